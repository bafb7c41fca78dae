"""Input validation shared by the planner modules.

The planners work on small numpy arrays internally (64 experts x 32 ranks is a
few thousand entries) and take / return torch tensors at the API boundary.
Every check raises ValueError (or TypeError) naming the argument.
"""
from __future__ import annotations

import numpy as np
import torch


def to_numpy(x, name: str, *, ndim: int, dtype=np.int64, shape=None, copy: bool = True) -> np.ndarray:
    """Convert a tensor / array-like to numpy with `ndim` dims, checking shape and values.

    copy=False may return a view of the input (callers that only read it, never keep it)."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be a real tensor, got dtype {x.dtype}")
        arr = x.numpy() if x.device.type == "cpu" and not x.requires_grad else x.detach().cpu().numpy()
    elif isinstance(x, (np.ndarray, list, tuple)):
        arr = np.asarray(x)
    else:
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(arr.shape)}")
    if shape is not None:
        for axis, (got, want) in enumerate(zip(arr.shape, shape)):
            if want is not None and got != want:
                raise ValueError(
                    f"{name} has shape {tuple(arr.shape)} but dim {axis} must be {want} "
                    f"(expected {tuple('*' if s is None else s for s in shape)})"
                )
    kind = arr.dtype.kind  # dtype.kind checks: np.issubdtype costs microseconds per call
    if dtype == np.bool_:
        if kind != "b":
            raise TypeError(f"{name} must be a bool tensor, got dtype {arr.dtype}")
        return arr.astype(np.bool_, copy=copy)
    if kind not in "iuf":
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    if dtype == np.int64 and kind == "f":
        raise TypeError(f"{name} must be an integer tensor (int64), got dtype {arr.dtype}")
    out = arr.astype(dtype, copy=copy)
    if dtype == np.float64 and kind == "f" and not np.isfinite(out).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return out


def check_nonnegative(arr: np.ndarray, name: str) -> None:
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative, found {arr.min()}")


def check_owner(owner_E: np.ndarray, world_size: int, name: str = "owner_E") -> None:
    if owner_E.size and (owner_E.min() < 0 or owner_E.max() >= world_size):
        raise ValueError(
            f"{name} entries must be ranks in [0, {world_size}), found "
            f"{owner_E.min()}..{owner_E.max()}"
        )


def check_positive_int(value, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class CheckedCache:
    """The arrays a check accepted for the last few CPU tensors, keyed on the tensor object, its
    version counter (an in-place change bumps it, which sends the tensor through the checks
    again) and what else the check depended on. The runtime passes the same owners and the
    same predicted load (LoadPredictor.predict returns one tensor per update) several times a
    step; each is checked once. Callers only read the cached arrays."""

    def __init__(self, size: int = 256):
        self.size = size
        self._entries: dict = {}

    def get(self, t, key):
        hit = self._entries.get(id(t))
        if hit is not None and hit[0] is t and hit[1] == t._version and hit[2] == key:
            return hit[3]
        return None

    def put(self, t, key, value) -> None:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.requires_grad:
            if len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))  # the oldest
            self._entries[id(t)] = (t, t._version, key, value)  # keeps t alive: its id stays its own


# The last node map node_array accepted: (tensor, its version counter, the checked copy). The
# runtime passes the same tensor every layer and step; an in-place change to it bumps _version,
# which sends it through the checks again. Its callers (materialize, routes) only read it.
_checked_nodes: tuple = (None, -1, None)


def node_array(node_of_W, name: str = "node_of_W") -> np.ndarray:
    """Validate the rank -> node map: int64 [W], values 0..N-1, every node used. Do not modify
    the result: it may be shared with other callers."""
    global _checked_nodes
    last, version, checked = _checked_nodes
    if node_of_W is last and node_of_W._version == version:
        return checked
    nodes = _node_array(node_of_W, name)
    if isinstance(node_of_W, torch.Tensor) and node_of_W.device.type == "cpu":
        _checked_nodes = (node_of_W, node_of_W._version, nodes)
    return nodes


def _node_array(node_of_W, name: str) -> np.ndarray:
    nodes = to_numpy(node_of_W, name, ndim=1)
    if nodes.size == 0:
        raise ValueError(f"{name} must name the node of at least one rank, got an empty tensor")
    check_nonnegative(nodes, name)
    # Nodes 0..N-1 all used (N <= W): a bincount, O(W), not a sort.
    if nodes.max() >= nodes.size or not (np.bincount(nodes) > 0).all():
        raise ValueError(f"{name} must number nodes 0..N-1 without gaps, found nodes "
                         f"{np.unique(nodes).tolist()}")
    return nodes


def sparse_nonzero(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """np.nonzero of a mostly-False bool array, faster: scan it 8 bytes at a time (one uint64
    word per 8 cells) and look inside the non-zero words only. Same result, same order."""
    if mask.size < 4096:  # small: numpy's own scan is as fast and has less overhead
        return np.nonzero(mask)
    flat = np.ascontiguousarray(mask).reshape(-1)
    n8 = flat.size - flat.size % 8
    words = np.flatnonzero(flat[:n8].view(np.uint64) != 0)
    inner = np.flatnonzero(flat[:n8].reshape(-1, 8)[words])
    idx = words[inner >> 3] * 8 + (inner & 7)
    if n8 < flat.size:
        idx = np.concatenate((idx, n8 + np.flatnonzero(flat[n8:])))
    if mask.ndim == 2:
        return np.divmod(idx, mask.shape[1])
    return np.unravel_index(idx, mask.shape) if mask.ndim > 1 else (idx,)
