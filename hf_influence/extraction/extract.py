"""Resumable extraction of per-sample gradients, target-Hessian products, JVP, LM-pooled and sentence embeddings
into a `VectorStore`.

Rows go through fixed batches [b * batch_size, (b + 1) * batch_size): after a crash, only the batches
not marked done are recomputed, and since a batch is always computed from the same rows with the same
padding, the resumed store is byte-identical to an uninterrupted one. The store's manifest records the
model (id, revision and a digest of its adapter weights), the formatted dataset's fingerprint and the full
configuration; a store made for anything else is refused (`StoreMismatchError`) rather than silently mixed.

Under `accelerate launch` / torchrun, every process calls the same function and the pending batches are
split between them (`hf_influence.extraction.distributed`); the finished store is the same, byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import Dataset
from torch import Tensor, nn

from .distributed import fill_store
from ..rds_embeddings import pooled_batch
from ..networks.encoders import extract_sentence_embeddings  # noqa: F401  (public here with the other extractors)
from ..formatting import pad_batch
from .gradients import GradientConfig, PerSampleGradients, causal_lm_parts, first_blocks
from .hessian import TargetHessian
from .jvp import JVPConfig, JVPEmbedder
from ..models import adapter_digest, base_model, model_identity, weights_digest
from .store import MANIFEST_NAME, StoreMismatchError, StoreSpec, VectorStore, fingerprint_dataset


def _tensor_digest(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def _extract(
    kind: str,
    model: nn.Module,
    formatted: Dataset,
    output_dir: str | Path,
    config_record: dict,
    dim: int,
    batch_size: int,
    pad_token_id: int | None,
    compute: Callable[[dict[str, Tensor], list[int]], Tensor],
    overwrite: bool,
    show_progress: bool,
    with_adapter: bool = True,
) -> VectorStore:
    """Open (or resume) the store identified by model, data and config, and fill its pending batches (split between
    the processes of a multi-process launch, see `hf_influence.extraction.distributed`). with_adapter: `compute` runs with the
    model's adapter (its digest is then part of the identity); False when it runs the base model."""
    spec = _store_spec(kind, model, formatted, config_record, dim, with_adapter)
    pad_token_id = _pad_token_id(model, pad_token_id)

    def compute_rows(start: int, end: int) -> Tensor:
        rows = formatted.select(range(start, end))
        return compute(pad_batch(list(rows), pad_token_id), rows["row_id"])

    return fill_store(output_dir, spec, compute_rows, batch_size, row_ids=formatted["row_id"], overwrite=overwrite,
                      show_progress=show_progress, description=kind.replace("_", " "))


def _store_spec(kind: str, model: nn.Module, formatted: Dataset, config_record: dict, dim: int,
                with_adapter: bool = True) -> StoreSpec:
    """The identity of a store of `kind` for these rows: model id, revision and weights digest, the adapter's
    digest (None without `with_adapter`: the base model's vectors), data and settings."""
    model_id, revision = model_identity(model)
    return StoreSpec(kind=kind, model_id=model_id, model_revision=revision,
                     dataset_fingerprint=fingerprint_dataset(formatted),
                     config={**config_record, "adapter_digest": adapter_digest(model) if with_adapter else None,
                             "weights_digest": weights_digest(model)},
                     num_rows=len(formatted), dim=dim)


def _gradient_record(gradients: PerSampleGradients, config: GradientConfig, preconditioner: Tensor | None) -> dict:
    """The settings a gradient store records: the config, which parameters, and the preconditioner's digest."""
    record = asdict(config)
    # Stores written before projection_seed was renamed recorded it as "seed": the same name keeps them valid.
    record["seed"] = record.pop("projection_seed")
    # Whole-model gradients are what stores recorded before gradient_blocks existed: leaving the field out when it
    # is None keeps those stores valid (a truncated model's gradients record it and so never match them).
    if record["gradient_blocks"] is None:
        del record["gradient_blocks"]
    return {
        **record,
        "parameter_names_digest": hashlib.sha256("\n".join(gradients.parameter_names).encode()).hexdigest(),
        "preconditioner_digest": None if preconditioner is None else _tensor_digest(preconditioner),
    }


def _pad_token_id(model: nn.Module, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return pad_token_id
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return config.pad_token_id if config.pad_token_id is not None else 0


def extract_gradients(
    model: nn.Module,
    formatted: Dataset,
    output_dir: str | Path,
    config: GradientConfig | None = None,
    preconditioner: Tensor | None = None,
    pad_token_id: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> VectorStore:
    """Per-sample gradients of every formatted row, written to (or resumed in) a store at `output_dir`.

    Args:
        model: a PEFT LoRA causal LM (or any causal LM with `config.parameters="pattern"`).
        formatted: `format_dataset(...).dataset` (columns row_id, input_ids, attention_mask, labels).
        output_dir: store directory; an existing store with the same identity is resumed.
        config: gradient settings (its batch_size fixes the batch boundaries).
        preconditioner: [raw_dim] optimizer preconditioner (e.g. `affine_step(optimizer, ...).scale`),
            applied to every row; its digest is part of the store identity.
        pad_token_id: padding id (default: the model config's, else 0; padding is masked either way).
        overwrite: replace a store whose identity differs instead of refusing it.
        show_progress: show a progress bar.

    Returns:
        The completed VectorStore: float32 [len(formatted), output_dim], row_ids = formatted["row_id"].

    Under a multi-process launch every process must call it with the same arguments; each computes its share
    of the pending batches (see `hf_influence.extraction.distributed`).
    """
    config = config or GradientConfig()
    gradients = PerSampleGradients(model, config)
    config_record = _gradient_record(gradients, config, preconditioner)
    return _extract(
        "gradients", model, formatted, output_dir, config_record, gradients.output_dim, config.batch_size,
        pad_token_id, lambda batch, row_ids: gradients.compute(batch, preconditioner=preconditioner, row_ids=row_ids),
        overwrite, show_progress,
    )


def finished_gradients(model: nn.Module, formatted: Dataset, output_dir: str | Path, config: GradientConfig | None = None,
                       preconditioner: Tensor | None = None) -> VectorStore | None:
    """The complete gradient store at `output_dir` that `extract_gradients` would return for these arguments, or
    None when there is none (absent, unfinished, or made for another model, adapter, data or setting). Nothing
    is computed: a caller uses it to read rows another run already paid for."""
    path = Path(output_dir)
    if not (path / MANIFEST_NAME).exists():
        return None
    config = config or GradientConfig()
    gradients = PerSampleGradients(model, config)
    spec = _store_spec("gradients", model, formatted, _gradient_record(gradients, config, preconditioner),
                       gradients.output_dim)
    store = VectorStore.open(path)
    try:
        store.check_spec(spec, formatted["row_id"])
    except StoreMismatchError:
        return None
    return store if store.is_complete() else None


def target_hessian(model: nn.Module, gradients: PerSampleGradients, target: Dataset, config: GradientConfig,
                   kind: str = "exact", pad_token_id: int | None = None) -> TargetHessian:
    """The Hessian H_T of the target rows' loss in the tracked parameters, batched as `config.batch_size`. With
    unit-normalised gradients (config.normalize) each target row is weighted by 1 / |g_j|: p_i = mean_j <v_i,
    g_j / |g_j|> is then the first-order change of (1/m) sum_j l_j / |g_j|, whose Hessian this is, so that the
    first- and second-order terms are on one scale."""
    pad = _pad_token_id(model, pad_token_id)
    device = next(model.parameters()).device
    batches = [{key: value.to(device) for key, value in pad_batch(list(target.select(range(s, min(
        s + config.batch_size, len(target))))), pad).items()} for s in range(0, len(target), config.batch_size)]
    weights = None
    if config.normalize:
        weights = 1.0 / torch.cat([gradients.raw(batch).float().norm(dim=1).cpu() for batch in batches])
    return TargetHessian(model, gradients.parameters, batches, kind=kind, target_weights=weights)


def extract_hessian_products(
    model: nn.Module,
    formatted: Dataset,
    target: Dataset,
    output_dir: str | Path,
    config: GradientConfig | None = None,
    hessian: str = "exact",
    preconditioner: Tensor | None = None,
    pad_token_id: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> VectorStore:
    """P(H_T v_i) of every formatted row into (or resumed from) a store at `output_dir`: v_i = A g_i, the row's
    gradient times the preconditioner (unit-normalised when config.normalize), H_T the target Hessian
    (`target_hessian`), P the gradient projection, so the products share the gradient stores' coordinates.
    Second-order Influence Distillation's dominant cost: a rerun on the same work_dir reads them back.

    Args: as `extract_gradients`, plus
        target: the formatted target rows whose loss H_T is the Hessian of (their fingerprint is in the identity).
        hessian: "exact" or "gauss_newton".

    Returns:
        The completed VectorStore: float32 [len(formatted), output_dim].
    """
    config = config or GradientConfig()
    if config.projection == "factored":
        raise ValueError("order=2 needs an elementwise projection (countsketch, srht, gaussian or none), "
                         "not projection='factored'.")
    gradients = PerSampleGradients(model, config)
    device = next(model.parameters()).device
    operator: list[TargetHessian] = []  # built on the first pending batch: a finished store needs no target pass

    def compute(batch: dict[str, Tensor], row_ids: list[int]) -> Tensor:
        if not operator:
            operator.append(target_hessian(model, gradients, target, config, hessian, pad_token_id))
        vectors = gradients.raw({key: value.to(device) for key, value in batch.items()}).float()
        if preconditioner is not None:
            vectors = vectors * preconditioner.to(device)
        if config.normalize:
            vectors = vectors / vectors.norm(dim=1, keepdim=True)
        return gradients.project(operator[0].matmul(vectors)).float().cpu()

    record = {**_gradient_record(gradients, config, preconditioner), "hessian": hessian,
              "target_fingerprint": fingerprint_dataset(target)}
    return _extract("hessian_products", model, formatted, output_dir, record, gradients.output_dim, config.batch_size,
                    pad_token_id, compute, overwrite, show_progress)


def extract_jvp_embeddings(
    model: nn.Module,
    formatted: Dataset,
    output_dir: str | Path,
    config: JVPConfig | None = None,
    pad_token_id: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> VectorStore:
    """JVP embeddings of every formatted row, written to (or resumed in) a store at `output_dir`.

    Args: as `extract_gradients`, with a `JVPConfig`.

    Returns:
        The completed VectorStore: float32 [len(formatted), output_dim].
    """
    config = config or JVPConfig()
    embedder = JVPEmbedder(model, config)
    return _extract(
        "jvp_embeddings", model, formatted, output_dir, asdict(config), embedder.output_dim, config.jvp_batch_size,
        pad_token_id, lambda batch, row_ids: embedder.embed(batch), overwrite, show_progress,
    )


def extract_lm_embeddings(
    model: nn.Module,
    formatted: Dataset,
    output_dir: str | Path,
    batch_size: int = 8,
    pad_token_id: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    pooling: str = "mean",
    num_blocks: int | None = None,
) -> VectorStore:
    """Pooled hidden states of the base model for every formatted row, unit norm, written to (or resumed in) a store
    at `output_dir`: by default RDS+ embeddings (position-weighted mean of the last hidden state, see
    `rds_embeddings.py`); pooling "last" takes the last real token's state, num_blocks stops after that many decoder
    blocks (then the final norm). The base model's: a PEFT adapter is switched off for the pass and is not part of
    the store's identity, so a warm-up (which trains the adapter) leaves the store valid.

    Returns:
        The completed VectorStore: float32 [len(formatted), hidden_size].
    """
    decoder, _ = causal_lm_parts(model)
    device = next(model.parameters()).device
    hidden = decoder.config.hidden_size

    def compute(batch: dict[str, Tensor], row_ids: list[int]) -> Tensor:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), base_model(model), first_blocks(model, num_blocks):
                return pooled_batch(decoder, batch, device, pooling)
        finally:
            model.train(was_training)

    # RDS+'s identity is the one older stores carry: they stay valid.
    identity = {"pooling": "position_weighted_mean" if pooling == "mean" else "last_token"}
    if num_blocks is not None:
        identity["num_blocks"] = num_blocks
    return _extract("lm_embeddings", model, formatted, output_dir, identity, hidden, batch_size, pad_token_id,
                    compute, overwrite, show_progress, with_adapter=False)
