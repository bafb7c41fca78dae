"""hecate.parallel.fssdp.clock: host clocks on the CPU, CUDA events read when complete on a
GPU (mocked here: the logic of reading one step later runs without a device)."""
from collections import deque
from types import SimpleNamespace

import pytest
import torch

from hecate.parallel.fssdp import clock
from hecate.parallel.fssdp.clock import DeviceTimings, Interval, timed
from hecate.parallel.fssdp.strategy import FullyShardedSparse


class FakeEvent:
    """torch.cuda.Event stand-in: completes when the test says the GPU got there."""
    reached = set()
    clock_ms = 0.0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self, stream=None):
        FakeEvent.clock_ms += 5.0  # the device's own clock advances 5 ms per recorded event
        self.t, self.stream = FakeEvent.clock_ms, stream

    def query(self):
        return id(self) in FakeEvent.reached

    def synchronize(self):
        FakeEvent.reached.add(id(self))

    def elapsed_time(self, end):
        return end.t - self.t


@pytest.fixture
def fake_cuda_events(monkeypatch):
    FakeEvent.reached, FakeEvent.clock_ms = set(), 0.0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    return FakeEvent


def test_cpu_interval_is_read_at_once_and_host_seconds_win():
    t = DeviceTimings()
    with timed(t, "x", torch.device("cpu")):
        pass
    with timed(t, "y", torch.device("cpu")) as interval:
        interval.host_seconds = 0.25  # e.g. what a wait() reported blocking
    assert t.pending == 0 and t["x"] >= 0.0 and t["y"] == 0.25


def test_gpu_interval_is_added_when_its_events_completed(fake_cuda_events):
    t = DeviceTimings({"exposed_reduce_s": 0.0})
    with timed(t, "exposed_reduce_s", torch.device("cuda")) as first:
        first.host_seconds = 9.0  # a host measure means nothing on a GPU: ignored
    assert t.pending == 1 and t["exposed_reduce_s"] == 0.0  # not done: never blocks
    fake_cuda_events.reached.add(id(first._stop))
    with timed(t, "exposed_reduce_s", torch.device("cuda")):
        pass
    assert t.pending == 1 and t["exposed_reduce_s"] == pytest.approx(0.005)
    t.collect(wait=True)  # e.g. at the end of a benchmark
    assert t.pending == 0 and t["exposed_reduce_s"] == pytest.approx(0.010)


def test_plain_dict_gets_the_value_at_once(fake_cuda_events):
    d = {}
    with timed(d, "blocking_gather_s", torch.device("cuda")):
        pass
    assert d["blocking_gather_s"] == pytest.approx(0.005)


def test_non_moe_time_is_read_one_step_later_on_a_gpu(fake_cuda_events):
    state = SimpleNamespace(gaps=deque(maxlen=4), non_moe_us=0)
    step1 = Interval(torch.device("cuda")).start().stop()
    state.gaps.append(step1)
    FullyShardedSparse._read_non_moe_time(state)
    assert state.non_moe_us == 0 and len(state.gaps) == 1  # the GPU is not there yet
    fake_cuda_events.reached.add(id(step1._stop))
    step2 = Interval(torch.device("cuda")).start().stop()
    state.gaps.append(step2)
    FullyShardedSparse._read_non_moe_time(state)  # next step: step 1's gap, not launch time
    assert state.non_moe_us == 5000 and list(state.gaps) == [step2]


def test_non_moe_time_on_cpu_is_this_forwards():
    state = SimpleNamespace(gaps=deque([Interval(torch.device("cpu")).start().stop()]), non_moe_us=-1)
    FullyShardedSparse._read_non_moe_time(state)
    assert state.non_moe_us >= 0 and not state.gaps


def test_interval_read_before_stop_is_an_error():
    with pytest.raises(RuntimeError, match="before stop"):
        Interval(torch.device("cpu")).start().seconds()
    assert clock.__all__ == ["Interval", "DeviceTimings", "timed"]


def test_gpu_interval_records_on_its_devices_stream(fake_cuda_events):
    # Not the current device's (Event.record()'s default): cuda:1's work is what is timed.
    interval = Interval(torch.device("cuda", 1)).start().stop()
    assert interval._start.stream == interval._stop.stream == ("stream of", torch.device("cuda", 1))
