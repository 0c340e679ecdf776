"""
The pure-math core of Influence Distillation (ALGORITHMS.md sections 1.1, 1.2, 1.4).

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


def rbf_kernel(a: Tensor, b: Tensor, sigma: float) -> Tensor:
    """exp(-||a_i - b_j||^2 / (2 sigma^2)) for a: [p, e], b: [q, e]. Returns [p, q]."""
    # The expanded |a|^2 + |b|^2 - 2 a.b can round to a small negative number for near-equal rows.
    squared = (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2.0 * (a @ b.T)).clamp_min_(0.0)
    return torch.exp(squared / (-2.0 * sigma * sigma))


class LandmarkRegressor:
    """
    Kernel ridge regression from landmark embeddings to landmark scores:

        alpha = (K_LL + ridge * mean(diag K_LL) * I)^-1 P_L      [k, m], solved once for all targets
        P_hat = K(E_S, E_L) alpha                                 [n, m], streamed over the pool

    kernel="rbf" uses rbf_kernel with sigma = median_bandwidth(E_L) unless given; kernel="linear"
    uses K(x, y) = x.y, i.e. P_hat = E_S E_L^T (E_L E_L^T + ridge * mean(diag) I)^-1 P_L.
    ridge=0 is allowed (exact interpolation of the landmarks) when K_LL is non-singular.
    """

    def fit(self, landmark_embeddings: Tensor, landmark_scores: Tensor, kernel: str = "rbf", ridge: float = 0.01,
            sigma: float | None = None, seed: int = 0) -> "LandmarkRegressor":
        """landmark_embeddings: [k, e], landmark_scores: [k] or [k, m]. Returns self."""
        if kernel not in ("rbf", "linear"):
            raise ValueError(f"kernel must be 'rbf' or 'linear', got {kernel!r}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if landmark_embeddings.shape[0] != landmark_scores.shape[0]:
            raise ValueError(
                f"{landmark_embeddings.shape[0]} landmark embeddings but {landmark_scores.shape[0]} score rows")
        self.kernel = kernel
        self.scores_dtype = landmark_scores.dtype
        self.squeeze = landmark_scores.dim() == 1
        self.landmarks = landmark_embeddings.double()
        if kernel == "rbf":
            self.sigma = median_bandwidth(self.landmarks, seed=seed) if sigma is None else float(sigma)
        gram = self._kernel(self.landmarks)
        # Scaling the ridge by the mean diagonal makes it unit-free (the linear kernel's scale is arbitrary).
        gram.diagonal().add_(ridge * gram.diagonal().mean())
        targets = landmark_scores.double().reshape(landmark_scores.shape[0], -1)
        self.gram = gram
        self.alpha = torch.linalg.solve(gram, targets)
        return self

    def transfer_matrix(self, pool_embeddings: Tensor, chunk_rows: int = 65536) -> Tensor:
        """
        C [n, k] (float64) with P_hat = C P_L: C = K(E_S, E_L) (K_LL + ridge I)^-1. It is the landmark
        factor of the second-order term, Q ~ C Q_L C^T (ALGORITHMS.md 1.2).
        """
        inverse = torch.linalg.inv(self.gram)
        parts = []
        for start in range(0, pool_embeddings.shape[0], chunk_rows):
            chunk = pool_embeddings[start : start + chunk_rows].to(device=self.gram.device, dtype=torch.float64)
            parts.append(self._kernel(chunk) @ inverse)
        return torch.cat(parts)

    def _kernel(self, embeddings: Tensor) -> Tensor:
        if self.kernel == "rbf":
            return rbf_kernel(embeddings, self.landmarks, self.sigma)
        return embeddings @ self.landmarks.T

    def iter_predict(self, pool_embeddings: Tensor, chunk_rows: int = 65536):
        """Yield (start, scores [rows, m]) for consecutive chunks of pool_embeddings [n, e]."""
        for start in range(0, pool_embeddings.shape[0], chunk_rows):
            chunk = pool_embeddings[start : start + chunk_rows].to(device=self.alpha.device, dtype=torch.float64)
            scores = (self._kernel(chunk) @ self.alpha).to(self.scores_dtype)
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
