"""Token routes: which replica serves which source rank's tokens of each expert.

Given the materialization placement P1 (holders_WE) and every rank's token
counts per expert, each (source rank, expert) pair sends its tokens to
  1. the source itself, if it holds the expert (no traffic);
  2. else the holders on the source's node (fast links);
  3. else every holder (cross node).
Tokens are split evenly over the chosen replicas with integer splits that sum
exactly; the remainder tokens go to replicas in an order rotated by
(source + expert), so that many small remainders do not all land on the
lowest rank. The result is a pure function of its inputs (no randomness, no
floating point), so every rank computes the same routes.

Representation (`TokenRoutes`): routes are never stored as a dense
[W_src, E, W_dst] array (268M cells at W=1024, E=256). The holders of each expert
are two lists of ranks ("members"): grouped by (expert, node) for rule 2 and by
expert for rule 3, O(E + replicas) entries. Each routed (source, expert) pair is
then one record: its group (start and length n in the member list), the even
share q, the r remainder tokens and their rotation offset; the share of the
member at position p is q + [(p - offset) mod n < r]. Building it costs O(W*E)
(one pass over the counts); one rank's send / receive layout, every rank's
served tokens and off-rank bytes cost O(W*E + replicas) and no more. Changes
made after the rule (`balance_routes`) are a short list of signed moves
(src, expert, dst, tokens) added on top.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hecate.ops._backend import use_extension
from hecate.parallel.fssdp._checks import check_nonnegative, node_array, sparse_nonzero, to_numpy

_SELF, _NODE, _ALL = 0, 1, 2


def _int_sum(index: np.ndarray, weights: np.ndarray, length: int) -> np.ndarray:
    """Exact integer bincount with weights (values stay far below 2**53, so float64 sums are exact)."""
    if index.size == 0:
        return np.zeros(length, dtype=np.int64)
    return np.bincount(index, weights=weights, minlength=length).astype(np.int64)


@dataclass(frozen=True)
class RankLayout:
    """One rank's side of the token exchange (all int64 numpy):

    send_e / send_dst / send_tokens: what it sends (itself included), sorted by (expert,
    destination): the order in which its routed entries of each expert fill the shares.
    recv_WE [W_src, E]: what it receives per source and expert (itself included).
    send_splits / recv_splits: tokens per peer of the dispatch all-to-all.
    """

    rank: int
    send_e: np.ndarray
    send_dst: np.ndarray
    send_tokens: np.ndarray
    recv_WE: np.ndarray
    send_splits: list
    recv_splits: list
    # The sends as CPU int64 tensors when the C++ op made this layout (what the bins op reads).
    sends: tuple | None = field(default=None, repr=False, compare=False)

    def send_WE(self) -> np.ndarray:
        """Dense int64 [W_dst, E] view of the sends."""
        out = np.zeros_like(self.recv_WE)
        np.add.at(out, (self.send_dst, self.send_e), self.send_tokens)
        return out

    def destination_bins(self, indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
        """bin = dst * E + e of each routed entry of this rank (-1 for dropped ones, index < 0),
        as a CPU int64 tensor shaped like indices_TK: the entries of expert e, in token order,
        fill its sends' shares in destination order. One pass in C++ (csrc/cpu/routes.cpp;
        strategy._host_bins is the numpy twin); raises RuntimeError when the indices disagree
        with the plan's counts."""
        sends = self.sends if self.sends is not None else tuple(
            torch.from_numpy(a) for a in (self.send_e, self.send_dst, self.send_tokens))
        return torch.ops.hecate.destination_bins(indices_TK.detach().cpu(), *sends, int(num_experts),
                                                 int(self.rank))


class HoldersShape:
    """`world_size` and `num_experts` read off `holders_WE` [W, E] (a numpy array in
    TokenRoutes, a tensor in Plan)."""

    __slots__ = ()

    @property
    def world_size(self) -> int:
        return self.holders_WE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.holders_WE.shape[1]


class TokenRoutes(HoldersShape):
    """Sparse token routes of one layer's iteration (see the module docstring).

    Attributes (numpy, read-only by convention): holders_WE bool [W, E], counts_WE int64
    [W, E], node_of_W int64 [W]; `moves` int64 [K, 4] rows (src, expert, dst, tokens)
    added on top of the rule (sorted, merged, no zero rows).

    Construction only indexes the holders (O(W*E) scans, O(H log H) sorts for H = E +
    replicas holders). One rank's layout (`layout`, `send_WE`, `recv_WE`) then costs
    O(E + replicas + W * experts it holds); the whole world's per-pair records, which
    `rank_loads`, `dense` and balancing need, are built on first use in O(W*E).
    """

    __slots__ = ("holders_WE", "counts_WE", "node_of_W", "moves", "_N", "_H", "_all_cnt",
                 "_all_ptr", "_all_key", "_node_cnt", "_node_ptr", "_node_key", "_members",
                 "_member_start", "_pairs", "_loads", "_tensors", "_ready")

    def __init__(self, holders_WE: np.ndarray, counts_WE: np.ndarray, node_of_W: np.ndarray,
                 moves: np.ndarray | None = None, rank: int | None = None):
        self.holders_WE, self.counts_WE, self.node_of_W = holders_WE, counts_WE, node_of_W
        self.moves = _canonical_moves(moves)
        self._pairs = None
        self._loads = None
        self._members = None
        self._tensors = None
        self._ready = None
        if (not len(self.moves) and holders_WE.dtype == np.bool_ and counts_WE.dtype == np.int64
                and node_of_W.dtype == np.int64 and use_extension("route_layout", torch.device("cpu"))):
            # The C++ op indexes and checks the holders now and makes a rank's layout in one
            # call (csrc/cpu/routes.cpp): with `rank`, that rank's layout in the same call (the
            # first `layout(rank)` returns it). The numpy index below is built only for what
            # needs every rank (loads, balancing, dense views).
            self._tensors = tuple(torch.from_numpy(a) for a in (holders_WE, counts_WE, node_of_W))
            if rank is None:
                self._H = torch.ops.hecate.route_layout(*self._tensors, -1, True)[0]
            else:
                _check_rank(rank, holders_WE.shape[0])
                self._ready = self._op_layout(int(rank), check_counts=True)
        else:
            self._index_holders()

    @classmethod
    def from_layout(cls, holders_WE: torch.Tensor, counts_WE: torch.Tensor, node_of_W: torch.Tensor,
                    num_holders: int, layout: RankLayout) -> "TokenRoutes":
        """The routes whose rank layout `layout` the caller already made with the C++ op
        (planner.plan_layer: route_layout's code on checked inputs), without indexing the
        holders again. The tensors are CPU ones the routes keep (bool, int64, int64)."""
        routes = cls.__new__(cls)
        routes.holders_WE, routes.counts_WE = holders_WE.numpy(), counts_WE.numpy()
        routes.node_of_W = node_of_W.numpy()
        routes.moves = _NO_MOVES
        routes._pairs = routes._loads = routes._members = None
        routes._tensors = (holders_WE, counts_WE, node_of_W)
        routes._H = int(num_holders)
        routes._ready = layout  # the first layout(layout.rank) returns it
        return routes

    @property
    def num_holders(self) -> int:
        """Holders in P1 (owners plus replicas), counted when the holders were indexed."""
        return self._H

    # ---- construction: O(W*E) scans, O(H log H) sorts ----------------------------------------
    def _indexed(self) -> "TokenRoutes":
        if self._members is None:
            self._index_holders()
        return self

    def _index_holders(self) -> None:
        holders, counts, nodes = self.holders_WE, self.counts_WE, self.node_of_W
        W, E = holders.shape
        N = int(nodes.max()) + 1
        hd, he = sparse_nonzero(holders)  # P1 is sparse: owners plus a few replicas
        all_key = he * W + hd
        order = np.argsort(all_key)  # holders sorted by (expert, rank)
        he, hd, all_key = he[order], hd[order], all_key[order]
        H = he.size
        node_key = (he * N + nodes[hd]) * W + hd
        by_node = np.argsort(node_key)  # (expert, node, rank)
        node_cnt = np.bincount(he * N + nodes[hd], minlength=E * N)
        all_cnt = np.bincount(he, minlength=E)
        self._N, self._H = N, H
        self._all_cnt, self._all_ptr, self._all_key = all_cnt, _ptr(all_cnt), all_key
        self._node_cnt, self._node_ptr, self._node_key = node_cnt, _ptr(node_cnt), node_key[by_node]
        # members[0:H]: rule-2 groups (expert, node); members[H:2H]: rule-3 groups (expert).
        self._members = np.concatenate((hd[by_node], hd))
        self._member_start = np.concatenate((self._node_ptr[(he * N + nodes[hd])[by_node]],
                                             H + self._all_ptr[he]))
        unheld = np.flatnonzero(all_cnt == 0)  # none when P1 contains P0, as the policies ensure
        orphan = unheld[counts[:, unheld].sum(axis=0) > 0] if unheld.size else unheld
        if orphan.size:
            e = int(orphan[0])
            src = int(np.argmax(counts[:, e] > 0))
            raise ValueError(
                f"holders_WE has no holder of expert {e} but rank {src} routes "
                f"{int(counts[src, e])} tokens to it; every expert needs at least its owner "
                "in holders_WE")

    def _groups(self, src: np.ndarray, e: np.ndarray):
        """(start in members, n) of the group that serves each (src, expert) pair the source
        does not hold: its node's holders if any, else every holder."""
        self._indexed()
        key = e * self._N + self.node_of_W[src]
        n_node = self._node_cnt[key]
        node_rule = n_node > 0
        n = np.where(node_rule, n_node, self._all_cnt[e])
        start = np.where(node_rule, self._node_ptr[key], self._H + self._all_ptr[e])
        return start, n

    @staticmethod
    def _split(c, n, src, e):
        """Even share q, remainder r and its rotation offset of c tokens over n replicas."""
        q, r, off = c.copy(), np.zeros_like(c), np.zeros_like(c)
        many = n > 1  # a single candidate takes everything: skip the divisions for those
        if many.any():
            nm = n[many]
            q[many], r[many] = np.divmod(c[many], nm)
            off[many] = (src[many] + e[many]) % nm
        return q, r, off

    def _pair_arrays(self):
        """Every routed (source, expert) pair's record, source-major; built on first use."""
        if self._pairs is None:
            src, e = np.nonzero((self.counts_WE > 0) & ~self.holders_WE)
            start, n = self._groups(src, e)
            q, r, off = self._split(self.counts_WE[src, e], n, src, e)
            self._pairs = (src, e, start, n, q, r, off)
        return self._pairs

    # ---- per-rank layouts: O(E + replicas + W * held experts) ---------------------------------
    def _send_entries(self, rank: int):
        """(expert, dst, tokens) this rank sends under the rule (no moves), unsorted."""
        self._indexed()
        row, keep = self.counts_WE[rank], self.holders_WE[rank]
        local = np.flatnonzero(keep & (row > 0))
        es = np.flatnonzero(~keep & (row > 0))
        if es.size == 0:
            return local, np.full(local.size, rank, dtype=np.int64), row[local]
        src = np.full(es.size, rank, dtype=np.int64)
        start, n = self._groups(src, es)
        q, r, off = self._split(row[es], n, src, es)
        rep = np.repeat(np.arange(es.size), n)
        pos = np.arange(rep.size) - np.repeat(np.cumsum(n) - n, n)
        dst = self._members[start[rep] + pos]
        tok = q[rep] + (((pos - off[rep]) % n[rep]) < r[rep])
        return (np.concatenate((local, es[rep])), np.concatenate((np.full(local.size, rank), dst)),
                np.concatenate((row[local], tok)))

    def layout(self, rank: int) -> RankLayout:
        """This rank's sends (sparse, sorted by expert then destination) and receives."""
        W = self.world_size
        if self._ready is not None and self._ready.rank == rank:  # made with the routes: once
            ready, self._ready = self._ready, None
            return ready
        if self._tensors is not None:  # one C++ call (no moves: those are only made by balancing)
            return self._op_layout(int(rank))
        e, dst, tok = self._send_entries(rank)
        if len(self.moves):
            mv = self.moves[self.moves[:, 0] == rank]
            e, dst, tok = (np.concatenate((e, mv[:, 1])), np.concatenate((dst, mv[:, 2])),
                           np.concatenate((tok, mv[:, 3])))
            key, inv = np.unique(e * W + dst, return_inverse=True)
            tok = np.bincount(inv.reshape(-1), weights=tok, minlength=key.size).astype(np.int64)
            e, dst = key // W, key % W
        else:
            order = np.argsort(e * W + dst)
            e, dst, tok = e[order], dst[order], tok[order]
        recv = np.zeros(self.holders_WE.shape, dtype=np.int64)
        held = np.flatnonzero(self.holders_WE[rank])
        cols = self._recv_base(rank, held) if held.size else np.zeros((W, 0), dtype=np.int64)
        recv[:, held] = cols
        recv_splits = cols.sum(axis=1)  # W x held experts, not a pass over [W, E]
        if len(self.moves):
            mv = self.moves[self.moves[:, 2] == rank]
            np.add.at(recv, (mv[:, 0], mv[:, 1]), mv[:, 3])
            recv_splits += _int_sum(mv[:, 0], mv[:, 3], W)
        return RankLayout(rank, e, dst, tok, recv, _int_sum(dst, tok, W).tolist(), recv_splits.tolist())

    def _op_layout(self, rank: int, check_counts: bool = False) -> RankLayout:
        H, e, dst, tok, recv, send_splits, recv_splits = torch.ops.hecate.route_layout(
            *self._tensors, rank, check_counts)
        self._H = H
        return RankLayout(rank, e.numpy(), dst.numpy(), tok.numpy(), recv.numpy(),
                          send_splits.tolist(), recv_splits.tolist(), sends=(e, dst, tok))

    def send_WE(self, rank: int) -> np.ndarray:
        """int64 [W_dst, E]: tokens of each expert `rank` sends to each rank (itself included)."""
        out = np.zeros(self.holders_WE.shape, dtype=np.int64)
        e, dst, tok = self._send_entries(rank)
        out[dst, e] = tok  # (dst, expert) pairs are distinct
        if len(self.moves):
            mv = self.moves[self.moves[:, 0] == rank]
            np.add.at(out, (mv[:, 2], mv[:, 1]), mv[:, 3])
        return out

    def recv_WE(self, rank: int) -> np.ndarray:
        """int64 [W_src, E]: tokens of each expert `rank` receives from each rank (itself included)."""
        out = np.zeros(self.holders_WE.shape, dtype=np.int64)
        held = np.flatnonzero(self.holders_WE[rank])
        if held.size:
            out[:, held] = self._recv_base(rank, held)
        if len(self.moves):
            mv = self.moves[self.moves[:, 2] == rank]
            np.add.at(out, (mv[:, 0], mv[:, 1]), mv[:, 3])
        return out

    def _recv_base(self, rank: int, experts: np.ndarray) -> np.ndarray:
        """[W_src, len(experts)] tokens the rule sends to `rank` for experts it holds (no moves)."""
        self._indexed()
        W, N, nodes = self.world_size, self._N, self.node_of_W
        counts = self.counts_WE[:, experts]
        held = self.holders_WE[:, experts]
        me = nodes[rank]
        # rank's place in its node's group and in the all-holders group of each expert.
        node_group = experts * N + me
        n_node = self._node_cnt[node_group]
        pos_node = np.searchsorted(self._node_key, node_group * W + rank) - self._node_ptr[node_group]
        n_all = self._all_cnt[experts]
        pos_all = np.searchsorted(self._all_key, experts * W + rank) - self._all_ptr[experts]
        # Sources whose tokens can reach `rank`: not holding e, and either on its node (rule
        # 2) or on a node without any holder of e (rule 3).
        src_node_has = self._node_cnt.reshape(-1, N)[experts][:, nodes].T > 0  # [W, len(experts)]
        by_node = (nodes == me)[:, None] & ~held
        by_all = ~src_node_has
        reach = by_node | by_all
        n = np.where(by_node, n_node, n_all)
        pos = np.where(by_node, pos_node, pos_all)
        src = np.arange(W)[:, None]
        q, r = np.divmod(counts, n)
        off = (src + experts[None, :]) % n
        cols = np.where(reach, q + (((pos - off) % n) < r), 0)
        cols[rank] = counts[rank]  # it keeps its own tokens
        return cols

    # ---- whole-world aggregates: O(W*E + holders) -------------------------------------------
    def rank_loads(self) -> dict[str, np.ndarray]:
        """Per rank, int64 [W]: `served` (rows it computes), `send_intra` / `send_inter` (tokens
        it sends to other ranks on its node / other nodes), `recv_intra` / `recv_inter`."""
        if self._loads is not None:
            return self._loads
        W = self.world_size
        self._indexed()
        M, H = self._members.size, self._H
        src, e, start, n, q, r, off = self._pair_arrays()
        sum_q = _int_sum(start, q, M)  # at each group's first member
        # Remainder tokens: +1 on the circular interval [off, off + r) of the group.
        a = start + off
        b = a + r
        wrap = b > start + n
        ends = np.where(wrap, start + n, b)
        plus = np.concatenate((a, start[wrap]))
        minus = np.concatenate((ends, (b - n)[wrap]))
        diff = np.bincount(plus, minlength=M + 1)[: M + 1] - np.bincount(minus, minlength=M + 1)[: M + 1]
        got = sum_q[self._member_start] + np.cumsum(diff)[:M]
        recv_intra = _int_sum(self._members[:H], got[:H], W)
        recv_inter = _int_sum(self._members[H:], got[H:], W)
        c = self.counts_WE[src, e]
        node_rule = start < H
        send_intra = _int_sum(src[node_rule], c[node_rule], W)
        send_inter = _int_sum(src[~node_rule], c[~node_rule], W)
        kept = (self.counts_WE * self.holders_WE).sum(axis=1)
        served = kept + recv_intra + recv_inter
        if len(self.moves):
            s, d, t = self.moves[:, 0], self.moves[:, 2], self.moves[:, 3]
            served += _int_sum(d, t, W)
            off_rank = s != d
            same = self.node_of_W[s] == self.node_of_W[d]
            for mask, send, recv in ((off_rank & same, send_intra, recv_intra),
                                     (off_rank & ~same, send_inter, recv_inter)):
                send += _int_sum(s[mask], t[mask], W)
                recv += _int_sum(d[mask], t[mask], W)
        self._loads = {"served": served, "send_intra": send_intra, "send_inter": send_inter,
                       "recv_intra": recv_intra, "recv_inter": recv_inter}
        return self._loads

    def moved_tokens(self) -> int:
        """Tokens that `moves` took away from the rule's replicas (0 without moves)."""
        return int(self.moves[:, 3].clip(min=0).sum()) if len(self.moves) else 0

    # ---- dense views (tests and small worlds only: O(W^2 E)) ----------------------------------
    def dense(self) -> np.ndarray:
        """int64 [W_src, E, W_dst]; O(W^2 E) memory, meant for tests and small worlds."""
        return np.stack([self.send_WE(s).T for s in range(self.world_size)])

    def tokens_WW(self) -> np.ndarray:
        """int64 [W_src, W_dst] all-to-all split sizes of every rank; O(W^2) memory."""
        return np.stack([self.send_WE(s).sum(axis=1) for s in range(self.world_size)])

    def digest_arrays(self) -> tuple[np.ndarray, ...]:
        """The arrays that determine the routes (the rule's inputs, then the moves)."""
        return (self.holders_WE.astype(np.int64), self.counts_WE, self.node_of_W, self.moves)


def _ptr(cnt: np.ndarray) -> np.ndarray:
    out = np.zeros(cnt.size + 1, dtype=np.int64)
    np.cumsum(cnt, out=out[1:])
    return out


_NO_MOVES = np.zeros((0, 4), dtype=np.int64)
_NO_MOVES.flags.writeable = False  # shared by every route set without moves


def _canonical_moves(moves) -> np.ndarray:
    """Merge rows with equal (src, expert, dst), drop zero rows, sort: one form per route set."""
    if moves is None or len(moves) == 0:
        return _NO_MOVES
    moves = np.asarray(moves, dtype=np.int64).reshape(-1, 4)
    keys, inverse = np.unique(moves[:, :3], axis=0, return_inverse=True)
    tokens = np.zeros(len(keys), dtype=np.int64)
    np.add.at(tokens, inverse.reshape(-1), moves[:, 3])
    keep = tokens != 0
    return np.concatenate((keys[keep], tokens[keep, None]), axis=1)


def _inputs(holders_WE, counts_WE, node_of_W):
    holders = to_numpy(holders_WE, "holders_WE", ndim=2, dtype=np.bool_)
    W, E = holders.shape
    # A view, not a copy (2 MiB at W=1024, E=256): the routes keep it, so the caller must
    # not modify counts_WE while it uses them (the runtime never does).
    counts = to_numpy(counts_WE, "counts_WE", ndim=2, shape=(W, E), copy=False)
    if not (counts.dtype == np.int64 and use_extension("route_layout", torch.device("cpu"))):
        check_nonnegative(counts, "counts_WE")  # else route_layout checks them, in the same pass
    nodes = node_array(node_of_W)
    if nodes.shape[0] != W:
        raise ValueError(f"node_of_W has {nodes.shape[0]} ranks but holders_WE has {W} rows")
    return holders, counts, nodes


def route_tokens(holders_WE, counts_WE, node_of_W, rank: int | None = None) -> TokenRoutes:
    """The sparse routes (TokenRoutes) for P1 `holders_WE` and the batch's `counts_WE`.

    holders_WE: bool [W, E], P1 (every expert with tokens needs >= 1 holder).
    counts_WE: int64 [W_src, E], tokens of each source rank per expert.
    node_of_W: int64 [W], node index of each rank.
    The routes keep a view of counts_WE (no copy): do not modify it while they are in use.
    rank: the rank whose layout the caller wants next; with hecate._C it is made in the same
    C++ call as the routes (one pass instead of two), and the first `layout(rank)` returns it.
    Guarantees: every source's tokens of e are routed exactly once, only to holders of e;
    a source holding e keeps all of its tokens of e; the chosen replicas' shares differ by
    at most one token.
    """
    return TokenRoutes(*_inputs(holders_WE, counts_WE, node_of_W), rank=rank)


def token_routes(holders_WE, counts_WE, node_of_W) -> torch.Tensor:
    """The same routes as a dense int64 tensor [W_src, E, W_dst] (tests and small worlds:
    O(W^2 E) memory; the runtime uses `route_tokens`)."""
    return torch.from_numpy(route_tokens(holders_WE, counts_WE, node_of_W).dense())


def rank_splits(routes, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's all-to-all layout.

    `routes` is a TokenRoutes or a dense int64 tensor [W_src, E, W_dst]. Returns (send_WE,
    recv_WE), both int64 [W, E]: send_WE[d, e] tokens of expert e this rank sends to rank d
    (the send buffer is ordered by destination, then expert); recv_WE[s, e] tokens of
    expert e it receives from rank s. Per-peer split sizes are send_WE.sum(1) and recv_WE.sum(1).
    """
    if isinstance(routes, TokenRoutes):
        W = routes.world_size
        _check_rank(rank, W)
        return torch.from_numpy(routes.send_WE(rank)), torch.from_numpy(routes.recv_WE(rank))
    if not isinstance(routes, torch.Tensor) or routes.dim() != 3:
        raise ValueError("routes must be a TokenRoutes or an int64 tensor [W_src, E, W_dst]")
    W = routes.shape[0]
    if routes.shape[2] != W:
        raise ValueError(f"routes must be [W_src, E, W_dst] with W_src == W_dst, got "
                         f"{tuple(routes.shape)}")
    _check_rank(rank, W)
    return routes[rank].T.contiguous(), routes[:, :, rank].contiguous()


def _check_rank(rank, W: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < W:
        raise ValueError(f"rank must be an int in [0, {W}), got {rank!r}")


# ---- compute balancing -------------------------------------------------------------------------
def balance_routes(routes, holders_WE=None, node_of_W=None, tolerance: float = 0.02,
                   min_rows: int = 16):
    """Shift tokens among replicas on one node so that no rank computes far more rows than another.

    Local-first routes keep every source's tokens of a replicated expert at home, and send
    the tokens of experts that are not replicated to their owners, so the ranks' expert
    rows can differ even with hot experts replicated; the rank with the most rows then
    sets the pace of every token exchange. Repeatedly, the rank h with the most rows hands
    half the gap to the least loaded rank l on its node that holds an expert h serves
    (ascending expert id; first tokens from third ranks, which costs no extra traffic,
    then h's own, which then cross to l). It stops when the gap is within
    max(min_rows, tolerance x mean rows) or no such pair exists. Never across nodes.

    `routes` is a TokenRoutes (returns a TokenRoutes with the shifts as `moves`), or a dense
    int64 tensor [W, E, W] with `holders_WE` and `node_of_W` (returns a dense tensor).
    Keeps every token routed once and only to holders. A pure function of its inputs, so
    every rank computes the same result.
    """
    if isinstance(routes, TokenRoutes):
        return _balance(routes, tolerance, min_rows)
    dense = to_numpy(routes, "routes_WEW", ndim=3)
    holders = to_numpy(holders_WE, "holders_WE", ndim=2, dtype=np.bool_)
    nodes = node_array(node_of_W)
    W, E = holders.shape
    if dense.shape != (W, E, W):
        raise ValueError(f"routes_WEW must be [W, E, W] = {(W, E, W)}, got {dense.shape}")
    base = TokenRoutes(holders, dense.sum(axis=2), nodes)
    diff = dense - base.dense()
    s, e, d = np.nonzero(diff)
    rows = np.stack((s, e, d, diff[s, e, d]), axis=1)
    balanced = _balance(TokenRoutes(holders, base.counts_WE, nodes, rows), tolerance, min_rows)
    return torch.from_numpy(balanced.dense())


def _balance(routes: TokenRoutes, tolerance: float, min_rows: int) -> TokenRoutes:
    holders, nodes = routes.holders_WE, routes.node_of_W
    W, E = holders.shape
    load = routes.rank_loads()["served"].copy()
    slack = max(min_rows, int(tolerance * load.sum() / max(W, 1)))
    columns: dict = {}  # (expert, rank) -> current tokens per source served there
    moves: list = []

    def column(e: int, d: int) -> np.ndarray:
        col = columns.get((e, d))
        if col is None:
            col = routes._recv_base(d, np.array([e]))[:, 0]
            if len(routes.moves):
                mv = routes.moves[(routes.moves[:, 1] == e) & (routes.moves[:, 2] == d)]
                np.add.at(col, mv[:, 0], mv[:, 3])
            columns[(e, d)] = col
        return col

    def shift(h: int, lo: int, want: int) -> int:
        moved = 0
        order = np.concatenate((np.arange(h), np.arange(h + 1, W), [h]))  # third ranks first
        for e in np.nonzero(holders[h] & holders[lo])[0]:
            e = int(e)
            col = column(e, h)
            avail = col[order]
            before = np.cumsum(avail) - avail
            take = np.clip(want - moved - before, 0, avail)
            got = np.nonzero(take)[0]
            if got.size:
                srcs, amounts = order[got], take[got]
                col[srcs] -= amounts
                column(e, lo)[srcs] += amounts
                moves.extend((int(s), e, h, -int(t)) for s, t in zip(srcs, amounts))
                moves.extend((int(s), e, lo, int(t)) for s, t in zip(srcs, amounts))
                moved += int(amounts.sum())
            if moved == want:
                break
        return moved

    for _ in range(W * E):
        h = int(np.argmax(load))  # ties: the lowest rank
        moved = 0
        for lo in np.argsort(load, kind="stable"):
            lo = int(lo)
            if lo == h or nodes[lo] != nodes[h] or load[h] - load[lo] <= slack:
                continue
            moved = shift(h, lo, int(load[h] - load[lo]) // 2)
            if moved:
                load[h] -= moved
                load[lo] += moved
                break
        if not moved:
            break
    if not moves:
        return routes
    rows = np.array(moves, dtype=np.int64)
    if len(routes.moves):
        rows = np.concatenate((routes.moves, rows))
    return TokenRoutes(routes.holders_WE, routes.counts_WE, routes.node_of_W, rows)
