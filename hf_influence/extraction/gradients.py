"""Per-sample gradients of LoRA (or selected full) Linear weights for a whole padded batch at once.

For a Linear layer y_t = W x_t, one sample's gradient is sum_t delta_t x_t^T with delta_t = dl/dy_t.
A forward hook keeps each tracked layer's input x [B, T, in] and output y [B, T, out]; one call of
`torch.autograd.grad(sum of per-sample losses, outputs)` returns every delta [B, T, out] at once (no
parameter .grad is accumulated), and one einsum per layer gives all B per-sample gradients. Because the
batch loss is a SUM of per-sample losses and samples never attend to each other, delta of sample b depends
on sample b alone; padding carries no loss, so its delta is exactly zero.

Per-sample loss: mean cross-entropy over the response (label) tokens only. The LM head is applied to the
label positions only, which saves the [B, T, vocab] logits of a plain forward.

Order per sample (docs/algorithms.md §1.3): optimizer preconditioning (pool samples, optional), then unit L2
normalisation, then the seeded projection. Normalisation commutes with the (linear) projection, so it is
applied after it using the norm of the unprojected gradient.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import HFInfluenceError
from ..formatting import IGNORE_INDEX
from .projection import FactoredProjector, Projector, derive_seed, make_projector
from ..validation import check_fields

PARAMETER_MODES = ("lora", "pattern")


class GradientError(HFInfluenceError, ValueError):
    """Per-sample gradients cannot be computed for this model, configuration or row."""


@dataclass
class GradientConfig:
    """What gradient to take per sample and how to compress it.

    Each field's help is in its metadata (TRL's convention: `--help` shows it).
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "per-sample gradients (GradientConfig)"

    parameters: str = field(
        default="lora",
        metadata={"help": '"lora" (every LoRA A/B matrix of a PEFT model) or "pattern" (the weight and bias of '
                          "every Linear layer of the decoder whose qualified name matches `parameter_pattern`)."})
    parameter_pattern: str | None = field(
        default=None,
        metadata={"help": 'regular expression (re.search) on module names: the Linear layers of "pattern", e.g. '
                          '"down_proj"; with "lora", the LoRA layers kept (e.g. "layers\\.29\\." for the last '
                          "block's adapters: the backward pass then stops there)."})
    gradient_blocks: int | None = field(
        default=None,
        metadata={"help": "gradient of a truncated model: its first gradient_blocks decoder blocks, the final norm and "
                          "the LM head, with the tracked layers of those blocks only (a cheap proxy of the full "
                          "gradient, used as landmark regression features); None: the whole model."})
    normalize: bool = field(
        default=True,
        metadata={"help": "divide each gradient by its L2 norm (after preconditioning, before projection)."})
    projection: str = field(
        default="countsketch",
        metadata={"help": '"countsketch", "srht", "gaussian", "factored" (LoGra: per-layer projection of the two '
                          'factors, for "pattern" only; never materialises out x in per sample) or "none".'})
    projection_dim: int = field(
        default=8192,
        metadata={"help": 'output dimension k of the projection (ignored for "none" and "factored").'})
    factored_out_dim: int = field(
        default=16,
        metadata={"help": 'k_out, the projected output side of each layer for "factored".'})
    factored_in_dim: int = field(
        default=16,
        metadata={"help": "k_in, the projected input side; each layer contributes k_out * k_in (+ k_out for a "
                          "bias)."})
    projection_seed: int = field(
        default=0,
        metadata={"help": "seed of the random projection; the same seed gives the same projection in every "
                          "process (was `seed`, which read as the selection's seed)."})
    batch_size: int = field(default=8, metadata={"help": "rows per batch in the extraction loops."})

    def __post_init__(self) -> None:
        check_fields(self, integers={"projection_dim": 1, "factored_out_dim": 1, "factored_in_dim": 1,
                                     "projection_seed": None, "batch_size": 1, "gradient_blocks": 1},
                     optional=("gradient_blocks",))
        if self.parameters not in PARAMETER_MODES:
            raise ValueError(f"GradientConfig.parameters={self.parameters!r}: use one of {PARAMETER_MODES}.")
        if self.parameters == "pattern" and not self.parameter_pattern:
            raise ValueError("GradientConfig.parameters='pattern' needs parameter_pattern, e.g. 'down_proj'.")
        if self.projection == "factored" and self.parameters != "pattern":
            raise ValueError(
                "GradientConfig.projection='factored' projects full weight matrices; LoRA gradients are small "
                "enough to flatten: use 'countsketch', 'srht', 'gaussian' or 'none' with parameters='lora'."
            )


@dataclass
class TrackedLayer:
    """A Linear layer whose per-sample weight (and bias) gradient is taken."""

    name: str
    module: nn.Linear

    @property
    def parameters(self) -> list[tuple[str, Tensor]]:
        weights = [(f"{self.name}.weight", self.module.weight)]
        if self.module.bias is not None:
            weights.append((f"{self.name}.bias", self.module.bias))
        return weights


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, lm_head) of a causal LM, possibly wrapped in PEFT; the decoder returns hidden states."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or lm_head is None:
        raise GradientError(
            f"{type(base).__name__} is not a causal LM with a decoder and an output embedding (lm_head)."
        )
    return decoder, lm_head


def _lora_layers(model: nn.Module, pattern: str | None = None) -> list[TrackedLayer]:
    """Every trainable LoRA A/B layer, or those whose name matches `pattern`: the others are left out on purpose
    (their parameters keep requires_grad, but the backward pass never reaches them)."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        raise GradientError(
            "GradientConfig.parameters='lora' needs a PEFT LoRA model: wrap it with hf_influence.add_lora(model) "
            "or peft.get_peft_model, or use parameters='pattern'."
        )
    for adapter, adapter_config in peft_config.items():
        if getattr(adapter_config, "use_dora", False):
            raise GradientError(
                f"Adapter {adapter!r} uses DoRA, whose magnitude vector is not a Linear weight: per-sample "
                f"gradients through hooks are not defined for it. Use plain LoRA."
            )
        if getattr(adapter_config, "target_parameters", None):
            raise GradientError(
                f"Adapter {adapter!r} targets raw parameters ({adapter_config.target_parameters}), as MoE expert "
                f"LoRA does; only Linear-module LoRA is supported."
            )
    layers = [
        TrackedLayer(name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and re.search(r"\.lora_[AB]\.[^.]+$", name) and module.weight.requires_grad
    ]
    tracked = {id(parameter) for layer in layers for _, parameter in layer.parameters}
    untracked = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in tracked]
    if untracked:
        raise GradientError(
            f"Trainable parameters outside LoRA Linear layers would be missed: {untracked[:5]}"
            f"{' ...' if len(untracked) > 5 else ''}. Freeze them, or use LoRA on Linear modules only "
            f"(embedding LoRA and modules_to_save are not supported)."
        )
    if not layers:
        raise GradientError("The PEFT model has no trainable LoRA Linear layer.")
    if pattern is not None:
        regex = re.compile(pattern)
        layers = [layer for layer in layers if regex.search(layer.name)]
        if not layers:
            raise GradientError(f"parameter_pattern={pattern!r} matches no LoRA layer of the model.")
    return layers


def _in_blocks(layers: list[TrackedLayer], model: nn.Module, num_blocks: int) -> list[TrackedLayer]:
    """The layers that belong to the first `num_blocks` decoder blocks."""
    blocks = checked_blocks(model, num_blocks, "GradientConfig.gradient_blocks")
    kept = {id(module) for block in blocks[:num_blocks] for module in block.modules()}
    layers = [layer for layer in layers if id(layer.module) in kept]
    if not layers:
        raise GradientError(f"The first {num_blocks} decoder blocks hold no tracked layer.")
    return layers


def checked_blocks(model: nn.Module, num_blocks: int, option: str) -> nn.ModuleList:
    """All decoder blocks of a Llama/Qwen2-style causal LM (PEFT-wrapped or not), once `num_blocks` is checked to
    be 1 to their number: the one check behind every truncated pass (gradient_blocks, JVP num_blocks, hidden-state
    blocks). `option` names the setting in the error, e.g. "JVPConfig.num_blocks"."""
    decoder, _ = causal_lm_parts(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise GradientError(f"{type(decoder).__name__} has no `layers` ModuleList: {option} (a truncated model) needs "
                            f"a Llama/Qwen2-style decoder.")
    if not 1 <= num_blocks <= len(layers):  # a silent whole model would pass for the truncated one
        raise GradientError(f"{option}={num_blocks}: the model has {len(layers)} decoder blocks (use 1 to "
                            f"{len(layers)}).")
    return layers


@contextmanager
def first_blocks(model: nn.Module, num_blocks: int | None) -> Iterator[None]:
    """Run the model with only its first `num_blocks` decoder blocks (then the final norm and the LM head), for the
    duration; None leaves it whole. The blocks are shared, not copied."""
    if num_blocks is None:
        yield
        return
    decoder, _ = causal_lm_parts(model)
    layers = checked_blocks(model, num_blocks, "num_blocks")
    decoder.layers = nn.ModuleList(list(layers[:num_blocks]))
    try:
        yield
    finally:
        decoder.layers = layers


def _pattern_layers(model: nn.Module, pattern: str) -> list[TrackedLayer]:
    decoder, _ = causal_lm_parts(model)
    regex = re.compile(pattern)
    layers = [
        TrackedLayer(name, module)
        for name, module in decoder.named_modules()
        if isinstance(module, nn.Linear) and regex.search(name) and ".lora_" not in name
    ]
    if not layers:
        names = [name for name, module in decoder.named_modules() if isinstance(module, nn.Linear)][:8]
        raise GradientError(f"parameter_pattern={pattern!r} matches no Linear layer of the decoder; some names: {names}.")
    return layers


def _per_sample_linear_grad(delta: Tensor, x: Tensor, has_bias: bool) -> Tensor:
    """[B, T, out] x [B, T, in] -> [B, out*in (+ out)] flattened per-sample gradient of W (and b)."""
    weight = torch.einsum("bto,bti->boi", delta, x).flatten(1)
    return torch.cat([weight, delta.sum(1)], dim=1) if has_bias else weight


def _per_sample_linear_sq_norm(delta: Tensor, x: Tensor, has_bias: bool) -> Tensor:
    """||sum_t delta_t x_t^T||_F^2 per sample from T x T Gram matrices: [B], no out x in matrix formed."""
    squared = (torch.bmm(delta, delta.transpose(1, 2)) * torch.bmm(x, x.transpose(1, 2))).sum((1, 2))
    return squared + delta.sum(1).square().sum(1) if has_bias else squared


def response_token_losses(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy of every label token: (losses [T] float32 nats, row of each [T], label tokens per row [B]).

    T is the batch's number of label tokens (in row-major order); the LM head runs only on the positions that
    predict one. Raises GradientError for a row without a label token.
    """
    decoder, lm_head = causal_lm_parts(model)
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    label_mask = targets != IGNORE_INDEX
    token_losses = F.cross_entropy(lm_head(hidden[:, :-1][label_mask]).float(), targets[label_mask], reduction="none")
    rows = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)[label_mask]
    counts = label_mask.sum(1)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise GradientError(f"Batch rows {empty} have no label token: their loss (and gradient) is undefined.")
    return token_losses, rows, counts


def per_sample_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean response-token cross-entropy of each row: [B] (float32 accumulation, rows must have labels)."""
    token_losses, rows, counts = response_token_losses(model, batch)
    sums = torch.zeros(len(counts), dtype=token_losses.dtype, device=token_losses.device).index_add(0, rows, token_losses)
    return sums / counts


class PerSampleGradients:
    """Per-sample gradients of a causal LM's LoRA (or selected Linear) weights, projected.

    Example:
        >>> grads = PerSampleGradients(peft_model, GradientConfig(projection_dim=4096))
        >>> vectors = grads.compute(batch)          # [B, 4096], unit norm rows

    Attributes:
        layers: tracked Linear layers in flattening order.
        raw_dim: total number of gradient coordinates per sample before projection.
        output_dim: per-sample vector size after projection.
    """

    def __init__(self, model: nn.Module, config: GradientConfig | None = None):
        self.model = model
        self.config = config or GradientConfig()
        if self.config.parameters == "lora":
            self.layers = _lora_layers(model, self.config.parameter_pattern)
        else:
            self.layers = _pattern_layers(model, self.config.parameter_pattern)
        if self.config.gradient_blocks is not None:
            self.layers = _in_blocks(self.layers, model, self.config.gradient_blocks)
        self.raw_dim = sum(p.numel() for layer in self.layers for _, p in layer.parameters)
        self._factored: list[FactoredProjector] | None = None
        self._projector: Projector | None = None
        if self.config.projection == "factored":
            k_out, k_in = self.config.factored_out_dim, self.config.factored_in_dim
            self._factored = [
                FactoredProjector(
                    layer.module.out_features, layer.module.in_features, k_out, k_in, derive_seed(self.config.projection_seed, layer.name)
                )
                for layer in self.layers
            ]
            self.output_dim = sum(
                k_out * k_in + (k_out if layer.module.bias is not None else 0) for layer in self.layers
            )
        else:
            dim = None if self.config.projection == "none" else self.config.projection_dim
            self._projector = make_projector(self.config.projection, self.raw_dim, dim, self.config.projection_seed)
            self.output_dim = self._projector.output_dim

    def project(self, vectors: Tensor) -> Tensor:
        """Raw-coordinate vectors [b, raw_dim] (e.g. Hessian-vector products) in the stored gradients' coordinates
        [b, output_dim]: the same projection, without normalisation. Elementwise projections only."""
        if self._projector is None:
            raise GradientError("projection='factored' projects per-layer factors of a gradient, not arbitrary "
                                "vectors: use an elementwise projection (countsketch, srht, gaussian or none).")
        return self._projector.project(vectors)

    @property
    def parameter_names(self) -> list[str]:
        """Names of the tracked parameters, in flattening order."""
        return [name for layer in self.layers for name, _ in layer.parameters]

    @property
    def parameters(self) -> list[Tensor]:
        """The tracked parameter tensors, in flattening order."""
        return [p for layer in self.layers for _, p in layer.parameters]

    @contextmanager
    def _capture(self) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
        """Hooks that record (input, output) of every tracked layer; tracked weights require grad inside."""
        captured: dict[str, tuple[Tensor, Tensor]] = {}
        handles = []
        for layer in self.layers:
            def hook(module, inputs, output, name=layer.name):
                captured[name] = (inputs[0].detach(), output)

            handles.append(layer.module.register_forward_hook(hook))
        previous = [(p, p.requires_grad) for p in self.parameters]
        for parameter, _ in previous:
            parameter.requires_grad_(True)
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()
            for parameter, requires_grad in previous:
                parameter.requires_grad_(requires_grad)

    def raw_factors(self, batch: dict[str, Tensor]) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
        """Run forward + backward once; return {layer: (delta [B,T,out], x [B,T,in])} and losses [B]."""
        was_training = self.model.training
        self.model.eval()  # no dropout: the gradient must be a function of the sample alone
        try:
            with self._capture() as captured, first_blocks(self.model, self.config.gradient_blocks):
                losses = per_sample_losses(self.model, batch)
                outputs = [captured[layer.name][1] for layer in self.layers]
                deltas = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        finally:
            self.model.train(was_training)
        factors = {}
        for layer, output, delta in zip(self.layers, outputs, deltas):
            # A layer the loss does not reach (unused=None) has an exactly zero gradient.
            factors[layer.name] = (torch.zeros_like(output) if delta is None else delta, captured[layer.name][0])
        return factors, losses.detach()

    def raw(self, batch: dict[str, Tensor]) -> Tensor:
        """Unprojected, unnormalised per-sample gradients [B, raw_dim] (flattening order: `parameter_names`).

        Memory is B x raw_dim floats: use `compute` with a projection for full-weight patterns.
        """
        factors, _ = self.raw_factors(batch)
        return torch.cat(
            [_per_sample_linear_grad(*factors[layer.name], layer.module.bias is not None) for layer in self.layers], dim=1
        )

    def compute(
        self, batch: dict[str, Tensor], preconditioner: Tensor | None = None, row_ids: list[int] | None = None
    ) -> Tensor:
        """Processed per-sample gradients: preconditioned, unit-normalised, projected.

        Args:
            batch: `input_ids`, `attention_mask`, `labels` [B, T] (right-padded, see `pad_batch`).
            preconditioner: [raw_dim] elementwise scale (an optimizer preconditioner, docs/algorithms.md §1.1),
                applied before normalisation; None for none.
            row_ids: dataset row ids of the batch rows, used in error messages.

        Returns:
            float32 Tensor [B, output_dim].

        Raises:
            GradientError: a non-finite or zero gradient (the message names the row).
        """
        row_ids = row_ids if row_ids is not None else list(range(batch["input_ids"].shape[0]))
        if self._factored is not None:
            if preconditioner is not None:
                raise GradientError(
                    "An elementwise preconditioner cannot be applied to factored (LoGra) projections; use "
                    "projection='countsketch' / 'srht' / 'gaussian' with preconditioning."
                )
            factors, _ = self.raw_factors(batch)
            parts, squared_norms = [], 0.0
            for layer, projector in zip(self.layers, self._factored):
                delta, x = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in factors[layer.name])
                has_bias = layer.module.bias is not None
                projected = projector.project_factors(delta, x)
                if has_bias:
                    projected = torch.cat([projected, projector.project_output_side(delta.sum(1))], dim=1)
                parts.append(projected)
                squared_norms = squared_norms + _per_sample_linear_sq_norm(delta, x, has_bias)
            vectors, norms = torch.cat(parts, dim=1), torch.as_tensor(squared_norms).sqrt()
        else:
            gradients = self.raw(batch)
            # Half-precision models: accumulate norms and projections in float32.
            if gradients.dtype in (torch.float16, torch.bfloat16):
                gradients = gradients.float()
            if preconditioner is not None:
                if preconditioner.shape != (self.raw_dim,):
                    raise GradientError(
                        f"The preconditioner has shape {tuple(preconditioner.shape)}; expected ({self.raw_dim},)."
                    )
                gradients = gradients * preconditioner.to(gradients)
            norms = gradients.norm(dim=1)
            vectors = self._projector.project(gradients)
        _check_finite(vectors, norms, row_ids, self.config.normalize)
        if self.config.normalize:
            vectors = vectors / norms.unsqueeze(1)
        return vectors.float()


def _check_finite(vectors: Tensor, norms: Tensor, row_ids: list[int], normalize: bool) -> None:
    bad = ~torch.isfinite(vectors).all(dim=1) | ~torch.isfinite(norms)
    if bool(bad.any()):
        rows = [row_ids[i] for i in torch.nonzero(bad).flatten().tolist()]
        raise GradientError(
            f"Non-finite (NaN/inf) gradients for rows {rows}: check the model's dtype (fp16 overflows) and these rows."
        )
    zero = norms == 0
    if normalize and bool(zero.any()):
        rows = [row_ids[i] for i in torch.nonzero(zero).flatten().tolist()]
        raise GradientError(f"Rows {rows} have an exactly zero gradient: they cannot be normalised or scored.")
