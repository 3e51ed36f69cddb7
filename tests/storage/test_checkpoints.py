import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from storage.checkpoints import (
    CheckpointRecord,
    file_sha256,
    load_state_dict,
    read_checkpoint_index,
    save_checkpoint,
    write_checkpoint_index,
)
from storage.errors import BadInput


def _state() -> dict[str, torch.Tensor]:
    return torch.nn.Linear(3, 2).state_dict()


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    state = _state()
    path, sha = save_checkpoint(tmp_path / "ckpts", 40, state)
    assert path == tmp_path / "ckpts" / "step-40.pt"
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["step-40.pt"]
    loaded = load_state_dict(path, sha)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert load_state_dict(path, sha.upper()).keys() == state.keys()


def test_sha_mismatch_is_refused(tmp_path: Path) -> None:
    path, sha = save_checkpoint(tmp_path, 1, _state())
    other = "0" * 64
    with pytest.raises(BadInput, match="does not match its recorded sha256"):
        load_state_dict(path, other)
    torch.save({"weight": torch.zeros(1)}, path)  # the file changed after it was recorded
    with pytest.raises(BadInput, match="does not match its recorded sha256"):
        load_state_dict(path, sha)


def test_missing_unreadable_and_not_a_state_dict(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="does not exist"):
        load_state_dict(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(BadInput, match="is unreadable") as e:
        load_state_dict(tmp_path / "junk.pt")
    assert "\n" not in str(e.value)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(BadInput, match="is not a state_dict"):
        load_state_dict(tmp_path / "list.pt")
    torch.save({"weight": 3}, tmp_path / "ints.pt")
    with pytest.raises(BadInput, match="is not a state_dict"):
        load_state_dict(tmp_path / "ints.pt")


def test_arbitrary_pickles_are_refused(tmp_path: Path) -> None:
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # needs full unpickling
    with pytest.raises(BadInput, match="is unreadable") as e:
        load_state_dict(tmp_path / "module.pt")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_wrapped_state_dicts_are_accepted(tmp_path: Path, key: str) -> None:
    state = _state()
    torch.save({key: state, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "w.pt")
    loaded = load_state_dict(tmp_path / "w.pt")
    assert all(torch.equal(loaded[k], state[k]) for k in state) and loaded.keys() == state.keys()


def test_index_round_trip_relative_inside_absolute_outside(tmp_path: Path) -> None:
    ckpts = tmp_path / "run" / "checkpoints"
    p0, s0 = save_checkpoint(ckpts, 0, _state())
    p1, s1 = save_checkpoint(ckpts, 100, _state())
    outside, s2 = save_checkpoint(tmp_path / "user", 7, _state())
    records = [
        CheckpointRecord(checkpoint=2, step=7, epoch=3.0, lr=0.001, path=str(outside), sha256=s2),
        CheckpointRecord(checkpoint=0, step=0, epoch=0.0, lr=0.1, path=str(p0), sha256=s0),
        CheckpointRecord(checkpoint=1, step=100, epoch=1.5, lr=0.05, path=str(p1), sha256=s1),
    ]
    write_checkpoint_index(ckpts, records)
    table = pq.read_table(ckpts / "index.parquet")
    assert table.schema == pa.schema(
        [
            ("checkpoint", pa.int64()),
            ("step", pa.int64()),
            ("epoch", pa.float64()),
            ("lr", pa.float64()),
            ("path", pa.string()),
            ("sha256", pa.string()),
            ("step_lr", pa.float64()),
            ("model", pa.int64()),
        ]
    )
    assert table.column("path").to_pylist() == [str(outside), "step-0.pt", "step-100.pt"]
    # the run folder can move: relative paths follow it
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    got = read_checkpoint_index(moved / "checkpoints")
    assert [r.checkpoint for r in got] == [0, 1, 2]
    assert got[1] == CheckpointRecord(
        1, 100, 1.5, 0.05, str(moved.resolve() / "checkpoints" / "step-100.pt"), s1
    )
    assert got[2].path == str(outside)
    for r in got:
        assert Path(r.path).is_absolute()
        load_state_dict(Path(r.path), r.sha256)


def test_index_missing_or_unreadable(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no checkpoint index"):
        read_checkpoint_index(tmp_path)
    (tmp_path / "index.parquet").write_bytes(b"garbage")
    with pytest.raises(BadInput, match="unreadable checkpoint index"):
        read_checkpoint_index(tmp_path)
    pq.write_table(pa.table({"checkpoint": [0]}), tmp_path / "index.parquet")
    with pytest.raises(BadInput, match="unreadable checkpoint index"):
        read_checkpoint_index(tmp_path)
