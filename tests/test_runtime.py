import platform

import pytest

from fastdream.runtime import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_is_accepted_by_glibc_and_can_be_repeated():
    assert keep_freed_memory() is True
    assert keep_freed_memory(mmap_threshold=16 << 20, trim_threshold=1 << 30) is True
    assert keep_freed_memory() is True
