"""fssdp skips placing and fitting P1 when no fit can keep a replica (FullyShardedSparse.
_fit_keeps_none, ep's path under balanced routing): the bound must be sound (whenever it says
so, fit_holders returns P0 for any proposed P1, with and without hecate._C), the prefetch's
bound over the window's mean too, and the plans must be the ones made without the shortcut."""
import numpy as np
import pytest
import torch

from hecate.ops._backend import use_extension
from hecate.parallel.fssdp.materialize import fit_holders
from hecate.parallel.fssdp.planner import ReplicaFit
from hecate.sim.plans import FssdpReplay

KERNEL = [False, True] if use_extension("fit_replicas", torch.device("cpu")) else [False]


def _p0(owner_E, W):
    p0 = torch.zeros(W, owner_E.numel(), dtype=torch.bool)
    p0[owner_E, torch.arange(owner_E.numel())] = True
    return p0


def _case(rng):
    """A strategy (the replay's: the runtime's code, no process group), its layer state with
    random owners, prices, and counts around the break-even count."""
    W, E = int(rng.integers(2, 9)), int(rng.integers(2, 17))
    replay = FssdpReplay(W, int(rng.choice([1, 2])) if W % 2 == 0 else 1, E, 64, 1)
    state = replay.layers[0].fssdp_state
    state.owner_E = torch.from_numpy(rng.integers(0, W, E))
    fit = ReplicaFit(chunk_bytes=int(rng.integers(1, 5)) * 256, token_bytes=int(rng.integers(1, 5)) * 16,
                     chunk_passes=int(rng.choice([2, 3])), fixed_bytes=0.0)
    even = fit.chunk_passes * fit.chunk_bytes / (4 * fit.token_bytes)  # break-even tokens
    return replay.strategy, state, fit, W, E, even


def _counts(rng, W, E, even):
    hi = max(1, int(even * rng.choice([0.5, 1.0, 1.5, 3.0])))
    return rng.integers(0, hi + 1, (W, E)).astype(np.int64)


def _proposed(rng, W, E, owner_E):
    return torch.from_numpy(rng.random((W, E)) < 0.4) | _p0(owner_E, W)


@pytest.mark.parametrize("kernel", KERNEL)
def test_when_the_bound_says_no_replica_every_fit_returns_p0(kernel):
    rng = np.random.default_rng(11)
    fired = missed = 0
    for _ in range(300):
        s, state, fit, W, E, even = _case(rng)
        counts = _counts(rng, W, E, even)
        top, most = s._fit_bound(fit, counts, state)[:2]
        # fixed bytes on both sides of what the replicas could save at most
        fit = ReplicaFit(fit.chunk_bytes, fit.token_bytes, fit.chunk_passes,
                         fixed_bytes=float(rng.choice([0.0, most * 0.5, most * 1.5, most + 1.0])))
        got = fit_holders(_proposed(rng, W, E, state.owner_E), state.owner_E, torch.from_numpy(counts),
                          chunk_bytes=fit.chunk_bytes, token_bytes=fit.token_bytes, chunk_passes=fit.chunk_passes,
                          capacity_m=int(rng.integers(1, E + 1)), fixed_bytes=fit.fixed_bytes, use_kernel=kernel)
        if s._fit_keeps_none(fit, top, most, W * E):
            fired += 1
            assert torch.equal(got, _p0(state.owner_E, W))
        elif not torch.equal(got, _p0(state.owner_E, W)):
            missed += 1  # the bound is not tight: these cases must exist for the test to mean anything
    assert fired > 50 and missed > 50


@pytest.mark.parametrize("kernel", KERNEL)
def test_the_prefetch_bound_over_the_window_mean_is_sound(kernel):
    """The prefetch fits the window's mean (float64): its cells are at most the window's
    largest, and its saving at most the mean of the entries' bounds (convexity)."""
    rng = np.random.default_rng(12)
    fired = 0
    for _ in range(200):
        s, state, fit, W, E, even = _case(rng)
        window = [_counts(rng, W, E, even) for _ in range(int(rng.integers(1, 5)))]
        bounds = [s._fit_bound(fit, c, state)[:2] for c in window]
        top, mean_most = max(b[0] for b in bounds), sum(b[1] for b in bounds) / len(bounds)
        fit = ReplicaFit(fit.chunk_bytes, fit.token_bytes, fit.chunk_passes,
                         fixed_bytes=float(rng.choice([0.0, mean_most * 0.7, mean_most * 1.01 + 1.0])))
        predicted = torch.stack([torch.from_numpy(c).double() for c in window]).mean(0)
        got = fit_holders(_proposed(rng, W, E, state.owner_E), state.owner_E, predicted,
                          chunk_bytes=fit.chunk_bytes, token_bytes=fit.token_bytes, chunk_passes=fit.chunk_passes,
                          capacity_m=int(rng.integers(1, E + 1)), fixed_bytes=fit.fixed_bytes, use_kernel=kernel)
        if s._fit_keeps_none(fit, top, mean_most, W * E):
            fired += 1
            assert torch.equal(got, _p0(state.owner_E, W))
    assert fired > 30


def _replay_plans(monkeypatch, shortcut: bool):
    """Plans and prefetch plans of a 2-layer replay whose counts go above and below what pays
    for a replica (so the early P1 is skipped, then needed), with or without the shortcut."""
    from hecate.parallel.fssdp.strategy import FullyShardedSparse

    if not shortcut:
        monkeypatch.setattr(FullyShardedSparse, "_fit_keeps_none", staticmethod(lambda *a: False))
    W, E = 4, 8
    replay = FssdpReplay(W, 2, E, 64, 2, window=3, overlap_degree=3, prefetch=True, collective_latency_s=1e-6)
    for layer in replay.layers:
        layer.expert_chunks = torch.empty(0)  # _prefetch_plan reads the chunks' device
    s = replay.strategy
    rng = np.random.default_rng(3)
    prefetches, plans = [], []
    for step in range(12):
        hot = step % 4 in (2, 3)
        counts = [rng.integers(0, 40 if hot else 6, (W, E)).astype(np.int64) for _ in range(2)]
        s._token_bytes = 64
        staged = s._prefetch_plan(replay.layers[1], 64)
        prefetches.append(None if staged is None else (staged[0].tolist(), staged[1].send_ids.tolist(),
                                                       staged[1].recv_ids.tolist()))
        plans += [(lp.plan.digest(), lp.plan.holders_WE.tolist(), lp.replicated)
                  for lp in replay.step(counts, token_bytes=64)]
    monkeypatch.undo()
    return prefetches, plans, s.timings.get("early_p1", 0)


def test_plans_are_the_same_with_and_without_the_shortcut(monkeypatch):
    *fast, early_fast = _replay_plans(monkeypatch, True)
    *slow, early_slow = _replay_plans(monkeypatch, False)
    assert fast == slow
    prefetches, plans = fast
    assert any(p[-1] for p in plans) and not all(p[-1] for p in plans)  # with replicas, and without
    assert any(p is not None for p in prefetches) and None in prefetches[1:]  # prefetched, and not
    assert early_fast < early_slow  # the early P1 was skipped after steps without replicas


def test_state_digest_is_the_digest_of_owners_and_prediction():
    from hecate.parallel.fssdp.strategy import _digest_words

    replay = FssdpReplay(4, 2, 8, 64, 1)
    s, state = replay.strategy, replay.layers[0].fssdp_state
    state.predictor.update(torch.arange(8, dtype=torch.float64))
    assert s._state_digest(state).tolist() == list(_digest_words(state.owner_E, state.predictor.predict()))
    state.owner_E[0] = (int(state.owner_E[0]) + 1) % 4  # in place: the cached owners' hash follows
    assert s._state_digest(state).tolist() == list(_digest_words(state.owner_E, state.predictor.predict()))


def test_window_mean_is_the_stacked_mean_bit_for_bit():
    """The prefetch's predicted counts: rank_history's mean without stacking it."""
    from collections import deque

    from hecate.parallel.fssdp.strategy import _window_mean

    rng = np.random.default_rng(13)
    for _ in range(200):
        K, W, E = int(rng.integers(1, 12)), int(rng.integers(1, 40)), int(rng.integers(1, 70))
        top = 10 ** int(rng.integers(0, 12))
        history = deque(torch.from_numpy(rng.integers(0, top, (W, E)).astype(np.float64)) for _ in range(K))
        want = torch.stack(list(history)).mean(0)
        got = _window_mean(history)
        assert torch.equal(got, want) and got.dtype == want.dtype
        assert all(not np.shares_memory(got.numpy(), h.numpy()) for h in history)
