"""Total and active (per-token) parameters of every language-model preset of the zoo,
counted on the meta device (no memory). Prints the markdown table of docs/models.md; with
--papers, the "Against the papers" table (hecate.models.paper_sizes.PAPER_SIZES, our count of each).

    .venv/bin/python benchmarks/zoo_params.py [--papers]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hecate.models.registry import PRESETS, build_model, count_parameters, get_preset  # noqa: E402


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def table() -> str:
    """One markdown row per `transformer` preset: name, total, active, active share."""
    get_preset("tiny-moh")  # importing the zoo registers the presets
    rows = ["| preset | total params | active params / token | active share |", "|---|---:|---:|---:|"]
    for name, p in PRESETS.items():
        if p.arch != "transformer":
            continue
        c = count_parameters(build_model(p.arch, p.config, device="meta"))
        t, a = c["total_params"], c["active_params"]
        rows.append(f"| `{name}` | {_fmt(t)} ({t:,}) | {_fmt(a)} ({a:,}) | {100 * a / t:.1f}% |")
    return "\n".join(rows)


def papers_table() -> str:
    """One markdown row per PAPER_SIZES entry: preset, what is counted, the paper's number, ours."""
    from hecate.models.paper_sizes import DERIVED, PAPER_SIZES, derived_total, ours

    rows = ["| preset | counted | paper | ours | source | note |", "|---|---|---:|---:|---|---|"]
    counted = {}
    for e in PAPER_SIZES:
        if e.quantity in DERIVED:
            n = derived_total(e.preset, e.quantity)
        else:
            if e.preset not in counted:
                p = get_preset(e.preset)
                model = build_model(p.arch, p.config, device="meta")
                counted[e.preset] = count_parameters(model)
            n = ours(e.preset, e.quantity, counted[e.preset])
        rows.append(f"| `{e.preset}` | {e.quantity.replace('_', '-')} | {e.reported} | {n:,} | {e.source} | {e.note} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(papers_table() if "--papers" in sys.argv[1:] else table())
