import platform

import pytest

from fastdream.fast.runtime import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_is_accepted_by_glibc_and_can_be_repeated():
    assert keep_freed_memory() is True
    assert keep_freed_memory(mmap_threshold=16 << 20, trim_threshold=1 << 30, mmap=True) is True
    assert keep_freed_memory() is True


_DREAM_FAULTS = """
import resource, sys
from fastdream.fast.runtime import keep_freed_memory
assert keep_freed_memory(mmap=sys.argv[1] == "mmap")
from fastdream.benchmarks import dream_case
dream = dream_case("xs", 16384, horizon=4, engines=("kernels",), precisions=("fp32",)).variant("kernels_fp32").fn
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    dream()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_dream_reuses_its_freed_blocks_above_the_mmap_cap():
    """An N=16384 xs fp32 dream (kernels engine, H=4) allocates many blocks above glibc's 32 MiB cap on the mmap
    threshold: as fresh mappings they faulted their pages in (zeroed) at every dream; kept on the heap, the third
    dream of a fresh process reuses them. fp32, not bf16: a CPU without native bf16 (AMD Zen 3) runs bf16 matmuls
    ~150x slower than fp32, minutes for these dreams."""
    import subprocess
    import sys

    def third_dream_faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _DREAM_FAULTS, mode], check=True, capture_output=True, text=True)
        return int(run.stdout.split()[-1])

    mapped = third_dream_faults("mmap")
    assert mapped > 50_000  # > 200 MB of pages faulted in per dream (94k-124k measured here)
    assert third_dream_faults("heap") < mapped // 10
