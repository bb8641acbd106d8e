"""Peak memory of creating an ONNX Runtime session and running it once, in MB (``with PeakMemory()
as memory: ...``, then ``memory.mb``).

Method: the process's resident set (VmRSS) before the session is created, then the peak resident
set (VmHWM) after creating it and running the first feed; the peak is reset first by writing "5" to
/proc/self/clear_refs (Linux >= 4.0). Limits: it is process-wide (anything else the process
allocates meanwhile counts); memory freed earlier and reused by the allocator does not show as
growth; pages of a memory-mapped model count only once touched. When the reset is not allowed and
no new peak was set, it falls back to the growth of VmRSS, a lower bound. None off Linux.
"""

from __future__ import annotations


def _status_kb() -> dict[str, int] | None:
    try:
        with open("/proc/self/status") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values if len(values) == 2 else None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    def __enter__(self) -> PeakMemory:
        self.before = _status_kb()
        self.reset = self.before is not None and _reset_peak()
        self.mb: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        after = _status_kb()
        if self.before is None or after is None:
            return
        grown = after["VmRSS"] - self.before["VmRSS"]
        if self.reset or after["VmHWM"] > self.before["VmHWM"]:
            grown = max(grown, after["VmHWM"] - self.before["VmRSS"])
        self.mb = max(0, grown) / 1024
