"""The options of the two Influence Distillation methods, beside them (PEFT's pattern: a method registers with
its own config class). `influence_distillation_exact` reads InfluenceDistillationExactConfig (the robust
weights' objective); `influence_distillation` reads InfluenceDistillationConfig, which adds the landmarks, the
regression and the shortlist. The options every method shares stay in `options.SelectionConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..extraction.hessian import HESSIAN_KINDS
from ..rds_embeddings import LM_POOLINGS
from ..validation import check_fields, is_number

LANDMARK_FEATURES = ("jvp", "lm", "jvp+lm", "truncated_gradient", "hidden_state")


@dataclass
class InfluenceDistillationExactConfig:
    """Influence Distillation's objective: first- or second-order influence turned into robust per-row weights
    (docs/algorithms.md). The options of `influence_distillation_exact`, and of `influence_distillation` too.

    Each field's help is in its metadata (TRL's convention: `--help` shows it).
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "Influence Distillation (InfluenceDistillationExactConfig)"

    order: int = field(
        default=1,
        metadata={"help": "1 (first-order influence) or 2 (adds the target-Hessian term to the robust weights)."})
    hessian: str = field(
        default="exact",
        metadata={"help": '"exact" (double backward) or "gauss_newton", for order 2.'})
    robust_lambda: float = field(
        default=0.02,
        metadata={"help": "lambda of the robust-weights objective (the paper's running example uses 0.02)."})
    step_size: float | None = field(
        default=None,
        metadata={"help": "eta of the one-step objective; None uses the optimizer's learning rate (required for "
                          'optimizer_state="gd" or "warmup_gd" with order 2).'})

    def __post_init__(self) -> None:
        check_fields(self, numbers={"robust_lambda": (0, None), "step_size": (0, None)}, optional=("step_size",),
                     choices={"order": (1, 2), "hessian": HESSIAN_KINDS})


@dataclass
class InfluenceDistillationConfig(InfluenceDistillationExactConfig):
    """Landmark Influence Distillation: exact gradients for a few landmark rows (and a shortlist), a kernel
    ridge regression on cheap features of every row for the rest. The options of `influence_distillation`.

    Each field's help is in its metadata (TRL's convention: `--help` shows it).
    """

    _argument_group_name = "landmark Influence Distillation (InfluenceDistillationConfig)"

    num_landmarks: int = field(
        default=4096,
        metadata={"help": "landmark rows with exact gradients (capped at the pool size)."})
    landmark_selection: str = field(
        default="uniform",
        metadata={"help": '"uniform" (seeded random) or "kmeans++" on the regression features.'})
    landmark_features: str = field(
        default="jvp",
        metadata={"help": 'what the kernel regression reads for every pool row: "jvp" (JVP embeddings, '
                          "JVPConfig), \"lm\" (the base model's RDS+ embeddings: position-weighted mean of the last"
                          ' hidden state, one forward pass of the whole model), "jvp+lm" (both, each scaled by'
                          " its median pairwise distance so that both weigh the same in the kernel; held in "
                          'memory, [n, e_jvp + hidden]) or "truncated_gradient" (the run\'s per-sample gradient, '
                          "preconditioned and projected, of the model cut after JVPConfig.num_blocks blocks: the "
                          "same truncated model as the JVP features, a backward pass instead of a forward-mode one)"
                          ' or "hidden_state" (the base model\'s hidden state after hidden_state_blocks blocks, '
                          "pooled as hidden_state_pooling says: a forward pass through a quarter of SmolLM2, 0.10 of"
                          " a gradient row, half the JVP's cost for the same fidelity ceiling in the fidelity lab; "
                          "README, Landmark fidelity)."})
    hidden_state_blocks: int = field(
        default=8,
        metadata={"help": 'landmark_features="hidden_state": the decoder blocks run before the final norm (8 of '
                          "SmolLM2-135M's 30, the fidelity lab's best point per unit of cost)."})
    hidden_state_pooling: str = field(
        default="last",
        metadata={"help": 'landmark_features="hidden_state": "last" (the state at the row\'s last token, which has '
                          'seen the whole row) or "mean" (the position-weighted mean, RDS+\'s).'})
    landmark_scores: str = field(
        default="loo",
        metadata={"help": 'what landmark rows are ranked by when there are fewer landmarks than pool rows: "loo" '
                          "(their leave-one-out predictions, made from the other landmarks: every row is then an "
                          'out-of-sample prediction on the same footing) or "exact" (their exact influence, which'
                          " beats the ridge-shrunk predictions of the other rows and fills round-robin selections"
                          " with landmarks). With landmarks = the whole pool both give exact influence."})
    shortlist_factor: float | None = field(
        default=None,
        metadata={"help": "first-order landmark runs with a budget: the regression shortlists the shortlist_factor x"
                          " budget rows it ranks highest (under the selection rule), those rows get exact gradients"
                          " too and are scored exactly before the rule selects (an exact re-rank: the choice among "
                          "the likely rows is exact influence's). None: 4 for first-order runs with a budget, off "
                          "otherwise; 0: off (the paper's algorithm: the regression alone decides). "
                          "exact_gradient_fraction bounds it."})
    exact_gradient_fraction: float | None = field(
        default=0.14,
        metadata={"help": "the most exact gradients a landmark run takes, as a fraction of the pool rows: landmarks "
                          "+ shortlisted rows <= exact_gradient_fraction x n (the landmarks take at most a quarter of"
                          " it when the run shortlists, at least 16 rows). The pool side then costs about this "
                          "fraction plus the features' (JVP: 0.19 of a gradient row, measured) of exact influence's,"
                          " whatever the budget: 0.14 keeps it >= 3x cheaper. None: no bound (num_landmarks and "
                          "shortlist_factor as given; the shortlist grows with the budget)."})
    kernel: str = field(default="rbf", metadata={"help": 'kernel of the landmark regression: "rbf" or "linear".'})
    kernel_bandwidth: float | None = field(
        default=1.0,
        metadata={"help": "RBF bandwidth as a multiple of the median pairwise landmark distance (1.0, the "
                          "default, is the median heuristic); None chooses it by closed-form leave-one-out on the"
                          " landmarks (better in the fidelity lab, but an argmin over a grid: rounding "
                          "differences, e.g. a multi-process warm-up, can flip the choice and with it the "
                          "selection, so it is opt-in)."})
    kernel_ridge: float | None = field(
        default=0.01,
        metadata={"help": "ridge of the landmark regression, relative to the mean kernel diagonal (default 0.01);"
                          " None chooses it by closed-form leave-one-out on the landmarks (see kernel_bandwidth)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        # Types first, so that a YAML `num_landmarks: 4.7` or `null` is refused here, before any model pass, and
        # not as a raw TypeError after the warm-up.
        check_fields(self, integers={"num_landmarks": 1, "hidden_state_blocks": 1},
                     choices={"landmark_selection": ("uniform", "kmeans++"), "landmark_features": LANDMARK_FEATURES,
                              "hidden_state_pooling": LM_POOLINGS,
                              "landmark_scores": ("loo", "exact"), "kernel": ("rbf", "linear")})
        for name in ("kernel_ridge", "kernel_bandwidth", "shortlist_factor", "exact_gradient_fraction"):
            value = getattr(self, name)
            if value is not None and not (is_number(value) and math.isfinite(value)):
                raise ValueError(f"{owner}.{name} must be a finite number or None, got {value!r}")
        if self.kernel_ridge is not None and self.kernel_ridge < 0:
            raise ValueError(f"{owner}.kernel_ridge must be >= 0 (or None: chosen by leave-one-out), got "
                             f"{self.kernel_ridge}")
        if self.kernel_bandwidth is not None and not self.kernel_bandwidth > 0:
            raise ValueError(f"{owner}.kernel_bandwidth must be > 0 (a multiple of the median distance, or None: "
                             f"chosen by leave-one-out), got {self.kernel_bandwidth}")
        if self.shortlist_factor is not None and not self.shortlist_factor >= 0:
            raise ValueError(f"{owner}.shortlist_factor must be >= 0 (0: off; None: 4 for first-order runs with a "
                             f"budget), got {self.shortlist_factor}")
        if self.exact_gradient_fraction is not None and not 0 < self.exact_gradient_fraction <= 1:
            raise ValueError(f"{owner}.exact_gradient_fraction must be in (0, 1] (or None: no bound), got "
                             f"{self.exact_gradient_fraction}")
        if self.shortlist_factor and self.order == 2:
            raise ValueError("shortlist_factor > 0 with order=2: the shortlist refines first-order scores only (the "
                             "second-order term of shortlisted rows is not computed). Pass shortlist_factor=0 (or "
                             "leave it None) with order=2.")
