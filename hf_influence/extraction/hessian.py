"""Products with the Hessian of the mean target loss on the tracked (LoRA) parameters (docs/algorithms.md §1.2).

The second-order term of Influence Distillation is Q = (1/n) G A H_T A G^T, so it needs H_T v for one
vector v per (landmark) pool sample. Two kinds:

- "exact": double backward. The target gradient is built once per target batch with create_graph=True,
  then every H_T v is one more backward through that graph (vectorised over v with vmap).
- "gauss_newton": J^T H_out J v, where J is the Jacobian of the label-position logits and H_out the
  softmax cross-entropy Hessian diag(p) - p p^T. It is PSD and drops the curvature of the network itself.
  Jv comes from the double-vjp trick (the vjp is linear in its cotangent, so differentiating it w.r.t.
  the cotangent gives the Jacobian-vector product) so no forward-mode support is needed.

The target loss is L_T = (1/m) sum_j w_j l_j with l_j the mean response-token cross-entropy of target j and
weights w_j = 1 by default (Influence Distillation with unit-normalised gradients uses w_j = 1 / |g_j|, see
influence.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formatting import IGNORE_INDEX
from .gradients import GradientError, causal_lm_parts, per_sample_losses
from .jvp import eager_attention

HESSIAN_KINDS = ("exact", "gauss_newton")


@contextmanager
def _differentiable(model: nn.Module, parameters: list[Tensor]) -> Iterator[None]:
    """Eval mode (no dropout) and requires_grad on the tracked parameters, restored afterwards."""
    was_training = model.training
    previous = [p.requires_grad for p in parameters]
    model.eval()
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        model.train(was_training)
        for parameter, requires_grad in zip(parameters, previous):
            parameter.requires_grad_(requires_grad)


def _unflatten(vectors: Tensor, parameters: list[Tensor]) -> list[Tensor]:
    """[k, d] -> one [k, *p.shape] slice per parameter."""
    sizes = [p.numel() for p in parameters]
    return [chunk.reshape(vectors.shape[0], *p.shape) for chunk, p in zip(vectors.split(sizes, dim=1), parameters)]


def _flatten(per_parameter: tuple[Tensor | None, ...], parameters: list[Tensor], k: int) -> Tensor:
    return torch.cat(
        [
            torch.zeros(k, p.numel(), dtype=p.dtype, device=p.device) if part is None else part.reshape(k, -1)
            for part, p in zip(per_parameter, parameters)
        ],
        dim=1,
    )


class TargetHessian:
    """H_T v for the mean target loss, w.r.t. `parameters` flattened in order.

    Example:
        >>> tracked = PerSampleGradients(peft_model)
        >>> hessian = TargetHessian(peft_model, tracked.parameters, target_batches, kind="exact")
        >>> products = hessian.matmul(vectors)   # vectors [k, raw_dim] -> [k, raw_dim]

    Args:
        model: the causal LM (PEFT-wrapped or not); put in eval mode while computing.
        parameters: the tracked parameter tensors (e.g. `PerSampleGradients.parameters`).
        target_batches: padded target batches (`pad_batch`), together covering all m target rows once.
        kind: "exact" (double backward) or "gauss_newton".
        vector_chunk: how many vectors go through one vmapped backward (memory grows with it).
        target_weights: [m] weight w_j of each target row's loss, in batch order (None: all 1).
    """

    def __init__(self, model: nn.Module, parameters: list[Tensor], target_batches: list[dict[str, Tensor]],
                 kind: str = "exact", vector_chunk: int = 16, target_weights: Tensor | None = None):
        if kind not in HESSIAN_KINDS:
            raise ValueError(f"hessian kind must be one of {HESSIAN_KINDS}, got {kind!r}")
        if not target_batches:
            raise ValueError("TargetHessian needs at least one target batch")
        self.model, self.parameters, self.kind = model, list(parameters), kind
        self.target_batches = target_batches
        sizes = [int(batch["input_ids"].shape[0]) for batch in target_batches]
        self.num_targets = sum(sizes)
        if target_weights is None:
            target_weights = torch.ones(self.num_targets)
        if target_weights.shape != (self.num_targets,):
            raise ValueError(f"target_weights must be [{self.num_targets}] (one per target row), got "
                             f"{list(target_weights.shape)}")
        device = self.parameters[0].device
        self.batch_weights = [w.to(device) for w in target_weights.float().split(sizes)]
        self.dim = sum(p.numel() for p in self.parameters)
        self.vector_chunk = vector_chunk

    def matmul(self, vectors: Tensor) -> Tensor:
        """H_T applied to each row of vectors [k, dim] (or [dim]); returns the same shape, float32."""
        squeeze = vectors.dim() == 1
        vectors = vectors.reshape(-1, self.dim) if squeeze else vectors
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have {vectors.shape[1]} coordinates, the tracked parameters have {self.dim}")
        dtype = self.parameters[0].dtype
        result = torch.zeros(vectors.shape, dtype=torch.float32, device=vectors.device)
        # SDPA kernels have no double backward on CPU: use the eager attention for these graphs.
        with _differentiable(self.model, self.parameters), eager_attention(self.model):
            for batch, weights in zip(self.target_batches, self.batch_weights):
                product = self._exact if self.kind == "exact" else self._gauss_newton
                for start in range(0, vectors.shape[0], self.vector_chunk):
                    chunk = vectors[start : start + self.vector_chunk].to(self.parameters[0].device, dtype)
                    result[start : start + chunk.shape[0]] += product(batch, weights, chunk).float().to(result.device)
        return result.squeeze(0) if squeeze else result

    def _exact(self, batch: dict[str, Tensor], weights: Tensor, vectors: Tensor) -> Tensor:
        loss = (per_sample_losses(self.model, batch) * weights).sum() / self.num_targets
        gradients = torch.autograd.grad(loss, self.parameters, create_graph=True)
        products = torch.autograd.grad(
            gradients, self.parameters, grad_outputs=_unflatten(vectors, self.parameters),
            is_grads_batched=True, allow_unused=True,
        )
        return _flatten(products, self.parameters, vectors.shape[0])

    def _gauss_newton(self, batch: dict[str, Tensor], weights: Tensor, vectors: Tensor) -> Tensor:
        decoder, lm_head = causal_lm_parts(self.model)
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        targets = batch["labels"][:, 1:]
        label_mask = targets != IGNORE_INDEX
        counts = label_mask.sum(1)
        if bool((counts == 0).any()):
            raise GradientError(f"Target batch rows {torch.nonzero(counts == 0).flatten().tolist()} have no label token.")
        logits = lm_head(hidden[:, :-1][label_mask])
        # Each token's weight in L_T: w_row / (m * label tokens of its row).
        rows = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)[label_mask]
        token_weights = (weights[rows] / (self.num_targets * counts[rows].to(torch.float32))).unsqueeze(1)
        probabilities = F.softmax(logits.detach().float(), dim=-1)
        cotangent = torch.zeros_like(logits, requires_grad=True)
        vjp = torch.autograd.grad(logits, self.parameters, grad_outputs=cotangent, create_graph=True)
        products = []
        for vector in vectors:
            tangent = [part[0] for part in _unflatten(vector[None], self.parameters)]
            jacobian_vector = torch.autograd.grad(vjp, cotangent, grad_outputs=tangent, retain_graph=True)[0].float()
            curvature = token_weights * (probabilities * jacobian_vector
                                         - probabilities * (probabilities * jacobian_vector).sum(1, keepdim=True))
            product = torch.autograd.grad(logits, self.parameters, grad_outputs=curvature.to(logits.dtype),
                                          retain_graph=True, allow_unused=True)
            products.append(_flatten(product, self.parameters, 1))
        return torch.cat(products)
