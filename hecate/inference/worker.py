"""`python -m hecate.inference.worker REQUEST.json`: one rank of `hecate generate --nproc N`
(started by hecate.train.launch; see hecate.inference.distributed)."""
from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    from hecate.train.faults import die_with_parent, report_worker_error

    if os.environ.get("HECATE_LAUNCHER_PID"):
        die_with_parent(int(os.environ["HECATE_LAUNCHER_PID"]))
    try:
        from hecate.inference.distributed import run_rank
        from hecate.train.checkpoint_io import atomic_write_json

        if len(argv) != 1:
            raise ValueError("usage: python -m hecate.inference.worker REQUEST.json")
        with open(argv[0]) as f:
            request = json.load(f)
        result = run_rank(request)
        if result is not None:  # rank 0
            atomic_write_json(request["result"], result)
            r = result
            print(f"[hecate generate] {r['world_size']} ranks ({r['strategy']}): {r['new_tokens']} new tokens "
                  f"decoded in {r['decode_seconds']:.2f} s ({r['tokens_per_s']:.1f} tok/s); expert bytes per rank "
                  f"{r['expert_bytes_per_rank']}; bytes sent per rank {r['sent_bytes_per_rank']}",
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line naming the rank
        if os.environ.get("HECATE_DEBUG"):
            raise
        return report_worker_error(e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
