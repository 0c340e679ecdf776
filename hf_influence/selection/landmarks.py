"""
Influence scores of gradients and the landmark approximation of Influence Distillation (docs/algorithms.md §1.4).

- first_order_scores: p = G_S G_T^T, the first-order influence of every pool sample on every target.
- Landmarks: exact gradients for k landmark samples only, spread to the whole pool by kernel ridge
  regression on cheap embeddings (median_bandwidth, rbf_kernel, LandmarkRegressor, select_landmarks).

Everything that solves a linear system works in float64.
"""

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------------
# First-order influence


def first_order_scores(pool_gradients: Tensor, target_gradients: Tensor, chunk_rows: int = 65536) -> Tensor:
    """
    Inner products of every pool gradient with every target gradient.

    pool_gradients: [n, d], may live on the CPU (e.g. a memory-mapped store) while
    target_gradients: [m, d] lives on an accelerator; pool rows are moved chunk_rows at a time so
    the accelerator never holds more than chunk_rows x d of the pool.
    Returns [n, m] on target_gradients' device.
    """
    n, m = pool_gradients.shape[0], target_gradients.shape[0]
    dtype = torch.promote_types(pool_gradients.dtype, target_gradients.dtype)
    target = target_gradients.to(dtype)
    scores = torch.empty(n, m, dtype=dtype, device=target.device)
    for start in range(0, n, chunk_rows):
        chunk = pool_gradients[start : start + chunk_rows].to(device=target.device, dtype=dtype)
        scores[start : start + chunk.shape[0]] = chunk @ target.T
    return scores


# ----------------------------------------------------------------------------------------------
# Landmarks and kernel ridge regression


def median_bandwidth(embeddings: Tensor, max_points: int = 1000, seed: int = 0) -> float:
    """
    RBF bandwidth: the median pairwise Euclidean distance of embeddings [k, e], computed on at most
    max_points rows (a seeded subsample, so the same seed gives the same sigma). Falls back to the
    mean distance when over half of the pairs are duplicates (median 0).
    """
    if embeddings.shape[0] < 2:
        raise ValueError(f"median_bandwidth needs at least 2 embeddings, got {embeddings.shape[0]}")
    points = embeddings
    if points.shape[0] > max_points:
        generator = torch.Generator().manual_seed(seed)
        points = points[torch.randperm(points.shape[0], generator=generator)[:max_points].to(points.device)]
    distances = torch.pdist(points.double())
    sigma = distances.median().item()
    if sigma == 0.0:
        sigma = distances.mean().item()
    if sigma == 0.0:
        raise ValueError("median_bandwidth: all embeddings are identical, the RBF bandwidth is undefined")
    return sigma



def concatenate_scaled(parts: list[Tensor], seed: int = 0) -> Tensor:
    """[n, e_1 + ... + e_p]: the parts [n, e_j] side by side, each divided by its median pairwise distance
    (`median_bandwidth` with `seed`), so that each part weighs the same in an RBF distance whatever its units
    (JVP embeddings and unit-norm hidden states differ in scale by orders of magnitude)."""
    return torch.cat([part / median_bandwidth(part, seed=seed) for part in parts], dim=1)

def rbf_kernel(a: Tensor, b: Tensor, sigma: float) -> Tensor:
    """exp(-||a_i - b_j||^2 / (2 sigma^2)) for a: [p, e], b: [q, e]. Returns [p, q]."""
    # The expanded |a|^2 + |b|^2 - 2 a.b can round to a small negative number for near-equal rows.
    squared = (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2.0 * (a @ b.T)).clamp_min_(0.0)
    return torch.exp(squared / (-2.0 * sigma * sigma))


# Closed-form leave-one-out picks the RBF bandwidth (a multiple of the median pairwise landmark distance) and the
# ridge (relative to the mean kernel diagonal) from these grids. The grids span the regimes seen on real
# embeddings: a nearly constant kernel (large bandwidth), near-interpolation (small ridge) and heavy shrinkage.
BANDWIDTH_GRID = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# The grid search runs on at most this many landmarks (a seeded subsample): one eigendecomposition per
# bandwidth costs O(k^3), 2048^3 is a few seconds on a CPU; the final fit uses every landmark.
TUNING_MAX_LANDMARKS = 2048


def _loo_error(eigenvalues: Tensor, eigenvectors: Tensor, centred: Tensor, ridge: float) -> float:
    """Leave-one-out error of kernel ridge regression with K = U diag(eigenvalues) U^T and K + ridge I, for the
    centred targets [k, m]: the mean over columns of sum(residual^2) / sum(target^2) (1 - LOO R^2)."""
    inverse_values = 1.0 / (eigenvalues + ridge)
    diagonal = (eigenvectors.square() * inverse_values).sum(1)  # diag((K + ridge I)^-1)
    alpha = eigenvectors @ (inverse_values[:, None] * (eigenvectors.T @ centred))
    return _relative_error(alpha / diagonal[:, None], centred)  # alpha_i / M^-1_ii = y_i - LOO prediction


def _relative_error(residuals: Tensor, centred: Tensor) -> float:
    """1 - R^2 per column (sum of squared residuals over the centred targets' sum of squares), averaged."""
    scale = centred.square().sum(0).clamp_min(torch.finfo(torch.float64).tiny)
    return (residuals.square().sum(0) / scale).mean().item()


class LandmarkRegressor:
    """
    Kernel ridge regression from landmark embeddings to landmark scores, with an intercept:

        alpha = (K_LL + ridge * mean(diag K_LL) * I)^-1 (P_L - offset)     [k, m], solved once for all targets
        P_hat = K(E_S, E_L) alpha + offset                                   [n, m], streamed over the pool

    offset [m] is the landmark mean of each column: far from every landmark a prediction falls back to the
    mean, not to 0. For the RBF kernel, embeddings are centred on the landmark mean first (the kernel does not
    change; float32 distances in the streamed kernel lose less to cancellation).

    kernel="rbf": exp(-|x - l|^2 / (2 sigma^2)) with sigma = bandwidth * median pairwise landmark distance;
    kernel="linear": x.l. ridge / bandwidth = None (the default) choose them by closed-form leave-one-out
    (LOO) over RIDGE_GRID / BANDWIDTH_GRID: the pair with the smallest LOO error (1 - R^2 averaged over the
    score columns). ridge=0 is allowed (exact interpolation) when K_LL is non-singular.

    After fit: `loo` [k, m] (or [k]) are the landmarks' leave-one-out predictions, each made from the other
    landmarks only (the intercept is the all-landmark mean, an O(1/k) approximation): the scores that put a
    landmark on the same footing as a pool row the regression never saw. `loo_error` is their error.
    """

    def fit(self, landmark_embeddings: Tensor, landmark_scores: Tensor, kernel: str = "rbf",
            ridge: float | None = None, bandwidth: float | None = None, seed: int = 0) -> "LandmarkRegressor":
        """landmark_embeddings: [k, e], landmark_scores: [k] or [k, m]. Returns self."""
        if kernel not in ("rbf", "linear"):
            raise ValueError(f"kernel must be 'rbf' or 'linear', got {kernel!r}")
        if ridge is not None and ridge < 0:
            raise ValueError(f"ridge must be >= 0 (or None: chosen by leave-one-out), got {ridge}")
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0 (a multiple of the median distance, or None), got {bandwidth}")
        if landmark_embeddings.shape[0] != landmark_scores.shape[0]:
            raise ValueError(
                f"{landmark_embeddings.shape[0]} landmark embeddings but {landmark_scores.shape[0]} score rows")
        if landmark_embeddings.shape[0] < 2:
            raise ValueError(f"kernel ridge regression needs at least 2 landmarks, got {landmark_embeddings.shape[0]}")
        self.kernel = kernel
        self.scores_dtype = landmark_scores.dtype
        self.squeeze = landmark_scores.dim() == 1
        embeddings = landmark_embeddings.double()
        # The linear kernel is not centred: centring would make K_LL singular (rank k - 1) and it has no
        # distance to lose to cancellation.
        self.center = embeddings.mean(0) if kernel == "rbf" else torch.zeros_like(embeddings[0])
        self.landmarks = embeddings - self.center
        targets = landmark_scores.double().reshape(landmark_scores.shape[0], -1)
        self.offset = targets.mean(0)
        centred = targets - self.offset
        median = median_bandwidth(self.landmarks, seed=seed) if kernel == "rbf" else None
        self.ridge, self.bandwidth = self._tune(centred, median, ridge, bandwidth, seed)
        if kernel == "rbf":
            self.sigma = self.bandwidth * median
        gram = self._kernel(self.landmarks)
        # Scaling the ridge by the mean diagonal makes it unit-free (the linear kernel's scale is arbitrary).
        gram.diagonal().add_(self.ridge * gram.diagonal().mean())
        self.gram = gram
        self.inverse = torch.linalg.inv(gram)
        self.alpha = self.inverse @ centred
        residuals = self.alpha / self.inverse.diagonal()[:, None]
        self.loo_error = _relative_error(residuals, centred)
        loo = targets - residuals
        self.loo = (loo.squeeze(1) if self.squeeze else loo).to(self.scores_dtype)
        return self

    def _tune(self, centred: Tensor, median: float | None, ridge: float | None, bandwidth: float | None,
              seed: int) -> tuple[float, float | None]:
        """(ridge, bandwidth): the given values, or the LOO-best grid values for those left None."""
        bandwidths = [None] if self.kernel == "linear" else [bandwidth] if bandwidth is not None else BANDWIDTH_GRID
        ridges = [ridge] if ridge is not None else RIDGE_GRID
        if len(bandwidths) * len(ridges) == 1:
            return ridges[0], bandwidths[0]
        rows = torch.arange(self.landmarks.shape[0])
        if len(rows) > TUNING_MAX_LANDMARKS:
            rows = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:TUNING_MAX_LANDMARKS]
        points, values = self.landmarks[rows], centred[rows] - centred[rows].mean(0)
        best = (float("inf"), ridges[0], bandwidths[0])
        for candidate in bandwidths:
            if self.kernel == "rbf":
                self.sigma = candidate * median
            gram = self._kernel(points, points)
            scale = gram.diagonal().mean().item()
            eigenvalues, eigenvectors = torch.linalg.eigh(gram)
            for relative in ridges:
                error = _loo_error(eigenvalues.clamp_min(0.0), eigenvectors, values, relative * scale)
                if error < best[0]:  # a NaN (ridge 0 on a singular kernel) is never below
                    best = (error, relative, candidate)
        return best[1], best[2]

    def transfer_matrix(self, pool_embeddings: Tensor, chunk_rows: int = 65536) -> Tensor:
        """
        C [n, k] (float64) with P_hat = C P_L, the intercept included: with A = K(E_S, E_L) (K_LL + ridge I)^-1,
        C = A + (1 - A 1) 1^T / k. It is the landmark factor of the second-order term, Q ~ C Q_L C^T
        (docs/algorithms.md §1.2).
        """
        k = self.landmarks.shape[0]
        parts = []
        for start in range(0, pool_embeddings.shape[0], chunk_rows):
            chunk = pool_embeddings[start : start + chunk_rows].to(device=self.gram.device, dtype=torch.float64)
            weights = self._kernel(chunk - self.center) @ self.inverse
            parts.append(weights + (1.0 - weights.sum(1, keepdim=True)) / k)
        return torch.cat(parts)

    def loo_transfer_matrix(self) -> Tensor:
        """[k, k] (float64): loo = L P_L, the leave-one-out predictions as a linear map of the landmark scores,
        L = I - D^-1 M^-1 (I - 1 1^T / k), with M = K_LL + ridge I and D = diag(M^-1)."""
        k = self.landmarks.shape[0]
        centring = torch.eye(k, dtype=torch.float64) - 1.0 / k
        return torch.eye(k, dtype=torch.float64) - (self.inverse / self.inverse.diagonal()[:, None]) @ centring

    def _kernel(self, embeddings: Tensor, landmarks: Tensor | None = None) -> Tensor:
        """Kernel between centred embeddings [p, e] and the (centred) landmarks: [p, k]."""
        landmarks = self.landmarks if landmarks is None else landmarks
        if self.kernel == "rbf":
            return rbf_kernel(embeddings, landmarks, self.sigma)
        return embeddings @ landmarks.T

    def iter_predict(self, pool_embeddings: Tensor, chunk_rows: int = 65536):
        """Yield (start, scores [rows, m]) for consecutive chunks of pool_embeddings [n, e]."""
        for start in range(0, pool_embeddings.shape[0], chunk_rows):
            chunk = pool_embeddings[start : start + chunk_rows].to(device=self.alpha.device, dtype=torch.float64)
            scores = (self._kernel(chunk - self.center) @ self.alpha + self.offset).to(self.scores_dtype)
            yield start, scores.squeeze(1) if self.squeeze else scores

    def predict(self, pool_embeddings: Tensor, chunk_rows: int = 65536) -> Tensor:
        """Predicted scores for pool_embeddings [n, e]: [n, m] (or [n] if fitted on [k] scores)."""
        return torch.cat([scores for _, scores in self.iter_predict(pool_embeddings, chunk_rows)])


def select_landmarks(num_rows: int, k: int, method: str = "uniform", embeddings: Tensor | None = None,
                     seed: int = 0) -> Tensor:
    """
    Choose k distinct landmark rows out of num_rows. Returns sorted LongTensor [k].

    method="uniform": a seeded uniform sample. method="kmeans++": k-means++ seeding (D^2 sampling)
    on embeddings [num_rows, e], which spreads landmarks over the embedding space.
    """
    if not 1 <= k <= num_rows:
        raise ValueError(f"cannot select k={k} landmarks from num_rows={num_rows} rows (need 1 <= k <= num_rows)")
    generator = torch.Generator().manual_seed(seed)
    if method == "uniform":
        return torch.randperm(num_rows, generator=generator)[:k].sort().values
    if method != "kmeans++":
        raise ValueError(f"method must be 'uniform' or 'kmeans++', got {method!r}")
    if embeddings is None or embeddings.shape[0] != num_rows:
        raise ValueError(f"kmeans++ needs embeddings with num_rows={num_rows} rows")
    # Stay on the embeddings' device and dtype (at least float32): at pool scale a float64 copy of
    # [n, e] would not fit, and the expanded distance avoids an [n, e] temporary per step.
    points = embeddings.detach().to(torch.promote_types(embeddings.dtype, torch.float32))
    norms = points.square().sum(1)

    def squared_distances(index: int) -> Tensor:
        return (norms + norms[index] - 2.0 * (points @ points[index])).clamp_min_(0.0)

    chosen = [int(torch.randint(num_rows, (1,), generator=generator))]
    nearest = squared_distances(chosen[0])
    for _ in range(k - 1):
        # Rounding can leave a chosen row a tiny positive distance: zero them so none is drawn twice.
        nearest[chosen[-1]] = 0.0
        weights = nearest.double().cpu()
        if weights.sum() == 0:  # every remaining row duplicates a chosen one: any unchosen row will do
            weights = torch.ones(num_rows, dtype=torch.float64).index_fill_(0, torch.tensor(chosen), 0.0)
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        nearest = torch.minimum(nearest, squared_distances(index))
    return torch.tensor(chosen, dtype=torch.long).sort().values
