"""Per-sample gradients against a per-sample autograd loop (HF's own loss) and the batched gradient."""

import pytest
import torch

from hf_influence.testing import ATTENTION, formatted_batch, lora_model
from hf_influence.formatting import pad_batch
from hf_influence.extraction.gradients import GradientConfig, GradientError, PerSampleGradients
from hf_influence.testing import tiny_causal_lm

CASES = [
    ("llama", ATTENTION),
    ("llama", "all-linear"),
    ("qwen2", ATTENTION),
    ("qwen2", "all-linear"),
]


def loop_gradients(model, parameters, formatted):
    """Reference: one unpadded forward/backward per sample with transformers' own causal-LM loss."""
    rows = []
    for row in formatted:
        input_ids = torch.tensor([row["input_ids"]])
        loss = model(input_ids=input_ids, labels=torch.tensor([row["labels"]])).loss
        grads = torch.autograd.grad(loss, parameters)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("arch,targets", CASES)
def test_lora_per_sample_gradients_match_loop(arch, targets):
    model, tokenizer = lora_model(arch, targets, dtype=torch.float64)
    formatted, batch = formatted_batch(tokenizer)
    assert batch["attention_mask"].sum(1).unique().numel() > 1, "the batch must carry uneven padding"
    per_sample = PerSampleGradients(model, GradientConfig(projection="none", normalize=False))
    hooks = per_sample.raw(batch)
    reference = loop_gradients(model, per_sample.parameters, formatted)
    assert hooks.shape == (len(formatted), per_sample.raw_dim)
    for i in range(len(formatted)):
        assert relative_error(hooks[i], reference[i]) <= 1e-5, f"row {i}"
    # Per-sample gradients sum to the gradient of the summed batch loss.
    from hf_influence.extraction.gradients import per_sample_losses

    batched = torch.autograd.grad(per_sample_losses(model, batch).sum(), per_sample.parameters)
    assert relative_error(hooks.sum(0), torch.cat([g.flatten() for g in batched])) <= 1e-6


def test_float32_hooks_agree_with_loop():
    model, tokenizer = lora_model("qwen2", "all-linear")
    formatted, batch = formatted_batch(tokenizer)
    per_sample = PerSampleGradients(model, GradientConfig(projection="none", normalize=False))
    reference = loop_gradients(model, per_sample.parameters, formatted)
    assert relative_error(per_sample.raw(batch), reference) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_parameter_pattern_matches_loop(arch):
    model, tokenizer = tiny_causal_lm(arch, dtype=torch.float64)
    formatted, batch = formatted_batch(tokenizer)
    pattern = "q_proj" if arch == "qwen2" else "down_proj"  # qwen2's q_proj carries a bias
    per_sample = PerSampleGradients(model, GradientConfig(parameters="pattern", parameter_pattern=pattern, projection="none", normalize=False))
    assert all(pattern in name for name in per_sample.parameter_names)
    if arch == "qwen2":
        assert any(name.endswith("bias") for name in per_sample.parameter_names)
    reference = loop_gradients(model, per_sample.parameters, formatted)
    assert relative_error(per_sample.raw(batch), reference) <= 1e-8
    # Tracked weights are only made trainable while computing.
    assert all(p.requires_grad for p in model.parameters())


def test_truncated_model_gradient_matches_loop_on_a_truncated_copy():
    """gradient_blocks: the per-sample gradient of the model cut after its first blocks (then the final norm and head)
    equals HF's own loss on a copy whose decoder keeps those blocks only; the model itself stays whole."""
    import copy

    model, tokenizer = lora_model("llama", dtype=torch.float64, num_layers=3)
    formatted, batch = formatted_batch(tokenizer)
    per_sample = PerSampleGradients(model, GradientConfig(gradient_blocks=2, projection="none", normalize=False))
    assert per_sample.parameter_names and all(".layers.2." not in name for name in per_sample.parameter_names)
    assert any(".layers.1." in name for name in per_sample.parameter_names)
    truncated = copy.deepcopy(model)
    decoder = truncated.get_base_model().model
    decoder.layers = torch.nn.ModuleList(list(decoder.layers[:2]))
    named = dict(truncated.named_parameters())
    reference = loop_gradients(truncated, [named[name] for name in per_sample.parameter_names], formatted)
    assert relative_error(per_sample.raw(batch), reference) <= 1e-8
    assert len(model.get_base_model().model.layers) == 3
    full = PerSampleGradients(model, GradientConfig(projection="none", normalize=False))
    assert relative_error(per_sample.raw(batch), full.raw(batch)[:, : per_sample.raw_dim]) > 1e-3  # not the full model's


def test_lora_pattern_keeps_the_matching_slice_of_the_full_gradient():
    model, tokenizer = lora_model("qwen2", dtype=torch.float64, num_layers=3)
    _, batch = formatted_batch(tokenizer)
    full = PerSampleGradients(model, GradientConfig(projection="none", normalize=False))
    tail = PerSampleGradients(model, GradientConfig(parameter_pattern=r"\.layers\.2\.", projection="none", normalize=False))
    assert tail.parameter_names and all(".layers.2." in name for name in tail.parameter_names)
    columns = torch.cat([torch.full((p.numel(),), name in tail.parameter_names)
                         for name, p in zip(full.parameter_names, full.parameters)])
    assert relative_error(tail.raw(batch), full.raw(batch)[:, columns]) <= 1e-10
    with pytest.raises(GradientError, match="matches no LoRA layer"):
        PerSampleGradients(model, GradientConfig(parameter_pattern="no_such_layer"))
    with pytest.raises(GradientError, match="GradientConfig.gradient_blocks=4: the model has 3 decoder blocks"):
        PerSampleGradients(model, GradientConfig(gradient_blocks=4))


def test_frozen_base_weights_are_restored():
    model, tokenizer = tiny_causal_lm("llama")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    _, batch = formatted_batch(tokenizer)
    per_sample = PerSampleGradients(model, GradientConfig(parameters="pattern", parameter_pattern="down_proj", projection="none"))
    per_sample.compute(batch)
    assert not any(p.requires_grad for p in model.parameters())


def test_factored_projection_equals_projected_full_gradient():
    model, tokenizer = tiny_causal_lm("qwen2", dtype=torch.float64)
    _, batch = formatted_batch(tokenizer)
    config = dict(parameters="pattern", parameter_pattern="v_proj", normalize=True)
    factored = PerSampleGradients(model, GradientConfig(projection="factored", factored_out_dim=4, factored_in_dim=8, **config))
    full = PerSampleGradients(model, GradientConfig(projection="none", **config))
    vectors = factored.compute(batch)
    raw = full.raw(batch)
    expected = []
    offset = 0
    for layer, projector in zip(factored.layers, factored._factored):
        out_f, in_f = layer.module.out_features, layer.module.in_features
        weight = raw[:, offset: offset + out_f * in_f]
        bias = raw[:, offset + out_f * in_f: offset + out_f * in_f + out_f]
        offset += out_f * in_f + out_f
        expected += [projector.project(weight), projector.project_output_side(bias)]
    expected = torch.cat(expected, dim=1) / raw.norm(dim=1, keepdim=True)
    assert vectors.shape == (raw.shape[0], factored.output_dim)
    torch.testing.assert_close(vectors, expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("projection", ["countsketch", "srht", "gaussian"])
def test_projected_real_gradients_preserve_cosines(projection):
    """JL on real per-sample gradients: 24 demo rows of four domains, all 276 pairs."""
    from hf_influence.demo import demo_pool

    model, tokenizer = lora_model("llama", "all-linear")
    rows = [{"messages": m} for m in demo_pool(6, seed=0)["messages"]]
    _, batch = formatted_batch(tokenizer, rows)
    exact = PerSampleGradients(model, GradientConfig(projection="none", normalize=True)).compute(batch)
    projected = PerSampleGradients(model, GradientConfig(projection=projection, projection_dim=2048, projection_seed=7)).compute(batch)
    assert torch.allclose(exact.norm(dim=1), torch.ones(exact.shape[0]), atol=1e-5)
    cos_exact, cos_projected = exact @ exact.T, projected @ projected.T
    assert cos_exact.std() > 0.05, "the rows must not all be alike for this check to mean anything"
    assert (cos_exact - cos_projected).abs().max() < 4 / 2048**0.5


def test_preconditioner_is_applied_before_normalisation():
    model, tokenizer = lora_model("llama")
    _, batch = formatted_batch(tokenizer)
    per_sample = PerSampleGradients(model, GradientConfig(projection="none", normalize=True))
    scale = torch.rand(per_sample.raw_dim) + 0.5
    raw = per_sample.raw(batch) * scale
    expected = raw / raw.norm(dim=1, keepdim=True)
    torch.testing.assert_close(per_sample.compute(batch, preconditioner=scale), expected)
    with pytest.raises(GradientError, match="shape"):
        per_sample.compute(batch, preconditioner=scale[:-1])


def test_refuses_dora_and_non_peft_models():
    model, _ = tiny_causal_lm("llama")
    with pytest.raises(GradientError, match="PEFT LoRA"):
        PerSampleGradients(model, GradientConfig())
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(tiny_causal_lm("llama")[0], LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(GradientError, match="DoRA"):
        PerSampleGradients(dora, GradientConfig())
    with pytest.raises(GradientError, match="matches no Linear"):
        PerSampleGradients(model, GradientConfig(parameters="pattern", parameter_pattern="no_such_layer"))


def test_refuses_untracked_trainable_parameters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_causal_lm("llama")[0], LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(GradientError, match="outside LoRA"):
        PerSampleGradients(model, GradientConfig())


def test_nan_gradient_names_the_row():
    model, tokenizer = lora_model("llama")
    _, batch = formatted_batch(tokenizer)
    with torch.no_grad():
        model.get_base_model().model.embed_tokens.weight[batch["input_ids"][3, 2]] = float("nan")
    per_sample = PerSampleGradients(model, GradientConfig(projection="none"))
    with pytest.raises(GradientError, match=r"rows \[.*103.*\]"):
        per_sample.compute(batch, row_ids=[100, 101, 102, 103, 104])


def test_row_without_labels_is_refused():
    model, tokenizer = lora_model("llama")
    formatted, _ = formatted_batch(tokenizer)
    rows = list(formatted)
    rows[1]["labels"] = [-100] * len(rows[1]["labels"])
    batch = pad_batch(rows, tokenizer.pad_token_id)
    with pytest.raises(GradientError, match=r"rows \[1\] have no label"):
        PerSampleGradients(model, GradientConfig(projection="none")).compute(batch)


def test_bfloat16_model_gives_float32_vectors_close_to_float32_model():
    model, tokenizer = lora_model("llama")
    _, batch = formatted_batch(tokenizer)
    config = GradientConfig(projection="countsketch", projection_dim=256)
    reference = PerSampleGradients(model, config).compute(batch)
    half = PerSampleGradients(model.to(torch.bfloat16), config).compute(batch)
    assert half.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(half, reference).min() > 0.98
