"""An object store that goes away, against moto's S3 server on 127.0.0.1:

- a short outage (the server stopped, then started again on its port) is ridden out by the
  S3 client's retries (``storage.location.S3_RETRIES``): the figures are counted and printed;
- a run whose store stops during the gradient stage fails within a bounded time, with one
  line naming the store and exit 2, and leaves no partial object; once the store is back,
  ``--resume`` completes with the scores of an uninterrupted local-store run, bit for bit;
- two machines, one run: while the run is being written, a ``--resume`` of it from a process
  that shares no lock folder with the writer (another ``SIEVE_CACHE_DIR``) is refused by the
  run's lease object in the bucket (``storage.leases``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from flows.cli import main
from storage.atomic import read_parquet_table
from storage.gradient_shards import read_gradient_shard
from storage.location import store_path
from storage.store import Store
from tests.flows.conftest import SHARDED_RUN, sets
from tests.storage.moto_s3 import RUNNING, object_keys, s3_server

ROOT = Path(__file__).resolve().parents[2]
BUCKET, PREFIX = "sieve-faults", "store"
URL = f"s3://{BUCKET}/{PREFIX}"
SIEVE = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]
FAIL_LIMIT_S = 90.0  # the bound asserted; the measured time is printed
RUN = [*SHARDED_RUN, "gradients.shard_size=32"]  # 2 checkpoints x 36 shards: a longer stage


def _stop_moto() -> int:
    """Stop the running moto server (the one ``s3_server`` started) and close its socket, so
    connections are refused; returns its port."""
    [server] = RUNNING
    port = server.get_host_and_port()[1]
    server.stop()
    server._server.server_close()
    return port


def _restart(port: int):
    """A moto server on ``port`` again (moto's objects live in this process, so they are kept)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def test_a_short_outage_is_retried(tmp_path):
    with s3_server(BUCKET):
        path = store_path(f"{URL}/probe.bin")
        path.write_bytes(b"x" * 1024)
        attempts: list[float] = []
        path.fs.s3.meta.events.register("before-send.s3",
                                        lambda **_: attempts.append(time.monotonic()))
        assert path.read_bytes() == b"x" * 1024
        needed = len(attempts)  # requests a read makes when nothing fails
        attempts.clear()
        port = _stop_moto()
        restarted: list = []
        timer = threading.Timer(2.0, lambda: restarted.append(_restart(port)))
        started = time.monotonic()
        timer.start()
        assert path.read_bytes() == b"x" * 1024
        seconds = time.monotonic() - started
        timer.join()
        retried = len(attempts) - needed
        assert retried >= 1, "the outage was not retried"
        gaps = np.diff(attempts)
        print(f"\na 2 s outage: the read ({needed} requests) succeeded after {retried} failed "
              f"attempts were retried, in {seconds:.2f} s; waits between attempts "
              f"{', '.join(f'{g:.2f}' for g in gaps)} s")
        restarted[0].stop()
        restarted[0]._server.server_close()


def _prefect_api() -> str:
    """This process's Prefect API, for the runs this test starts (no server start of theirs)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    from flows.environment import start_local_api

    start_local_api()
    return PREFECT_API_URL.value() or SubprocessASGIServer().api_url


def _reference(tmp_path: Path) -> dict[str, np.ndarray]:
    store = Store(tmp_path / "local")
    assert main(["run", "--store", str(store.root), *sets(*RUN)]) == 0
    return _scores(store)


def _scores(store: Store) -> dict[str, np.ndarray]:
    run = store.latest_run()
    out = {}
    for estimator in ("ip", "tracin"):
        [part] = (run.scores_root / f"estimator={estimator}").glob("target=*/part-0.parquet")
        table = read_parquet_table(part).sort_by("sample_id")
        out[estimator] = table["score"].to_numpy()
    return out


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_store_lost_mid_gradients_fails_in_bounded_time_and_resumes(tmp_path, monkeypatch,
                                                                     capsys):
    expected = _reference(tmp_path)
    with s3_server(BUCKET):
        store = Store(URL)
        env = dict(os.environ, PYTHONPATH=str(ROOT), SIEVE_CACHE_DIR=str(tmp_path / "cache-a"),
                   PREFECT_API_URL=_prefect_api())
        with open(tmp_path / "stderr", "w") as err:
            writer = subprocess.Popen([*SIEVE, "run", "--store", URL, *sets(*RUN)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=err)
        try:
            runs = f"{PREFIX}/runs/"
            _wait(lambda: any(k.endswith("/samples.parquet") for k in object_keys(BUCKET, runs)),
                  300, "the run never started")
            run = store.latest_run()

            # two machines, one run: a process with its own lock folder is refused
            monkeypatch.setenv("SIEVE_CACHE_DIR", str(tmp_path / "cache-b"))
            capsys.readouterr()
            assert main(["run", "--store", URL, "--resume", run.run_id]) == 2
            refused = capsys.readouterr().err
            assert refused.count("\n") == 1 and f"pid {writer.pid} on" in refused, refused
            assert "one machine at a time" in refused and ".lease" in refused
            print(f"\nsecond machine: {refused.strip()}")

            shards = f"{PREFIX}/runs/{run.run_id}/gradients/"
            _wait(lambda: object_keys(BUCKET, shards) or writer.poll() is not None, 300,
                  "the gradient stage never started")
            assert writer.poll() is None, "the run ended before the store could be stopped"
            port = _stop_moto()
            stopped = time.monotonic()
            code = writer.wait(300)
            failed_after = time.monotonic() - stopped
        finally:
            if writer.poll() is None:
                writer.kill()
        lines = (tmp_path / "stderr").read_text().splitlines()
        errors = [x for x in lines if x.startswith("error: ")]
        assert code == 2, lines[-20:]
        assert len(errors) == 1 and f"store {URL} is not reachable" in errors[0], errors
        assert failed_after < FAIL_LIMIT_S
        print(f"store stopped during the gradient stage: exit {code} {failed_after:.1f} s later: "
              f"{errors[0]}")

        server = _restart(port)
        try:
            objects = object_keys(BUCKET, f"{PREFIX}/runs/{run.run_id}/")
            done = [k for k in objects if "/gradients/" in k]
            for key in objects:  # every visible object is whole
                path = store_path(f"s3://{BUCKET}/{key}")
                if "/gradients/" in key:
                    read_gradient_shard(path)
                elif key.endswith(".parquet"):
                    read_parquet_table(path)
            assert 0 < len(done) < 2 * 36 * 2, "the stage was not cut short"
            assert not (run.scores_root).exists()
            monkeypatch.setenv("SIEVE_CACHE_DIR", str(tmp_path / "cache-a"))
            assert main(["run", "--store", URL, "--resume", run.run_id]) == 0
            resumed = _scores(store)
            assert not store_path(f"{URL}/runs/{run.run_id}/.lease").exists()
        finally:
            server.stop()
            server._server.server_close()
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)

