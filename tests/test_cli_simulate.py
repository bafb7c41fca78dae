"""`hecate simulate`: cost-model ranking of FSSDP policies at cluster sizes."""
import json

from hecate.cli import main


def test_simulate_json(capsys):
    rc = main(["simulate", "--ranks", "8", "16", "--ranks-per-node", "4", "--steps", "2", "--layers", "2",
               "--experts", "16", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["num_ranks"] for r in out["results"]] == [8, 16]
    for r in out["results"]:
        assert set(r["seconds_per_step"]) == {"ep", "shadowing", "hecate"}
        assert r["speedup_vs_ep"]["ep"] == 1.0
        # Skewed routing: replication must not be estimated slower than plain EP.
        assert r["speedup_vs_ep"]["hecate"] >= 1.0
    assert out["chunk_bytes"] == 2 * 768 * 1536 * 2


def test_simulate_rejects_bad_sizes(capsys):
    assert main(["simulate", "--experts", "0"]) == 2
    assert "--experts must be >= 1" in capsys.readouterr().err
    assert main(["simulate", "--ranks", "12", "--ranks-per-node", "8"]) == 2
    assert "multiple of --ranks-per-node" in capsys.readouterr().err
