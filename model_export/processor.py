"""The processor's model name, for the records that say what a figure was
measured or a model trained on (the trainer's platform, the benchmarks'
machine). Imports nothing heavy: the server's benchmarks read it on machines
without torch."""

from __future__ import annotations

import platform


def processor_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo; platform's elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"
