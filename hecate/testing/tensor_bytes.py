"""Exact bytes of the CPU tensors a block of code allocates (torch's profiler memory events).

The CPU allocator keeps no statistics, and a process's resident memory also moves with
malloc's arenas, Python objects and page granularity. With `profile_memory` the profiler
records every allocation and free of the CPU allocator (size, time); summing them in time
order gives the bytes the block allocated and still holds at each point:

    with TensorBytes() as tb:
        y = f(x)
    tb.peak  # most bytes allocated inside the block alive at once
    tb.net   # bytes allocated inside the block still alive at its end (what it kept)

Only allocations made inside the block are counted: a tensor allocated before it and freed
inside it is not subtracted (the profiler cannot size it). Only this thread's frees are seen:
a buffer whose last reference another thread drops (gloo's worker releasing a collective's
send buffer after the caller has let go of it, a race) counts as alive to the end. Both errors
only ever add bytes, so the smallest of a few repeats is the sharpest figure. Profiling slows
the block down: do not time it.
"""
from __future__ import annotations

import gc

import torch
from torch.profiler import ProfilerActivity, profile

MEMORY_EVENT = "[memory]"


class TensorBytes:
    def __init__(self) -> None:
        self.peak = 0
        self.net = 0
        self._prof = None

    def __enter__(self) -> "TensorBytes":
        # Collect earlier garbage now and keep the collector off inside the block: a cycle from
        # before it (a previous layer) freed inside would be subtracted from the block's bytes
        # (the profiler remembers sizes across sessions), a ~20 KB swing seen in one of 5 repeats.
        self._gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        if self._gc_was_enabled:
            gc.enable()
        if exc[0] is not None:
            return
        cpu = torch.device("cpu").type
        events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                        if e.name() == MEMORY_EVENT and e.device_type().name.lower() == cpu)
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        self.peak, self.net = peak, live
        self._prof = None
