"""The build process's own peak memory per phase, as the kernel counts it (`VmHWM` in /proc/self/status),
for benchmarks/bench_scale.py.

Off unless MMPR_PEAK_MEMORY_LOG names a file. Then `phase_end(name)` appends one JSON line to it,
{"phase", "peak_mib", "rss_mib", "seconds"}, and resets the kernel's high-water mark (writing 5 to
/proc/self/clear_refs), so each line is the peak of that phase alone and the largest line the peak
of the whole build. A kernel without that reset leaves each line the peak so far (`"reset": false`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "MMPR_PEAK_MEMORY_LOG"
_since = time.monotonic()


def status_kib(pid: int | str = "self") -> dict[str, int]:
    """VmHWM, VmRSS (and the other Vm* figures) of /proc/PID/status, in KiB; {} where unreadable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {
        key: int(value.split()[0])
        for key, _, value in (line.partition(":") for line in text.splitlines())
        if key.startswith("Vm") and value.strip().endswith("kB")
    }


def phase_end(name: str) -> None:
    """Log the peak memory of the phase that ends here (a no-op unless MMPR_PEAK_MEMORY_LOG is set)."""
    global _since
    path = os.environ.get(ENV)
    if not path:
        return
    vm = status_kib()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the next phase's peak starts from its RSS
        reset = True
    except OSError:
        reset = False
    now = time.monotonic()
    line = dict(
        phase=name,
        peak_mib=round(vm.get("VmHWM", 0) / 1024, 1),
        rss_mib=round(vm.get("VmRSS", 0) / 1024, 1),
        seconds=round(now - _since, 2),
        reset=reset,
    )
    _since = now
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
