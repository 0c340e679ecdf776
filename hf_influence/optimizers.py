"""One optimizer step as an affine map of the (weighted) gradient: theta' = theta - eta * (drift + scale * g).

docs/algorithms.md §1.1. With the second moment frozen at its current value, one step of AdamW, SGD (with
momentum, dampening, Nesterov) or plain GD is affine in the gradient g, with an elementwise `scale`
(the preconditioner A) and a `drift` b that does not depend on g:

    AdamW:  scale = a2 / (sqrt(vhat) + eps),  drift = wd * theta + a1 * m / (sqrt(vhat) + eps)
            a1 = b1 / (1 - b1^(t+1)),  a2 = (1 - b1) / (1 - b1^(t+1)),  vhat = v / (1 - b2^(t+1))
    SGD:    scale = 1 - dampening,     drift = mu * buf + (1 - dampening) * wd * theta
            (Nesterov: scale = 1 + mu, drift = mu^2 * buf + (1 + mu) * wd * theta)

Everything is flattened in the order of the parameter list given (the tracked order of
`PerSampleGradients.parameters`), so `scale * g` preconditions a flattened per-sample gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import HFInfluenceError


class OptimizerStateError(HFInfluenceError, ValueError):
    """The optimizer (or its state) cannot be turned into an affine step."""


@dataclass
class AffineStep:
    """theta' = theta - lr * (drift + scale * g), flattened over the given parameters.

    Attributes:
        scale: [d] elementwise preconditioner A (float32).
        drift: [d] gradient-independent part b (float32).
        lr: the optimizer's learning rate eta.
        kind: "adamw", "sgd" or "gd".
        initial_lr: the learning rate an LR scheduler started from (its `initial_lr`), None without one.
    """

    scale: Tensor
    drift: Tensor
    lr: float
    kind: str
    initial_lr: float | None = None

    def apply(self, parameters_flat: Tensor, gradient_flat: Tensor, lr: float | None = None) -> Tensor:
        """The parameters after one step with gradient `gradient_flat` ([d] each)."""
        step = self.drift.to(gradient_flat) + self.scale.to(gradient_flat) * gradient_flat
        return parameters_flat - (self.lr if lr is None else lr) * step


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def affine_step(optimizer: torch.optim.Optimizer | None, parameters: list[Tensor]) -> AffineStep:
    """Build the affine step of `optimizer`'s next update for `parameters` (plain GD when None).

    Args:
        optimizer: a torch.optim.AdamW, torch.optim.Adam (no weight decay, or decoupled weight decay),
            torch.optim.SGD, or None for plain gradient descent with lr 1.
        parameters: the parameter tensors, in the order the gradients are flattened.

    Raises:
        OptimizerStateError: Adam with coupled L2 weight decay (not AdamW; refused because its step is
            not the AdamW form), a parameter the optimizer does not hold or has no state for, amsgrad,
            or an unsupported optimizer class.
    """
    if optimizer is None:
        flat = torch.cat([p.detach().flatten() for p in parameters]).float()
        return AffineStep(scale=torch.ones_like(flat), drift=torch.zeros_like(flat), lr=1.0, kind="gd")
    groups = _group_of(optimizer)
    missing = [i for i, p in enumerate(parameters) if id(p) not in groups]
    if missing:
        raise OptimizerStateError(f"The optimizer does not hold tracked parameters at positions {missing[:5]}.")
    lrs = {float(groups[id(p)]["lr"]) for p in parameters}
    if len(lrs) > 1:
        raise OptimizerStateError(f"Tracked parameters use different learning rates {sorted(lrs)}; use one group.")
    if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
        scales, drifts = zip(*(_adamw_terms(optimizer, groups[id(p)], p, i) for i, p in enumerate(parameters)))
        kind = "adamw"
    elif isinstance(optimizer, torch.optim.SGD):
        scales, drifts = zip(*(_sgd_terms(optimizer, groups[id(p)], p) for p in parameters))
        kind = "sgd"
    else:
        raise OptimizerStateError(
            f"{type(optimizer).__name__} is not supported: use torch.optim.AdamW, Adam without weight decay, or SGD."
        )
    return AffineStep(
        scale=torch.cat([s.flatten() for s in scales]).float(),
        drift=torch.cat([b.flatten() for b in drifts]).float(),
        lr=lrs.pop(),
        kind=kind,
        initial_lr=groups[id(parameters[0])].get("initial_lr"),
    )


def _adamw_terms(optimizer: torch.optim.Optimizer, group: dict, parameter: Tensor, position: int) -> tuple[Tensor, Tensor]:
    decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
    if not decoupled and group["weight_decay"] != 0:
        raise OptimizerStateError(
            "torch.optim.Adam with weight_decay > 0 adds L2 to the gradient before the moments: that is not AdamW "
            "and its step is not the affine form used here. Use torch.optim.AdamW (or weight_decay=0)."
        )
    if group.get("amsgrad", False):
        raise OptimizerStateError("amsgrad is not supported: its denominator is a running maximum.")
    state = optimizer.state.get(parameter, {})
    if "exp_avg" not in state:
        raise OptimizerStateError(
            f"The optimizer has no state for tracked parameter {position}: run at least one step (a warm-up) first."
        )
    beta1, beta2 = group["betas"]
    next_step = float(state["step"]) + 1
    bias1 = 1 - beta1**next_step
    v_hat = state["exp_avg_sq"].detach() / (1 - beta2**next_step)
    denominator = v_hat.sqrt() + group["eps"]
    scale = ((1 - beta1) / bias1) / denominator
    drift = group["weight_decay"] * parameter.detach() + (beta1 / bias1) * state["exp_avg"].detach() / denominator
    return scale, drift


def _sgd_terms(optimizer: torch.optim.Optimizer, group: dict, parameter: Tensor) -> tuple[Tensor, Tensor]:
    momentum, dampening, wd = group["momentum"], group["dampening"], group["weight_decay"]
    theta = parameter.detach()
    buffer = optimizer.state.get(parameter, {}).get("momentum_buffer")
    if momentum == 0 or buffer is None:
        # No momentum, or the first step, where torch starts the buffer at the gradient itself.
        scale = torch.ones_like(theta) * (1 + momentum if group["nesterov"] and momentum else 1.0)
        return scale, wd * theta * scale
    if group["nesterov"]:
        return torch.full_like(theta, 1 + momentum), momentum**2 * buffer + (1 + momentum) * wd * theta
    return torch.full_like(theta, 1 - dampening), momentum * buffer + (1 - dampening) * wd * theta
