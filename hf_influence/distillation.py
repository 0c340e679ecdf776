"""
The pure-math core of Influence Distillation (docs/algorithms.md §1.1, §1.2, §1.4).

- first_order_scores: p = G_S G_T^T, the first-order influence of every pool sample on every target.
- Landmarks: exact gradients for k landmark samples only, spread to the whole pool by kernel ridge
  regression on cheap embeddings (median_bandwidth, rbf_kernel, LandmarkRegressor, select_landmarks).
- Robust weights: minimise -p^T w + (eta/2) w^T Q w + lam ||w||^2 subject to w >= 0, sum(w) = n,
  in closed form (first order) or with SLSQP / projected gradient (second order, dense or
  landmark-factored Q ~ C Q_L C^T that never forms n x n).

Everything that solves a linear system or an optimisation problem works in float64.
"""

import logging
import warnings

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# When lam is raised to make the objective convex, it is raised this much (relative) past the
# PSD boundary, so the problem is strongly convex and the solvers converge linearly.
CONVEXITY_MARGIN = 0.01
# "auto" uses SLSQP (the paper's solver) only for small problems: it slows down ~n^3 (measured on CPU,
# factored Q with k=16: 0.26 s at n=200, 4.5 s at n=500, 190 s at n=2000), while projected gradient
# reaches a smaller KKT residual in 0.02-0.13 s at those sizes.
SLSQP_MAX_ROWS = 200

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


# ----------------------------------------------------------------------------------------------
# Robust weights


def project_to_simplex(v: Tensor, total: float) -> Tensor:
    """Euclidean projection of v [n] onto {w >= 0, sum(w) = total}: w = max(0, v - tau), exact (sort-based)."""
    u = v.sort(descending=True).values
    cumulative = u.cumsum(0) - total
    ranks = torch.arange(1, v.shape[0] + 1, dtype=v.dtype, device=v.device)
    # The support is the largest prefix of the sorted values that stays above its own threshold.
    support = int((u - cumulative / ranks > 0).nonzero().max()) + 1
    tau = cumulative[support - 1] / support
    return (v - tau).clamp_min(0.0)


def robust_weights_first_order(p: Tensor, lam: float) -> Tensor:
    """
    argmin -p^T w + lam ||w||^2 s.t. w >= 0, sum(w) = n, for p [n]. Returns float64 [n].

    Stationarity gives w_i = max(0, (p_i - tau) / (2 lam)), which is the projection of p / (2 lam)
    onto the scaled simplex; the support is the top of p, so top-k by weight == top-k by p.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    p = p.double().reshape(-1)
    return project_to_simplex(p / (2.0 * lam), float(p.shape[0]))


def _quadratic(Q: Tensor | None, Q_factors: tuple[Tensor, Tensor] | None, n: int):
    """Return (matvec w -> Q w, lambda_min(Q), lambda_max(Q)) for a dense or factored Q, in float64."""
    if (Q is None) == (Q_factors is None):
        raise ValueError("give exactly one of Q (dense [n, n]) or Q_factors (C [n, k], Q_L [k, k])")
    if Q is not None:
        Q = Q.double()
        if Q.shape != (n, n):
            raise ValueError(f"Q must be [{n}, {n}], got {list(Q.shape)}")
        Q = (Q + Q.T) / 2  # only the symmetric part enters w^T Q w
        eigenvalues = torch.linalg.eigvalsh(Q)
        return (lambda w: Q @ w), eigenvalues[0].item(), eigenvalues[-1].item()
    C, Q_L = (factor.double() for factor in Q_factors)
    if C.shape[0] != n or Q_L.shape != (C.shape[1], C.shape[1]):
        raise ValueError(f"Q_factors must be C [{n}, k] and Q_L [k, k], got {list(C.shape)} and {list(Q_L.shape)}")
    Q_L = (Q_L + Q_L.T) / 2
    # The non-zero eigenvalues of C Q_L C^T are those of G^1/2 Q_L G^1/2 with G = C^T C (k x k), so the
    # spectrum costs O(n k^2 + k^3). Q may also have zero eigenvalues; the callers only use
    # min(lambda_min, 0) and max(lambda_max, 0), which those cannot change.
    values, vectors = torch.linalg.eigh(C.T @ C)
    root = vectors * values.clamp_min(0.0).sqrt() @ vectors.T
    eigenvalues = torch.linalg.eigvalsh(root @ Q_L @ root)
    return (lambda w: C @ (Q_L @ (C.T @ w))), eigenvalues[0].item(), eigenvalues[-1].item()


def _convex_lam(lam: float, eta: float, lambda_min: float) -> float:
    """The objective's Hessian is eta Q + 2 lam I: raise lam if that is not PSD, with a warning."""
    needed = -eta * lambda_min / 2.0
    if lam >= needed:
        return lam
    raised = needed * (1.0 + CONVEXITY_MARGIN)
    message = (f"robust_weights: Q + (2 lam / eta) I is not PSD (lambda_min(Q) = {lambda_min:.4g}); "
               f"raising lam from {lam:.4g} to {raised:.4g}")
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return raised


def robust_weights(p: Tensor, lam: float, eta: float = 0.0, Q: Tensor | None = None,
                   Q_factors: tuple[Tensor, Tensor] | None = None, method: str = "auto",
                   max_iter: int = 20000, tol: float = 1e-10) -> Tensor:
    """
    argmin -p^T w + (eta/2) w^T Q w + lam ||w||^2 s.t. w >= 0, sum(w) = n. Returns float64 [n].

    p: [n]. The second-order term is a dense Q [n, n] or landmark factors Q_factors = (C [n, k],
    Q_L [k, k]) with Q ~ C Q_L C^T (never formed). eta == 0 or no Q: the first-order closed form.
    lam is raised (with a warning) if needed to make the problem convex.
    method: "slsqp" (SciPy, for small n), "projected_gradient" (FISTA with restarts, exact
    projection onto the scaled simplex), or "auto" (SLSQP for n <= SLSQP_MAX_ROWS).
    tol: SLSQP's ftol, or projected gradient's bound on the largest change of a weight in one step.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if method not in ("auto", "slsqp", "projected_gradient"):
        raise ValueError(f"method must be 'auto', 'slsqp' or 'projected_gradient', got {method!r}")
    if eta == 0 or (Q is None and Q_factors is None):
        return robust_weights_first_order(p, lam)
    p = p.double().reshape(-1)
    n = p.shape[0]
    use_slsqp = method == "slsqp" or (method == "auto" and n <= SLSQP_MAX_ROWS)
    if use_slsqp:  # SciPy works on CPU numpy arrays; at SLSQP sizes moving Q there is cheap
        p = p.cpu()
        Q = None if Q is None else Q.cpu()
        Q_factors = None if Q_factors is None else tuple(factor.cpu() for factor in Q_factors)
    matvec, lambda_min, lambda_max = _quadratic(Q, Q_factors, n)
    lam = _convex_lam(lam, eta, lambda_min)

    def gradient(w: Tensor) -> Tensor:
        return -p + eta * matvec(w) + 2.0 * lam * w

    w = robust_weights_first_order(p, lam)  # a feasible start, the optimum when eta Q is negligible
    if use_slsqp:
        def objective(x: np.ndarray):
            w = torch.from_numpy(x)
            Qw = matvec(w)
            value = -p @ w + 0.5 * eta * (w @ Qw) + lam * (w @ w)
            return value.item(), (-p + eta * Qw + 2.0 * lam * w).numpy()

        result = scipy.optimize.minimize(
            objective, w.numpy(), jac=True, method="SLSQP", bounds=[(0.0, None)] * n,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - n, "jac": lambda x: np.ones_like(x)}],
            options={"maxiter": max_iter, "ftol": tol},
        )
        if not result.success:
            logger.warning("robust_weights: SLSQP did not converge: %s", result.message)
        # SLSQP meets the bounds and the equality only to rounding; make the output exactly feasible.
        return project_to_simplex(torch.from_numpy(result.x), float(n))

    # Projected gradient with Nesterov momentum (FISTA) and adaptive restart (O'Donoghue & Candes),
    # which recovers linear convergence on this strongly convex problem. Step 1/L, L = Hessian's top eigenvalue.
    step = 1.0 / (eta * max(lambda_max, 0.0) + 2.0 * lam)
    y, t = w, 1.0
    for _ in range(max_iter):
        w_next = project_to_simplex(y - step * gradient(y), float(n))
        if (w_next - w).abs().max() <= tol:
            return w_next
        if (y - w_next) @ (w_next - w) > 0:  # momentum points uphill: restart it
            t = 1.0
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = w_next + ((t - 1.0) / t_next) * (w_next - w)
        w, t = w_next, t_next
    logger.warning("robust_weights: projected gradient stopped at max_iter=%d before reaching tol=%g", max_iter, tol)
    return w


def kkt_residual(w: Tensor, p: Tensor, lam: float, eta: float = 0.0, Q: Tensor | None = None,
                 Q_factors: tuple[Tensor, Tensor] | None = None, support_tol: float = 1e-7) -> float:
    """
    Largest violation of the KKT conditions of the robust-weights problem at w [n] (0 at the optimum).

    With g = -p + eta Q w + 2 lam w and the sum multiplier nu = -mean(g over the support w > support_tol):
    stationarity |g_i + nu| on the support, dual feasibility max(0, -(g_i + nu)) off it, and primal
    feasibility |sum(w) - n| / n and max(0, -w_i).
    """
    w, p = w.double().reshape(-1), p.double().reshape(-1)
    n = p.shape[0]
    g = -p + 2.0 * lam * w
    if eta != 0 and (Q is not None or Q_factors is not None):
        g = g + eta * _quadratic(Q, Q_factors, n)[0](w)
    support = w > support_tol
    if not support.any():
        return float("inf")
    reduced = g - g[support].mean()
    return max(
        reduced[support].abs().max().item(),
        (-reduced[~support]).clamp_min(0.0).max().item() if (~support).any() else 0.0,
        abs(w.sum().item() - n) / n,
        (-w).clamp_min(0.0).max().item(),
    )
