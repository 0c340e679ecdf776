"""
NN-CIFT's InfluenceNetwork (docs/algorithms.md §2; Agarwal & Hakkani-Tur, 2025, arXiv 2502.09969).

A small MLP learns an expensive influence oracle from sentence-encoder embeddings:
  pairwise:  score(i, j) = MLP([e_i ; e_j])   (pool sample i, target sample j)
  pointwise: score(i)    = MLP(e_i)
Linear(input, 100) -> ReLU -> Linear(100, 1) by default (77k parameters for e=384, 205k for e=1024).
With interaction_rank r > 0 a pairwise network adds a low-rank bilinear term (P e_i) . (Q e_j), P and Q [r, e]:
the MLP's first layer is additive in e_i and e_j, so it can only approximate a similarity through its ReLUs;
the bilinear term represents one directly (an embedding cosine exactly, with r = e) and still factorises.

- fit: normalise the oracle's block of labels, min-max over the block (label_normalization="global", the paper)
  or each target column standardised over the block's rows first ("column": the network then learns which rows
  a target ranks high, not each target's scale, and predicts standardised scores); the statistics are kept,
  so predictions come back in oracle units ("global") or per-target standard units ("column"). Seeded split
  of the pairs into train / validation, Adam + MSE, early stopping that restores the best weights.
- predict / top_candidates: the first layer factorises, W1 [e_i ; e_j] + b1 = (A e_i + b1) + B e_j, so
  both sides are projected once and each pair costs an add, a ReLU and a dot product (fused as a max:
  relu(p + q) = max(p, -q) + q), tiled so the work buffer stays in cache. top_candidates streams the
  pool and never holds the [n, m] matrix.
- evaluate: MSE, Spearman and top-k overlap on the quadrants Q1..Q4 of seen / unseen rows and columns,
  next to 'predict the mean' and 'random' baselines.
- Hub: config.json holds the constructor arguments (oracle, valuation model and encoder included),
  weights are safetensors only, and loading is strict: nothing is unpickled, no key may be missing or extra.
"""

import contextlib
import itertools
import json
import math
import os
import warnings

import safetensors.torch
import scipy.stats
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin, constants, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from torch import Tensor, nn

from ..artifacts.cards import HUB_TAG
from ..errors import HFInfluenceError
from ..models import looks_like_local_path
from ..selection.rules import TopRows

KINDS = ("pairwise", "pointwise")
# Below this many training pairs (after the validation split) a fit is refused: there is nothing to learn
# from and early stopping would be driven by noise.
MIN_TRAINING_PAIRS = 10
LABEL_NORMALIZATIONS = ("global", "column")
# Pool rows per tile of the factorised predict are chosen so the [hidden, rows, m] work buffer is about
# this size. Measured on a 2-core Xeon (2 MiB L2 per core), m=300, h=100: 8-row tiles (0.96 MB) ran at
# 33-42M pairs/s on one thread, 32-64-row tiles (4-8 MB, out of L2) at 25-27M.
TILE_BYTES = 1 << 20
# Pairs per step when a loss is computed over a whole split (bounds the [pairs, 2e] input).
EVAL_PAIRS = 65536
# evaluate ranks at most this many pairs of a quadrant for Spearman (a seeded sample beyond it): ranking
# tens of millions of pairs in float64 costs GBs and seconds for no visible change in the coefficient.
SPEARMAN_MAX_PAIRS = 1_000_000


def split_pairs(num_pairs: int, validation_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """
    Seeded random split of pair indices 0..num_pairs-1 (row-major over the label block) into
    (train [num_pairs - v], validation [v]) with v = max(1, round(validation_fraction * num_pairs)).
    Raises ValueError when fewer than MIN_TRAINING_PAIRS remain to train on.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    num_validation = max(1, round(validation_fraction * num_pairs))
    if num_pairs - num_validation < MIN_TRAINING_PAIRS:
        raise ValueError(
            f"the label block is too small to learn from: {num_pairs} pairs leave {num_pairs - num_validation} "
            f"training pairs after the validation split (at least {MIN_TRAINING_PAIRS} needed); "
            f"score a larger block with the oracle"
        )
    order = torch.randperm(num_pairs, generator=generator)
    return order[num_validation:], order[:num_validation]


def split_held_out(num_rows: int, num_columns: int, validation_fraction: float,
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """
    Seeded split of the [num_rows, num_columns] label block (pair index = row * num_columns + column) that holds
    out whole rows and columns: max(1, round(f * num_rows)) rows and, when num_columns > 1,
    max(1, round(f * num_columns)) columns. Validation = every pair with a held-out row or column; train = the
    rest. Unlike split_pairs, the validation loss then measures what selection needs (rows and targets the
    network never saw), so early stopping stops before the network memorises the block's rows.
    Returns (train pair indices, validation pair indices), each sorted. Raises ValueError when fewer than
    MIN_TRAINING_PAIRS remain to train on.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    held_rows = torch.randperm(num_rows, generator=generator)[: max(1, round(validation_fraction * num_rows))]
    held = torch.zeros(num_rows, num_columns, dtype=torch.bool)
    held[held_rows] = True
    if num_columns > 1:
        held_columns = torch.randperm(num_columns, generator=generator)[: max(1, round(validation_fraction
                                                                                       * num_columns))]
        held[:, held_columns] = True
    flat = held.flatten()
    train, validation = (~flat).nonzero().squeeze(1), flat.nonzero().squeeze(1)
    if len(train) < MIN_TRAINING_PAIRS:
        raise ValueError(
            f"the label block is too small to learn from: holding out rows and columns of the {num_rows} x "
            f"{num_columns} block leaves {len(train)} training pairs (at least {MIN_TRAINING_PAIRS} needed); "
            f"score a larger block with the oracle, or use validation_split='pairs'"
        )
    return train, validation


def topk_overlap(predicted: Tensor, true: Tensor, k: int) -> float:
    """
    Mean over columns of |top-k rows by predicted  intersect  top-k rows by true| / k, for score
    matrices [r, c] (k is capped at r). 1.0 means every column's true top-k was recovered.
    """
    k = min(k, predicted.shape[0])
    hits = torch.zeros(predicted.shape, dtype=torch.bool)
    hits.scatter_(0, true.topk(k, dim=0).indices, True)
    return hits.gather(0, predicted.topk(k, dim=0).indices).sum(0).double().mean().item() / k


def spearman(predicted: Tensor, true: Tensor, generator: torch.Generator) -> float:
    """Spearman correlation of two equal-shape score tensors, flattened; NaN when either is constant."""
    predicted, true = predicted.flatten(), true.flatten()
    if predicted.numel() > SPEARMAN_MAX_PAIRS:
        sample = torch.randperm(predicted.numel(), generator=generator)[:SPEARMAN_MAX_PAIRS]
        predicted, true = predicted[sample], true[sample]
    with warnings.catch_warnings():
        # A constant input has no ranking: scipy warns and returns NaN, which is the answer we report.
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        return float(scipy.stats.spearmanr(predicted.double().numpy(), true.double().numpy()).statistic)


def column_spearman(predicted: Tensor, true: Tensor) -> float:
    """Mean over columns of the Spearman correlation of the rows' scores [r, c]: how well each target's ranking
    of the rows (what a per-target selection rule reads) is recovered, whatever the targets' scales. Columns
    with a constant side are left out; NaN when every column is, or with fewer than 2 rows."""
    if predicted.shape[0] < 2:
        return math.nan
    ranks = [torch.from_numpy(scipy.stats.rankdata(values.double().numpy(), axis=0)) for values in (predicted, true)]
    centred = [rank - rank.mean(0, keepdim=True) for rank in ranks]
    norms = centred[0].norm(dim=0) * centred[1].norm(dim=0)
    defined = norms > 0
    if not bool(defined.any()):
        return math.nan
    return float(((centred[0] * centred[1]).sum(0)[defined] / norms[defined]).mean())


def _first_non_finite(values: Tensor) -> tuple[int, ...] | None:
    """Position of the first NaN / inf of a tensor (row-major), or None when every value is finite."""
    bad = torch.nonzero(~torch.isfinite(values))
    return tuple(bad[0].tolist()) if len(bad) else None


@contextlib.contextmanager
def _torch_threads(count: int | None):
    """Run torch on `count` CPU intra-op threads inside the block, then restore the count; None: leave it."""
    # The work here comes as many small ops (a 64-pair training step, a 1 MB inference tile), each of which
    # would be a parallel region ending in a barrier. Measured on a 2-core CPU shared with another process:
    # a training step 0.3 ms on one thread against 1.2-19 ms on two, and the factorised predict 36M pairs/s
    # on one thread against 1.7M on two, as every barrier waits for a descheduled thread. Hence the
    # default of 1; torch's thread count is process-wide, so a caller running torch work in other Python
    # threads at the same time passes None.
    if count is None:
        yield
        return
    if count < 1:
        raise ValueError(f"num_threads must be >= 1 or None (leave torch's setting), got {count}")
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def standardize_columns(labels: Tensor) -> Tensor:
    """Each column of labels [r, c] minus its mean, over its standard deviation (population; a constant column
    becomes 0): the "column" label normalisation. Pointwise labels [r] are one column. NaN entries (unscored
    pairs) are left out of a column's statistics and stay NaN."""
    mean = labels.nanmean(0, keepdim=True)
    std = (labels - mean).square().nanmean(0, keepdim=True).sqrt()
    return (labels - mean) / torch.where(std > 0, std, torch.ones_like(std))


def complement(indices: Tensor, size: int) -> Tensor:
    """The indices of range(size) not in `indices` (LongTensor), ascending: the unseen rows or columns of a block."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[indices] = False
    return mask.nonzero().squeeze(1)


class NetworkMismatchError(HFInfluenceError, RuntimeError):
    """A saved InfluenceNetwork whose weights do not fit its config (sizes, kind or layers differ)."""


class InfluenceNetwork(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="hf-influence",
    tags=[HUB_TAG, "nn-cift", "data-selection"],
    paper_url="https://arxiv.org/abs/2502.09969",
):
    """
    NN-CIFT influence network. The constructor arguments are its config (config.json on the Hub).

    kind: "pairwise" (input [e_i ; e_j], predicts an [n, m] matrix) or "pointwise" (input e_i, predicts [n]).
    embedding_dim: e, the encoder's embedding size.
    hidden_sizes: widths of the ReLU hidden layers (default [100], the paper's network).
    embedding_model: the encoder id the embeddings come from (predict can verify it).
    embedding_revision: the encoder's revision (Hub commit, or the offline copy's version), when known.
    text_format: how rows were turned into the encoder's text (`hf_influence.networks.encoders.TEXT_FORMAT`).
    interaction_rank: r of the bilinear term (P e_i) . (Q e_j) of a pairwise network; 0 for none (the paper).
    label_normalization: "global" (min-max over the block, the paper) or "column" (see the module docstring).
    oracle: name of the distilled influence oracle, e.g. "influence_distillation".
    valuation_model: the LM id the oracle ran with, or None (e.g. an embedding-cosine oracle).
    label_min, label_max: min-max statistics of the training block in oracle units (set by fit).
    seed: seed of the initialisation, the validation split and the batch order.
    metrics: evaluate's Q1..Q4 figures, kept so they travel with the weights.
    """

    def __init__(
        self,
        kind: str = "pairwise",
        embedding_dim: int = 384,
        hidden_sizes: list[int] | None = None,
        embedding_model: str | None = None,
        oracle: str | None = None,
        valuation_model: str | None = None,
        label_min: float | None = None,
        label_max: float | None = None,
        seed: int = 0,
        metrics: dict | None = None,
        embedding_revision: str | None = None,
        text_format: str | None = None,
        interaction_rank: int = 0,
        label_normalization: str = "global",
    ):
        super().__init__()
        hidden_sizes = [100] if hidden_sizes is None else [int(size) for size in hidden_sizes]
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        if embedding_dim < 1 or not hidden_sizes or min(hidden_sizes) < 1:
            raise ValueError(f"need embedding_dim >= 1 and hidden sizes >= 1, got {embedding_dim}, {hidden_sizes}")
        if interaction_rank < 0 or (interaction_rank and kind != "pairwise"):
            raise ValueError(f"interaction_rank must be >= 0, and 0 for a pointwise network, got {interaction_rank}")
        if (label_min is None) != (label_max is None) or (label_min is not None and not (
                math.isfinite(label_min) and math.isfinite(label_max) and label_min < label_max)):
            raise ValueError(f"label_min and label_max must both be None (not fitted) or finite with label_min < "
                             f"label_max, got {label_min!r} and {label_max!r}: swapped values would invert every "
                             f"ranking the network predicts.")
        if label_normalization not in LABEL_NORMALIZATIONS:
            raise ValueError(f"label_normalization must be one of {list(LABEL_NORMALIZATIONS)}, "
                             f"got {label_normalization!r}")
        self.kind = kind
        self.embedding_dim = int(embedding_dim)
        self.hidden_sizes = hidden_sizes
        self.embedding_model = embedding_model
        self.oracle = oracle
        self.valuation_model = valuation_model
        self.label_min = label_min
        self.label_max = label_max
        self.seed = int(seed)
        self.metrics = metrics
        # (predicted, true) of the unseen pairs of the last `evaluate` (its label units), for the card's plot;
        # in memory only.
        self.evaluation_pairs: tuple[Tensor, Tensor] | None = None
        self.embedding_revision = embedding_revision
        self.text_format = text_format
        self.interaction_rank = int(interaction_rank)
        self.label_normalization = label_normalization
        # P and Q of the bilinear term, stacked: [2, r, e] (no parameters when r = 0).
        self.interaction = nn.Parameter(torch.empty(2, self.interaction_rank, self.embedding_dim)) \
            if self.interaction_rank else None
        widths = [2 * self.embedding_dim if kind == "pairwise" else self.embedding_dim, *hidden_sizes]
        self.hidden = nn.ModuleList(nn.Linear(fan_in, fan_out) for fan_in, fan_out in itertools.pairwise(widths))
        self.output = nn.Linear(widths[-1], 1)
        self._initialise(self.seed)

    @property
    def config(self) -> dict:
        """The constructor arguments as they stand now (fit and evaluate update the label range and metrics)."""
        return {
            "kind": self.kind, "embedding_dim": self.embedding_dim, "hidden_sizes": list(self.hidden_sizes),
            "embedding_model": self.embedding_model, "oracle": self.oracle, "valuation_model": self.valuation_model,
            "label_min": self.label_min, "label_max": self.label_max, "seed": self.seed, "metrics": self.metrics,
            "embedding_revision": self.embedding_revision, "text_format": self.text_format,
            "interaction_rank": self.interaction_rank, "label_normalization": self.label_normalization,
        }

    def _initialise(self, seed: int) -> None:
        # nn.Linear's default init (kaiming_uniform with a=sqrt(5) is U(+-1/sqrt(fan_in))) from a private
        # generator: the same seed gives the same network whatever the global RNG has been through.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in [*self.hidden, self.output]:
                bound = 1 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
            if self.interaction is not None:
                # Each projection starts like a Linear(e, r); the product term then starts small.
                bound = 1 / math.sqrt(self.embedding_dim)
                nn.init.uniform_(self.interaction, -bound, bound, generator=generator)

    def forward(self, inputs: Tensor) -> Tensor:
        """inputs [N, 2e] (pairwise, [e_i ; e_j]) or [N, e] (pointwise) -> [N] scores in normalised units."""
        hidden = inputs
        for layer in self.hidden:
            hidden = F.relu(layer(hidden))
        scores = self.output(hidden).squeeze(-1)
        if self.interaction is not None:
            pool, target = inputs[:, : self.embedding_dim], inputs[:, self.embedding_dim :]
            scores = scores + ((pool @ self.interaction[0].T) * (target @ self.interaction[1].T)).sum(-1)
        return scores

    # ------------------------------------------------------------------------------------------
    # Checks

    def check_embeddings(self, embeddings: Tensor, encoder_id: str | None = None) -> None:
        """
        Refuse embeddings this network cannot score: not [rows, embedding_dim], or (when encoder_id is
        given) from another encoder than the recorded embedding_model. Raises ValueError.
        """
        if encoder_id is not None and encoder_id != self.embedding_model:
            raise ValueError(
                f"embeddings from encoder {encoder_id!r}, but this network records embedding_model="
                f"{self.embedding_model!r}: its predictions are meaningless for another encoder's embeddings"
            )
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"expected embeddings of shape [rows, {self.embedding_dim}] (encoder {self.embedding_model!r}), "
                f"got {list(embeddings.shape)}"
            )

    def _require_fitted(self) -> tuple[float, float]:
        if self.label_min is None or self.label_max is None:
            raise RuntimeError("this InfluenceNetwork has no label range: fit it (or load a fitted one) first")
        return self.label_min, self.label_max - self.label_min

    # ------------------------------------------------------------------------------------------
    # Training

    def fit(
        self,
        pool_embeddings: Tensor,
        target_embeddings: Tensor | None,
        labels: Tensor,
        *,
        validation_fraction: float = 0.1,
        validation_split: str = "pairs",
        epochs: int = 20,
        batch_size: int = 64,
        lr: float = 1e-4,
        patience: int = 3,
        seed: int | None = None,
        num_threads: int | None = 1,
    ) -> dict:
        """
        Train from scratch on an oracle block (the paper's recipe plus a validation split and early stopping).

        pool_embeddings: [u_n, e] embeddings of the block's pool rows.
        target_embeddings: [u_m, e] of its target columns (pairwise); None for a pointwise network.
        labels: [u_n, u_m] oracle values (pairwise) or [u_n] (pointwise), in oracle units.
        Labels are normalised as label_normalization says (then min-max over the block; label_min / label_max are
        stored, in oracle units or per-column standard units, and metrics cleared);
        the block is split into train / validation (validation_split "pairs": random pairs, the paper's
        regime; "held_out": whole rows and columns held out, see split_held_out); Adam on the MSE for at
        most `epochs`, stopping after `patience` epochs without a lower validation loss and restoring the best
        epoch's weights.
        seed: None uses the network's seed; the seed used is stored. The same seed gives the same network.
        num_threads: torch CPU threads while training (see _torch_threads); None leaves torch's setting.
        Returns {"train_loss": [per epoch], "validation_loss": [per epoch], "best_epoch", "best_validation_loss",
        "stopped_early", "train_pairs", "validation_pairs"} (losses: MSE in normalised units).
        """
        pool = self._training_embeddings(pool_embeddings, "pool_embeddings")
        labels = torch.as_tensor(labels).to(torch.float64)
        if self.kind == "pairwise":
            if target_embeddings is None:
                raise ValueError("a pairwise network needs target_embeddings to fit")
            target = self._training_embeddings(target_embeddings, "target_embeddings")
            expected_shape = (pool.shape[0], target.shape[0])
        else:
            if target_embeddings is not None:
                raise ValueError("a pointwise network scores pool rows alone: pass target_embeddings=None")
            target, expected_shape = None, (pool.shape[0],)
        if tuple(labels.shape) != expected_shape:
            raise ValueError(f"labels must have shape {list(expected_shape)} (pool rows x target columns), "
                             f"got {list(labels.shape)}")
        position = _first_non_finite(labels)
        if position is not None:
            where = f"row {position[0]}" + (f", column {position[1]}" if len(position) == 2 else "")
            raise ValueError(f"labels contain {labels[position].item()} at {where} (the first non-finite value): "
                             f"drop or recompute that oracle value before fitting")
        if self.label_normalization == "column":
            labels = standardize_columns(labels)
        label_min, label_max = labels.min().item(), labels.max().item()
        if label_min == label_max:
            raise ValueError(f"every label of the block equals {label_min}: a constant block has nothing to learn")
        normalised = ((labels - label_min) / (label_max - label_min)).flatten().to(device=pool.device, dtype=pool.dtype)
        seed = self.seed if seed is None else int(seed)
        generator = torch.Generator().manual_seed(seed)
        if validation_split == "pairs":
            train, validation = split_pairs(normalised.numel(), validation_fraction, generator)
        elif validation_split == "held_out":
            train, validation = split_held_out(expected_shape[0], expected_shape[1] if len(expected_shape) == 2
                                               else 1, validation_fraction, generator)
        else:
            raise ValueError(f"validation_split must be 'pairs' or 'held_out', got {validation_split!r}")

        # New weights: old metrics no longer describe them.
        self.seed, self.label_min, self.label_max, self.metrics = seed, label_min, label_max, None
        self.evaluation_pairs = None
        self._initialise(seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        history = {"train_loss": [], "validation_loss": [], "train_pairs": len(train),
                   "validation_pairs": len(validation)}
        best_loss, best_epoch, best_state = math.inf, -1, None
        with _torch_threads(num_threads):
            for epoch in range(epochs):
                order = train[torch.randperm(len(train), generator=generator)]
                history["train_loss"].append(self._train_epoch(pool, target, order, normalised, optimizer, batch_size))
                history["validation_loss"].append(self._loss(pool, target, validation, normalised))
                if history["validation_loss"][-1] < best_loss:
                    best_loss, best_epoch = history["validation_loss"][-1], epoch
                    best_state = {name: value.detach().clone() for name, value in self.state_dict().items()}
                elif epoch - best_epoch >= patience:
                    break
        if best_state is None:
            raise RuntimeError("training diverged: the validation loss was never finite; lower lr")
        self.load_state_dict(best_state)
        history.update(best_epoch=best_epoch, best_validation_loss=best_loss,
                       stopped_early=len(history["validation_loss"]) < epochs)
        return history

    def _training_embeddings(self, embeddings: Tensor, name: str) -> Tensor:
        embeddings = torch.as_tensor(embeddings)
        self.check_embeddings(embeddings)
        parameter = self.output.weight
        embeddings = embeddings.to(device=parameter.device, dtype=parameter.dtype)
        position = _first_non_finite(embeddings)
        if position is not None:
            raise ValueError(f"{name} row {position[0]} contains a non-finite value (column {position[1]})")
        return embeddings

    def _pair_inputs(self, pool: Tensor, target: Tensor | None, pairs: Tensor) -> Tensor:
        """Network inputs [len(pairs), 2e or e] for row-major pair indices into the [u_n, u_m] block."""
        if target is None:
            return pool[pairs]
        return torch.cat([pool[pairs // target.shape[0]], target[pairs % target.shape[0]]], dim=1)

    def _train_epoch(self, pool: Tensor, target: Tensor | None, order: Tensor, normalised: Tensor,
                     optimizer: torch.optim.Optimizer, batch_size: int) -> float:
        """One pass over the training pairs in the given order; returns their mean training loss."""
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = F.mse_loss(self(self._pair_inputs(pool, target, batch)), normalised[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        return total / len(order)

    @torch.no_grad()
    def _loss(self, pool: Tensor, target: Tensor | None, pairs: Tensor, normalised: Tensor) -> float:
        """MSE over the given pairs, EVAL_PAIRS at a time."""
        total = 0.0
        for start in range(0, len(pairs), EVAL_PAIRS):
            batch = pairs[start : start + EVAL_PAIRS]
            total += F.mse_loss(self(self._pair_inputs(pool, target, batch)), normalised[batch], reduction="sum").item()
        return total / len(pairs)

    # ------------------------------------------------------------------------------------------
    # Inference

    def _pair_scorer(self, target: Tensor):
        """
        Precompute the target side of the factorised network once, for target embeddings [m, e] already on
        the network's device and dtype. Returns score(pool_block [r, e], out [r, m]) writing oracle units.
        """
        label_min, label_scale = self._require_fitted()
        first, e = self.hidden[0], self.embedding_dim
        # De-normalisation folded into the output layer: out = (w2 . h + b2) * scale + label_min.
        out_weight = self.output.weight[0] * label_scale
        out_bias = self.output.bias[0] * label_scale + label_min
        target_part = target @ first.weight[:, e:].T  # B E_T: [m, h]
        m, h = target_part.shape
        tile = max(1, TILE_BYTES // (h * m * target_part.element_size()))
        # The bilinear term factorises too: (P e_i) . (Q e_j) * scale is one [r, m] product per pool block.
        interaction_target = None if self.interaction is None else (target @ self.interaction[1].T).T * label_scale

        def add_interaction(pool_block: Tensor, out: Tensor) -> None:
            if interaction_target is not None:
                out.addmm_(pool_block @ self.interaction[0].T, interaction_target)

        if len(self.hidden) == 1:
            # relu(p + q) = max(p, -q) + q, so w2 . relu(p + q) = w2 . max(p, -q) + w2 . q: one fused
            # broadcast maximum per tile instead of an add and a ReLU pass, and w2 . q is per column.
            # Rounding stays at eps * (|p| + |q|) per unit, as for the add.
            negative_target = (-target_part).T.contiguous()  # [h, m]
            column_offset = target_part @ out_weight + out_bias  # [m]

            def score(pool_block: Tensor, out: Tensor) -> None:
                rows = pool_block.shape[0]
                pool_part = torch.addmm(first.bias[:, None], first.weight[:, :e], pool_block.T)  # A E_S + b1: [h, r]
                buffer = torch.empty(h, min(tile, rows), m, dtype=out.dtype, device=out.device)
                for start in range(0, rows, tile):
                    work = buffer[:, : min(tile, rows - start)]  # [h, t, m]
                    torch.maximum(pool_part[:, start : start + tile, None], negative_target[:, None, :], out=work)
                    # [t * m, h] @ w2 as one matrix-vector product, written straight into the output rows.
                    torch.mv(work.view(h, -1).T, out_weight, out=out[start : start + tile].view(-1))
                out += column_offset
                add_interaction(pool_block, out)

            return score

        def score(pool_block: Tensor, out: Tensor) -> None:
            # Deeper networks: the first layer factorised as above, the remaining layers on the tile's
            # [t, m, h1] activations.
            pool_part = torch.addmm(first.bias, pool_block, first.weight[:, :e].T)  # A E_S + b1: [r, h]
            for start in range(0, pool_block.shape[0], tile):
                activations = (pool_part[start : start + tile, None, :] + target_part).relu_()
                for layer in self.hidden[1:]:
                    activations = F.linear(activations, layer.weight, layer.bias).relu_()
                out[start : start + tile] = activations @ out_weight + out_bias
            add_interaction(pool_block, out)

        return score

    def _inference_embeddings(self, embeddings: Tensor, encoder_id: str | None) -> Tensor:
        embeddings = torch.as_tensor(embeddings)
        self.check_embeddings(embeddings, encoder_id)
        return embeddings

    @torch.no_grad()
    def predict(
        self,
        pool_embeddings: Tensor,
        target_embeddings: Tensor | None = None,
        chunk_rows: int = 16384,
        embedding_model: str | None = None,
        num_threads: int | None = 1,
    ) -> Tensor:
        """
        Predicted influence in oracle units: [n, m] for pool_embeddings [n, e] x target_embeddings [m, e]
        (pairwise), [n] for pool_embeddings alone (pointwise).

        chunk_rows pool rows are moved to the network's device and projected at a time (pool_embeddings may
        be a CPU or memory-mapped tensor); beyond the [n, m] result, memory is O(chunk_rows * h + m * h).
        On a CPU it runs on one thread by default (see _torch_threads): >= 30M pairs/s for e=384, h=100 on
        one core. num_threads: torch CPU threads while predicting; None leaves torch's setting.
        embedding_model: the encoder id of the embeddings; when given it must match the network's.
        Equals the plain forward on concatenated pairs, de-normalised, to float rounding.
        """
        with _torch_threads(num_threads):
            return self._predict(pool_embeddings, target_embeddings, chunk_rows, embedding_model)

    def _predict(self, pool_embeddings, target_embeddings, chunk_rows, embedding_model) -> Tensor:
        label_min, label_scale = self._require_fitted()
        pool = self._inference_embeddings(pool_embeddings, embedding_model)
        parameter = self.output.weight
        if self.kind == "pointwise":
            if target_embeddings is not None:
                raise ValueError("a pointwise network scores pool rows alone: pass no target_embeddings")
            scores = torch.empty(pool.shape[0], dtype=parameter.dtype, device=parameter.device)
            for start in range(0, pool.shape[0], chunk_rows):
                block = pool[start : start + chunk_rows].to(device=parameter.device, dtype=parameter.dtype)
                scores[start : start + chunk_rows] = self(block) * label_scale + label_min
            return scores
        if target_embeddings is None:
            raise ValueError("a pairwise network needs target_embeddings")
        target = self._inference_embeddings(target_embeddings, embedding_model)
        score = self._pair_scorer(target.to(device=parameter.device, dtype=parameter.dtype))
        scores = torch.empty(pool.shape[0], target.shape[0], dtype=parameter.dtype, device=parameter.device)
        for start in range(0, pool.shape[0], chunk_rows):
            block = pool[start : start + chunk_rows].to(device=parameter.device, dtype=parameter.dtype)
            score(block, scores[start : start + chunk_rows])
        return scores

    @torch.no_grad()
    def top_candidates(
        self,
        pool_embeddings: Tensor,
        target_embeddings: Tensor,
        k: int,
        chunk_rows: int = 16384,
        embedding_model: str | None = None,
        num_threads: int | None = 1,
    ) -> tuple[Tensor, Tensor]:
        """
        The k pool rows with the highest predicted influence for every target, streamed over the pool:
        memory is O(chunk_rows * m + k * m), never [n, m].

        pool_embeddings [n, e], target_embeddings [m, e] (pairwise networks only), 1 <= k <= n.
        Returns (values [m, k] in oracle units, pool row indices [m, k]), best first, as
        predict(...).topk(k, dim=0) transposed. num_threads: as in predict.
        """
        with _torch_threads(num_threads):
            return self._top_candidates(pool_embeddings, target_embeddings, k, chunk_rows, embedding_model)

    def _top_candidates(self, pool_embeddings, target_embeddings, k, chunk_rows, embedding_model):
        if self.kind != "pairwise":
            raise ValueError("top_candidates needs a pairwise network; rank a pointwise predict() with topk")
        pool = self._inference_embeddings(pool_embeddings, embedding_model)
        target = self._inference_embeddings(target_embeddings, embedding_model)
        n, m = pool.shape[0], target.shape[0]
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}] (the pool size), got {k}")
        parameter = self.output.weight
        score = self._pair_scorer(target.to(device=parameter.device, dtype=parameter.dtype))
        block_scores = torch.empty(min(chunk_rows, n), m, dtype=parameter.dtype, device=parameter.device)
        keeper = TopRows(m, k, min(chunk_rows, n), parameter.dtype, parameter.device, n)
        for start in range(0, n, chunk_rows):
            block = pool[start : start + chunk_rows].to(device=parameter.device, dtype=parameter.dtype)
            rows = block.shape[0]
            score(block, block_scores[:rows])
            keeper.add(block_scores[:rows].T, start)
        values, rows = keeper.top(n)
        return values.contiguous(), rows.contiguous()

    # ------------------------------------------------------------------------------------------
    # Evaluation

    @torch.no_grad()
    def evaluate(
        self,
        pool_embeddings: Tensor,
        target_embeddings: Tensor | None,
        labels: Tensor,
        seen_rows: Tensor,
        seen_columns: Tensor | None = None,
        k: int = 10,
    ) -> dict:
        """
        Quadrant errors against the full oracle matrix labels [n, m] (oracle units); for a pointwise network
        target_embeddings is None, labels is [n] and seen_columns is ignored.

        seen_rows / seen_columns: LongTensor indices of the training block. Q1 = seen rows x seen columns,
        Q2 = seen rows x unseen columns, Q3 = unseen rows x seen columns, Q4 = unseen x unseen; quadrants
        with no pairs are left out. Per quadrant, on labels min-max normalised with the network's stored
        statistics: "mse", "spearman" (flattened quadrant; a seeded sample of SPEARMAN_MAX_PAIRS beyond
        that), "column_spearman" (column_spearman: each target's ranking of the rows), "topk_overlap" (mean over columns of the fraction of the true top-k rows of the quadrant
        found in the predicted top-k), the same three for "mean_baseline_*" (the training block's mean
        label: no ranking, so Spearman is NaN and the overlap its expected value under random tie-breaks,
        k / rows) and "random_baseline_*" (seeded uniform [0, 1]), plus "rows" and "columns".
        Returns {"k": k, "Q1": {...}, ...}; the result is also kept as the network's metrics.
        """
        label_min, label_scale = self._require_fitted()
        if self.kind == "pairwise" and seen_columns is None:
            raise ValueError("evaluating a pairwise network needs seen_columns (the training block's target columns)")
        predictions = self.predict(pool_embeddings, target_embeddings).cpu().double()
        labels = torch.as_tensor(labels).cpu().double()
        if self.kind == "pointwise":
            # One column that is always "seen": only Q1 and Q3 exist.
            predictions, labels, seen_columns = predictions[:, None], labels.reshape(-1, 1), torch.tensor([0])
        if labels.shape != predictions.shape:
            raise ValueError(f"labels must be the full oracle matrix {list(predictions.shape)}, "
                             f"got {list(labels.shape)}")
        if self.label_normalization == "column":
            # The network predicts per-target standard units: compare with each column's standardised labels.
            labels = standardize_columns(labels)
        seen_rows, seen_columns = torch.as_tensor(seen_rows).long(), torch.as_tensor(seen_columns).long()
        unseen_rows = complement(seen_rows, labels.shape[0])
        unseen_columns = complement(seen_columns, labels.shape[1])
        # The unseen pairs (Q4; Q3 for a pointwise network), in the labels' own units.
        plotted = unseen_columns if self.kind == "pairwise" else seen_columns
        self.evaluation_pairs = None if len(unseen_rows) == 0 or len(plotted) == 0 else (
            predictions[unseen_rows][:, plotted].flatten().float(), labels[unseen_rows][:, plotted].flatten().float())
        predictions = (predictions - label_min) / label_scale
        labels = (labels - label_min) / label_scale
        training_mean = labels[seen_rows][:, seen_columns].mean().item()
        generator = torch.Generator().manual_seed(self.seed)

        results, metrics = {"k": k}, {"k": k}
        quadrants = {"Q1": (seen_rows, seen_columns), "Q2": (seen_rows, unseen_columns),
                     "Q3": (unseen_rows, seen_columns), "Q4": (unseen_rows, unseen_columns)}
        for name, (rows, columns) in quadrants.items():
            if len(rows) == 0 or len(columns) == 0:
                continue
            true = labels[rows][:, columns]
            predicted = predictions[rows][:, columns]
            random = torch.rand(true.shape, generator=generator, dtype=torch.float64)
            results[name] = {
                "rows": len(rows), "columns": len(columns),
                "mse": (predicted - true).square().mean().item(),
                "spearman": spearman(predicted, true, generator),
                "column_spearman": column_spearman(predicted, true),
                "topk_overlap": topk_overlap(predicted, true, k),
                "mean_baseline_mse": (true - training_mean).square().mean().item(),
                "mean_baseline_spearman": math.nan,
                "mean_baseline_topk_overlap": min(k, len(rows)) / len(rows),
                "random_baseline_mse": (random - true).square().mean().item(),
                "random_baseline_spearman": spearman(random, true, generator),
                "random_baseline_topk_overlap": topk_overlap(random, true, k),
            }
            # config.json must stay strict JSON (the Hub parses it): an undefined correlation is stored as null.
            metrics[name] = {key: None if isinstance(value, float) and math.isnan(value) else value
                             for key, value in results[name].items()}
        self.metrics = metrics
        return results

    # ------------------------------------------------------------------------------------------
    # Hub: the config is always the network's own, weights are safetensors only, loading is strict

    def save_pretrained(self, save_directory, **kwargs):
        """PyTorchModelHubMixin.save_pretrained, always with this network's current config (label range, metrics)
        and its real model card (README.md: oracle, encoder, measured quadrants), not the mixin's placeholder;
        after `evaluate`, with the predicted-vs-true plot of the unseen pairs beside it (PLOT_FILE)."""
        from ..artifacts.hub import PLOT_FILE, plot_predicted_vs_true  # hub imports this module

        kwargs["config"] = self.config
        card_kwargs = dict(kwargs.get("model_card_kwargs") or {})
        # The repo a folder becomes when pushed is named after it (the mixin's own default).
        card_kwargs.setdefault("repo_id", kwargs.get("repo_id") or os.path.basename(os.path.normpath(save_directory)))
        if card_kwargs.get("plot_file") is None and self.evaluation_pairs is not None:
            os.makedirs(save_directory, exist_ok=True)
            card_kwargs["plot_file"] = plot_predicted_vs_true(
                *self.evaluation_pairs, os.path.join(save_directory, PLOT_FILE)).name
        kwargs["model_card_kwargs"] = card_kwargs
        return super().save_pretrained(save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict | None = None, **kwargs) -> str:
        """PyTorchModelHubMixin.push_to_hub, the card's usage snippet and model-index naming `repo_id`; pass
        `model_card_kwargs={"license": ...}` for the licence (it follows the oracle's data and models)."""
        return super().push_to_hub(repo_id, model_card_kwargs={"repo_id": repo_id, **(model_card_kwargs or {})},
                                   **kwargs)

    def generate_model_card(self, repo_id: str | None = None, training: dict | None = None,
                            plot_file: str | None = None, license: str | None = None,
                            training_data: str | None = None, **_) -> ModelCard:
        """The card save_pretrained / push_to_hub write (`hub.influence_network_card`): the quadrant figures come
        from the network's metrics, the training block's size from its Q1 (when evaluated). Pass these through
        `save_pretrained(..., model_card_kwargs={"license": "apache-2.0", "training_data": "..."})`:
        training_data is Markdown saying which rows and targets the block came from and their licences."""
        from ..artifacts.hub import influence_network_card  # hub renders cards for tables too; imported where used

        metrics = self.metrics or {}
        block = metrics.get("Q1") or {}
        training = training or {"block_rows": block.get("rows"), "block_columns": block.get("columns")}
        return influence_network_card(self, repo_id or "influence-network", training, metrics or None, plot_file,
                                      license, training_data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "InfluenceNetwork":
        """The mixin's loader, with a missing local folder named as a folder (not judged as a Hub repo id) and an
        unreadable config.json named as the file it is."""
        name = str(pretrained_model_name_or_path)
        if looks_like_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
            raise FileNotFoundError(f"InfluenceNetwork folder {name!r} does not exist (a local path, not a Hub id).")
        try:
            return super().from_pretrained(os.path.expanduser(name) if os.path.isdir(os.path.expanduser(name))
                                           else name, **kwargs)
        except UnicodeDecodeError as error:
            raise ValueError(f"{name}: {constants.CONFIG_NAME} is not UTF-8 JSON ({error})") from error
        except json.JSONDecodeError as error:
            raise ValueError(f"{name}: {constants.CONFIG_NAME} is not valid JSON ({error})") from error

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir,
        force_download: bool,
        local_files_only: bool,
        token,
        map_location: str = "cpu",
        config: dict | None = None,
        **model_kwargs,
    ):
        # `config` is what ModelHubMixin.from_pretrained read from config.json; it only warns when that
        # file is missing, which would build a network with default shapes.
        if config is None:
            raise FileNotFoundError(f"{model_id} has no {constants.CONFIG_NAME}: an InfluenceNetwork cannot be "
                                    f"rebuilt without its config (kind, embedding_dim, hidden_sizes, label range)")
        missing_weights = (f"{model_id} has no {constants.SAFETENSORS_SINGLE_FILE}: InfluenceNetwork loads "
                           f"safetensors weights only and never unpickles {constants.PYTORCH_WEIGHTS_NAME}")
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, constants.SAFETENSORS_SINGLE_FILE)
            if not os.path.isfile(weights):
                raise FileNotFoundError(missing_weights)
        else:
            try:
                weights = hf_hub_download(
                    repo_id=model_id, filename=constants.SAFETENSORS_SINGLE_FILE, revision=revision,
                    cache_dir=cache_dir, force_download=force_download, token=token,
                    local_files_only=local_files_only,
                )
            except RemoteEntryNotFoundError as error:
                raise FileNotFoundError(missing_weights) from error
        network = cls(**model_kwargs)
        # strict: a missing or unexpected tensor is an error (the mixin's default, strict=False, would
        # silently keep random weights for a missing layer).
        try:
            safetensors.torch.load_model(network, weights, strict=True, device=map_location)
        except safetensors.SafetensorError as error:
            raise ValueError(f"{model_id}: {weights} is not a readable safetensors file ({error})") from error
        except RuntimeError as error:  # torch's several-line state-dict report, said in one line with the config
            details = "; ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip())
            shape = {key: model_kwargs.get(key) for key in ("kind", "embedding_dim", "hidden_sizes", "interaction_rank")}
            raise NetworkMismatchError(
                f"{model_id}: the weights in {constants.SAFETENSORS_SINGLE_FILE} do not fit the network its "
                f"{constants.CONFIG_NAME} describes ({shape}): {details}. The config was edited, or belongs to "
                f"another network.") from None
        for name, tensor in network.state_dict().items():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{model_id}: weight {name!r} in {constants.SAFETENSORS_SINGLE_FILE} holds NaN or "
                                 f"inf values; the network would predict NaN for every pair (refit or re-upload it).")
        return network
