"""The baselines: LESS (gradient cosine), RDS+ (hidden-state cosine) and uniform random rows."""

from __future__ import annotations

import torch

from ..engine import Context, MethodOutput
from ..extraction.gradients import GradientConfig, PerSampleGradients
from ..selection.landmarks import first_order_scores
from ..models import base_model
from ..rds_embeddings import cosine_scores, lm_pooled_embeddings
from ..registry import register_method
from .stores import feature_store, gradient_vectors, optimizer_step, target_gradient_vectors


@register_method("less", default_selection="less")
def less(context: Context) -> MethodOutput:
    """LESS (Xia et al. 2024): Adam-preconditioned LoRA gradients of every pool row, cosine with target
    gradients, mean within each target task, max over tasks. One warm-up checkpoint, not LESS's four."""
    tracked = PerSampleGradients(context.model, context.configs[GradientConfig])
    step = optimizer_step(context, tracked)
    pool_vectors = gradient_vectors(context, context.pool, "pool_gradients", None if step is None else step.scale)
    target_vectors = target_gradient_vectors(context)
    if not context.configs[GradientConfig].normalize:
        pool_vectors = pool_vectors / pool_vectors.norm(dim=1, keepdim=True)
        target_vectors = target_vectors / target_vectors.norm(dim=1, keepdim=True)
    return MethodOutput(first_order_scores(pool_vectors, target_vectors))


@register_method("rds", default_selection="round_robin", uses_stores=False)
def rds(context: Context) -> MethodOutput:
    """RDS+ (Ivison et al. 2025): cosine of position-weighted mean-pooled last hidden states of the base model (a
    PEFT adapter, the user's or the library's, is switched off for pool and target alike). With a work_dir the
    pool's embeddings go to the store that landmark_features="lm" uses, so that another target (or a landmark
    run with lm features) on the same work_dir reuses them; without one they stay in memory (every process of a
    multi-process launch then embeds the whole pool itself, as no folder is shared)."""
    pad, show = context.tokenizer.pad_token_id, context.show_progress
    if context.config.work_dir is not None:
        pool = feature_store(context, "lm").to_tensor()
    else:
        with context.timed("lm_embeddings"), base_model(context.model):
            pool = lm_pooled_embeddings(context.model, context.pool, pad_token_id=pad, show_progress=show)
    with context.timed("embeddings"), base_model(context.model):
        target = lm_pooled_embeddings(context.model, context.target, pad_token_id=pad, show_progress=show)
    return MethodOutput(cosine_scores(pool, target, chunk_rows=context.config.chunk_rows))


@register_method("random", default_selection="mean_top_k", needs_model=False, uses_stores=False)
def random_method(context: Context) -> MethodOutput:
    """Uniform random rows: seeded uniform random keys [n, 1], the top-budget keys are selected."""
    generator = torch.Generator().manual_seed(context.config.selection_seed)
    return MethodOutput(torch.rand(len(context.pool), 1, generator=generator))
