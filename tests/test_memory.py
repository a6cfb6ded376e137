import platform

import pytest

from softprompt_cli.memory import release_free_memory


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_memory_goes_back_to_the_system():
    blocks = [bytearray(64 * 1024) for _ in range(3000)]  # ~190 MB of heap blocks (below the mmap threshold)
    last = blocks[-1]  # holds the top of the heap, so that free() alone cannot shrink it
    before = resident_mb()
    del blocks
    assert resident_mb() > before - 50  # freed, but still resident
    release_free_memory()
    assert resident_mb() < before - 150
    assert len(last) == 64 * 1024
