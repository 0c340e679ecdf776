"""What the gradient-based methods share: the warm-up's optimizer state, and the run's resumable stores in
work_dir (gradients of pool, landmark and target rows; JVP and LM embeddings of the pool)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import Tensor

from ..engine import Context
from ..extraction.extract import extract_gradients, extract_jvp_embeddings, extract_lm_embeddings, finished_gradients
from ..extraction.gradients import GradientConfig, PerSampleGradients
from ..extraction.jvp import JVPConfig
from ..selection.landmarks import concatenate_scaled, first_order_scores
from ..optimizer_warmup import WarmupConfig, warmup
from ..optimizers import AffineStep, affine_step
from ..extraction.store import VectorStore, fingerprint_dataset


def optimizer_step(context: Context, tracked: PerSampleGradients) -> AffineStep | None:
    """The affine step of the optimizer used for influence (None: plain GD): the user's optimizer, else the
    warm-up's if optimizer_state="warmup" ("warmup_gd" warms up but returns None; call it once per run: each call without a user's optimizer warms up,
    or loads the warm-up saved in work_dir)."""
    optimizer = context.optimizer
    state = context.configs[WarmupConfig].optimizer_state
    if optimizer is None and state != "gd":
        # Saved in a given work_dir: a rerun (after a crash, or for another target) reuses the same state,
        # and with it the gradient stores preconditioned by it.
        cache_dir = None if context.config.work_dir is None else Path(context.config.work_dir) / "warmup"
        with context.timed("warmup"):
            optimizer = warmup(context.model, context.tokenizer, context.pool, context.configs[WarmupConfig],
                               cache_dir=cache_dir, overwrite=context.config.overwrite).optimizer
    if optimizer is None or (context.optimizer is None and state == "warmup_gd"):  # weights moved, no preconditioner
        return None
    return affine_step(optimizer, tracked.parameters)


def gradient_store(context: Context, rows: Dataset, name: str, preconditioner: Tensor | None,
                   folder: str | None = None) -> VectorStore:
    """The store work_dir/folder (default: name) of the gradients of `rows`, computed or resumed, timed as `name`."""
    with context.timed(name):
        return extract_gradients(context.model, rows, context.work_dir / (folder or name), context.configs[GradientConfig],
                                 preconditioner=preconditioner, pad_token_id=context.tokenizer.pad_token_id,
                                 overwrite=context.config.overwrite, show_progress=context.show_progress)


def gradient_vectors(context: Context, rows: Dataset, name: str, preconditioner: Tensor | None,
                     folder: str | None = None) -> Tensor:
    """Gradients of `rows` in memory [r, d], from `gradient_store`."""
    return gradient_store(context, rows, name, preconditioner, folder).to_tensor()


def target_gradient_vectors(context: Context) -> Tensor:
    """The target rows' gradients, in a store named by the target's fingerprint: one work_dir serves several
    targets, and their pool-side stores (JVP embeddings, landmark or pool gradients, warm-up) are shared."""
    folder = f"target_gradients-{fingerprint_dataset(context.target)[:16]}"
    return gradient_vectors(context, context.target, "target_gradients", None, folder)


def feature_store(context: Context, part: str, step: AffineStep | None = None,
                  tracked: PerSampleGradients | None = None) -> VectorStore:
    """One part of the regression features of every pool row, in a resumable store under work_dir. step and
    tracked: the run's optimizer step and gradients ("truncated_gradient" takes its preconditioner from them)."""
    pad, show = context.tokenizer.pad_token_id, context.show_progress
    if part == "jvp":
        with context.timed("jvp_embeddings"):
            return extract_jvp_embeddings(context.model, context.pool, context.work_dir / "jvp",
                                          context.configs[JVPConfig], pad_token_id=pad,
                                          overwrite=context.config.overwrite, show_progress=show)
    if part == "truncated_gradient":
        config = replace(context.configs[GradientConfig], gradient_blocks=context.configs[JVPConfig].num_blocks)
        truncated = PerSampleGradients(context.model, config)
        scale = None if step is None else restricted_scale(step.scale, tracked, truncated)
        with context.timed("truncated_gradient_embeddings"):
            return extract_gradients(context.model, context.pool, context.work_dir / "truncated_gradients", config,
                                     preconditioner=scale, pad_token_id=pad, overwrite=context.config.overwrite,
                                     show_progress=show)
    if part == "hidden_state":  # the base model's state partway through (the warm-up's adapter is switched off)
        config = context.method_config
        with context.timed("hidden_state_embeddings"):
            return extract_lm_embeddings(context.model, context.pool, context.work_dir / "hidden_states",
                                         batch_size=context.configs[GradientConfig].batch_size, pad_token_id=pad,
                                         overwrite=context.config.overwrite, show_progress=show,
                                         pooling=config.hidden_state_pooling, num_blocks=config.hidden_state_blocks)
    # The base model's representation, as method="rds" computes it (the warm-up's adapter is switched off).
    with context.timed("lm_embeddings"):
        return extract_lm_embeddings(context.model, context.pool, context.work_dir / "lm_embeddings",
                                     batch_size=context.configs[GradientConfig].batch_size, pad_token_id=pad,
                                     overwrite=context.config.overwrite, show_progress=show)


def restricted_scale(scale: Tensor, full: PerSampleGradients, part: PerSampleGradients) -> Tensor:
    """The entries [part.raw_dim] of a preconditioner over `full`'s parameters [full.raw_dim] that belong to
    `part`'s parameters (a subset of them, e.g. a truncated model's adapters), in `part`'s flattening order."""
    spans, start = {}, 0
    for parameter in full.parameters:
        spans[id(parameter)] = (start, start + parameter.numel())
        start += parameter.numel()
    return torch.cat([scale[slice(*spans[id(parameter)])] for parameter in part.parameters])


def landmark_feature_rows(context: Context, step: AffineStep | None, tracked: PerSampleGradients) -> VectorStore | Tensor:
    """The regression features of every pool row (InfluenceDistillationConfig.landmark_features): a store for one
    part; for several, the rows [e_1 / s_1, e_2 / s_2] in memory, s_j the median pairwise distance of part j on a
    seeded sample of at most 1000 rows, so that each part weighs the same in the RBF distance whatever its units."""
    parts = context.method_config.landmark_features.split("+")
    stores = [feature_store(context, part, step, tracked) for part in parts]
    if len(stores) == 1:
        return stores[0]
    return concatenate_scaled([store.to_tensor() for store in stores], seed=context.config.selection_seed)


def pool_row_store(context: Context, rows: Tensor, name: str, preconditioner: Tensor | None,
                   folder: str | None = None) -> tuple[VectorStore, Tensor, int]:
    """The gradient store holding some pool rows (landmarks, a shortlist), timed as `name`: (store, the rows'
    positions in it [r], how many gradients this call computed). When an exact run on this work_dir already holds
    every pool row's gradient (same model, adapter, data and settings), that store is used and nothing is computed:
    trying other landmark settings after an exact run then costs no model pass. Otherwise the rows' gradients are
    computed into work_dir/folder (default: name)."""
    exact = finished_gradients(context.model, context.pool, context.work_dir / "pool_gradients",
                               context.configs[GradientConfig], preconditioner)
    if exact is not None:
        return exact, rows, 0
    store = gradient_store(context, context.pool.select(rows.tolist()), name, preconditioner, folder)
    return store, torch.arange(len(rows)), len(rows)


def pool_row_gradients(context: Context, rows: Tensor, name: str, preconditioner: Tensor | None,
                       folder: str | None = None) -> Tensor:
    """Gradients [r, d] of some pool rows in memory (the order-2 terms need them; first-order runs stream their
    scores with `pool_row_scores`)."""
    store, positions, _ = pool_row_store(context, rows, name, preconditioner, folder)
    return store_rows(store, positions)


def pool_row_scores(context: Context, rows: Tensor, name: str, preconditioner: Tensor | None, targets: Tensor,
                    folder: str | None = None) -> tuple[Tensor, int]:
    """First-order scores [r, m] of some pool rows against the target gradients [m, d], streamed from their
    gradient store chunk_rows rows at a time (memory: r x m scores, not r x d gradients), and how many gradients
    this call computed (0: read from an exact run's store)."""
    store, positions, computed = pool_row_store(context, rows, name, preconditioner, folder)
    return store_scores(store, positions, targets, context.config.chunk_rows), computed


def store_scores(store: VectorStore, positions: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:
    """First-order scores [r, m] of the store's rows at `positions` [r] against targets [m, d], reading at most
    chunk_rows gradients at a time."""
    blocks = [first_order_scores(store_rows(store, positions[start:start + chunk_rows]), targets)
              for start in range(0, len(positions), chunk_rows)]
    return torch.cat(blocks) if blocks else targets.new_zeros(0, len(targets))


def store_rows(store: VectorStore, rows: Tensor) -> Tensor:
    """Rows [r, e] of a store at arbitrary indices, read in row order one run of consecutive rows at a time (the
    memory map is then read forwards, once)."""
    order = rows.argsort()
    ordered = rows[order].numpy()
    values = torch.empty(len(rows), store.dim, dtype=torch.float32)
    # A run ends where the next index is not the previous one plus one (repeated indices start a new run).
    breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
    for start, end in zip(np.r_[0, breaks], np.r_[breaks, len(ordered)]):
        block = store.read(int(ordered[start]), int(ordered[end - 1]) + 1).astype(np.float32)
        values[order[start:end]] = torch.from_numpy(block)
    return values
