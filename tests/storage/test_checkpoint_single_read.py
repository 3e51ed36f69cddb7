"""load_state_dict reads the checkpoint file once: the hash is checked on the bytes it loads.
Opens are counted with a Python audit hook (every ``open`` raises an "open" audit event)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from storage.checkpoints import load_state_dict, save_checkpoint
from storage.errors import BadInput

_WATCHED: dict[str, int] = {}


def _count_opens(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        name = os.fsdecode(args[0])
        if name in _WATCHED:
            _WATCHED[name] += 1


sys.addaudithook(_count_opens)  # hooks can't be removed; it counts only watched paths


@pytest.mark.parametrize("with_hash", [True, False])
def test_one_open_per_load(tmp_path: Path, with_hash: bool) -> None:
    state = {"weight": torch.arange(6.0).reshape(2, 3)}
    path, sha = save_checkpoint(tmp_path, 3, state)
    _WATCHED[str(path)] = 0
    try:
        loaded = load_state_dict(path, sha if with_hash else None)
        opens = _WATCHED[str(path)]
    finally:
        del _WATCHED[str(path)]
    torch.testing.assert_close(loaded["weight"], state["weight"])
    assert opens == 1


def test_a_changed_file_is_refused_on_the_bytes_read(tmp_path: Path) -> None:
    path, sha = save_checkpoint(tmp_path, 1, {"w": torch.zeros(4)})
    data = bytearray(Path(path).read_bytes())
    data[-5] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(BadInput, match="does not match its recorded sha256"):
        load_state_dict(path, sha)
