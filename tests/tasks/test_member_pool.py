"""Ensemble members computed in a worker process: the same numbers, each member once."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import psutil
import pytest
import torch

from estimators.model_ensemble import ModelEnsemble
from tasks.config import load_config
from tasks.ensemble import scored_estimator
from tasks.member_pool import MemberJob, MemberPool, claim, member_pool, parallel_members
from tasks.score import scoring_context


def _workers() -> list[psutil.Process]:
    """This process's pool workers: spawned ones, or those forked by the fork server."""
    found = []
    for child in psutil.Process().children(recursive=True):
        line, parent = " ".join(child.cmdline()), " ".join(child.parent().cmdline())
        if "spawn_main" in line or ("forkserver" in line and "forkserver" in parent):
            found.append(child)
    return found


def _sequential(config, name: str) -> ModelEnsemble:
    ensemble = scored_estimator(config, name)
    assert isinstance(ensemble, ModelEnsemble)
    ensemble.on_member = None  # it logs to the score task's run logger
    return ensemble


@pytest.mark.parametrize(("method", "pairwise"), [("score", False),
                                                  ("pairwise_vectors", True)])
def test_a_worker_computes_a_member_with_the_same_numbers(ensemble_run, tmp_path, monkeypatch,
                                                          method, pairwise) -> None:
    """Model 0 is held here until the worker has claimed model 1; the worker's result is the
    one this process computes for model 1, bit for bit (one torch thread on both sides)."""
    run, config, records = ensemble_run
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the claim folders go
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ctx = scoring_context(run, config, records, pairwise=pairwise)
    local = _sequential(config, "if_cg")
    computed_here, announced = [], []

    def here(m: int):
        computed_here.append(m)
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("sieve-members-*/1")):
            assert time.monotonic() < deadline, "the worker never claimed model 1"
            time.sleep(0.05)
        return local.member_result(ctx, method, m)

    pool = MemberPool(1)
    try:
        runner = pool.runner(MemberJob(run, config, records, "if_cg"),
                             lambda m, k: announced.append((m, k)))
        results = runner.map(method, 2, here)
    finally:
        pool.close()
        torch.set_num_threads(threads)
    assert computed_here == [0] and announced == [(1, 2)]
    expected = [local.member_result(ctx, method, m) for m in (0, 1)]
    for got, want in zip(results, expected, strict=True):
        if method == "score":
            np.testing.assert_array_equal(got.sample_ids, want.sample_ids)
            np.testing.assert_array_equal(got.score, want.score)
        else:
            np.testing.assert_array_equal(got.target_ids, want.target_ids)
            for c, vectors in want.vectors.items():
                torch.testing.assert_close(got.vectors[c], vectors, rtol=0, atol=0)
    assert not np.array_equal(*(r.score if method == "score" else r.vectors[0].numpy()
                                for r in results))  # two different models
    assert not list(tmp_path.glob("sieve-members-*"))  # claims removed


def test_a_lost_worker_costs_only_time(ensemble_run, tmp_path, monkeypatch) -> None:
    """The worker is killed while it holds model 1: this process computes model 1 itself, with
    a warning, and the results are the one-after-the-other ones."""
    run, config, records = ensemble_run
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ctx = scoring_context(run, config, records)
    local = _sequential(config, "ip")
    computed_here = []

    def here(m: int):
        computed_here.append(m)
        deadline = time.monotonic() + 120
        while m == 0 and not list(tmp_path.glob("sieve-members-*/1")):
            assert time.monotonic() < deadline, "the worker never claimed model 1"
            time.sleep(0.05)
        if m == 0:
            for worker in _workers():
                worker.kill()
        return local.member_result(ctx, "score", m)

    pool = MemberPool(1)
    try:
        with pytest.warns(RuntimeWarning, match="worker process was lost while it held model 1"):
            results = pool.runner(MemberJob(run, config, records, "ip")).map("score", 2, here)
    finally:
        pool.close()
    assert computed_here == [0, 1]
    for got, m in zip(results, (0, 1), strict=True):
        np.testing.assert_array_equal(got.score, local.member_result(ctx, "score", m).score)


UNGUARDED_SCRIPT = textwrap.dedent("""\
    import sys, tempfile, time
    from pathlib import Path
    print("the script's top level ran", flush=True)
    from storage.checkpoints import read_checkpoint_index
    from storage.store import Store
    from tasks.config import load_resolved_config
    from tasks.member_pool import MemberJob, MemberPool
    from tasks.score import scoring_context
    from tasks.ensemble import scored_estimator
    run = Store(sys.argv[1]).existing_run(sys.argv[2])
    config = load_resolved_config(run.config)
    records = read_checkpoint_index(run.checkpoints_dir)
    tempfile.tempdir = sys.argv[3]
    ctx, local = scoring_context(run, config, records), scored_estimator(config, "ip")
    def here(m):
        while not list(Path(sys.argv[3]).glob("sieve-members-*/1")):
            time.sleep(0.05)
        return local.member_result(ctx, "score", m)
    pool = MemberPool(1)
    results = pool.runner(MemberJob(run, config, records, "ip")).map("score", 2, here)
    pool.close()
    print("members", len(results), flush=True)
""")


def test_workers_do_not_run_an_unguarded_script_again(ensemble_run, tmp_path) -> None:
    """A script that scores an ensemble at its top level, without ``if __name__ ==
    "__main__"``: the worker computes model 1 without importing the script again."""
    run, _, _ = ensemble_run
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    claims = tmp_path / "claims"
    claims.mkdir()
    done = subprocess.run([sys.executable, str(script), str(run.dir.parent.parent), run.run_id,
                           str(claims)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("the script's top level ran") == 1
    assert "members 2" in done.stdout


def test_each_member_is_claimed_once(tmp_path) -> None:
    assert claim(tmp_path, 3) and not claim(tmp_path, 3) and claim(tmp_path, 4)


def test_members_in_parallel_default_to_the_cores_at_most_the_models() -> None:
    assert parallel_members(load_config(None, ["train.models=5",
                                               "train.models_in_parallel=3"])) == 3
    assert parallel_members(load_config(None, ["train.models=2",
                                               "train.models_in_parallel=8"])) == 2
    default = load_config(None, ["train.models=64"])
    assert 1 <= parallel_members(default) <= 64
    one = load_config(None, ["train.models=5", "train.models_in_parallel=1"])
    with member_pool(one) as pool:
        assert pool is None  # one after the other, in the stage's process
