"""``python -m benchmarks.quality --quick``: Sieve's evaluation on a tiny workload, peers beside
it (each with numbers or a ``failed:`` reason), all judged against the same retrains."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np

from benchmarks import quality, quality_peers
from benchmarks.quality_truth import align, most_harmful


def test_quick_quality_table(tmp_path, capsys):
    out = tmp_path / "quality.json"
    assert quality.main(["--quick", "--store", str(tmp_path / "store"), "--json", str(out),
                         "--ensemble", "2"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["quick"] and len(doc["workloads"]) == 1
    result = doc["workloads"][0]
    assert result["workload"] == "digits-logreg"
    assert result["estimators"] == ["tracin", "if_exact"]
    for name in result["estimators"]:
        row = result["sieve"][name]
        assert math.isfinite(row["lds"]) and -1 <= row["lds"] <= 1
        assert row["lds_low"] <= row["lds"] <= row["lds_high"]
        assert math.isfinite(row["loo_spearman"]) and 0 <= row["detection_auc"] <= 1
        assert f"sieve {name}" in printed
    # peers are judged against exactly the truth Sieve's own rows were judged against
    assert result["truth_check"] < 1e-9
    assert result["peers"], "the quick run lists its peers"
    for peer in result["peers"]:
        assert peer["peer"] in printed
        if peer["ok"]:
            metrics = peer["metrics"]
            assert math.isfinite(metrics["lds"]) and math.isfinite(metrics["loo_spearman"])
            assert 0 <= metrics["detection_auc"] <= 1
            assert math.isfinite(metrics[f"prune_gain@{result['prune_q']}"])
            assert peer["seconds"] > 0
        else:
            assert peer["error"] and "failed:" in printed
            assert f"peer failed: {peer['peer']}: {peer['error']}" in " ".join(printed.split())
    # the ensemble rows (train.models=2) face the same retrains as the single-model rows
    ensemble = result["ensemble"]
    assert ensemble["models"] == 2 and ensemble["truth_check"] < 1e-9
    assert ensemble["train_seconds"] > 0 and "×2 rows: run" in printed
    for name in result["estimators"]:
        assert math.isfinite(ensemble["sieve"][name]["lds"])
        # other scores (LDS over 5 subsets takes few values; LOO Pearson is continuous)
        assert ensemble["sieve"][name]["loo_pearson"] != result["sieve"][name]["loo_pearson"]
    # rows in the order they are printed: Sieve's, its ensemble's, then the peers
    rows = quality.table_rows(result)
    assert [r[0] for r in rows[:4]] == ["sieve tracin", "sieve if_exact", "sieve tracin ×2",
                                        "sieve if_exact ×2"]
    assert (tmp_path / "store" / "quality-latest.json").exists()


def test_a_missing_peer_library_is_a_failed_row(tmp_path, monkeypatch):
    monkeypatch.setattr(quality_peers, "importable", lambda library: "not installed (test)")
    row = quality.run_peer("dattri.TRAK", str(tmp_path), "no-run", np.arange(3), tmp_path, 5, 4)
    assert row == row | {"ok": False, "error": "not installed (test)", "family": "trak"}
    result = {"prune_q": 0.1, "estimators": [], "sieve": {}, "peers": [row]}
    assert quality.table_rows(result)[0][:2] == ["dattri.TRAK", "failed: not installed (test)"]


def test_peer_names_and_pruned_sets():
    assert quality_peers.peer_names("none") == []
    assert quality_peers.peer_names("CAPTUM.tracincp, traker.TRAKer") == [
        "captum.TracInCP", "traker.TRAKer"]
    assert len(quality_peers.peer_names("all")) == len(quality_peers.PEERS)
    try:
        quality_peers.peer_names("nope")
    except KeyError as e:
        assert "unknown peer" in e.args[0]
    else:
        raise AssertionError("an unknown peer name must be refused")
    # a peer prunes its lowest scores, ties broken by the lower sample id (as Sieve's query)
    truth = SimpleNamespace(train_ids=np.array([3, 5, 8, 9, 12]))
    score = np.array([0.5, -1.0, -1.0, 2.0, 0.0])  # for ids 12, 9, 8, 5, 3 (unsorted)
    ids = np.array([12, 9, 8, 5, 3])
    assert most_harmful(truth, ids, score, 0.4) == (8, 9)
    assert most_harmful(truth, ids, score, 0.01) == (8,)
    assert list(align(ids, score, truth.train_ids)) == [0.0, 2.0, -1.0, -1.0, 0.5]


def test_arnoldi_convergence_on_a_quality_run(tmp_path, capsys):
    """``benchmarks.arnoldi_convergence`` reads a finished run and prints, per Krylov
    dimension, the agreement with the exact solve; the adaptive default agrees closely."""
    from benchmarks import arnoldi_convergence
    from storage.store import Store

    store = tmp_path / "store"
    assert quality.main(["--quick", "--store", str(store), "--peers", "none",
                         "--estimators", "if_exact"]) == 0
    capsys.readouterr()
    run = Store(store).list_runs()[0]
    assert arnoldi_convergence.main(["--store", str(store), "--run", run.run_id,
                                     "--dims", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    small, default = lines[-2].split(), lines[-1].split()
    assert small[0] == "32" and default[0] == "default"
    assert float(default[2]) > 0.99 > float(small[1])


def test_paired_difference_against_the_best_peer():
    """Sieve's rows are compared, target by target, with the peer of the best mean LDS; the
    paired CI excludes 0 for a small, consistent lead that two overlapping CIs would hide."""
    rng = np.random.default_rng(0)
    spread = rng.uniform(0.5, 0.95, 200)  # targets differ a lot from each other
    truth = SimpleNamespace(fresh=("membership", "margins"), target_ids=np.arange(200))
    peers = {"weak": {"lds_fresh": spread - 0.2}, "strong": {"lds_fresh": spread - 0.005}}
    sieve = {"if_cg ×5": {"lds_fresh": spread + rng.normal(0, 0.002, 200)}}
    sieve["if_cg ×5"]["lds_fresh"][3] = np.nan  # a constant target is dropped, not counted
    paired = quality.paired_with_best_peer(truth, sieve, peers,
                                           {"weak": 0.5, "strong": 0.7})
    assert paired["peer"] == "strong" and paired["metric"] == "lds_fresh"
    mean, low, high = paired["rows"]["if_cg ×5"]
    assert 0 < low < mean < high < 0.01
    assert quality.paired_with_best_peer(truth, sieve, {}, {}) is None
