"""`select_by_influence`: one entry point over a registry of selection methods.

    subset = select_by_influence(pool, target, model="HuggingFaceTB/SmolLM2-135M-Instruct", budget=0.05)

Every method turns (pool, target) into a score matrix [pool rows, target rows] (or per-row weights), and
one selection rule (`selection.py`) turns that into pool rows. Options are the fields of the config
dataclasses (`SelectionConfig`, `FormattingConfig`, `GradientConfig`, `JVPConfig`, `WarmupConfig`,
`LoraSettings`); their names are unique, so `select_by_influence(..., num_landmarks=512, projection_dim=4096)`
routes each keyword to its dataclass.

Influence Distillation (ALGORITHMS.md 1): warm-up (AdamW optimizer state) -> JVP embeddings of the whole
pool -> exact LoRA gradients of k landmarks and of the targets -> P_L = G_L G_T^T -> kernel ridge
regression spreads P_L to every pool row -> robust weights (first order in closed form; second order with
target-Hessian products on the landmarks, Q ~ C Q_L C^T) -> selection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from datasets import Dataset
from torch import Tensor, nn
from transformers.utils.logging import tqdm

from .data import load_rows
from .distillation import (LandmarkRegressor, concatenate_scaled, first_order_scores, robust_weights,
                           select_landmarks)
from .distributed import process_state
from .embeddings import cosine_scores, lm_pooled_embeddings
from .extract import extract_gradients, extract_jvp_embeddings, extract_lm_embeddings
from .formatting import FormattingConfig, format_dataset, pad_batch
from .gradients import GradientConfig, PerSampleGradients
from .hessian import HESSIAN_KINDS, TargetHessian
from .jvp import JVPConfig
from .models import DEFAULT_MODEL, LoraSettings, add_lora, load_model, model_identity
from .network import InfluenceNetwork
from .nn_cift import NNCIFTConfig, block_overrides, nn_cift
from .optimizers import AffineStep, affine_step
from .scores import ScoreTable, provenance_record
from .selection import RULES, SelectionError, resolve_budget, select_indices, weighted_sample
from .store import VectorStore, fingerprint_dataset
from .streaming import predict_scores, stream_select
from .warmup import WarmupConfig, warmup

logger = logging.getLogger(__name__)


LANDMARK_FEATURES = ("jvp", "lm", "jvp+lm")


@dataclass
class SelectionConfig:
    """How `select_by_influence` scores and selects.

    Attributes:
        method: registered method: "influence_distillation" (landmarks), "influence_distillation_exact"
            (gradients of every pool row), "less", "rds" (RDS+ embeddings), "nn_cift" (an oracle distilled into
            an InfluenceNetwork, see NNCIFTConfig) or "random".
        selection: "round_robin" (each target sample in turn takes its best remaining row), "round_robin_task"
            (the same over target tasks), "mean_top_k", "less" (mean within task, max over tasks),
            "facility_location" (lazy greedy coverage of the targets, as DELIFT; in memory), "weighted"
            (sample rows with probability proportional to the robust weights); None: the method's default.
        target_task_column: target column naming each row's task (for "round_robin_task" and "less");
            None uses "task" when the target has it, else every target row is its own task.
        optimizer_state: where the Adam state comes from when no optimizer object is passed: "warmup" (a short
            LoRA AdamW run on a slice of the pool) or "gd" (plain gradient descent, no preconditioning).
        num_landmarks: landmark rows with exact gradients (capped at the pool size).
        landmark_selection: "uniform" (seeded random) or "kmeans++" on the regression features.
        landmark_features: what the kernel regression reads for every pool row: "jvp" (JVP embeddings, JVPConfig),
            "lm" (the base model's RDS+ embeddings: position-weighted mean of the last hidden state, one forward
            pass of the whole model), or "jvp+lm" (both, each scaled by its median pairwise distance so that both
            weigh the same in the kernel; held in memory, [n, e_jvp + hidden]).
        landmark_scores: what landmark rows are ranked by when there are fewer landmarks than pool rows:
            "loo" (their leave-one-out predictions, made from the other landmarks: every row is then an
            out-of-sample prediction on the same footing) or "exact" (their exact influence, which beats the
            ridge-shrunk predictions of the other rows and fills round-robin selections with landmarks). With
            landmarks = the whole pool both give exact influence.
        kernel: kernel of the landmark regression: "rbf" or "linear".
        kernel_bandwidth: RBF bandwidth as a multiple of the median pairwise landmark distance (1.0, the default,
            is the median heuristic); None chooses it by closed-form leave-one-out on the landmarks (better in the
            fidelity lab, but an argmin over a grid: rounding differences, e.g. a multi-process warm-up, can flip
            the choice and with it the selection, so it is opt-in).
        kernel_ridge: ridge of the landmark regression, relative to the mean kernel diagonal (default 0.01); None
            chooses it by closed-form leave-one-out on the landmarks (see kernel_bandwidth).
        order: 1 (first-order influence) or 2 (adds the target-Hessian term to the robust weights).
        hessian: "exact" (double backward) or "gauss_newton", for order 2.
        robust_lambda: lambda of the robust-weights objective (the paper's running example uses 0.02).
        step_size: eta of the one-step objective; None uses the optimizer's learning rate (required for
            optimizer_state="gd" with order 2).
        selection_seed: seed of landmarks, selection order and random baselines.
        work_dir: folder for the resumable stores (embeddings, gradients) and the saved warm-up; None uses a
            temporary folder. Re-running with the same folder resumes after a crash and reuses finished stores;
            target gradients are stored per target, so other targets on the same pool and model share the
            pool-side stores and the warm-up.
        chunk_rows: pool rows per chunk when streaming regression and scoring.
    """

    method: str = "influence_distillation"
    selection: str | None = None
    target_task_column: str | None = None
    optimizer_state: str = "warmup"
    num_landmarks: int = 4096
    landmark_selection: str = "uniform"
    landmark_features: str = "jvp"
    landmark_scores: str = "loo"
    kernel: str = "rbf"
    kernel_bandwidth: float | None = 1.0
    kernel_ridge: float | None = 0.01
    order: int = 1
    hessian: str = "exact"
    robust_lambda: float = 0.02
    step_size: float | None = None
    selection_seed: int = 0
    work_dir: str | None = None
    chunk_rows: int = 65536

    def __post_init__(self) -> None:
        choices = {
            "method": tuple(METHODS), "selection": (None, *RULES, "facility_location", "weighted"), "optimizer_state": ("warmup", "gd"),
            "landmark_selection": ("uniform", "kmeans++"), "landmark_features": LANDMARK_FEATURES,
            "landmark_scores": ("loo", "exact"),
            "kernel": ("rbf", "linear"), "order": (1, 2),
            "hessian": HESSIAN_KINDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"SelectionConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("num_landmarks", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"SelectionConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_ridge is not None and self.kernel_ridge < 0:
            raise ValueError(f"SelectionConfig.kernel_ridge must be >= 0 (or None: chosen by leave-one-out), got "
                             f"{self.kernel_ridge}")
        if self.kernel_bandwidth is not None and not self.kernel_bandwidth > 0:
            raise ValueError(f"SelectionConfig.kernel_bandwidth must be > 0 (a multiple of the median distance, or "
                             f"None: chosen by leave-one-out), got {self.kernel_bandwidth}")
        if not self.robust_lambda > 0:
            raise ValueError(f"SelectionConfig.robust_lambda must be > 0, got {self.robust_lambda}")


CONFIG_TYPES = (SelectionConfig, FormattingConfig, GradientConfig, JVPConfig, WarmupConfig, LoraSettings, NNCIFTConfig)


@dataclass
class Context:
    """What a method gets: the model, the formatted rows and every config."""

    model: nn.Module
    tokenizer: Any
    pool: Dataset  # formatted pool rows (row_id = index into the user's pool)
    target: Dataset  # formatted target rows
    configs: dict[type, Any]
    optimizer: torch.optim.Optimizer | None
    work_dir: Path
    raw_pool: Dataset | None = None  # the user's pool rows behind `pool` (same order), for text-based methods
    raw_target: Dataset | None = None
    details: dict = field(default_factory=dict)
    # Set by select_by_influence when no score table is asked for and the rule streams: a method may then
    # return a ScoreStream instead of the [n, m] matrix.
    stream_selection: bool = False

    @property
    def config(self) -> SelectionConfig:
        return self.configs[SelectionConfig]

    @property
    def show_progress(self) -> bool:
        return self.configs[FormattingConfig].show_progress

    def timed(self, name: str):
        return _Timer(self.details.setdefault("seconds", {}), name)


class _Timer:
    def __init__(self, record: dict, name: str):
        self.record, self.name = record, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.record[self.name] = self.record.get(self.name, 0.0) + time.perf_counter() - self.start


@dataclass
class ScoreStream:
    """Scores [n, m] left as a fitted predictor over the pool's embeddings (a VectorStore read in blocks, or a
    tensor), with the known scores (landmark rows, or NN-CIFT's oracle block) as exact values: `select` never
    holds more than a chunk of the pool (see streaming.py)."""

    embeddings: VectorStore | Tensor  # [n, e]
    predictor: LandmarkRegressor | InfluenceNetwork
    exact: dict[str, Tensor]  # exact_rows [r], exact_scores [r, m or c], optionally exact_columns [c]
    chunk_rows: int
    target_embeddings: Tensor | None = None  # [m, e], for a pairwise InfluenceNetwork

    def select(self, budget: int, rule: str, seed: int, target_groups=None) -> Tensor:
        """stream_select: the rows select_indices(self.scores(), ...) would pick, in the same order."""
        return stream_select(self.embeddings, self.predictor, budget, rule, target_embeddings=self.target_embeddings,
                             target_groups=target_groups, seed=seed, chunk_rows=self.chunk_rows, **self.exact)

    def scores(self) -> Tensor:
        """The whole [n, m] matrix (same blocks, same bits as `select`)."""
        return predict_scores(self.embeddings, self.predictor, self.target_embeddings, **self.exact)


@dataclass
class MethodOutput:
    """scores [n, m] over the formatted pool rows (None when streamed); weights [n]; landmark_mask [n];
    stream: the scores as a ScoreStream (only when Context.stream_selection); pointwise: scores [n, 1] that
    do not depend on the target (a pointwise NN-CIFT oracle)."""

    scores: Tensor | None
    weights: Tensor | None = None
    landmark_mask: Tensor | None = None
    stream: ScoreStream | None = None
    pointwise: bool = False


METHODS: dict[str, tuple[Callable[[Context], MethodOutput], str, bool]] = {}


def register_method(name: str, default_selection: str, needs_model: bool = True):
    """Register `function(context) -> MethodOutput` under `name` for `select_by_influence(method=name)`."""

    def decorator(function: Callable[[Context], MethodOutput]):
        METHODS[name] = (function, default_selection, needs_model)
        return function

    return decorator


# ----------------------------------------------------------------------------------------------
# Optimizer state and gradients


def _optimizer_step(context: Context, tracked: PerSampleGradients) -> AffineStep | None:
    """The affine step of the optimizer used for influence (None: plain GD), after the warm-up if asked."""
    if context.optimizer is None and context.config.optimizer_state == "warmup":
        # Saved in a given work_dir: a rerun (after a crash, or for another target) reuses the same state,
        # and with it the gradient stores preconditioned by it.
        cache_dir = None if context.config.work_dir is None else Path(context.config.work_dir) / "warmup"
        with context.timed("warmup"):
            context.optimizer = warmup(context.model, context.tokenizer, context.pool,
                                       context.configs[WarmupConfig], cache_dir=cache_dir).optimizer
    if context.optimizer is None:
        return None
    return affine_step(context.optimizer, tracked.parameters)


def _gradients(context: Context, rows: Dataset, name: str, preconditioner: Tensor | None,
               folder: str | None = None) -> Tensor:
    """Gradients of `rows` from (or into) the store work_dir/folder (default: name), timed as `name`."""
    with context.timed(name):
        store = extract_gradients(context.model, rows, context.work_dir / (folder or name), context.configs[GradientConfig],
                                  preconditioner=preconditioner, pad_token_id=context.tokenizer.pad_token_id,
                                  show_progress=context.show_progress)
    return store.to_tensor()


def _target_gradients(context: Context) -> Tensor:
    """The target rows' gradients, in a store named by the target's fingerprint: one work_dir serves several
    targets, and their pool-side stores (JVP embeddings, landmark or pool gradients, warm-up) are shared."""
    folder = f"target_gradients-{fingerprint_dataset(context.target)[:16]}"
    return _gradients(context, context.target, "target_gradients", None, folder)


def _device(context: Context) -> torch.device:
    return next(context.model.parameters()).device


def _hessian_projected(context: Context, tracked: PerSampleGradients, rows: Dataset, step: AffineStep | None,
                       extra: Tensor | None = None) -> Tensor:
    """P(H_T v_i) [len(rows) (+1), output_dim] for v_i = A g_i (unit-normalised when the gradients are), and
    optionally for one more raw vector `extra` (the drift b), in the coordinates of the stored gradients.

    With unit-normalised gradients, p_i = mean_j <v_i, g_j / |g_j|> is the first-order change of the target
    objective (1/m) sum_j l_j / |g_j|, so H_T is that objective's Hessian (target weights 1 / |g_j|): the first-
    and second-order terms are then on one scale, and eta means the same thing for both.
    """
    gradient_config = context.configs[GradientConfig]
    if gradient_config.projection == "factored":
        raise ValueError("order=2 needs an elementwise projection (countsketch, srht, gaussian or none), "
                         "not projection='factored'.")
    pad = context.tokenizer.pad_token_id
    target_batches = [pad_batch(list(context.target.select(range(s, min(s + gradient_config.batch_size,
                                                                       len(context.target))))), pad)
                      for s in range(0, len(context.target), gradient_config.batch_size)]
    device = _device(context)
    target_batches = [{key: value.to(device) for key, value in batch.items()} for batch in target_batches]
    target_weights = None
    if gradient_config.normalize:
        target_weights = 1.0 / torch.cat([tracked.raw(batch).float().norm(dim=1).cpu() for batch in target_batches])
    hessian = TargetHessian(context.model, tracked.parameters, target_batches, kind=context.config.hessian,
                            target_weights=target_weights)
    scale = None if step is None else step.scale.to(device)
    projected = []
    batch_size = gradient_config.batch_size
    for start in tqdm(range(0, len(rows), batch_size), desc="hessian products", unit="batches",
                      disable=not context.show_progress):
        batch = pad_batch(list(rows.select(range(start, min(start + batch_size, len(rows))))), pad)
        vectors = tracked.raw({key: value.to(device) for key, value in batch.items()}).float()
        if scale is not None:
            vectors = vectors * scale
        if gradient_config.normalize:
            vectors = vectors / vectors.norm(dim=1, keepdim=True)
        projected.append(tracked._projector.project(hessian.matmul(vectors)).float().cpu())
    if extra is not None:
        projected.append(tracked._projector.project(hessian.matmul(extra.to(device)[None])).float().cpu())
    return torch.cat(projected)


def _landmark_second_order(context: Context, tracked, landmark_rows: Dataset, landmark_vectors: Tensor,
                           step: AffineStep | None, num_pool_rows: int) -> tuple[Tensor, Tensor | None]:
    """Q_L = (1/n) U_L (P H V_L)^T [k, k] (symmetrised), and P(H b) for the drift correction (or None).

    The drift enters p as p = G A (g_T - eta H b) only for unnormalised gradients: with unit-normalised
    gradients g_T has no physical scale to compare H b with.
    """
    drift = None
    if step is not None and not context.configs[GradientConfig].normalize and bool(step.drift.any()):
        drift = step.drift
    with context.timed("hessian_products"):
        products = _hessian_projected(context, tracked, landmark_rows, step, extra=drift)
    landmark_products, drift_product = (products[:-1], products[-1]) if drift is not None else (products, None)
    q_landmarks = landmark_vectors.double() @ landmark_products.double().T / num_pool_rows
    return (q_landmarks + q_landmarks.T) / 2, drift_product


def _step_size(context: Context, step: AffineStep | None) -> float:
    """eta of the second-order term: step_size, else the optimizer's learning rate. A learning rate of 0 (a schedule
    that has decayed to its end) would silently make the weights first-order: then half the schedule's initial
    learning rate is used, as the reference implementation does, with a warning."""
    if context.config.step_size is not None:
        return context.config.step_size
    if step is None:
        raise ValueError("order=2 with optimizer_state='gd' needs step_size (the learning rate eta of the one-step objective).")
    if step.lr > 0:
        return step.lr
    initial = context.optimizer.param_groups[0].get("initial_lr") if context.optimizer is not None else None
    if not initial:
        raise ValueError("order=2: the optimizer's learning rate is 0 and it records no initial_lr (set by an LR "
                         "scheduler), so the second-order term would vanish; pass step_size=... (eta).")
    logger.warning("order=2: the optimizer's learning rate is 0 (a finished schedule); using initial_lr / 2 = %g as "
                   "eta. Pass step_size=... to choose it.", initial / 2)
    return initial / 2


def _weights(context: Context, p: Tensor, q_factors: tuple[Tensor, Tensor] | None, eta: float) -> Tensor:
    with context.timed("robust_weights"):
        return robust_weights(p, context.config.robust_lambda, eta=eta, Q_factors=q_factors).float()


# ----------------------------------------------------------------------------------------------
# Methods


@register_method("influence_distillation", default_selection="round_robin")
def influence_distillation(context: Context) -> MethodOutput:
    """Landmark Influence Distillation: exact gradients for k landmarks, KRR on JVP embeddings for the rest."""
    config, n = context.config, len(context.pool)
    tracked = PerSampleGradients(context.model, context.configs[GradientConfig])
    step = _optimizer_step(context, tracked)
    store = _landmark_features(context)
    # Uniform landmarks and first-order scores need only the landmarks' rows in memory (the rest is read from
    # the store in blocks); kmeans++ and the order-2 transfer matrix need all [n, e] embeddings.
    embeddings = store if isinstance(store, Tensor) else None
    if embeddings is None and (config.landmark_selection == "kmeans++" or config.order == 2):
        embeddings = store.to_tensor()
    k = min(config.num_landmarks, n)
    landmarks = select_landmarks(n, k, config.landmark_selection, embeddings=embeddings, seed=config.selection_seed)
    landmark_rows = context.pool.select(landmarks.tolist())
    preconditioner = None if step is None else step.scale
    landmark_vectors = _gradients(context, landmark_rows, "landmark_gradients", preconditioner)
    target_vectors = _target_gradients(context)
    landmark_scores = first_order_scores(landmark_vectors, target_vectors)  # [k, m]
    regression_columns = landmark_scores
    if config.order == 2:
        q_landmarks, drift_product = _landmark_second_order(context, tracked, landmark_rows, landmark_vectors, step, n)
        if drift_product is not None:
            regression_columns = torch.cat([landmark_scores, (landmark_vectors @ drift_product)[:, None]], dim=1)
    with context.timed("regression"):
        landmark_embeddings = _store_rows(store, landmarks) if embeddings is None else embeddings[landmarks]
        regressor = LandmarkRegressor().fit(landmark_embeddings, regression_columns, kernel=config.kernel,
                                            ridge=config.kernel_ridge, bandwidth=config.kernel_bandwidth,
                                            seed=config.selection_seed)
    landmark_mask = torch.zeros(n, dtype=torch.bool)
    landmark_mask[landmarks] = True
    # Landmark rows are ranked by their leave-one-out predictions, like every other row by an out-of-sample one;
    # with landmarks = the whole pool they keep their exact values (this is then exact influence).
    calibrated = config.landmark_scores == "loo" and k < n
    context.details.update(num_landmarks=k, landmarks=landmark_diagnostics(regressor, landmark_scores, n, calibrated))
    stream = ScoreStream(store if embeddings is None else embeddings, regressor,
                         {"exact_rows": landmarks, "exact_scores": regressor.loo if calibrated else regression_columns},
                         config.chunk_rows)
    if config.order == 1 and context.stream_selection:
        return MethodOutput(None, landmark_mask=landmark_mask, stream=stream)
    with context.timed("regression"):
        predicted = stream.scores()
    scores = predicted[:, : landmark_scores.shape[1]]
    p = scores.mean(1)
    if config.order == 1:
        return MethodOutput(scores, _weights(context, p, None, 0.0), landmark_mask)
    eta = _step_size(context, step)
    if regression_columns.shape[1] > landmark_scores.shape[1]:
        p = p - eta * predicted[:, -1]
    transfer = regressor.transfer_matrix(embeddings, chunk_rows=config.chunk_rows)
    # Landmark rows of C as their scores are made: P_L itself (exact) or its leave-one-out map.
    transfer[landmarks] = regressor.loo_transfer_matrix() if calibrated else torch.eye(k, dtype=transfer.dtype)
    return MethodOutput(scores, _weights(context, p, (transfer, q_landmarks), eta), landmark_mask)


# Below this leave-one-out Spearman the landmark regression ranks rows it never saw poorly: a warning says so.
LOO_SPEARMAN_WARNING = 0.5


def landmark_diagnostics(regressor: LandmarkRegressor, landmark_scores: Tensor, num_pool_rows: int,
                         calibrated: bool) -> dict:
    """How faithful the landmark regression is, from the landmarks alone (no extra model pass).

    loo_spearman: Spearman correlation, over the k landmarks, of their leave-one-out predicted mean score (over
    the m targets) with their exact mean score: how well the regression ranks a row it did not see (None when
    either is constant, which warns too). loo_error:
    1 - leave-one-out R^2, averaged over the regression's columns. Logs a warning below LOO_SPEARMAN_WARNING.
    landmark_scores: [k, m] exact first-order scores.
    """
    k, m = landmark_scores.shape
    predicted, exact = regressor.loo.reshape(k, -1)[:, :m].double().mean(1), landmark_scores.double().mean(1)
    # Undefined (None) when either side is constant, e.g. a regression that predicts the mean for every landmark.
    constant = bool((predicted == predicted[0]).all() or (exact == exact[0]).all())
    loo_spearman = None if constant else float(scipy.stats.spearmanr(predicted.numpy(), exact.numpy()).statistic)
    diagnostics = {
        "num_landmarks": k, "landmark_share_pool": k / num_pool_rows, "landmark_scores": "loo" if calibrated else "exact",
        "kernel": regressor.kernel, "bandwidth": getattr(regressor, "sigma", None),
        "bandwidth_scale": regressor.bandwidth, "ridge": regressor.ridge, "loo_spearman": loo_spearman,
        "loo_error": regressor.loo_error,
    }
    if k < num_pool_rows and (loo_spearman is None or loo_spearman < LOO_SPEARMAN_WARNING):
        logger.warning(
            "Landmark regression fidelity is low: leave-one-out Spearman %s over %d landmarks (below %.2f), so the "
            "scores of the %d other pool rows are unreliable. Raise num_landmarks (now %d), or use "
            "method='influence_distillation_exact'.", "undefined" if loo_spearman is None else f"{loo_spearman:.2f}",
            k, LOO_SPEARMAN_WARNING, num_pool_rows - k, k)
    return diagnostics


def _feature_store(context: Context, part: str) -> VectorStore:
    """One part of the regression features of every pool row, in a resumable store under work_dir."""
    pad, show = context.tokenizer.pad_token_id, context.show_progress
    if part == "jvp":
        with context.timed("jvp_embeddings"):
            return extract_jvp_embeddings(context.model, context.pool, context.work_dir / "jvp",
                                          context.configs[JVPConfig], pad_token_id=pad, show_progress=show)
    # The base model's representation, as method="rds" computes it: the warm-up's adapter is switched off.
    adapter_off = context.model.disable_adapter() if hasattr(context.model, "disable_adapter") else contextlib.nullcontext()
    with context.timed("lm_embeddings"), adapter_off:
        return extract_lm_embeddings(context.model, context.pool, context.work_dir / "lm_embeddings",
                                     batch_size=context.configs[GradientConfig].batch_size, pad_token_id=pad,
                                     show_progress=show)


def _landmark_features(context: Context) -> VectorStore | Tensor:
    """The regression features of every pool row (SelectionConfig.landmark_features): a store for one part; for
    several, the rows [e_1 / s_1, e_2 / s_2] in memory, s_j the median pairwise distance of part j on a seeded
    sample of at most 1000 rows, so that each part weighs the same in the RBF distance whatever its units."""
    stores = [_feature_store(context, part) for part in context.config.landmark_features.split("+")]
    if len(stores) == 1:
        return stores[0]
    return concatenate_scaled([store.to_tensor() for store in stores], seed=context.config.selection_seed)


def _store_rows(store: VectorStore, rows: Tensor) -> Tensor:
    """Rows [r, e] of a store at arbitrary indices, read one row at a time in row order (the memory map is
    then read forwards)."""
    order = rows.argsort()
    values = torch.empty(len(rows), store.dim, dtype=torch.float32)
    for position, row in zip(order.tolist(), rows[order].tolist()):
        values[position] = torch.from_numpy(store.read(row, row + 1)[0].astype(np.float32))
    return values


@register_method("influence_distillation_exact", default_selection="round_robin")
def influence_distillation_exact(context: Context) -> MethodOutput:
    """Influence Distillation without landmarks: gradients (and, for order 2, Hessian products) of every pool row."""
    n = len(context.pool)
    tracked = PerSampleGradients(context.model, context.configs[GradientConfig])
    step = _optimizer_step(context, tracked)
    pool_vectors = _gradients(context, context.pool, "pool_gradients", None if step is None else step.scale)
    target_vectors = _target_gradients(context)
    scores = first_order_scores(pool_vectors, target_vectors)
    p = scores.mean(1)
    if context.config.order == 1:
        return MethodOutput(scores, _weights(context, p, None, 0.0), torch.ones(n, dtype=torch.bool))
    q_pool, drift_product = _landmark_second_order(context, tracked, context.pool, pool_vectors, step, n)
    eta = _step_size(context, step)
    if drift_product is not None:
        p = p - eta * (pool_vectors @ drift_product)
    identity = torch.eye(n, dtype=torch.float64)
    return MethodOutput(scores, _weights(context, p, (identity, q_pool), eta), torch.ones(n, dtype=torch.bool))


@register_method("less", default_selection="less")
def less(context: Context) -> MethodOutput:
    """LESS (Xia et al. 2024): Adam-preconditioned LoRA gradients of every pool row, cosine with target
    gradients, mean within each target task, max over tasks. One warm-up checkpoint, not LESS's four."""
    tracked = PerSampleGradients(context.model, context.configs[GradientConfig])
    step = _optimizer_step(context, tracked)
    pool_vectors = _gradients(context, context.pool, "pool_gradients", None if step is None else step.scale)
    target_vectors = _target_gradients(context)
    if not context.configs[GradientConfig].normalize:
        pool_vectors = pool_vectors / pool_vectors.norm(dim=1, keepdim=True)
        target_vectors = target_vectors / target_vectors.norm(dim=1, keepdim=True)
    return MethodOutput(first_order_scores(pool_vectors, target_vectors))


@register_method("rds", default_selection="round_robin")
def rds(context: Context) -> MethodOutput:
    """RDS+ (Ivison et al. 2025): cosine of position-weighted mean-pooled last hidden states. The pool's
    embeddings go to the work_dir store that landmark_features="lm" uses, so that another target (or a landmark
    run with lm features) on the same work_dir reuses them."""
    pool = _feature_store(context, "lm").to_tensor()
    with context.timed("embeddings"):
        target = lm_pooled_embeddings(context.model, context.target, pad_token_id=context.tokenizer.pad_token_id,
                                      show_progress=context.show_progress)
    return MethodOutput(cosine_scores(pool, target, chunk_rows=context.config.chunk_rows))


# SelectionConfig fields that describe the outer selection, not how a method oracle scores a block.
_NOT_ORACLE_FIELDS = ("method", "selection", "target_task_column")


def oracle_options(configs: dict[type, Any]) -> dict[str, Any]:
    """The options of a NN-CIFT method oracle: every config field except NNCIFTConfig's and the outer
    selection's own (method, selection rule, task column). optimizer_state, step_size, selection_seed and
    work_dir (per-block subfolders, see MethodOracle) reach the oracle."""
    return {name: value for config_type, config in configs.items() if config_type is not NNCIFTConfig
            for name, value in asdict(config).items()
            if not (config_type is SelectionConfig and name in _NOT_ORACLE_FIELDS)}


@register_method("nn_cift", default_selection="round_robin")
def nn_cift_method(context: Context) -> MethodOutput:
    """NN-CIFT: an oracle (NNCIFTConfig.oracle) on a u-block, an InfluenceNetwork fitted on it predicts the rest."""
    result = nn_cift(context.raw_pool, context.raw_target, context.configs[NNCIFTConfig], model=context.model,
                     tokenizer=context.tokenizer, optimizer=context.optimizer, predict=not context.stream_selection,
                     **oracle_options(context.configs))
    context.details.setdefault("seconds", {}).update(result.seconds)
    context.details.update(block_rows=len(result.block_rows), block_columns=len(result.block_columns),
                           evaluation=result.evaluation)
    block_mask = torch.zeros(len(context.pool), dtype=torch.bool)
    block_mask[result.block_rows] = True
    pointwise = result.network.kind == "pointwise"
    if context.stream_selection:  # the network predicts chunk by chunk while selecting
        stream = ScoreStream(result.pool_embeddings, result.network,
                             block_overrides(result.block_rows, result.block_columns, result.block_labels, pointwise),
                             context.config.chunk_rows, None if pointwise else result.target_embeddings)
        return MethodOutput(None, landmark_mask=block_mask, stream=stream, pointwise=pointwise)
    return MethodOutput(result.scores, landmark_mask=block_mask, pointwise=pointwise)


@register_method("random", default_selection="mean_top_k", needs_model=False)
def random_method(context: Context) -> MethodOutput:
    """Uniform random rows: seeded uniform random keys [n, 1], the top-budget keys are selected."""
    generator = torch.Generator().manual_seed(context.config.selection_seed)
    return MethodOutput(torch.rand(len(context.pool), 1, generator=generator))


# ----------------------------------------------------------------------------------------------
# Entry point


def split_options(options: dict[str, Any], base: dict[type, Any] | None = None) -> dict[type, Any]:
    """Route keyword options to the config dataclass that declares them; returns {type: instance}.

    Raises:
        TypeError: an option no config declares (the message lists the close matches' dataclasses).
    """
    configs = dict(base or {})
    owners = {f.name: config_type for config_type in CONFIG_TYPES for f in dataclasses.fields(config_type)}
    unknown = sorted(set(options) - set(owners))
    if unknown:
        raise TypeError(f"Unknown option(s) {unknown}. Options are the fields of "
                        f"{', '.join(t.__name__ for t in CONFIG_TYPES)}; see their docstrings.")
    for config_type in CONFIG_TYPES:
        mine = {name: value for name, value in options.items() if owners[name] is config_type}
        current = configs.get(config_type)
        if current is None:
            configs[config_type] = config_type(**mine)
        elif mine:
            configs[config_type] = dataclasses.replace(current, **mine)
    return configs


def _prepare_model(model, tokenizer, configs) -> tuple[nn.Module, Any, Callable[[], None]]:
    """Load or wrap the model with LoRA; returns (model, tokenizer, restore) where restore() undoes our changes
    to a user's model (LoRA weights trained by the warm-up, or the adapter we added)."""
    lora = configs[LoraSettings]
    if model is None or isinstance(model, str):
        loaded, loaded_tokenizer = load_model(model or DEFAULT_MODEL)
        return add_lora(loaded, lora), tokenizer or loaded_tokenizer, lambda: None
    if tokenizer is None:
        raise ValueError("tokenizer=... is required when model is a model object (pass its tokenizer).")
    if hasattr(model, "peft_config"):
        snapshot = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

        def restore():
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name in snapshot:
                        parameter.copy_(snapshot[name])

        return model, tokenizer, restore
    # add_lora freezes the base weights and unload() leaves them frozen: put the user's flags back, or a full
    # fine-tune after selection would silently train nothing.
    trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    wrapped = add_lora(model, lora)

    def restore():
        wrapped.unload()
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)

    return wrapped, tokenizer, restore


@contextlib.contextmanager
def _without_input_require_grads(model: nn.Module | None):
    """Remove transformers' input-require-grads hooks for the block, then put them back.

    Trainers add them for gradient checkpointing with adapters (`enable_input_require_grads`); they call
    requires_grad_() on the embedding output, which functorch's jvp (JVP embeddings) refuses, and our passes
    need no gradient flowing into the inputs.
    """
    hooked = [module for module in (model.modules() if model is not None else ())
              if getattr(module, "_require_grads_hooks", None)]
    for module in hooked:
        module.disable_input_require_grads()
    try:
        yield
    finally:
        for module in hooked:
            module.enable_input_require_grads()


def _target_tasks(target: Dataset, formatted_target: Dataset, column: str | None) -> list[str] | None:
    if column is None and "task" in target.column_names:
        column = "task"
    if column is None:
        return None
    if column not in target.column_names:
        raise ValueError(f"target_task_column={column!r} is not a target column; columns: {target.column_names}")
    values = target[column]
    return [str(values[row]) for row in formatted_target["row_id"]]


def _target_names(target: Dataset, formatted_target: Dataset) -> list[str]:
    ids = target["id"] if "id" in target.column_names else None
    names = [str(ids[row]) if ids is not None else f"target/{row}" for row in formatted_target["row_id"]]
    return names if len(set(names)) == len(names) else [f"target/{row}" for row in formatted_target["row_id"]]


def _as_dataset(rows, name: str) -> Dataset:
    if isinstance(rows, Dataset):
        dataset = rows
    elif isinstance(rows, list):
        dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({})
    else:
        dataset = load_rows(rows)
    if len(dataset) == 0:
        raise SelectionError(f"The {name} is empty: it needs at least one row.")
    return dataset


def select_by_influence(
    pool: Dataset | list[dict] | str,
    target: Dataset | list[dict] | str,
    model: str | nn.Module | None = None,
    budget: float = 0.05,
    method: str | None = None,
    tokenizer=None,
    optimizer: torch.optim.Optimizer | None = None,
    return_scores: bool = False,
    **options: Any,
) -> Dataset | tuple[Dataset, ScoreTable]:
    """Select the pool rows that help most on the target.

    Args:
        pool: candidate training rows (chat `messages` or prompt/response columns): a Dataset, a list of
            dicts, a file path or a Hub dataset id.
        target: rows of the task to improve, same forms.
        model: Hub id / folder, a transformers causal LM or a PEFT LoRA model; None: the embedded default
            (SmolLM2-135M-Instruct). A base model gets a LoRA adapter for the run (removed afterwards);
            a PEFT model's adapter weights are restored after the warm-up trains them.
        budget: number of rows (int) or fraction of the pool (float in (0, 1]).
        method: a registered method (see SelectionConfig.method); overrides options["method"].
        tokenizer: required when `model` is an object.
        optimizer: a torch AdamW / SGD holding the LoRA parameters with state (e.g. your own warm-up);
            skips the built-in warm-up.
        return_scores: also return the ScoreTable (scores of every pool row for every target).
        **options: fields of SelectionConfig, FormattingConfig, GradientConfig, JVPConfig, WarmupConfig and
            LoraSettings (e.g. num_landmarks=1024, order=2, max_length=2048).

    Returns:
        `pool.select(indices)`: the selected rows with all pool columns, in selection order (the order the
        rule picked them: round-robin order, or descending score); with return_scores, (dataset, ScoreTable).

    Raises:
        SelectionError: empty pool/target, budget larger than the usable pool, bad scores.
        FormattingError: missing columns, unknown chat format, a tokenizer without a chat template.
        ValueError: a target row with no label token (the message names it), or bad options.
    """
    if method is not None:
        options["method"] = method
    configs = split_options(options)
    config: SelectionConfig = configs[SelectionConfig]
    pool = _as_dataset(pool, "pool")
    budget_rows = resolve_budget(budget, len(pool))
    rule = config.selection or METHODS[config.method][1]
    if rule == "weighted" and config.method not in ("influence_distillation", "influence_distillation_exact"):
        raise ValueError(f"selection='weighted' needs robust weights; method {config.method!r} has none.")
    start = time.perf_counter()
    # Without a score table to return, a streaming rule lets the method keep its scores as a predictor
    # (first-order landmark ID): the [n, m] matrix and the [n, e] embeddings are then never held.
    with tempfile.TemporaryDirectory(prefix="hf_influence_") as scratch:
        run = _compute(pool, target, model, tokenizer, optimizer, configs, budget_rows, Path(scratch),
                       stream_selection=not return_scores and rule in RULES)
        chosen = _select_rows(run, budget_rows, rule, config.selection_seed)
    selected_rows = [run.pool_row_ids[i] for i in chosen.tolist()]
    selected = pool.select(selected_rows)
    if "landmarks" in run.details:  # the share of landmarks among the selected rows, against their pool share
        run.details["landmarks"]["landmark_share_selected"] = float(run.output.landmark_mask[chosen].float().mean())
    if not return_scores:
        return selected
    run.details["seconds"]["total"] = time.perf_counter() - start
    return selected, run.score_table(selection=rule, budget=budget_rows, selected_pool_row_ids=selected_rows)


def _select_rows(run: ScoreRun, budget_rows: int, rule: str, seed: int) -> Tensor:
    """Positions (into run.pool_row_ids) of the `budget_rows` rows `rule` picks, in selection order."""
    output = run.output
    with _Timer(run.details.setdefault("seconds", {}), "selection"):
        groups = run.target_tasks if rule in ("round_robin_task", "less") else None
        if rule == "weighted":
            return weighted_sample(output.weights, budget_rows, seed=seed)
        if output.stream is not None:
            return output.stream.select(budget_rows, rule, seed, groups)
        return select_indices(output.scores, budget_rows, rule=rule, seed=seed, target_groups=groups)


@dataclass
class ScoreRun:
    """The scores of one method run, before selection.

    Attributes:
        output: the method's scores [n, m] over the usable pool rows, weights [n], landmark mask [n].
        pool_row_ids: [n] the pool row (index into the given pool) of each score row.
        target_names: [m] target sample ids.
        target_tasks: [m] task of each target column (None when the target has no task column).
        skipped: {pool row: reason} for pool rows formatting could not use.
        configs: every config used.
        provenance: model id and revision, method, configs, fingerprints, skipped rows.
        details: stage timings ("seconds") and method details (e.g. num_landmarks).
    """

    output: MethodOutput
    pool_row_ids: list[int]
    target_names: list[str]
    target_tasks: list[str] | None
    skipped: dict
    configs: dict
    provenance: dict
    details: dict

    def score_table(self, **provenance: Any) -> ScoreTable:
        """The ScoreTable of this run, with extra provenance fields (e.g. the selection)."""
        # The task of each target column: the LESS and round_robin_task rules group by it, and a table selected
        # from later (the trainer, a pulled Hub table) must pick the same rows as this run did.
        tasks = None if self.target_tasks is None else dict(zip(self.target_names, self.target_tasks))
        record = provenance_record(**self.provenance, **provenance, target_tasks=tasks, details=self.details)
        return ScoreTable.from_matrix(self.output.scores, self.pool_row_ids, self.target_names,
                                      weights=self.output.weights, landmark_mask=self.output.landmark_mask,
                                      provenance=record)


def compute_scores(pool: Dataset | list[dict] | str, target: Dataset | list[dict] | str,
                   model: str | nn.Module | None = None, method: str | None = None, tokenizer=None,
                   optimizer: torch.optim.Optimizer | None = None, **options: Any) -> ScoreRun:
    """Run a method's scoring without selecting: the arguments of `select_by_influence` without budget.

    Returns:
        ScoreRun; `run.output.scores` is [usable pool rows, target rows] (`run.pool_row_ids` maps rows back).
    """
    if method is not None:
        options["method"] = method
    with tempfile.TemporaryDirectory(prefix="hf_influence_") as scratch:
        return _compute(_as_dataset(pool, "pool"), target, model, tokenizer, optimizer, split_options(options), None,
                        Path(scratch))


def _compute(pool: Dataset, target, model, tokenizer, optimizer, configs: dict, budget_rows: int | None,
             scratch: Path, stream_selection: bool = False) -> ScoreRun:
    """Score with the configured method; stores go to work_dir, else to `scratch` (a folder the caller removes
    once it no longer needs them: a ScoreStream reads its embeddings from there)."""
    config = configs[SelectionConfig]
    target = _as_dataset(target, "target")
    function, _, needs_model = METHODS[config.method]
    if needs_model:
        model, tokenizer, restore = _prepare_model(model, tokenizer, configs)
    else:
        model, restore = None, lambda: None
    try:
        with _without_input_require_grads(model):
            output, context, pool_row_ids, target_names, tasks, skipped = _run_method(
                function, pool, target, model, tokenizer, optimizer, budget_rows, configs, scratch, stream_selection)
    finally:
        restore()
    if output.pointwise:  # one score per pool row, whatever the target: one column, no target tasks
        target_names, tasks = ["pointwise"], None
    model_id, revision = model_identity(model) if model is not None else (None, None)
    provenance = {
        "model_id": model_id, "model_revision": revision, "method": config.method,
        "configs": {config_type.__name__: asdict(value) for config_type, value in configs.items()},
        "pool_fingerprint": fingerprint_dataset(pool), "target_fingerprint": fingerprint_dataset(target),
        "skipped_pool_rows": {str(row): reason for row, reason in skipped.items()},
    }
    return ScoreRun(output, pool_row_ids, target_names, tasks, skipped, configs, provenance, context.details)


def _run_method(function, pool, target, model, tokenizer, optimizer, budget_rows, configs, scratch: Path,
                stream_selection: bool):
    """Format the rows and run the method: (output, context, pool row ids, target names, target tasks, skipped)."""
    config = configs[SelectionConfig]
    if model is None:  # a method without a model ("random") scores the raw rows
        context = Context(None, None, pool, target, configs, None, Path())
        output = function(context)
        return output, context, list(range(len(pool))), ["random"], None, {}
    formatted_pool = format_dataset(pool, tokenizer, configs[FormattingConfig])
    formatted_target = format_dataset(target, tokenizer, configs[FormattingConfig])
    if formatted_target.skipped:
        raise ValueError(f"Target rows cannot be scored (row: reason): {formatted_target.skipped}. Fix or remove "
                         "them: a target row without label tokens has no loss and no gradient.")
    if formatted_pool.skipped:
        logger.warning("%d pool rows are skipped and cannot be selected: %s", len(formatted_pool.skipped),
                       dict(list(formatted_pool.skipped.items())[:10]))
    usable = len(formatted_pool.dataset)
    if budget_rows is not None and budget_rows > usable:
        raise SelectionError(f"budget {budget_rows} is larger than the {usable} usable pool rows "
                             f"({len(formatted_pool.skipped)} of {len(pool)} were skipped by formatting).")
    # Methods that extract into stores need one folder shared by all processes (rds and random keep none).
    if config.work_dir is None and process_state() is not None and config.method not in ("rds", "random"):
        raise ValueError("work_dir must be set when selecting under a multi-process launch: every process needs the "
                         "same store folder (a temporary folder would differ per process). Pass work_dir=... on a "
                         "file system all processes share.")
    context = Context(model, tokenizer, formatted_pool.dataset, formatted_target.dataset, configs, optimizer,
                      Path(config.work_dir or scratch), raw_pool=pool.select(formatted_pool.dataset["row_id"]),
                      raw_target=target, stream_selection=stream_selection)
    output = function(context)
    tasks = _target_tasks(target, formatted_target.dataset, config.target_task_column)
    return (output, context, formatted_pool.dataset["row_id"], _target_names(target, formatted_target.dataset),
            tasks, formatted_pool.skipped)


def _dataset_select_by_influence(self: Dataset, target, **kwargs):
    """`Dataset.select_by_influence(target, model=..., budget=..., method=..., **options)`: see
    `hf_influence.select_by_influence` (this dataset is the pool)."""
    return select_by_influence(self, target, **kwargs)


def register_dataset_method() -> None:
    """Add `datasets.Dataset.select_by_influence`, never overwriting an attribute that already exists."""
    existing = getattr(Dataset, "select_by_influence", None)
    if existing is None:
        Dataset.select_by_influence = _dataset_select_by_influence
    elif existing is not _dataset_select_by_influence:
        logger.warning("datasets.Dataset already has a select_by_influence attribute; hf_influence leaves it "
                       "alone (use hf_influence.select_by_influence).")
