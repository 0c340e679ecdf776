"""Target-loss Hessian products against brute-force Hessians of a tiny LoRA model."""

import pytest
import torch
import torch.nn.functional as F
from hf_influence.testing import CHAT_ROWS, formatted_batch, lora_model
from torch.func import functional_call

from hf_influence.formatting import pad_batch
from hf_influence.extraction.gradients import PerSampleGradients
from hf_influence.extraction.hessian import TargetHessian
from hf_influence.extraction.jvp import eager_attention


def _setup(dtype=torch.float64):
    model, tokenizer = lora_model(target_modules=["q_proj", "v_proj"], dtype=dtype, hidden_size=16, num_layers=1)
    tracked = PerSampleGradients(model)
    names = {id(p): name for name, p in model.named_parameters()}
    tracked_names = [names[id(p)] for p in tracked.parameters]
    formatted, _ = formatted_batch(tokenizer, CHAT_ROWS)
    # Two uneven batches, to check that the products are accumulated over batches with 1/m weights.
    batches = [pad_batch(list(formatted.select(range(2))), tokenizer.pad_token_id),
               pad_batch(list(formatted.select(range(2, 5))), tokenizer.pad_token_id)]
    return model, tracked, tracked_names, batches


def _split(flat, tracked):
    out, offset = [], 0
    for p in tracked.parameters:
        out.append(flat[offset: offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def _target_loss(model, tracked, names, batches, flat, weights):
    parameters = dict(zip(names, _split(flat, tracked)))
    losses = torch.cat([_losses_with(model, parameters, batch) for batch in batches])
    return (losses * weights).sum() / len(losses)


# Per-target weights (what unit-normalised Influence Distillation passes: 1 / |g_j|), or None (all 1).
WEIGHTS = [None, torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)]


def _logits_with(model, parameters, batch):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    return functional_call(model, parameters, args=(), kwargs=inputs).logits


def _losses_with(model, parameters, batch):
    logits = _logits_with(model, parameters, batch)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp_min(0), reduction="none") * mask
    return token.sum(1) / mask.sum(1)


@pytest.mark.parametrize("target_weights", WEIGHTS)
@pytest.mark.slow
def test_exact_products_equal_the_full_hessian(target_weights):
    model, tracked, names, batches = _setup()
    model.eval()
    flat = torch.cat([p.detach().flatten() for p in tracked.parameters])
    weights = torch.ones(5, dtype=torch.float64) if target_weights is None else target_weights
    with eager_attention(model):
        full = torch.autograd.functional.hessian(lambda x: _target_loss(model, tracked, names, batches, x, weights),
                                                 flat, vectorize=True)
    vectors = torch.randn(5, flat.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    products = TargetHessian(model, tracked.parameters, batches, kind="exact", vector_chunk=2,
                             target_weights=target_weights).matmul(vectors)
    torch.testing.assert_close(products.double(), vectors @ full.T, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target_weights", WEIGHTS)
def test_gauss_newton_equals_jacobian_form(target_weights):
    model, tracked, names, batches = _setup()
    model.eval()
    flat = torch.cat([p.detach().flatten() for p in tracked.parameters])
    m = sum(b["input_ids"].shape[0] for b in batches)
    row_weights = (torch.ones(m, dtype=torch.float64) if target_weights is None else target_weights).split([2, 3])
    expected = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    for batch, row_weight in zip(batches, row_weights):
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        def label_logits(x, batch=batch, mask=mask):
            return _logits_with(model, dict(zip(names, _split(x, tracked))), batch)[:, :-1][mask]
        with eager_attention(model):
            jacobian = torch.autograd.functional.jacobian(label_logits, flat, vectorize=True, strategy="forward-mode")
        probabilities = F.softmax(label_logits(flat).detach(), dim=-1)
        weights = (row_weight / (m * mask.sum(1))).unsqueeze(1).expand_as(mask)[mask]
        for token in range(jacobian.shape[0]):
            p = probabilities[token]
            curvature = torch.diag(p) - torch.outer(p, p)
            expected += weights[token] * jacobian[token].T @ curvature @ jacobian[token]
    vectors = torch.randn(3, flat.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    products = TargetHessian(model, tracked.parameters, batches, kind="gauss_newton",
                             target_weights=target_weights).matmul(vectors)
    torch.testing.assert_close(products.double(), vectors @ expected, rtol=1e-4, atol=1e-6)
    # Gauss-Newton is PSD.
    assert torch.linalg.eigvalsh((expected + expected.T) / 2).min() > -1e-8


def test_requires_grad_flags_and_training_mode_restored():
    model, tracked, _, batches = _setup(torch.float32)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    TargetHessian(model, tracked.parameters, batches).matmul(torch.ones(tracked.raw_dim))
    assert model.training and flags == [p.requires_grad for p in model.parameters()]


def test_bad_arguments():
    model, tracked, _, batches = _setup(torch.float32)
    with pytest.raises(ValueError, match="kind"):
        TargetHessian(model, tracked.parameters, batches, kind="fisher")
    with pytest.raises(ValueError, match="coordinates"):
        TargetHessian(model, tracked.parameters, batches).matmul(torch.ones(3, tracked.raw_dim + 1))
    with pytest.raises(ValueError, match=r"target_weights must be \[5\]"):
        TargetHessian(model, tracked.parameters, batches, target_weights=torch.ones(4))
