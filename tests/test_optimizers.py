"""The affine step (scale, drift) against real torch.optim steps, and a hand-computed AdamW step."""

import pytest
import torch

from hf_influence.optimizers import OptimizerStateError, affine_step


def _warmed_up(optimizer_class, steps=3, **kwargs):
    torch.manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    optimizer = optimizer_class(parameters, **kwargs)
    for _ in range(steps):
        for p in parameters:
            p.grad = torch.randn_like(p)
        optimizer.step()
    return parameters, optimizer


def _flat(tensors):
    return torch.cat([t.detach().flatten() for t in tensors])


def _real_step(parameters, optimizer, gradient):
    offset = 0
    for p in parameters:
        p.grad = gradient[offset: offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    optimizer.step()
    return _flat(parameters)


def test_adamw_matches_hand_computed_step():
    lr, (beta1, beta2), eps, wd = 1e-2, (0.9, 0.95), 1e-8, 0.1
    parameters, optimizer = _warmed_up(torch.optim.AdamW, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    step = affine_step(optimizer, parameters)
    theta = _flat(parameters)
    m = _flat([optimizer.state[p]["exp_avg"] for p in parameters])
    v = _flat([optimizer.state[p]["exp_avg_sq"] for p in parameters])
    t = 3
    # Written out from docs/algorithms.md §1.1, independently of the implementation.
    vhat = v / (1 - beta2 ** (t + 1))
    a1, a2 = beta1 / (1 - beta1 ** (t + 1)), (1 - beta1) / (1 - beta1 ** (t + 1))
    torch.testing.assert_close(step.scale.double(), a2 / (vhat.sqrt() + eps), rtol=1e-6, atol=0)
    torch.testing.assert_close(step.drift.double(), wd * theta + a1 * m / (vhat.sqrt() + eps), rtol=1e-6, atol=1e-9)
    assert step.lr == lr and step.kind == "adamw"


def test_adamw_affine_step_predicts_the_real_step_for_small_gradients():
    parameters, optimizer = _warmed_up(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    step = affine_step(optimizer, parameters)
    theta = _flat(parameters)
    v = _flat([optimizer.state[p]["exp_avg_sq"] for p in parameters])
    # A gradient much smaller than sqrt(v) leaves the second moment (almost) frozen, as the model assumes.
    gradient = 1e-3 * v.sqrt() * torch.randn(theta.shape, dtype=torch.float64)
    predicted = step.apply(theta, gradient).double()
    actual = _real_step(parameters, optimizer, gradient)
    moved = (actual - theta).norm()
    assert (predicted - actual).norm() / moved < 1e-3


def test_frozen_second_moment_is_exact_when_the_moment_is_given():
    """With v_{t+1} substituted, the affine form reproduces torch's AdamW step to rounding."""
    parameters, optimizer = _warmed_up(torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)
    theta = _flat(parameters)
    gradient = torch.randn(theta.shape, dtype=torch.float64)
    originals = [optimizer.state[p]["exp_avg_sq"].clone() for p in parameters]
    for p, g in zip(parameters, torch.split(gradient, [p.numel() for p in parameters])):
        optimizer.state[p]["exp_avg_sq"].mul_(0.99).addcmul_(g.view_as(p), g.view_as(p), value=0.01)
    step = affine_step(optimizer, parameters)
    for p, original in zip(parameters, originals):
        optimizer.state[p]["exp_avg_sq"].copy_(original)
    predicted = step.apply(theta, gradient).double()
    actual = _real_step(parameters, optimizer, gradient)
    torch.testing.assert_close(predicted, actual, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.1, momentum=0.0, weight_decay=0.01),
    dict(lr=0.1, momentum=0.9, weight_decay=0.01),
    dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
])
@pytest.mark.parametrize("steps", [0, 2])
def test_sgd_affine_step_is_exact(kwargs, steps):
    parameters, optimizer = _warmed_up(torch.optim.SGD, steps=steps, **kwargs)
    step = affine_step(optimizer, parameters)
    theta = _flat(parameters)
    gradient = torch.randn(theta.shape, dtype=torch.float64)
    torch.testing.assert_close(step.apply(theta, gradient).double(), _real_step(parameters, optimizer, gradient))


def test_plain_gd_and_refusals():
    parameters, _ = _warmed_up(torch.optim.SGD, steps=0, lr=1.0)
    step = affine_step(None, parameters)
    assert step.kind == "gd" and torch.all(step.scale == 1) and torch.all(step.drift == 0)
    coupled, optimizer = _warmed_up(torch.optim.Adam, weight_decay=0.1)
    with pytest.raises(OptimizerStateError, match="not AdamW"):
        affine_step(optimizer, coupled)
    fresh = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(OptimizerStateError, match="warm-up"):
        affine_step(torch.optim.AdamW(fresh), fresh)
    with pytest.raises(OptimizerStateError, match="does not hold"):
        affine_step(optimizer, fresh)
    with pytest.raises(OptimizerStateError, match="not supported"):
        affine_step(torch.optim.RMSprop(fresh), fresh)


def test_a_preconditioner_restricted_to_a_truncated_model_is_that_models_own():
    """restricted_scale: the full run's Adam scale sliced to a truncated model's adapters equals the scale
    affine_step builds for those adapters directly."""
    from hf_influence.extraction.gradients import GradientConfig, PerSampleGradients
    from hf_influence.methods.stores import restricted_scale
    from hf_influence.optimizers import affine_step
    from hf_influence.testing import lora_model

    model, _ = lora_model(num_layers=3)
    full = PerSampleGradients(model, GradientConfig())
    part = PerSampleGradients(model, GradientConfig(gradient_blocks=2))
    optimizer = torch.optim.AdamW(full.parameters, lr=1e-3)
    for parameter in full.parameters:
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    assert part.raw_dim < full.raw_dim
    torch.testing.assert_close(restricted_scale(affine_step(optimizer, full.parameters).scale, full, part),
                               affine_step(optimizer, part.parameters).scale)
