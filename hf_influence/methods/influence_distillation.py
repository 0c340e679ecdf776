"""Influence Distillation (docs/algorithms.md): robust per-row weights from first-order scores p and, with
order=2, the target-Hessian term Q. `influence_distillation` computes exact gradients for k landmark rows and
spreads their scores to the pool by kernel ridge regression on cheap embeddings (warm-up -> JVP embeddings ->
landmark and target gradients -> P_L = G_L G_T^T -> regression -> robust weights -> selection);
`influence_distillation_exact` takes the gradient of every pool row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import scipy.stats
import torch
from datasets import Dataset
from torch import Tensor

from ..engine import Context, MethodOutput
from ..extraction.extract import extract_hessian_products, target_hessian
from ..extraction.gradients import GradientConfig, PerSampleGradients, checked_blocks
from ..extraction.jvp import JVPConfig
from ..selection.landmarks import LandmarkRegressor, first_order_scores, select_landmarks
from ..optimizers import AffineStep
from ..registry import register_method
from ..selection.rules import GROUPED_RULES, RULES, key_columns
from ..extraction.store import VectorStore, fingerprint_dataset
from ..selection.streaming import ScoreStream
from ..selection.robust_weighting import robust_weights
from ..verbosity import get_logger
from .influence_distillation_config import InfluenceDistillationConfig, InfluenceDistillationExactConfig
from .stores import (gradient_vectors, landmark_feature_rows, optimizer_step, pool_row_gradients, pool_row_scores,
                     store_rows, target_gradient_vectors)

logger = get_logger(__name__)


def _device(context: Context) -> torch.device:
    return next(context.model.parameters()).device


def _hessian_projected(context: Context, tracked: PerSampleGradients, rows: Dataset, step: AffineStep | None,
                       extra: Tensor | None = None) -> Tensor:
    """P(H_T v_i) [len(rows) (+1), output_dim] for v_i = A g_i (unit-normalised when the gradients are), and
    optionally for one more raw vector `extra` (the drift b), in the coordinates of the stored gradients.

    The rows' products are kept in a store under work_dir, one per target and row set (`extract_hessian_products`):
    they are the run's dominant cost, and a rerun (a crash, other selection settings) reads them back.
    """
    gradient_config = context.configs[GradientConfig]
    folder = (f"hessian_products-{fingerprint_dataset(context.target)[:16]}-"
              f"{fingerprint_dataset(rows)[:16]}")
    store = extract_hessian_products(context.model, rows, context.target, context.work_dir / folder, gradient_config,
                                     context.method_config.hessian, None if step is None else step.scale,
                                     pad_token_id=context.tokenizer.pad_token_id, overwrite=context.config.overwrite,
                                     show_progress=context.show_progress)
    products = [store.to_tensor()]
    if extra is not None:
        hessian = target_hessian(context.model, tracked, context.target, gradient_config, context.method_config.hessian,
                                 context.tokenizer.pad_token_id)
        products.append(tracked.project(hessian.matmul(extra.to(_device(context))[None])).float().cpu())
    return torch.cat(products)


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
    if context.method_config.step_size is not None:
        return context.method_config.step_size
    if step is None:
        raise ValueError("order=2 without a preconditioning optimizer (optimizer_state 'gd' or 'warmup_gd') needs "
                         "step_size (the learning rate eta of the one-step objective).")
    if step.lr > 0:
        return step.lr
    initial = step.initial_lr
    if not initial:
        raise ValueError("order=2: the optimizer's learning rate is 0 and it records no initial_lr (set by an LR "
                         "scheduler), so the second-order term would vanish; pass step_size=... (eta).")
    logger.warning("order=2: the optimizer's learning rate is 0 (a finished schedule); using initial_lr / 2 = %g as "
                   "eta. Pass step_size=... to choose it.", initial / 2)
    return initial / 2


def _weights(context: Context, p: Tensor, q_factors: tuple[Tensor, Tensor] | None, eta: float) -> Tensor:
    with context.timed("robust_weights"):
        return robust_weights(p, context.method_config.robust_lambda, eta=eta, Q_factors=q_factors).float()


@register_method("influence_distillation", default_selection="round_robin", robust_weights=True, streams=True,
                 config_cls=InfluenceDistillationConfig)
def influence_distillation(context: Context) -> MethodOutput:
    """Landmark Influence Distillation: exact gradients for k landmarks, KRR on cheap row features for the rest,
    then (first order, with a budget) an exact re-rank of the rows the regression shortlists; the landmarks and the
    shortlist together stay within exact_gradient_fraction of the pool."""
    config, n = context.method_config, len(context.pool)
    # A model too shallow for the features' blocks is refused before the warm-up runs.
    if set(config.landmark_features.split("+")) & {"jvp", "truncated_gradient"}:
        checked_blocks(context.model, context.configs[JVPConfig].num_blocks, "JVPConfig.num_blocks")
    if config.landmark_features == "hidden_state":
        checked_blocks(context.model, config.hidden_state_blocks, "InfluenceDistillationConfig.hidden_state_blocks")
    plan = exact_gradient_plan(config, n, context.budget_rows)
    if plan.landmarks < 2:  # refused here, before the warm-up and feature passes it would otherwise waste
        remedy = ("use method='influence_distillation_exact' on a pool this small" if n < 2
                  else "raise num_landmarks to at least 2")
        raise ValueError(f"Landmark Influence Distillation needs at least 2 landmarks for its regression; this run "
                         f"has {plan.landmarks} ({n} usable pool rows, num_landmarks={config.num_landmarks}): "
                         f"{remedy}.")
    tracked = PerSampleGradients(context.model, context.configs[GradientConfig])
    step = optimizer_step(context, tracked)
    store = landmark_feature_rows(context, step, tracked)
    # Uniform landmarks and first-order scores need only the landmarks' rows in memory (the rest is read from
    # the store in blocks); kmeans++ and the order-2 transfer matrix need all [n, e] embeddings.
    embeddings = store if isinstance(store, Tensor) else None
    if embeddings is None and (config.landmark_selection == "kmeans++" or config.order == 2):
        embeddings = store.to_tensor()
    k = plan.landmarks
    landmarks = select_landmarks(n, k, config.landmark_selection, embeddings=embeddings,
                                 seed=context.config.selection_seed)
    landmark_rows = context.pool.select(landmarks.tolist())
    preconditioner = None if step is None else step.scale
    target_vectors = target_gradient_vectors(context)
    # Named by the rows it holds (as the shortlist's and the targets' stores are): runs with other landmark
    # settings (num_landmarks, shortlist_factor, seed) share one work_dir, its warm-up and its features.
    folder = f"landmark_gradients-{fingerprint_dataset(landmark_rows)[:16]}"
    if config.order == 2:
        landmark_vectors = pool_row_gradients(context, landmarks, "landmark_gradients", preconditioner, folder)
        landmark_scores, computed = first_order_scores(landmark_vectors, target_vectors), None  # [k, m]
    else:  # streamed from the store: the landmarks' gradients are never all in memory
        landmark_scores, computed = pool_row_scores(context, landmarks, "landmark_gradients", preconditioner,
                                                    target_vectors, folder)
    regression_columns = landmark_scores
    if config.order == 2:
        q_landmarks, drift_product = _landmark_second_order(context, tracked, landmark_rows, landmark_vectors, step, n)
        if drift_product is not None:
            regression_columns = torch.cat([landmark_scores, (landmark_vectors @ drift_product)[:, None]], dim=1)
    with context.timed("regression"):
        landmark_embeddings = store_rows(store, landmarks) if embeddings is None else embeddings[landmarks]
        regressor = LandmarkRegressor().fit(landmark_embeddings, regression_columns, kernel=config.kernel,
                                            ridge=config.kernel_ridge, bandwidth=config.kernel_bandwidth,
                                            seed=context.config.selection_seed)
    landmark_mask = torch.zeros(n, dtype=torch.bool)
    landmark_mask[landmarks] = True
    # Landmark rows are ranked by their leave-one-out predictions, like every other row by an out-of-sample one;
    # with landmarks = the whole pool they keep their exact values (this is then exact influence).
    calibrated = config.landmark_scores == "loo" and k < n
    details = {"num_landmarks": k, "landmarks": landmark_diagnostics(regressor, landmark_scores, n, calibrated,
                                                                     fidelity_remedy(config, plan, n))}
    stream = ScoreStream(store if embeddings is None else embeddings, regressor,
                         {"exact_rows": landmarks, "exact_scores": regressor.loo if calibrated else regression_columns},
                         context.config.chunk_rows)
    exact_rows = k
    if plan.shortlist:
        stream, new, new_computed = _shortlisted(context, stream, store, landmarks, landmark_scores, target_vectors,
                                                 preconditioner, plan.shortlist, details["landmarks"], calibrated)
        exact_rows += new
        computed = None if computed is None else computed + new_computed
    details["exact_gradients"] = _cost_report(context, plan, exact_rows, computed)
    if config.order == 1 and context.stream_selection:
        return MethodOutput(None, landmark_mask=landmark_mask, stream=stream, details=details)
    with context.timed("regression"):
        predicted = stream.scores()
    scores = predicted[:, : landmark_scores.shape[1]]
    p = scores.mean(1)
    if config.order == 1:
        return MethodOutput(scores, _weights(context, p, None, 0.0), landmark_mask, details=details)
    eta = _step_size(context, step)
    if regression_columns.shape[1] > landmark_scores.shape[1]:
        p = p - eta * predicted[:, -1]
    transfer = regressor.transfer_matrix(embeddings, chunk_rows=context.config.chunk_rows)
    # Landmark rows of C as their scores are made: P_L itself (exact) or its leave-one-out map.
    transfer[landmarks] = regressor.loo_transfer_matrix() if calibrated else torch.eye(k, dtype=transfer.dtype)
    return MethodOutput(scores, _weights(context, p, (transfer, q_landmarks), eta), landmark_mask, details=details)


# Shortlist rows per budget row when InfluenceDistillationConfig.shortlist_factor is None (then bounded by
# exact_gradient_fraction): benchmarks/landmark_fidelity.py measures what the re-rank buys per gradient.
SHORTLIST_FACTOR = 4.0
# With a shortlist, the landmarks take at most this share of the exact-gradient bound, and at least MIN_LANDMARKS
# rows: a gradient spent on the shortlist is worth more than one spent on a landmark (0.5's lab, 2,048 rows, the
# same ~512 gradients: 512 landmarks alone selected with Jaccard 0.21 against exact ID, 128 + a shortlist 0.43).
# The quarter itself was not tuned.
LANDMARK_SHARE = 0.25
MIN_LANDMARKS = 16
# The one-pass shortlist holds (budget + landmarks + shortlist) candidates per key column of the rule (a key and a
# row each, 8 bytes, plus the keeper's slack); past this many (about 1.3 GB) the run streams the pool a second
# time instead. 1M rows, 300 targets, a 5% budget: 57M candidates, one pass.
ONE_PASS_MAX_CANDIDATES = 2**27
# Seconds of one pool row of each regression feature / of one exact gradient row, measured side by side on the
# 2-core CPU (benchmarks/results/landmark_fidelity_cpu.json, "feature_costs", rounded; a test keeps them equal):
# the predicted speed-up.
FEATURE_COSTS = {"jvp": 0.19, "lm": 0.42, "truncated_gradient": 0.16, "hidden_state": 0.10}


@dataclass(frozen=True)
class ExactGradientPlan:
    """How many pool rows a landmark run gives exact gradients: `landmarks` plus at most `shortlist` more (the
    shortlist may contain landmarks, which need none); `bound` is exact_gradient_fraction x n (None: unbounded)."""

    landmarks: int
    shortlist: int
    bound: int | None


def exact_gradient_plan(config, num_rows: int, budget: int | None) -> ExactGradientPlan:
    """The landmarks and shortlist of a run on `num_rows` pool rows selecting `budget` rows (None: scores only):
    num_landmarks and shortlist_factor x budget (SHORTLIST_FACTOR when None, first-order runs with a budget),
    bounded together by exact_gradient_fraction x num_rows, of which the landmarks take at most LANDMARK_SHARE
    (at least MIN_LANDMARKS) when there is a shortlist."""
    factor = config.shortlist_factor
    if factor is None:
        factor = SHORTLIST_FACTOR if config.order == 1 and budget is not None else 0.0
    elif factor > 0 and budget is None:
        raise ValueError("shortlist_factor > 0 needs the run's budget: compute_scores selects nothing; use "
                         "select_by_influence (or leave shortlist_factor None).")
    landmarks = min(config.num_landmarks, num_rows)
    shortlist = min(num_rows, math.ceil(factor * budget)) if factor else 0
    bound = None
    if config.exact_gradient_fraction is not None:
        bound = max(1, math.floor(config.exact_gradient_fraction * num_rows))
        if shortlist:
            landmarks = min(landmarks, max(MIN_LANDMARKS, math.floor(LANDMARK_SHARE * bound)))
        else:
            landmarks = min(landmarks, max(MIN_LANDMARKS, bound))
        shortlist = min(shortlist, max(0, bound - landmarks))
    if landmarks >= num_rows:
        shortlist = 0
    return ExactGradientPlan(landmarks, shortlist, bound)


def _cost_report(context: Context, plan: ExactGradientPlan, exact_rows: int, computed: int | None) -> dict:
    """What decided the selection and what the run's pool side cost against exact influence's: predicted from
    FEATURE_COSTS, and measured (this run's feature and gradient seconds against n gradients at this run's own
    gradient rate; None when no gradient was computed here). Warns when the run is no cheaper than exact."""
    n, config = len(context.pool), context.method_config
    if plan.landmarks >= n:
        decided_by = "exact ID (every pool row a landmark)"
    elif plan.shortlist:
        decided_by = f"ID + exact re-rank ({plan.shortlist} shortlisted rows)"
    else:
        decided_by = "landmark ID (the regression alone, as the paper)"
    parts = config.landmark_features.split("+")
    feature_cost = sum(FEATURE_COSTS.get(part, 1.0) for part in parts)
    predicted = 1.0 / (feature_cost + exact_rows / n)
    seconds = context.seconds
    gradient_seconds = seconds.get("landmark_gradients", 0.0) + seconds.get("shortlist_gradients", 0.0)
    measured = None
    if computed:
        feature_seconds = sum(seconds.get(f"{part}_embeddings", 0.0) for part in parts)
        measured = n * gradient_seconds / computed / (feature_seconds + gradient_seconds)
    report = {"decided_by": decided_by, "exact_gradient_fraction": config.exact_gradient_fraction,
              "bound_rows": plan.bound, "landmark_rows": plan.landmarks, "shortlist_rows": plan.shortlist,
              "exact_gradient_rows": exact_rows, "exact_gradient_share": exact_rows / n,
              "predicted_speedup_vs_exact": predicted, "measured_speedup_vs_exact": measured}
    slowest = min(value for value in (predicted, measured) if value is not None)
    if slowest < 1.0:
        logger.warning("This landmark run is no cheaper than exact influence (%s speed-up %.2fx: %d exact gradients "
                       "for %d pool rows, plus the features): use method='influence_distillation_exact', or lower "
                       "exact_gradient_fraction / num_landmarks / shortlist_factor.",
                       "measured" if measured is not None and measured == slowest else "predicted", slowest,
                       exact_rows, n)
    return report


def _shortlisted(context: Context, stream: ScoreStream, store, landmarks: Tensor, landmark_scores: Tensor,
                 target_vectors: Tensor, preconditioner: Tensor | None, size: int, diagnostics: dict,
                 calibrated: bool) -> tuple[ScoreStream, int, int]:
    """The stream with exact first-order scores for the `size` rows the regression ranks highest under the run's
    rule ("mean_top_k" for weighted sampling, whose weights follow the mean score): their gradients are computed
    (or read from a finished exact store), so the rule's choice among the likely rows is exact influence's.
    Landmarks the regression did not shortlist keep their leave-one-out scores when `calibrated` (so a uniformly
    drawn row does not outrank predicted rows for being exact), their exact ones otherwise. Returns the stream,
    the new (non-landmark) shortlisted rows and how many gradients were computed; records the shortlist's size
    and fidelity in `diagnostics`."""
    rule = context.rule if context.rule in RULES else "mean_top_k"
    groups = context.target_tasks if rule in GROUPED_RULES else None
    seed, retained = context.config.selection_seed, None
    # One pass over the pool can serve the shortlist and the final selection: each key column keeps enough rows
    # that, once the landmarks and the shortlist are exact, its best budget rows are still known.
    keep = min(len(context.pool), context.budget_rows + len(landmarks) + size)
    one_pass = (context.stream_selection and rule == context.rule
                and key_columns(rule, landmark_scores.shape[1], groups) * keep <= ONE_PASS_MAX_CANDIDATES)
    with context.timed("shortlist"):
        if one_pass:
            retained = stream.candidates(keep, rule, groups)
            shortlist = retained.select(size, seed)
        else:
            shortlist = stream.select(size, rule, seed, groups)
    new = shortlist[~torch.isin(shortlist, landmarks)].sort().values
    # A store per shortlist (its rows depend on the target and the settings): a rerun reuses its own.
    folder = f"shortlist_gradients-{fingerprint_dataset(context.pool.select(new.tolist()))[:16]}" if len(new) else None
    new_scores, computed = (pool_row_scores(context, new, "shortlist_gradients", preconditioner, target_vectors, folder)
                            if len(new) else (landmark_scores[:0], 0))
    fidelity = None
    if len(new):
        embeddings = store_rows(store, new) if isinstance(store, VectorStore) else store[new]
        predicted = stream.predictor.predict(embeddings)[:, : new_scores.shape[1]].double().mean(1)
        fidelity = _spearman(predicted, new_scores.double().mean(1))
    shortlisted = torch.isin(landmarks, shortlist)
    kept = stream.exact["exact_scores"][:, : landmark_scores.shape[1]] if calibrated else landmark_scores
    landmark_values = torch.where(shortlisted[:, None], landmark_scores.to(kept.dtype), kept)
    diagnostics.update(landmark_scores="loo outside the shortlist" if calibrated else "exact", shortlist_rows=size,
                       shortlist_new_gradients=len(new), shortlist_rule=rule, shortlist_spearman=fidelity)
    exact = {"exact_rows": torch.cat([landmarks, new]),
             "exact_scores": torch.cat([landmark_values, new_scores.to(landmark_values.dtype)])}
    if retained is not None:
        retained = retained.replaced(exact["exact_rows"], exact["exact_scores"])
    final = ScoreStream(stream.embeddings, stream.predictor, exact, stream.chunk_rows, retained=retained)
    return final, len(new), computed


def _spearman(predicted: Tensor, exact: Tensor) -> float | None:
    """Spearman correlation of two [r] vectors; None (undefined) when either is constant, e.g. a regression that
    predicts one value for every row."""
    if bool((predicted == predicted[0]).all() or (exact == exact[0]).all()):
        return None
    return float(scipy.stats.spearmanr(predicted.numpy(), exact.numpy()).statistic)


# Below this leave-one-out Spearman the landmark regression ranks rows it never saw poorly: a warning says so.
LOO_SPEARMAN_WARNING = 0.5


def fidelity_remedy(config, plan: ExactGradientPlan, num_rows: int) -> str | None:
    """What a user can change when the landmark regression is unfaithful, for the low-fidelity warning; None when
    no row is left to the regression alone (the landmarks or the shortlist cover the pool)."""
    if plan.landmarks >= num_rows or plan.shortlist >= num_rows:
        return None
    if plan.landmarks < min(config.num_landmarks, num_rows):  # the exact-gradient bound capped the landmarks
        return (f"Raise exact_gradient_fraction (now {config.exact_gradient_fraction}: it caps the landmarks at "
                f"{plan.landmarks} of num_landmarks={config.num_landmarks})")
    return f"Raise num_landmarks (now {plan.landmarks})"


def landmark_diagnostics(regressor: LandmarkRegressor, landmark_scores: Tensor, num_pool_rows: int,
                         calibrated: bool, remedy: str | None = "Raise num_landmarks") -> dict:
    """How faithful the landmark regression is, from the landmarks alone (no extra model pass).

    loo_spearman: Spearman correlation, over the k landmarks, of their leave-one-out predicted mean score (over
    the m targets) with their exact mean score: how well the regression ranks a row it did not see (None when
    either is constant, which warns too). loo_error:
    1 - leave-one-out R^2, averaged over the regression's columns. Logs a warning below LOO_SPEARMAN_WARNING
    that ends with `remedy` (fidelity_remedy; None: no row is left to the regression, no warning).
    landmark_scores: [k, m] exact first-order scores.
    """
    k, m = landmark_scores.shape
    loo_spearman = _spearman(regressor.loo.reshape(k, -1)[:, :m].double().mean(1), landmark_scores.double().mean(1))
    diagnostics = {
        "num_landmarks": k, "landmark_share_pool": k / num_pool_rows, "landmark_scores": "loo" if calibrated else "exact",
        "kernel": regressor.kernel, "bandwidth": getattr(regressor, "sigma", None),
        "bandwidth_scale": regressor.bandwidth, "ridge": regressor.ridge, "loo_spearman": loo_spearman,
        "loo_error": regressor.loo_error,
    }
    if remedy is not None and k < num_pool_rows and (loo_spearman is None or loo_spearman < LOO_SPEARMAN_WARNING):
        logger.warning(
            "Landmark regression fidelity is low: leave-one-out Spearman %s over %d landmarks (below %.2f), so the "
            "scores of the pool rows it alone ranks are unreliable. %s, or use method='influence_distillation_exact'.",
            "undefined" if loo_spearman is None else f"{loo_spearman:.2f}", k, LOO_SPEARMAN_WARNING, remedy)
    return diagnostics


@register_method("influence_distillation_exact", default_selection="round_robin", robust_weights=True,
                 config_cls=InfluenceDistillationExactConfig)
def influence_distillation_exact(context: Context) -> MethodOutput:
    """Influence Distillation without landmarks: gradients (and, for order 2, Hessian products) of every pool row."""
    n = len(context.pool)
    tracked = PerSampleGradients(context.model, context.configs[GradientConfig])
    step = optimizer_step(context, tracked)
    pool_vectors = gradient_vectors(context, context.pool, "pool_gradients", None if step is None else step.scale)
    target_vectors = target_gradient_vectors(context)
    scores = first_order_scores(pool_vectors, target_vectors)
    p = scores.mean(1)
    if context.method_config.order == 1:
        return MethodOutput(scores, _weights(context, p, None, 0.0), torch.ones(n, dtype=torch.bool))
    q_pool, drift_product = _landmark_second_order(context, tracked, context.pool, pool_vectors, step, n)
    eta = _step_size(context, step)
    if drift_product is not None:
        p = p - eta * (pool_vectors @ drift_product)
    identity = torch.eye(n, dtype=torch.float64)
    return MethodOutput(scores, _weights(context, p, (identity, q_pool), eta), torch.ones(n, dtype=torch.bool))
