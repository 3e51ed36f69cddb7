"""Inputs of any shape: list columns read from Parquet, several input columns through the model,
per-batch padding, and per-sample gradients on images and on several columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from estimators.per_sample import per_sample_gradients
from storage.errors import BadInput
from workloads.datasets import load_parquet, read_samples, samples_table
from workloads.inputs import batch_inputs, call_model, model_inputs, take
from workloads.models import small_cnn
from workloads.training import Recipe, train

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def _load(path: Path, **kw):
    return load_parquet(path, label_column="label", feature_columns=kw.pop("features", None),
                        group_column=None, fractions=FRACTIONS, seed=0, **kw)


def _images(n: int = 12) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 4, 5), dtype=np.float32)


def test_nested_list_column_comes_back_as_images(tmp_path: Path) -> None:
    images = _images()
    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": images.tolist(), "label": np.arange(12) % 3}), path)
    samples = _load(path)
    assert list(samples.inputs) == ["image"]
    assert samples.inputs["image"].shape == (12, 1, 4, 5)
    assert samples.inputs["image"].dtype == np.float32
    np.testing.assert_array_equal(samples.inputs["image"], images)
    assert samples.input_shape == (1, 4, 5)


@pytest.mark.parametrize("where", ["config", "metadata"])
def test_flat_fixed_size_list_with_a_recorded_shape(tmp_path: Path, where: str) -> None:
    images = _images()
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1), pa.float64()), 20)
    table = pa.table({"image": flat, "label": np.arange(12) % 3})
    shapes = {"image": (1, 4, 5)}
    if where == "metadata":
        table = table.replace_schema_metadata({b"shapes": json.dumps(shapes).encode()})
    path = tmp_path / "flat.parquet"
    pq.write_table(table, path)
    samples = _load(path, shapes=shapes if where == "config" else None)
    np.testing.assert_array_equal(samples.inputs["image"], images)  # float64 -> float32
    assert samples.inputs["image"].dtype == np.float32


def test_several_columns_round_trip_through_the_store(tmp_path: Path) -> None:
    tokens = [[5, 6, 7], [8], [9, 10], [11, 12, 13]] * 3
    table = pa.table({
        "input_ids": pa.array(tokens, pa.list_(pa.int32())),
        "attention_mask": pa.array([[1] * len(t) for t in tokens], pa.list_(pa.int8())),
        "a": np.arange(12, dtype=np.float64), "b": np.ones(12, np.int16),
        "label": np.arange(12) % 2,
    })
    pq.write_table(table, tmp_path / "tokens.parquet")
    samples = _load(tmp_path / "tokens.parquet")
    assert list(samples.inputs) == ["features", "input_ids", "attention_mask"]
    assert samples.inputs["features"].shape == (12, 2)
    ids = samples.inputs["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (12, 3)
    np.testing.assert_array_equal(ids[1], [8, 0, 0])  # padded with 0 to the longest
    np.testing.assert_array_equal(samples.inputs["attention_mask"][1], [1, 0, 0])
    pq.write_table(samples_table(samples), tmp_path / "samples.parquet")
    back = read_samples(tmp_path / "samples.parquet")
    for name, col in samples.inputs.items():
        assert back.inputs[name].dtype == col.dtype
        np.testing.assert_array_equal(back.inputs[name], col)
    # padding per batch: rows 1 and 2 use 2 positions at most
    batch = batch_inputs(back.inputs, np.array([1, 2]))
    assert batch["input_ids"].shape == (2, 2) and batch["attention_mask"].shape == (2, 2)
    assert batch["features"].shape == (2, 2)


def test_ragged_float_rows_are_refused(tmp_path: Path) -> None:
    table = pa.table({"image": [[[1.0, 2.0]], [[3.0]]], "label": [0, 1]})
    pq.write_table(table, tmp_path / "ragged.parquet")
    with pytest.raises(BadInput, match="'image'.*different shapes.*one shape is required"):
        _load(tmp_path / "ragged.parquet")


def test_a_recorded_shape_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": [[1.0] * 6, [2.0] * 6], "label": [0, 1]}), tmp_path / "x.pq")
    with pytest.raises(BadInput, match=r"can't be read as shape \(1, 2, 2\)"):
        _load(tmp_path / "x.pq", shapes={"x": (1, 2, 2)})
    with pytest.raises(BadInput, match=r"data.shapes names \['y'\], not list columns"):
        _load(tmp_path / "x.pq", shapes={"y": (6,)})


class TwoInputs(nn.Module):
    """``model(tokens=..., dense=...)``: an embedding bag of the tokens beside a dense vector."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 4)
        self.dense = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens).mean(1) + self.dense(dense)))


def _two_inputs(n: int = 10) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, 20, (n, 5), generator=g),
             "dense": torch.randn(n, 3, generator=g)}
    return batch, torch.randint(0, 3, (n,), generator=g)


def test_several_columns_call_the_model_by_keyword_and_train() -> None:
    torch.manual_seed(0)
    model = TwoInputs()
    batch, y = _two_inputs()
    assert call_model(model, batch).shape == (10, 3)
    before = F.cross_entropy(call_model(model, batch), y).item()
    train(model, batch, y, Recipe(epochs=20, batch_size=4, lr=0.1), seed=0)
    assert F.cross_entropy(call_model(model, batch), y).item() < before
    assert model_inputs({"only": y}) is y  # one column: the tensor itself

    class Output:  # like Hugging Face's ModelOutput
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, tokens, dense):
            return Output(self.inner(tokens=tokens, dense=dense))

    torch.testing.assert_close(call_model(Wrapped(), batch), call_model(model, batch))


def test_per_sample_gradients_of_several_columns_match_a_loop() -> None:
    torch.manual_seed(1)
    model = TwoInputs().eval()
    batch, y = _two_inputs(6)
    grads = per_sample_gradients(model, batch, y, chunk_size=4)
    for i in range(6):
        model.zero_grad()
        F.cross_entropy(call_model(model, take(batch, slice(i, i + 1))), y[i : i + 1]).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(grads[i], expected, rtol=1e-5, atol=1e-6)


def test_image_cnn_closed_form_matches_vmap() -> None:
    torch.manual_seed(2)
    model = small_cnn((1, 20, 20), 4, channels=3, flat=False).eval()  # the large-image layout
    x, y = torch.rand(5, 1, 20, 20), torch.tensor([0, 1, 2, 3, 0])
    closed = per_sample_gradients(model, x, y)  # layerwise route: an nn.Sequential of convs
    vmapped = per_sample_gradients(model, x, y, cost=F.cross_entropy)
    torch.testing.assert_close(closed, vmapped, rtol=1e-4, atol=1e-6)
