"""The Taylor check: the one-step objective of docs/algorithms.md §1.1 against the real loss change after a real
optimizer step on the weighted pool loss, over many random weight vectors.

The coefficients come from the library's own machinery (per-sample gradients with the optimizer's
preconditioner, exact target-Hessian products), with projection and normalisation off so that they are
the exact Taylor coefficients:
    L_T(theta') - L_T(theta) ~ -eta g_T.b + (eta^2/2) b.H b - (eta/n) p.w + (eta^2 / 2n) w.Q w
    p = U (g_T - eta H b),  Q = (1/n) U H U^T,  U = rows A g_i.
"""

import copy

import pytest
import torch
from hf_influence.testing import lora_model

from hf_influence.demo import demo_pool, demo_target
from hf_influence.formatting import FormattingConfig, format_dataset, pad_batch
from hf_influence.extraction.gradients import GradientConfig, PerSampleGradients, per_sample_losses
from hf_influence.extraction.hessian import TargetHessian
from hf_influence.optimizers import affine_step

NUM_WEIGHT_VECTORS = 40


@pytest.fixture(autouse=True)
def one_thread():
    # Thousands of tiny float64 ops, each a parallel region ending in a barrier: on a shared 2-core machine a
    # descheduled second thread stalled this file 10-50x (20 minutes next to a benchmark). One thread loses
    # nothing at this size.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem():
    model, tokenizer = lora_model(dtype=torch.float64, seed=3)
    # 8 rows, 4 domains: the pool of the README's Taylor table (two of its rows are the same, as 0.5 drew them).
    pool = format_dataset(demo_pool(2, seed=0, distinct=False), tokenizer).dataset
    # The bare final answers: short targets, on which a step of lr 1e-3 is small enough for the Taylor test.
    target = format_dataset(demo_target("math", 3, seed=1), tokenizer, FormattingConfig(response_column="answer")).dataset
    pad = tokenizer.pad_token_id
    return model, pad_batch(list(pool), pad), pad_batch(list(target), pad)


def _target_loss(model, target_batch):
    with torch.no_grad():
        return per_sample_losses(model, target_batch).mean().item()


def _warm_up(model, optimizer, pool_batch, steps):
    """Steps on randomly weighted pool losses drawn like the test's weight vectors, so that Adam's second moment
    has seen gradients of the size the test applies (the objective assumes it frozen for one step)."""
    for seed in range(steps):
        optimizer.zero_grad()
        weights = _random_weights(pool_batch["input_ids"].shape[0], seed=1000 + seed)[0]
        (per_sample_losses(model, pool_batch) * weights).mean().backward()
        optimizer.step()


def _taylor_terms(model, optimizer, pool_batch, target_batch):
    tracked = PerSampleGradients(model, GradientConfig(projection="none", normalize=False))
    step = affine_step(optimizer, tracked.parameters)
    pool_vectors = tracked.compute(pool_batch, preconditioner=step.scale).double()  # U = rows A g_i
    target_gradient = tracked.compute(target_batch).double().mean(0)
    hessian = TargetHessian(model, tracked.parameters, [target_batch])
    n = pool_vectors.shape[0]
    q = pool_vectors @ hessian.matmul(pool_vectors).double().T / n
    drift = step.drift.double()
    h_drift = hessian.matmul(drift).double()
    return step.lr, pool_vectors, target_gradient, (q + q.T) / 2, drift, h_drift


def _real_changes(model, optimizer, pool_batch, target_batch, weights):
    """The actual target-loss change after one step on (1/n) sum w_i l_i, for each weight vector."""
    before_model, before_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    base = _target_loss(model, target_batch)
    changes = []
    for w in weights:
        model.load_state_dict(before_model)
        # load_state_dict keeps the given state tensors, which the step then updates in place: load a copy.
        optimizer.load_state_dict(copy.deepcopy(before_optimizer))
        optimizer.zero_grad()
        (per_sample_losses(model, pool_batch) * w).mean().backward()
        optimizer.step()
        changes.append(_target_loss(model, target_batch) - base)
    model.load_state_dict(before_model)
    optimizer.load_state_dict(before_optimizer)
    return torch.tensor(changes, dtype=torch.float64)


def _predictions(lr, pool_vectors, target_gradient, q, drift, h_drift, weights):
    n = pool_vectors.shape[0]
    constant = -lr * target_gradient @ drift + 0.5 * lr**2 * drift @ h_drift
    p = pool_vectors @ (target_gradient - lr * h_drift)
    first = constant - (lr / n) * weights @ p
    second = first + (lr**2 / (2 * n)) * torch.einsum("wi,ij,wj->w", weights, q, weights)
    return first, second


def _random_weights(n, seed):
    generator = torch.Generator().manual_seed(seed)
    # Non-negative, summing to n, and far from uniform so that the change varies a lot between vectors.
    raw = torch.rand(NUM_WEIGHT_VECTORS, n, generator=generator, dtype=torch.float64) ** 3
    return raw / raw.sum(1, keepdim=True) * n


def _corr(a, b):
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def _report(name, make_optimizer, warmup_steps, lr):
    model, pool_batch, target_batch = _problem()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    _warm_up(model, optimizer, pool_batch, warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    weights = _random_weights(pool_batch["input_ids"].shape[0], seed=1)
    actual = _real_changes(model, optimizer, pool_batch, target_batch, weights)
    first, second = _predictions(*_taylor_terms(model, optimizer, pool_batch, target_batch), weights)
    report = {
        "corr_first": _corr(actual, first), "corr_second": _corr(actual, second),
        # Spread of the residual over weight vectors: what matters for choosing w (a constant offset does not).
        "error_first": (actual - first).std().item(), "error_second": (actual - second).std().item(),
        "spread": actual.std().item(),
    }
    print(name, f"lr={lr}", {key: f"{value:.4g}" for key, value in report.items()})
    return report


def _sgd(params):
    return torch.optim.SGD(params, lr=1e-3)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)


def _adamw_without_momentum(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, betas=(0.0, 0.999))


@pytest.mark.parametrize(
    ("name", "make_optimizer", "warmup_steps", "lr"),
    [("gd", _sgd, 0, 1e-3), ("adamw", _adamw, 200, 1e-5), ("adamw_beta1_0", _adamw_without_momentum, 200, 1e-5)],
)
@pytest.mark.slow
def test_first_order_prediction_matches_a_small_real_step(name, make_optimizer, warmup_steps, lr):
    report = _report(name, make_optimizer, warmup_steps, lr)
    assert report["corr_first"] > 0.99
    assert report["error_first"] < 0.05 * report["spread"]


@pytest.mark.slow
def test_second_order_improves_a_large_gd_step():
    report = _report("gd", _sgd, 0, 1.0)
    assert report["corr_second"] > report["corr_first"] + 0.05
    assert report["error_second"] < 0.9 * report["error_first"]
    assert report["corr_second"] > 0.95


@pytest.mark.slow
def test_second_order_improves_the_ranking_of_a_large_adamw_step():
    # Frozen second moment: the real step also updates v with the (weighted) gradient squared, which shrinks the
    # largest coordinates' steps, so the quadratic term overshoots in size; the ranking of weight vectors is what
    # it improves. With momentum (beta1 = 0.9) the drift step dominates and the expansion point matters more than
    # the curvature: there the second-order term does not help (measured; see the notes).
    report = _report("adamw_beta1_0", _adamw_without_momentum, 200, 3e-3)
    assert report["corr_second"] > report["corr_first"]
    assert report["corr_second"] > 0.99
