"""JVP embeddings against central finite differences of the truncated model, and batching invariance."""

import pytest
import torch

from hf_influence.testing import formatted_batch
from hf_influence.formatting import pad_batch
from hf_influence.extraction.jvp import JVPConfig, JVPEmbedder, truncated_decoder
from hf_influence.testing import tiny_causal_lm


@pytest.mark.parametrize(("arch", "perturb_embeddings", "jvp_pooling"), [
    ("llama", False, "last"), ("qwen2", False, "last"), ("llama", True, "last"), ("qwen2", True, "response_mean")])
def test_jvp_matches_central_finite_difference(arch, perturb_embeddings, jvp_pooling):
    model, tokenizer = tiny_causal_lm(arch, dtype=torch.float64, num_layers=3)
    _, batch = formatted_batch(tokenizer)
    embedder = JVPEmbedder(model, JVPConfig(num_blocks=2, num_tangents=2, jvp_projection="none",
                                            perturb_embeddings=perturb_embeddings, jvp_pooling=jvp_pooling))
    assert any(name.startswith("embed_tokens") for name in embedder.parameters) == perturb_embeddings
    jvp_vectors = embedder.raw(batch)
    epsilon = 1e-5
    finite_differences = []
    with torch.no_grad():
        for tangent in embedder.tangents:
            plus = {n: p + epsilon * tangent[n] for n, p in embedder.parameters.items()}
            minus = {n: p - epsilon * tangent[n] for n, p in embedder.parameters.items()}
            finite_differences.append(
                (embedder.hidden_states(plus, batch["input_ids"], batch["attention_mask"], batch["labels"])
                 - embedder.hidden_states(minus, batch["input_ids"], batch["attention_mask"], batch["labels"]))
                / (2 * epsilon)
            )
    expected = torch.cat(finite_differences, dim=1)
    assert jvp_vectors.shape == (batch["input_ids"].shape[0], 2 * model.config.hidden_size)
    for row in range(expected.shape[0]):
        error = (jvp_vectors[row] - expected[row]).norm() / expected[row].norm()
        assert error <= 1e-3, f"row {row}: relative error {error:.2e}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_equals_one_at_a_time(arch):
    model, tokenizer = tiny_causal_lm(arch)
    formatted, batch = formatted_batch(tokenizer)
    embedder = JVPEmbedder(model, JVPConfig(num_blocks=1, num_tangents=3, jvp_projection="gaussian", jvp_projection_dim=40))
    batched = embedder.embed(batch)
    assert batched.shape == (len(formatted), 40)
    singles = torch.cat([embedder.embed(pad_batch([row], tokenizer.pad_token_id)) for row in formatted])
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-5)


def test_truncated_model_matches_the_first_blocks_and_leaves_the_model_intact():
    model, tokenizer = tiny_causal_lm("llama", num_layers=3)
    _, batch = formatted_batch(tokenizer)
    truncated = truncated_decoder(model, 2)
    assert len(model.model.layers) == 3 and len(truncated.layers) == 2
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        mine = truncated(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    # hidden_states[2] is the output of block 2 before the final norm.
    torch.testing.assert_close(mine, model.model.norm(hidden.hidden_states[2]))
    assert model.config._attn_implementation == "sdpa"


def test_seed_determinism_and_eager_switch_is_undone():
    model, tokenizer = tiny_causal_lm("qwen2")
    _, batch = formatted_batch(tokenizer)
    first = JVPEmbedder(model, JVPConfig(num_blocks=2, jvp_seed=3)).embed(batch)
    second = JVPEmbedder(model, JVPConfig(num_blocks=2, jvp_seed=3)).embed(batch)
    other = JVPEmbedder(model, JVPConfig(num_blocks=2, jvp_seed=4)).embed(batch)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)
    assert model.config._attn_implementation == "sdpa"


def test_bad_configuration():
    model, _ = tiny_causal_lm("llama", num_layers=2)
    with pytest.raises(ValueError, match="JVPConfig.num_blocks=3: the model has 2 decoder blocks"):
        JVPEmbedder(model, JVPConfig(num_blocks=3))
    with pytest.raises(ValueError, match="JVPConfig.num_blocks must be an integer >= 1, got 0"):
        JVPConfig(num_blocks=0)
    with pytest.raises(ValueError, match="jvp_pooling must be one of"):
        JVPConfig(jvp_pooling="max")


def test_response_mean_pools_the_label_tokens_only():
    model, tokenizer = tiny_causal_lm("llama", dtype=torch.float64, num_layers=2)
    _, batch = formatted_batch(tokenizer)
    embedder = JVPEmbedder(model, JVPConfig(num_blocks=1, jvp_pooling="response_mean"))
    pooled = embedder.hidden_states(embedder.parameters, batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        hidden = embedder.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    for row in range(hidden.shape[0]):
        response = batch["labels"][row] != -100
        assert 0 < response.sum() < batch["attention_mask"][row].sum()  # a real subset of the row
        torch.testing.assert_close(pooled[row], hidden[row, response].mean(0))
    with pytest.raises(ValueError, match="needs the batch's labels"):
        embedder.hidden_states(embedder.parameters, batch["input_ids"], batch["attention_mask"])
