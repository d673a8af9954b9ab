"""Resident memory of a process, and the peak of one decode, measured from outside.

Linux only (/proc). ``ru_maxrss`` is no use in a child: Linux carries the
parent's peak across exec, so the peak here is ``VmHWM`` of the child itself.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _status(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def vm_hwm(pid: int | str = "self") -> int:
    """The process's peak resident memory so far, in bytes."""
    return _status(pid, "VmHWM")


def vm_rss(pid: int | str = "self") -> int:
    """The process's resident memory now, in bytes."""
    return _status(pid, "VmRSS")


_PROBE = r"""
import sys, time
from service.preprocessing import plan_prepare, prepare
from tests.helpers.memory import vm_hwm

data = sys.stdin.buffer.read()
try:
    planned = plan_prepare(data).peak_bytes
except Exception:
    planned = 0  # refused from the header
before = vm_hwm()
t0 = time.perf_counter()
try:
    prepare(data)
    outcome = "accepted"
except Exception as exc:
    outcome = getattr(getattr(exc, "reason", None), "value", type(exc).__name__)
print(outcome, vm_hwm() - before, before, round(time.perf_counter() - t0, 3), planned)
"""


@dataclass(frozen=True)
class DecodePeak:
    outcome: str  # "accepted", a refusal reason, or "exit N" where the process died
    peak_bytes: int  # peak resident memory during prepare(), over the peak before it
    base_bytes: int  # the process's peak before the call (Python, numpy, OpenCV loaded)
    seconds: float
    planned_bytes: int  # plan_prepare's reservation; 0 where the header is refused


def decode_peak(data: bytes, timeout: float = 600) -> DecodePeak:
    """``prepare(data)`` in a fresh Python process, and what it cost."""
    r = subprocess.run(
        [sys.executable, "-c", _PROBE],
        input=data,
        capture_output=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    if r.returncode != 0:
        return DecodePeak(f"exit {r.returncode}", 0, 0, 0.0, 0)
    outcome, peak, base, seconds, planned = r.stdout.decode().split()
    return DecodePeak(outcome, int(peak), int(base), float(seconds), int(planned))
