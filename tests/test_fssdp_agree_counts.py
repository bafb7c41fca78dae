"""fssdp reads the all-gathered counts message [counts | non-MoE us | state digest] per rank with
one C++ op (csrc/cpu/agree_counts.cpp) where hecate._C is built, with numpy elsewhere: both
must give the same counts, agreed non-MoE time, digest check (the same AgreementError), fit
bound (bit for bit: both sum in numpy's pairwise order, materialize.fit_bound) and the fit's
no-replica decision (materialize.fit_keeps_none, the rule of csrc/cpu/fit_rule.h), so that
ranks with and without the extension plan alike."""
from fractions import Fraction

import numpy as np
import pytest
import torch

import hecate._extension as extension
from hecate.comm.agreement import AgreementError
from hecate.ops._backend import use_extension
from hecate.parallel.fssdp import strategy as strategy_mod
from hecate.parallel.fssdp.materialize import fit_bound, fit_keeps_none
from hecate.parallel.fssdp.planner import ReplicaFit
from hecate.parallel.fssdp.strategy import _DIGEST_WORDS, FullyShardedSparse
from hecate.sim.plans import FssdpReplay

needs_ext = pytest.mark.skipif(not use_extension("agree_counts", torch.device("cpu")),
                               reason="hecate._C is not built")


def _case(rng):
    """A strategy (the runtime's code on a layout-only topology), random owners, prices and a
    gathered table whose counts are small, around the break-even, or near 2^53 / 4 (where the
    bound's sum rounds)."""
    W, E = int(rng.choice([1, 2, 3, 5, 8, 16])), int(rng.choice([1, 2, 7, 16, 64]))
    replay = FssdpReplay(W, 1, E, 64, 1)
    s, layer = replay.strategy, replay.layers[0]
    layer.fssdp_state.owner_E = torch.from_numpy(rng.integers(0, W, E))
    fit = ReplicaFit(chunk_bytes=int(rng.integers(0, 5)) * 256, token_bytes=int(rng.integers(0, 5)) * 16,
                     chunk_passes=int(rng.choice([2, 3])), fixed_bytes=float(rng.choice([0.0, 1e4])))
    kind = rng.integers(0, 4)
    hi = [3, 100, 100_000, 2**50][kind]
    table = np.empty((W, E + 1 + _DIGEST_WORDS), dtype=np.int64)
    table[:, :E] = rng.integers(0, hi + 1, (W, E))
    table[:, E] = rng.integers(0, 10**6, W)
    table[:, E + 1:] = rng.integers(-2**63, 2**63 - 1, _DIGEST_WORDS, dtype=np.int64)
    return s, layer, fit, table


def _numpy_reading(s, layer, fit, table):
    """What the numpy path reads: counts, agreed time, first bad rank, (top, most saved, none)."""
    E = layer.expert_layout.num_experts
    digests = table[:, E + 1:]
    differs = (digests != digests[0]).any(1)
    bad = int(np.flatnonzero(differs)[0]) if differs.any() else -1
    counts = table[:, :E].copy()
    cost = fit.chunk_passes * fit.chunk_bytes
    top, saved = fit_bound(counts, layer.fssdp_state.owner_E, token_bytes=fit.token_bytes, cost=cost,
                           use_kernel=False)
    none = fit_keeps_none(top, saved, counts.size, token_bytes=fit.token_bytes, cost=cost,
                          fixed_bytes=fit.fixed_bytes, use_kernel=False)
    return counts, int(table[:, E].max()), bad, (top, saved, none)


@needs_ext
def test_the_op_reads_the_table_as_numpy_does():
    rng = np.random.default_rng(0)
    exact = nones = mismatched = 0
    for _ in range(400):
        s, layer, fit, table = _case(rng)
        W, E = table.shape[0], layer.expert_layout.num_experts
        if W > 1 and rng.random() < 0.3:  # some rank's digest differs from rank 0's
            table[rng.integers(1, W), E + 1 + rng.integers(0, _DIGEST_WORDS)] ^= 1 << int(rng.integers(0, 63))
        flat = torch.from_numpy(table.reshape(-1).copy())
        counts, non_moe, bad, top, saving, none = torch.ops.hecate.agree_counts(
            flat, W, E, layer.fssdp_state.owner_E, fit.token_bytes, fit.chunk_passes * fit.chunk_bytes,
            fit.fixed_bytes)
        want_counts, want_non_moe, want_bad, (want_top, want_saving, want_none) = _numpy_reading(s, layer, fit, table)
        assert np.array_equal(counts.numpy(), want_counts) and counts.data_ptr() != flat.data_ptr()
        assert non_moe == want_non_moe and bad == want_bad and top == want_top
        assert saving == want_saving and isinstance(saving, float)  # the same double, bit for bit
        assert np.float64(saving).tobytes() == np.float64(want_saving).tobytes()
        assert none == want_none
        mismatched += bad >= 0
        nones += none
        cost, tb = fit.chunk_passes * fit.chunk_bytes, fit.token_bytes
        if int(want_counts.max()) * 4 * tb < 2**53 // max(1, want_counts.size):
            # every term and partial sum is an integer below 2^53: the sum is the exact one
            exact += 1
            owned = layer.fssdp_state.owner_E.numpy()[None, :] == np.arange(W)[:, None]
            true = sum((max(Fraction(int(c) * 4 * tb - cost), Fraction(0))
                        for c, o in zip(want_counts.reshape(-1), owned.reshape(-1)) if not o), Fraction(0))
            assert Fraction(saving) == true
    assert exact > 200 and 400 - exact > 20 and mismatched > 40 and 20 < nones < 380


def _agree(s, layer, table, fit, monkeypatch):
    """FullyShardedSparse._agree_on_counts on this rank (0) with the all-gather replaced: the
    other ranks' rows are `table`'s, rank 0's the message the method assembles."""
    W, M = table.shape
    E = layer.expert_layout.num_experts

    class Done:
        def wait(self):
            pass

    def gather(out, mine, group=None, async_op=False):
        out.view(W, M).copy_(torch.from_numpy(table))
        out.view(W, M)[0] = mine
        return Done()

    monkeypatch.setattr(strategy_mod, "all_gather_flat", gather)
    s._token_comm = (torch.device("cpu"), list(range(W)))
    state = layer.fssdp_state
    state.non_moe_us = int(table[0, E])
    counts_E = torch.from_numpy(table[0, :E].copy())
    try:
        counts, non_moe, early, bound = FullyShardedSparse._agree_on_counts(s, layer, counts_E, lambda: "x", fit)
    except AgreementError as err:
        return ("error", str(err), err.name, err.minority_ranks, err.majority_ranks)
    assert early == "x"
    return counts.numpy().copy(), non_moe, None if bound is None else (bound[0], bound[1], bound[2] is
                                                                       state.owner_cache, bound[3] is fit,
                                                                       bound[4])


@needs_ext
def test_agreement_is_the_same_with_and_without_the_extension(monkeypatch):
    """The whole _agree_on_counts: counts, agreed time, the bound and decision plan() reads (the
    op's, or numpy's twin without hecate._C) and the error naming the disagreeing ranks."""
    rng = np.random.default_rng(1)
    outcomes = set()
    for _ in range(120):
        s, layer, fit, table = _case(rng)
        W, E = table.shape[0], layer.expert_layout.num_experts
        table[:, E + 1:] = s._state_digest(layer.fssdp_state)  # everyone agrees ...
        if W > 2 and rng.random() < 0.3:  # ... but for some ranks
            for d in rng.choice(np.arange(1, W), int(rng.integers(1, W - 1)), replace=False):
                table[d, E + 1] += 1
        use_fit = fit if rng.random() < 0.8 else None
        with_ext = _agree(s, layer, table, use_fit, monkeypatch)
        monkeypatch.setattr(extension, "_loaded", False)
        assert not use_extension("agree_counts", torch.device("cpu"))
        without = _agree(s, layer, table, use_fit, monkeypatch)
        monkeypatch.setattr(extension, "_loaded", True)
        assert len(with_ext) == len(without)
        for a, b in zip(with_ext, without):
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
        outcomes.add("error" if isinstance(with_ext[0], str) else ("bound" if with_ext[2] else "no fit"))
    assert outcomes == {"error", "bound", "no fit"}


def test_a_disagreeing_rank_is_named(monkeypatch):
    """With or without the extension: the ranks whose digest differs from rank 0's, and the rest."""
    replay = FssdpReplay(4, 2, 8, 64, 1)
    s, layer = replay.strategy, replay.layers[0]
    table = np.zeros((4, 8 + 1 + _DIGEST_WORDS), dtype=np.int64)
    table[:, 9:] = s._state_digest(layer.fssdp_state)
    table[2, -1] += 1
    for loaded in ([True] if extension.load() else []) + [False]:
        monkeypatch.setattr(extension, "_loaded", loaded)
        kind, message, name, bad, good = _agree(s, layer, table, None, monkeypatch)
        assert (kind, name, bad, good) == ("error", "fssdp.layer0", [2], [0, 1, 3])
        assert "ranks [2] hold a different placement/load state than ranks [0, 1, 3]" in message


@needs_ext
def test_the_op_rejects_a_table_of_the_wrong_shape():
    with pytest.raises(ValueError, match="W x M values"):
        torch.ops.hecate.agree_counts(torch.zeros(7, dtype=torch.int64), 2, 2, None, 0, 0, 0.0)
    with pytest.raises(ValueError, match="fewer than the 4 counts"):
        torch.ops.hecate.agree_counts(torch.zeros(8, dtype=torch.int64), 2, 4, None, 0, 0, 0.0)
    with pytest.raises(ValueError, match="owner_E must be a 1-D CPU int64 tensor of 3 experts"):
        torch.ops.hecate.agree_counts(torch.zeros(16, dtype=torch.int64), 2, 3, torch.zeros(2, dtype=torch.int64),
                                      1, 1, 0.0)
    with pytest.raises(ValueError, match=r"owner_E entries must be ranks in \[0, 2\), found 2 at expert 1"):
        torch.ops.hecate.agree_counts(torch.zeros(16, dtype=torch.int64), 2, 3, torch.tensor([0, 2, 1]),
                                      1, 1, 0.0)
