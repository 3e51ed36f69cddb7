"""A full disk: the store is a small tmpfs the test mounts (as root; skipped, saying why, where
mounting is not permitted), and the test fills it as soon as the gradient stage has written
its first shard. The run stops with one line, ``error: no space left on the store at …``,
exit 2, and no partial shard; once the space is freed, ``--resume`` completes the run with the
scores of an uninterrupted run, bit for bit.

The runs fork from the crash test's preloaded interpreter (sharing this process's Prefect API,
whose home is not on the small filesystem).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.tiny import write_data
from storage.gradient_shards import read_gradient_shard
from storage.store import Store
from tests.flows.run_files import scores_by_estimator
from tests.flows.test_crash import ROOT, _finished_stages, sieve  # noqa: F401  (fixture)

SIZE = "48m"


def _args(store: Path, data: Path) -> list[str]:
    """The tiny run with 8-row shards (62 shard tasks), so the stage outlasts the test's fill."""
    from benchmarks.tiny import overrides

    values = [*overrides(data), "gradients.shard_size=8"]
    return ["run", "--store", str(store), *[a for kv in values for a in ("--set", kv)]]


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of SIZE mounted for the test (unmounted after)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path) -> Path:
    """Take every free byte of ``mount`` with one file."""
    ballast = mount / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (2**20, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return ballast


def test_full_disk_is_one_line_and_resume_completes(sieve, small_fs, tmp_path):  # noqa: F811
    data = write_data(tmp_path / "tiny.parquet")
    reference = Store(tmp_path / "reference")
    assert sieve.run(_args(reference.root, data)) == 0
    expected = scores_by_estimator(reference.latest_run().dir)

    store = Store(small_fs / "store")
    pid, exit_file = sieve.start(_args(store.root, data))
    deadline = time.monotonic() + 300
    while not list(store.root.glob("runs/*/gradients/*/*/part-*.parquet")):
        assert not exit_file.exists(), "the run ended before the gradient stage"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    ballast = _fill(small_fs)
    while not exit_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    code = int(exit_file.read_text())
    log = exit_file.with_suffix(".log").read_text().splitlines()
    errors = [x for x in log if x.startswith("error: ")]
    run = store.latest_run()
    assert code == 2, log[-30:]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: no space left on the store at {run.gradients_root}"), errors
    assert "gradients" not in _finished_stages(run)
    assert not list(run.dir.rglob(".*.tmp-*")), "a partial shard's temporary file was left"
    shards = list(run.gradients_root.rglob("part-*.parquet"))
    for shard in shards:
        read_gradient_shard(shard)  # whole: passes its checksum
    print(f"\ndisk full after {len(shards)} of 62 shards: exit {code}, {errors[0]}")

    ballast.unlink()
    args = ["run", "--store", str(store.root), "--resume", run.run_id]
    assert sieve.run(args) == 0
    resumed = scores_by_estimator(run.dir)
    assert resumed.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)
    assert os.path.ismount(small_fs) and ROOT.exists()
