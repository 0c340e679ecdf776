"""JVP embeddings: cheap per-sample features for the landmark approximation (docs/algorithms.md §1.5).

The causal LM is truncated to its first B decoder blocks plus the final norm. T fixed Gaussian tangents
v_1..v_T over the truncated blocks' parameters are drawn once (seeded). A sample's embedding is the
forward-mode derivative, in each direction v_i, of the hidden state at its last real token, concatenated
over the T directions ([T * hidden]) and projected. One `torch.func.jvp` per tangent embeds a whole
padded batch; SDPA has no forward-mode rule, so the model runs with eager attention while embedding.

By default the token embedding table gets no tangent: its derivative only touches the rows of the tokens
present, and a tangent over a vocabulary-sized matrix costs more memory than four blocks (49k x 576 floats for
SmolLM2). `perturb_embeddings=True` gives it one, as the paper's reference code does (every parameter of the
truncated model). LoRA adapter weights never get one, so attaching adapters with B = 0 leaves the embeddings
unchanged. `jvp_pooling="response_mean"` averages the derivative over the response (label) tokens instead of
taking the last real token, which for a chat template is usually an end-of-turn newline that carries little of
the row. The embedder binds to the module structure at construction: build it after wrapping the model in PEFT.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from ..formatting import IGNORE_INDEX
from .gradients import causal_lm_parts, checked_blocks
from .projection import derive_seed, make_projector
from ..validation import check_fields


JVP_POOLINGS = ("last", "response_mean")


@dataclass
class JVPConfig:
    """JVP embedding settings.

    Each field's help is in its metadata (TRL's convention: `--help` shows it).
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "JVP embeddings (JVPConfig)"

    num_blocks: int = field(default=4, metadata={"help": "decoder blocks kept in the truncated model (B)."})
    num_tangents: int = field(
        default=1,
        metadata={"help": "number of random tangent directions (T). Each costs about two more matmuls per layer "
                          "on top of the shared primal pass: T = 1 (the default) keeps 4 of 30 blocks at about "
                          "0.4x of a full forward; raise it for richer embeddings (T * hidden dimensions)."})
    jvp_projection: str = field(
        default="gaussian",
        metadata={"help": 'projection kind for the [T * hidden] vectors ("gaussian", "countsketch", "srht", '
                          '"none").'})
    jvp_projection_dim: int = field(
        default=4096,
        metadata={"help": "output dimension; when T * hidden <= it, the vectors are kept as they are."})
    jvp_seed: int = field(default=0, metadata={"help": "seed for the tangents and the projection."})
    jvp_batch_size: int = field(default=16, metadata={"help": "rows per batch in the extraction loops."})
    perturb_embeddings: bool = field(
        default=False,
        metadata={"help": "also give the token embedding table a tangent (the reference implementation's choice; "
                          "costs a vocabulary x hidden tangent per direction in memory)."})
    jvp_pooling: str = field(
        default="last",
        metadata={"help": "\"last\" (the hidden state at each row's last real token) or \"response_mean\" (the mean "
                          "over its response tokens, those with a label)."})

    def __post_init__(self) -> None:
        check_fields(self, integers={"num_blocks": 1, "num_tangents": 1, "jvp_projection_dim": 1, "jvp_seed": None,
                                     "jvp_batch_size": 1})
        if self.jvp_pooling not in JVP_POOLINGS:
            raise ValueError(f"JVPConfig.jvp_pooling must be one of {list(JVP_POOLINGS)}, got {self.jvp_pooling!r}.")


def truncated_decoder(model: nn.Module, num_blocks: int) -> nn.Module:
    """A view of the model's decoder with only its first `num_blocks` blocks (parameters shared, not copied)."""
    decoder, _ = causal_lm_parts(model)
    layers = checked_blocks(model, num_blocks, "JVPConfig.num_blocks")
    truncated = copy.copy(decoder)
    # copy.copy shares the submodule dict; give the view its own before replacing `layers`.
    truncated._modules = dict(decoder._modules)
    truncated.layers = nn.ModuleList(list(layers[:num_blocks]))
    return truncated


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch the model to eager attention for the duration (forward-mode AD has no SDPA rule)."""
    decoder, _ = causal_lm_parts(model)
    config = decoder.config
    previous = config._attn_implementation
    if previous == "eager":
        yield
        return
    decoder.set_attn_implementation("eager")
    try:
        yield
    finally:
        decoder.set_attn_implementation(previous)


class JVPEmbedder:
    """Batched JVP embeddings of a causal LM.

    Example:
        >>> embedder = JVPEmbedder(model, JVPConfig(num_blocks=4))
        >>> vectors = embedder.embed(batch)      # [B, output_dim]

    Attributes:
        raw_dim: T * hidden size, the length before projection.
        output_dim: the embedding length after projection.
    """

    def __init__(self, model: nn.Module, config: JVPConfig | None = None):
        self.model = model
        self.config = config or JVPConfig()
        self.decoder = truncated_decoder(model, self.config.num_blocks)
        self.parameters = {
            name: parameter.detach()
            for name, parameter in self.decoder.named_parameters()
            if (self.config.perturb_embeddings or not name.startswith("embed_tokens")) and "lora_" not in name
            and parameter.is_floating_point()
        }
        generator = torch.Generator(device="cpu").manual_seed(derive_seed(self.config.jvp_seed, "jvp-tangents"))
        self.tangents = [
            {
                name: torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
                for name, p in self.parameters.items()
            }
            for _ in range(self.config.num_tangents)
        ]
        hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else model.config.hidden_size
        self.raw_dim = self.config.num_tangents * hidden
        if self.raw_dim <= self.config.jvp_projection_dim or self.config.jvp_projection == "none":
            self._projector = None
            self.output_dim = self.raw_dim
        else:
            self._projector = make_projector(
                self.config.jvp_projection, self.raw_dim, self.config.jvp_projection_dim, derive_seed(self.config.jvp_seed, "jvp-projection")
            )
            self.output_dim = self._projector.output_dim

    def hidden_states(self, parameters: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor,
                      labels: Tensor | None = None) -> Tensor:
        """Final-norm hidden state of the truncated model, pooled per row as `jvp_pooling` says: [B, hidden].
        labels [B, T] (-100 off the response) are needed for "response_mean"."""
        hidden = functional_call(
            self.decoder,
            parameters,
            args=(),
            kwargs={"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False},
            strict=False,
        ).last_hidden_state
        if self.config.jvp_pooling == "response_mean":
            if labels is None:
                raise ValueError("jvp_pooling='response_mean' needs the batch's labels")
            weights = (labels != IGNORE_INDEX).to(hidden.dtype)
            return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
        last = attention_mask.sum(1) - 1  # right padding: the last real token of each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def raw(self, batch: dict[str, Tensor]) -> Tensor:
        """Unprojected JVP embeddings [B, T * hidden] (rows right-padded, see `pad_batch`)."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError("JVP embeddings expect right-padded rows (attention_mask of ones then zeros).")

        def last_hidden(parameters: dict[str, Tensor]) -> Tensor:
            return self.hidden_states(parameters, input_ids, attention_mask, batch.get("labels"))

        def derivative(tangent: dict[str, Tensor]) -> Tensor:
            return jvp(last_hidden, (self.parameters,), (tangent,))[1]

        with eager_attention(self.model), torch.no_grad():
            if len(self.tangents) == 1:
                return derivative(self.tangents[0])
            # vmap over the tangents computes the shared primal pass once: (1 + 2T) matmuls per layer
            # instead of 3T for a loop over tangents.
            stacked = {name: torch.stack([t[name] for t in self.tangents]) for name in self.parameters}
            derivatives = vmap(derivative)(stacked)  # [T, B, hidden]
        return derivatives.permute(1, 0, 2).flatten(1)

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Projected JVP embeddings, float32 [B, output_dim]."""
        raw = self.raw(batch).float()
        if not bool(torch.isfinite(raw).all()):
            raise ValueError("Non-finite JVP embeddings: check the model's dtype (fp16 overflows) and inputs.")
        return raw if self._projector is None else self._projector.project(raw)
