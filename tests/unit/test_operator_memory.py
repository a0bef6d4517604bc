"""The operator gives large freed buffers back to the system (``cli.fixed_mmap_threshold``).

Each case runs in a fresh interpreter: glibc's threshold is process state. 200 buffers of 256 KiB (an
SSL connection's read buffer) are allocated between long-lived 100 kB blocks and then freed, after one
1 MiB block was freed first (which, left to glibc, raises the threshold so that the buffers come from
the heap, where the long-lived blocks pin them)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import sys
if sys.argv[1] == "fixed":
    from modeldeploy.cli import fixed_mmap_threshold
    assert fixed_mmap_threshold()
else:
    import modeldeploy.cli  # the same imports in both cases

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

b = bytearray(1 << 20)
del b
keep, bufs = [], []
for _ in range(200):
    bufs.append(bytearray(256 * 1024))
    keep.append(bytearray(100_000))  # below the threshold either way: from the heap
before = rss()
del bufs
print(before - rss())
"""


def returned_mib(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_large_buffers_are_returned_with_the_fixed_threshold() -> None:
    assert returned_mib("dynamic") < 10  # glibc's own behaviour: 50 MiB freed, kept
    assert returned_mib("fixed") >= 40  # all but page rounding given back


def test_an_explicit_environment_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from modeldeploy.cli import fixed_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fixed_mmap_threshold() is False
