"""
Robust per-row weights of Influence Distillation (docs/algorithms.md §1.2): minimise
-p^T w + (eta/2) w^T Q w + lam ||w||^2 subject to w >= 0, sum(w) = n, in closed form (first order) or with
SLSQP / projected gradient (second order, dense or landmark-factored Q ~ C Q_L C^T that never forms n x n).

Everything that solves an optimisation problem works in float64.
"""

import warnings

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from ..verbosity import get_logger

logger = get_logger(__name__)

# When lam is raised to make the objective convex, it is raised this much (relative) past the
# PSD boundary, so the problem is strongly convex and the solvers converge linearly.
CONVEXITY_MARGIN = 0.01
# "auto" uses SLSQP (the paper's solver) only for small problems: it slows down ~n^3 (measured on CPU,
# factored Q with k=16: 0.26 s at n=200, 4.5 s at n=500, 190 s at n=2000), while projected gradient
# reaches a smaller KKT residual in 0.02-0.13 s at those sizes.
SLSQP_MAX_ROWS = 200

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
