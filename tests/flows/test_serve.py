"""``sieve serve``: a deployment scheduled every minute fires on its own and its run lands in the
store and the MLflow experiment like a CLI run; bad serve settings exit 2 before anything
starts. (Ctrl-C stopping everything is checked when the ``served`` fixture ends.)"""

from __future__ import annotations

import os
import socket

import yaml
from mlflow.tracking import MlflowClient

from flows.cli import main
from tests.flows.conftest import sets
from tests.flows.serving import free_port

FIRES_WITHIN_S = 150  # the next minute boundary, the runner's poll, a tiny run


def test_every_minute_schedule_fires_on_its_own(served):
    run = served.wait_for_run("pipeline", lambda r: r["auto_scheduled"], FIRES_WITHIN_S)
    assert run["parameters"]["epochs"] == 2  # the served config's value, nobody typed it
    run_dir = served.store.run(run["name"]).dir  # the flow run is named by the Sieve run id
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["epochs"] == 2 and [e["name"] for e in config["estimators"]] == ["ip"]
    assert (run_dir / "metrics.parquet").exists()
    client = MlflowClient(tracking_uri=served.store.mlflow_uri)
    experiment = client.get_experiment_by_name("sieve")
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`sieve.run_id` = '{run['name']}'")
    assert [p.info.status for p in parents] == ["FINISHED"]


def test_bad_serve_settings_exit_2_before_starting(tmp_path, capsys):
    store = ["--store", str(tmp_path / "store")]
    assert main(["serve", *store, *sets("serve.schedules.pipeline=0 3 * *")]) == 2
    assert "not a valid cron string" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", *store, "--prefect-port", str(port)]) == 2
    assert f"can't listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "store" / "serve").exists()  # no server was started


def test_schedule_of_no_deployment_exits_2(tmp_path, capsys):
    store = ["--store", str(tmp_path / "store")]
    assert main(["serve", *store, *sets("serve.schedules.nightly=0 3 * * *"), "--prefect-port",
                 str(free_port()), "--mlflow-port", str(free_port())]) == 2
    assert "serve.schedules: no deployment nightly" in capsys.readouterr().err
    assert os.environ.get("SIEVE_STORE") != str(tmp_path / "store")
