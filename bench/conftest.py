import os
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "2")
warnings.filterwarnings("ignore", module="gymnasium")

from fastdream.fast.runtime import keep_freed_memory  # noqa: E402  (after the thread setting, as the CLI does)

keep_freed_memory()
