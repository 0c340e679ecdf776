"""LM-pooled (RDS+) embeddings against a per-row reference, and cosine scores against a direct computation."""

import torch
import torch.nn.functional as F
from hf_influence.testing import CHAT_ROWS, lora_model

from hf_influence.rds_embeddings import cosine_scores, lm_pooled_embeddings
from hf_influence.extraction.extract import extract_lm_embeddings
from hf_influence.formatting import format_dataset
from hf_influence.testing import tiny_causal_lm


def reference_embeddings(model, formatted):
    """One unpadded row at a time: weighted mean of output_hidden_states[-1] with weights 1, 2, ..., T."""
    rows = []
    with torch.no_grad():
        for ids in formatted["input_ids"]:
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            weights = torch.arange(1, len(ids) + 1, dtype=torch.float32)
            pooled = (weights[:, None] * hidden).sum(0) / weights.sum()
            rows.append(pooled / pooled.norm())
    return torch.stack(rows)


def test_matches_per_row_reference(tiny_llama):
    model, tokenizer = tiny_llama
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset
    embeddings = lm_pooled_embeddings(model, formatted, batch_size=3, show_progress=False)
    assert embeddings.shape == (len(CHAT_ROWS), model.config.hidden_size)
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, reference_embeddings(model, formatted), atol=1e-5, rtol=0)


def test_qwen2_matches_reference():
    model, tokenizer = tiny_causal_lm("qwen2", seed=1)
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset
    embeddings = lm_pooled_embeddings(model, formatted, batch_size=5, show_progress=False)
    torch.testing.assert_close(embeddings, reference_embeddings(model, formatted), atol=1e-5, rtol=0)


def test_invariant_to_batch_size_and_padding(tiny_llama):
    model, tokenizer = tiny_llama
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset
    single = lm_pooled_embeddings(model, formatted, batch_size=1, show_progress=False)
    for batch_size in (2, 5, 16):
        batched = lm_pooled_embeddings(model, formatted, batch_size=batch_size, show_progress=False)
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    other_pad = lm_pooled_embeddings(model, formatted, batch_size=5, pad_token_id=7, show_progress=False)
    torch.testing.assert_close(other_pad, single, atol=1e-5, rtol=0)


def test_rows_are_unit_norm(tiny_llama):
    model, tokenizer = tiny_llama
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset
    embeddings = lm_pooled_embeddings(model, formatted, show_progress=False)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(CHAT_ROWS)), atol=1e-6, rtol=0)


def test_restores_training_flag(tiny_llama):
    model, tokenizer = tiny_llama
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset
    model.train()
    lm_pooled_embeddings(model, formatted, show_progress=False)
    assert model.training
    model.eval()
    lm_pooled_embeddings(model, formatted, show_progress=False)
    assert not model.training


def test_peft_model_uses_its_adapters():
    model, tokenizer = lora_model()
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset
    embeddings = lm_pooled_embeddings(model, formatted, batch_size=2, show_progress=False)
    torch.testing.assert_close(embeddings, reference_embeddings(model, formatted), atol=1e-5, rtol=0)
    with model.disable_adapter():
        without_lora = lm_pooled_embeddings(model, formatted, batch_size=2, show_progress=False)
    assert (embeddings - without_lora).abs().max() > 1e-3


def test_cosine_scores_match_direct_computation():
    generator = torch.Generator().manual_seed(0)
    pool, target = torch.randn(37, 8, generator=generator), torch.randn(5, 8, generator=generator) * 3
    expected = F.cosine_similarity(pool[:, None, :], target[None, :, :], dim=2)
    scores = cosine_scores(pool, target, chunk_rows=10)
    assert scores.shape == (37, 5)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(cosine_scores(pool, target), scores, atol=1e-6, rtol=0)


def test_lm_embeddings_store_holds_the_base_models_embeddings_whatever_the_adapter(tmp_path):
    """A PEFT model's store holds its base model's embeddings (adapter off) and records no adapter, so training
    the adapter (a warm-up) leaves the store valid: it is resumed, not refused."""
    model, tokenizer = lora_model()
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset
    store = extract_lm_embeddings(model, formatted, tmp_path / "lm", batch_size=2, show_progress=False)
    with model.disable_adapter():
        base = lm_pooled_embeddings(model, formatted, batch_size=2, pad_token_id=tokenizer.pad_token_id,
                                    show_progress=False)
    torch.testing.assert_close(store.to_tensor(), base)
    assert store.manifest["config"]["adapter_digest"] is None
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "lora_B" in name).add_(0.5)
    again = extract_lm_embeddings(model, formatted, tmp_path / "lm", batch_size=2, show_progress=False)
    assert torch.equal(again.to_tensor(), store.to_tensor())


def test_lm_embeddings_store_equals_the_in_memory_embeddings(tmp_path):
    model, tokenizer = tiny_causal_lm("llama")
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset
    store = extract_lm_embeddings(model, formatted, tmp_path / "lm", batch_size=2, show_progress=False)
    expected = lm_pooled_embeddings(model, formatted, batch_size=2, pad_token_id=tokenizer.pad_token_id,
                                    show_progress=False)
    torch.testing.assert_close(store.to_tensor(), expected)
    assert store.row_ids.tolist() == formatted["row_id"]


def test_a_truncated_last_token_store_is_its_own_store_and_refuses_too_many_blocks(tmp_path):
    """pooling="last" with num_blocks: the store holds lm_pooled_embeddings' rows with the same arguments, and its
    identity names both, so the default (RDS+) store and its identity are untouched; more blocks than the model
    has are refused instead of silently running all of them."""
    import pytest

    from hf_influence.extraction.gradients import GradientError

    model, tokenizer = tiny_causal_lm("llama")
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset
    store = extract_lm_embeddings(model, formatted, tmp_path / "state", batch_size=2, show_progress=False,
                                  pooling="last", num_blocks=1)
    expected = lm_pooled_embeddings(model, formatted, batch_size=2, pad_token_id=tokenizer.pad_token_id,
                                    show_progress=False, pooling="last", num_blocks=1)
    torch.testing.assert_close(store.to_tensor(), expected)
    assert store.manifest["config"] == {**store.manifest["config"], "pooling": "last_token", "num_blocks": 1}
    whole = lm_pooled_embeddings(model, formatted, batch_size=2, pad_token_id=tokenizer.pad_token_id,
                                 show_progress=False, pooling="last")
    assert not torch.allclose(whole, expected)
    rds = extract_lm_embeddings(model, formatted, tmp_path / "rds", batch_size=2, show_progress=False)
    assert rds.manifest["config"]["pooling"] == "position_weighted_mean" and "num_blocks" not in rds.manifest["config"]
    with pytest.raises(GradientError, match="num_blocks=3: the model has 2 decoder blocks"):
        lm_pooled_embeddings(model, formatted, num_blocks=3, show_progress=False)
