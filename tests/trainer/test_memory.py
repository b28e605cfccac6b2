"""keep_freed_memory: a large array freed and allocated again costs no new page faults."""

import platform
import subprocess
import sys

import pytest

# Run apart: the setting is process-wide and cannot be undone, so the test process keeps its allocator.
PROBE = """
import resource, sys
import numpy as np
from trainer.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(64 << 20, dtype=np.uint8)  # allocated, touched and freed
before = faults()
np.ones(64 << 20, dtype=np.uint8)
print(kept, faults() - before)
"""


def _probe(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")
def test_freed_memory_is_reused_without_faulting_it_in_again():
    kept, faults = _probe("keep")
    _, default_faults = _probe("default")
    assert kept
    # The default allocator maps the 64 MiB afresh: ~550 faults here (a few pages each), ~32 where the
    # kernel backs it with 2 MiB huge pages. The kept heap hands back memory already mapped: 0 here.
    assert default_faults >= 16
    assert faults <= default_faults // 16


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")
def test_calling_it_twice_is_harmless():
    code = "from trainer.memory import keep_freed_memory as keep; print(keep(), keep())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
