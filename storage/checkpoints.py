"""Model checkpoints: ``step-<n>.pt`` state_dicts and their ``index.parquet``."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from storage.atomic import atomic_path, read_parquet_table, write_parquet_atomic
from storage.errors import BadInput
from storage.location import (
    StorePath,
    is_within,
    joined,
    location,
    resolved,
    store_failure,
    store_path,
)

INDEX_NAME = "index.parquet"
INDEX_SCHEMA = pa.schema(
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
_WRAPPER_KEYS = ("state_dict", "model_state_dict")


@dataclass(frozen=True)
class CheckpointRecord:
    """One row of the checkpoint index; ``path`` is absolute when read back.

    ``lr``: the mean learning rate over the interval the checkpoint closes; ``step_lr``: the
    learning rate of its last step (None when unknown); ``model``: 0 for the attributed model,
    1.. for independently trained ensemble members (same recipe, other seeds).
    """

    checkpoint: int
    step: int
    epoch: float
    lr: float
    path: str
    sha256: str
    step_lr: float | None = None
    model: int = 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def file_sha256(path: StorePath) -> str:
    """Hex sha256 of a file's bytes (local or a URL)."""
    with store_path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(
    directory: StorePath, step: int, state_dict: Mapping[str, Any]
) -> tuple[StorePath, str]:
    """``torch.save`` a state_dict to ``directory/step-<step>.pt`` atomically.

    Returns (path, sha256 of the file).
    """
    path = store_path(directory) / f"step-{int(step)}.pt"
    with atomic_path(path) as tmp:
        torch.save(state_dict, tmp)  # keeps an OrderedDict's _metadata (module versions)
        sha = file_sha256(tmp)
    return path, sha


def write_checkpoint_index(directory: StorePath, records: list[CheckpointRecord]) -> None:
    """Write ``directory/index.parquet`` atomically.

    Record paths are URLs, absolute, or relative to the current directory; files inside
    ``directory`` are stored relative to it (so the run folder can move), others absolute.
    """
    directory = resolved(directory)
    paths = []
    for r in records:
        p = resolved(r.path)
        paths.append(p.relative_to(directory).as_posix() if is_within(p, directory)
                     else location(p))
    table = pa.table(
        {
            "checkpoint": [int(r.checkpoint) for r in records],
            "step": [int(r.step) for r in records],
            "epoch": [float(r.epoch) for r in records],
            "lr": [float(r.lr) for r in records],
            "path": paths,
            "sha256": [r.sha256 for r in records],
            "step_lr": [None if r.step_lr is None else float(r.step_lr) for r in records],
            "model": [int(r.model) for r in records],
        },
        schema=INDEX_SCHEMA,
    )
    write_parquet_atomic(table, directory / INDEX_NAME)


def read_checkpoint_index(directory: StorePath) -> list[CheckpointRecord]:
    """The index's records sorted by checkpoint, paths absolute (URLs in a URL store);
    BadInput if missing/unreadable."""
    directory = resolved(directory)
    path = directory / INDEX_NAME
    if not path.is_file():
        raise BadInput(f"no checkpoint index {path}")
    try:
        table = read_parquet_table(path)
        table = table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
    except (OSError, KeyError, pa.ArrowException) as e:
        raise BadInput(f"unreadable checkpoint index {path}: {_first_line(e)}") from None
    records = [
        CheckpointRecord(
            checkpoint=row["checkpoint"],
            step=row["step"],
            epoch=row["epoch"],
            lr=row["lr"],
            path=location(joined(directory, row["path"])),  # an absolute one stays as it is
            sha256=row["sha256"],
            step_lr=row["step_lr"],
            model=row["model"],
        )
        for row in table.to_pylist()
    ]
    return sorted(records, key=lambda r: (r.model, r.checkpoint))


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_state_dict(path: StorePath, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state_dict on the CPU with ``weights_only=True``.

    Accepts a plain state_dict or a dict holding one under ``state_dict`` or
    ``model_state_dict``. When ``sha256`` is given the file must match it. BadInput (one line)
    for a missing, unreadable or mismatching file, or one that holds no state_dict.

    The file is read once: the hash is checked on those bytes and the state_dict loaded from
    them (one download from an object store, and no chance for the file to change between the
    check and the load).
    """
    path = store_path(path)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise BadInput(f"checkpoint {path} does not exist") from None
    except OSError as e:
        if store_failure(e) is not None:
            raise  # the store did not answer: the caller reports the store, not the file
        raise BadInput(f"checkpoint {path} is unreadable: {_first_line(e)}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise BadInput(f"checkpoint {path} does not match its recorded sha256")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError...)
        raise BadInput(f"checkpoint {path} is unreadable: {_first_line(e)}") from None
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        obj = next((obj[k] for k in _WRAPPER_KEYS if _is_state_dict(obj.get(k))), obj)
    if _is_state_dict(obj):
        return obj if isinstance(obj, dict) else dict(obj)
    raise BadInput(f"checkpoint {path} is not a state_dict (str -> tensor mapping)")


def verify_checkpoints(records: list[CheckpointRecord]) -> None:
    """Check every checkpoint file against the sha256 its index recorded, before any is used.

    BadInput (one line) naming the first missing or mismatching file: a resumed run refuses a
    damaged checkpoint rather than attributing a model it did not train.
    """
    for r in records:
        try:
            digest = file_sha256(r.path)
        except (FileNotFoundError, IsADirectoryError):
            raise BadInput(f"checkpoint {r.path} does not exist") from None
        if digest != r.sha256.lower():
            raise BadInput(f"checkpoint {r.path} does not match its recorded sha256")
