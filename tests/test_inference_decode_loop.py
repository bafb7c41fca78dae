"""sampling.decode_loop, the one decode loop of generate() and of distributed generation's
decode_share: pass order, SCMoE contrast, what is appended where, and the idle-rank case."""
import torch

from hecate.inference.sampling import decode_loop
from hecate.inference.scmoe import SCMoE, contrast


class _Recorder:
    """A decoder that returns fixed logits per step and records every call into a shared log."""

    def __init__(self, name, logits_per_step, log):
        self.name, self.logits_per_step, self.log, self.step = name, logits_per_step, log, 0

    def logits(self):
        self.log.append(("logits", self.name, self.step))
        out = self.logits_per_step[self.step]
        self.step += 1
        return out

    def append(self, ids_B):
        self.log.append(("append", self.name, ids_B.tolist()))


def test_two_passes_are_contrasted_picked_and_appended_in_order():
    torch.manual_seed(0)
    strong = [torch.randn(2, 7) for _ in range(3)]
    weak = [torch.randn(2, 7) for _ in range(3)]
    log, picked = [], []
    scmoe = SCMoE(0.5, 0.1)

    def pick(logits_BV):
        picked.append(logits_BV)
        return logits_BV.argmax(-1)

    decoders = [_Recorder("strong", strong, log), _Recorder("weak", weak, log)]
    out = decode_loop(decoders, [[1, 2], [3]], 3, pick, scmoe, lambda step: log.append(("pass", step)))
    want = [contrast(s, w, scmoe.beta, scmoe.alpha) for s, w in zip(strong, weak)]
    assert all(torch.equal(a, b) for a, b in zip(picked, want))
    ids = [w.argmax(-1).tolist() for w in want]
    assert out == [[1, 2] + [i[0] for i in ids], [3] + [i[1] for i in ids]]
    step0 = [("logits", "strong", 0), ("pass", 0), ("logits", "weak", 0), ("pass", 0),
             ("append", "strong", ids[0]), ("append", "weak", ids[0])]
    assert log[:6] == step0 and len(log) == 18


def test_without_rows_the_passes_still_run_every_step():
    """An idle rank: every pass runs each step (its peers' collectives), nothing is picked."""
    log = []

    def pick(logits_BV):
        raise AssertionError("nothing to pick without rows")

    decoders = [_Recorder("strong", [None] * 4, log), _Recorder("weak", [None] * 4, log)]
    assert decode_loop(decoders, [], 4, pick, SCMoE(1.0, 0.1), lambda step: log.append(("pass", step))) == []
    assert [e for e in log if e[0] == "pass"] == [("pass", s) for s in range(4) for _ in range(2)]
    assert not [e for e in log if e[0] == "append"]
