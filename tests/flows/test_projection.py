"""Gradients stored randomly projected: shards hold k columns, and the inner-product
estimators reading them rank samples like the unprojected run of the same training."""

from __future__ import annotations

import pyarrow.parquet as pq
from scipy.stats import spearmanr

from flows.cli import main
from storage.gradient_shards import complete_shards, read_shard_meta
from storage.store import Store
from tests.flows.conftest import SMALL, sets


def _scores(run, name):
    table = pq.read_table(run.scores_dir(name, "val_loss") / "part-0.parquet")
    return table.sort_by("sample_id")["score"].to_numpy()


def test_projected_gradients_feed_the_inner_product_family(small_run, tmp_path):
    _, reference = small_run
    store = Store(tmp_path / "store")
    args = sets(*SMALL, "gradients.projection=512", "estimators=[ip,cosine,tracin]",
                "prune.by=ip", "prune.seeds=1")
    assert main(["run", "--store", str(store.root), *args]) == 0
    run = store.latest_run()
    meta = read_shard_meta(complete_shards(run.gradients_dir(0, "train"))[0])
    assert (meta.projection, meta.k, meta.seed) == ("rademacher", 512, 0)
    assert meta.parameter_count > 512
    for name in ("ip", "tracin"):
        rho = spearmanr(_scores(run, name), _scores(reference, name))[0]
        assert rho > 0.9, (name, rho)


def test_factorized_projection_feeds_the_inner_product_family(small_run, tmp_path, capsys):
    """``gradients.projection: {kind: factorized}``: shards hold the LoGra features (never the
    full gradient), and ip/tracin rank samples like the unprojected run. (A Kronecker
    projection of a rank-one layer gradient s aᵀ estimates s₁·s₂ and a₁·a₂ separately, with
    errors ~1/√k_out and ~1/√k_in: less accurate than a dense projection of the same width.)"""
    _, reference = small_run
    store = Store(tmp_path / "store")
    args = sets(*SMALL, "gradients.projection={kind: factorized, k_in: 32, k_out: 32}",
                "estimators=[ip,tracin]", "prune.by=ip", "prune.seeds=1")
    assert main(["run", "--store", str(store.root), *args]) == 0
    run = store.latest_run()
    meta = read_shard_meta(complete_shards(run.gradients_dir(0, "train"))[0])
    assert (meta.projection, meta.seed) == ("factorized", 0)
    assert meta.k == 32 * 32 + 32 * 10 < meta.parameter_count  # 64-64-10 MLP, k_out capped
    for name in ("ip", "tracin"):
        rho = spearmanr(_scores(run, name), _scores(reference, name))[0]
        with capsys.disabled():
            print(f"\n[factorized 32x32, k={meta.k}] {name}: Spearman with unprojected {rho:.3f}")
        assert rho > 0.8, (name, rho)
