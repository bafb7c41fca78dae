"""Time measured where the work runs: host clocks on the CPU, CUDA events on a GPU.

On a GPU the host only queues kernels and collectives: a host clock around a forward
measures launch time (microseconds), and `work.wait()` of an NCCL collective returns at
once (it only makes the compute stream wait). Read that way, FSSDP's non-MoE time (the
overlap degree t of Algorithm 1) collapses to ~0 and the exposed-communication timings
to nothing. `Interval` records CUDA events on the current stream instead, and its value
is taken once the events have completed (`query()`, which never blocks): one step later,
typically. On the CPU (gloo) the host clock is the truth and is read at once.
"""
from __future__ import annotations

import contextlib
import time

import torch

__all__ = ["Interval", "DeviceTimings", "timed"]


class Interval:
    """One time interval on `device`'s current stream (host clock off CUDA)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.events = self.device.type == "cuda"
        self.host_seconds: float | None = None  # what the host measured, when it is the truth
        self._start = self._stop = None

    def _mark(self):
        # On the stream of `device`, not of the current device (Event.record()'s default):
        # a process that computes on cuda:1 while cuda:0 is current would time an idle GPU.
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self) -> "Interval":
        self._start = self._mark() if self.events else time.perf_counter()
        return self

    def stop(self) -> "Interval":
        self._stop = self._mark() if self.events else time.perf_counter()
        return self

    def done(self) -> bool:
        """Whether the value can be read without waiting."""
        if self._stop is None:
            return False
        return self._stop.query() if self.events else True

    def seconds(self, wait: bool = False) -> float | None:
        """The interval in seconds; None while a GPU has not reached its end (unless `wait`)."""
        if self._stop is None:
            raise RuntimeError("Interval.seconds() before stop()")
        if not self.events:
            return self.host_seconds if self.host_seconds is not None else self._stop - self._start
        if not wait and not self._stop.query():
            return None
        self._stop.synchronize()
        return self._start.elapsed_time(self._stop) / 1e3


class DeviceTimings(dict):
    """A dict of accumulated seconds whose GPU intervals are added once they completed.

    `add(key, interval)` adds at once what can be read without waiting (always, on the
    CPU) and keeps the rest for a later `add` or `collect`; `collect(wait=True)` (e.g.
    at the end of a benchmark) adds everything, waiting for the device if needed.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending: list[tuple[str, Interval]] = []

    def add(self, key: str, interval: Interval) -> None:
        self._pending.append((key, interval))
        self.collect()

    def collect(self, wait: bool = False) -> "DeviceTimings":
        left = []
        for key, interval in self._pending:
            value = interval.seconds(wait=wait)
            if value is None:
                left.append((key, interval))
            else:
                self[key] = self.get(key, 0.0) + value
        self._pending = left
        return self

    @property
    def pending(self) -> int:
        return len(self._pending)


@contextlib.contextmanager
def timed(timings: dict, key: str, device: torch.device):
    """Time the block into timings[key]; the block may set `.host_seconds` on the yielded
    Interval (e.g. the seconds a wait() reported blocking) to be used instead of the host
    clock on the CPU. A plain dict gets the value at once (waiting for a GPU if needed)."""
    interval = Interval(device).start()
    yield interval
    interval.stop()
    if isinstance(timings, DeviceTimings):
        timings.add(key, interval)
    else:
        timings[key] = timings.get(key, 0.0) + interval.seconds(wait=True)
