import os
import sys
import warnings

# Keep tests quiet and deterministic on the 2-core CI box.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", module="gymnasium")
sys.path.insert(0, os.path.dirname(__file__))
