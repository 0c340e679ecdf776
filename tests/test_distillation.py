"""Tests for hf_influence.selection.landmarks and hf_influence.selection.robust_weighting: first-order scores, landmark regression,
robust weights."""

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch

from hf_influence.selection.landmarks import (
    BANDWIDTH_GRID,
    RIDGE_GRID,
    LandmarkRegressor,
    concatenate_scaled,
    first_order_scores,
    median_bandwidth,
    rbf_kernel,
    select_landmarks,
)
from hf_influence.selection.robust_weighting import kkt_residual, project_to_simplex, robust_weights, robust_weights_first_order


def generator(seed):
    return torch.Generator().manual_seed(seed)


def random_psd(n, seed, rank=None):
    a = torch.randn(n, rank or n, generator=generator(seed), dtype=torch.float64)
    return a @ a.T / (rank or n)


def reference_slsqp(p, lam):
    """An independent SLSQP solve of the first-order problem, with tight tolerances."""
    p = p.double().numpy()
    n = len(p)
    result = scipy.optimize.minimize(
        lambda w: (-p @ w + lam * w @ w, -p + 2 * lam * w), np.full(n, 1.0), jac=True, method="SLSQP",
        bounds=[(0, None)] * n, constraints=[{"type": "eq", "fun": lambda w: w.sum() - n}],
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    assert result.success
    return torch.from_numpy(result.x)


# ---------------------------------------------------------------------------------------------
# first-order scores


def test_first_order_scores_chunked_matches_matmul():
    pool = torch.randn(37, 16, generator=generator(0))
    target = torch.randn(5, 16, generator=generator(1))
    scores = first_order_scores(pool, target, chunk_rows=8)
    assert scores.shape == (37, 5)
    torch.testing.assert_close(scores, pool @ target.T)


# ---------------------------------------------------------------------------------------------
# landmarks


def test_median_bandwidth_deterministic_and_correct():
    points = torch.randn(3000, 6, generator=generator(0))
    assert median_bandwidth(points, max_points=500, seed=3) == median_bandwidth(points, max_points=500, seed=3)
    assert median_bandwidth(points, max_points=500, seed=3) != median_bandwidth(points, max_points=500, seed=4)
    small = points[:50]
    assert median_bandwidth(small) == pytest.approx(torch.pdist(small.double()).median().item())
    with pytest.raises(ValueError):
        median_bandwidth(torch.zeros(5, 3))


def test_rbf_kernel_matches_direct_formula():
    a, b = torch.randn(7, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    direct = torch.exp(-torch.cdist(a, b).square() / (2 * 1.3**2))
    torch.testing.assert_close(rbf_kernel(a, b, 1.3), direct)
    self_kernel = rbf_kernel(a, a, 0.7)
    assert (self_kernel <= 1).all() and torch.allclose(self_kernel.diagonal(), torch.ones(7, dtype=torch.float64))


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_landmarks_equal_to_pool_reproduce_exact_scores(kernel):
    # Linear kernel: E E^T must be non-singular, so use e >= n; scores from gradients as in ID.
    n, e = 40, 64
    embeddings = torch.randn(n, e, generator=generator(0), dtype=torch.float64)
    exact = first_order_scores(torch.randn(n, 30, generator=generator(1)), torch.randn(3, 30, generator=generator(2)))
    regressor = LandmarkRegressor().fit(embeddings, exact, kernel=kernel, ridge=0.0)
    torch.testing.assert_close(regressor.predict(embeddings), exact, atol=1e-5, rtol=1e-5)
    # The default ridge shrinks towards zero, so it no longer interpolates exactly.
    ridged = LandmarkRegressor().fit(embeddings, exact, kernel=kernel).predict(embeddings)
    assert (ridged - exact).abs().max() > 1e-4


def smooth_problem(n=2000, e=3, m=2):
    x = torch.rand(n, e, generator=generator(0), dtype=torch.float64) * 4 - 2
    scores = torch.stack([torch.sin(x[:, 0]) + x[:, 1] ** 2 - x[:, 2], torch.cos(x.sum(1))], 1)[:, :m]
    return x, scores


def test_rbf_landmarks_fraction_rank_correlation():
    x, exact = smooth_problem()
    landmarks = select_landmarks(x.shape[0], 200, seed=0)
    predicted = LandmarkRegressor().fit(x[landmarks], exact[landmarks], kernel="rbf", ridge=0.01).predict(x)
    for column in range(exact.shape[1]):
        assert scipy.stats.spearmanr(predicted[:, column], exact[:, column]).statistic > 0.9


def test_linear_landmarks_recover_linear_scores():
    x = torch.randn(500, 8, generator=generator(0), dtype=torch.float64)
    exact = x @ torch.randn(8, 3, generator=generator(1), dtype=torch.float64)
    landmarks = select_landmarks(500, 50, seed=1)
    predicted = LandmarkRegressor().fit(x[landmarks], exact[landmarks], kernel="linear", ridge=1e-6).predict(x)
    assert scipy.stats.spearmanr(predicted[:, 0], exact[:, 0]).statistic > 0.99


def test_predict_chunked_equals_unchunked_and_keeps_shape():
    x, exact = smooth_problem(n=300)
    regressor = LandmarkRegressor().fit(x[:50], exact[:50])
    full = regressor.predict(x, chunk_rows=1000)
    # The same up to BLAS rounding (shape-dependent); bitwise chunk invariance is predict_scores' job (fixed blocks).
    torch.testing.assert_close(regressor.predict(x, chunk_rows=7), full, rtol=0, atol=1e-12 * full.abs().max().item())
    starts = [start for start, chunk in regressor.iter_predict(x, chunk_rows=128)]
    assert starts == [0, 128, 256]
    assert LandmarkRegressor().fit(x[:50], exact[:50, 0]).predict(x).shape == (300,)
    with pytest.raises(ValueError):
        LandmarkRegressor().fit(x[:50], exact[:50], kernel="cosine")


def _refit_without(x, y, row, sigma, ridge, offset):
    """Brute force: kernel ridge regression (RBF, absolute ridge, fixed intercept) on every landmark but `row`,
    evaluated at `row`."""
    keep = torch.arange(x.shape[0]) != row
    gram = rbf_kernel(x[keep], x[keep], sigma) + ridge * torch.eye(int(keep.sum()), dtype=torch.float64)
    alpha = torch.linalg.solve(gram, y[keep] - offset)
    return rbf_kernel(x[row : row + 1], x[keep], sigma) @ alpha + offset


def test_leave_one_out_predictions_match_refitting_without_the_row():
    x, exact = smooth_problem(n=40)
    regressor = LandmarkRegressor().fit(x, exact, kernel="rbf", ridge=0.05, bandwidth=0.5)
    centred = x - x.mean(0)
    brute = torch.cat([_refit_without(centred, exact, row, regressor.sigma, 0.05, exact.mean(0)) for row in range(40)])
    torch.testing.assert_close(regressor.loo, brute, rtol=1e-8, atol=1e-8)
    # ... and as a linear map of the landmark scores (the second-order term uses it).
    torch.testing.assert_close(regressor.loo_transfer_matrix() @ exact, brute, rtol=1e-8, atol=1e-8)
    assert regressor.loo_error == pytest.approx(
        ((brute - exact).square().sum(0) / (exact - exact.mean(0)).square().sum(0)).mean().item(), rel=1e-8)


def test_bandwidth_and_ridge_are_the_brute_force_leave_one_out_best():
    x, exact = smooth_problem(n=30)
    exact = exact + 0.3 * torch.randn(exact.shape, generator=generator(5), dtype=torch.float64)  # noisy: ridge matters
    regressor = LandmarkRegressor().fit(x, exact, kernel="rbf")
    centred, offset = x - x.mean(0), exact.mean(0)
    median = median_bandwidth(centred)
    errors = {}
    for bandwidth in BANDWIDTH_GRID:
        for ridge in RIDGE_GRID:
            brute = torch.cat([_refit_without(centred, exact, row, bandwidth * median, ridge, offset)
                               for row in range(30)])
            errors[bandwidth, ridge] = ((brute - exact).square().sum(0) / (exact - offset).square().sum(0)).mean().item()
    best = min(errors, key=errors.get)
    assert (regressor.bandwidth, regressor.ridge) == best
    assert regressor.sigma == pytest.approx(best[0] * median)
    assert regressor.loo_error == pytest.approx(errors[best], rel=1e-6)
    # Given values are kept as they are; the linear kernel has no bandwidth.
    fixed = LandmarkRegressor().fit(x, exact, kernel="rbf", ridge=0.2, bandwidth=3.0)
    assert (fixed.ridge, fixed.bandwidth) == (0.2, 3.0)
    assert LandmarkRegressor().fit(x, exact, kernel="linear").bandwidth is None
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        LandmarkRegressor().fit(x, exact, bandwidth=0.0)


def test_far_rows_fall_back_to_the_landmark_mean():
    x, exact = smooth_problem(n=50)
    regressor = LandmarkRegressor().fit(x, exact, kernel="rbf", ridge=0.01, bandwidth=1.0)
    far = regressor.predict(x[:3] + 1e3)
    torch.testing.assert_close(far, exact.mean(0).expand(3, -1))


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_transfer_matrix_reproduces_predictions(kernel):
    x, exact = smooth_problem(n=300)
    landmarks = select_landmarks(x.shape[0], 40, seed=1)
    regressor = LandmarkRegressor().fit(x[landmarks], exact[landmarks], kernel=kernel, ridge=0.01)
    transfer = regressor.transfer_matrix(x, chunk_rows=70)
    assert transfer.shape == (300, 40)
    torch.testing.assert_close(transfer @ exact[landmarks], regressor.predict(x), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", ["uniform", "kmeans++"])
def test_select_landmarks_deterministic_unique_sorted(method):
    embeddings = torch.randn(300, 5, generator=generator(0))
    chosen = select_landmarks(300, 40, method=method, embeddings=embeddings, seed=7)
    assert chosen.dtype == torch.long and chosen.shape == (40,)
    assert torch.equal(chosen, select_landmarks(300, 40, method=method, embeddings=embeddings, seed=7))
    assert not torch.equal(chosen, select_landmarks(300, 40, method=method, embeddings=embeddings, seed=8))
    assert torch.equal(chosen, chosen.unique()) and chosen.min() >= 0 and chosen.max() < 300
    assert torch.equal(select_landmarks(300, 300, method=method, embeddings=embeddings), torch.arange(300))


def test_kmeans_plus_plus_covers_separated_clusters():
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    blobs = centres.repeat_interleave(50, 0) + torch.randn(200, 2, generator=generator(0))
    for seed in range(5):
        chosen = select_landmarks(200, 4, method="kmeans++", embeddings=blobs, seed=seed)
        assert sorted((chosen // 50).tolist()) == [0, 1, 2, 3]


def test_kmeans_plus_plus_with_duplicates_still_unique():
    embeddings = torch.zeros(10, 3)
    chosen = select_landmarks(10, 6, method="kmeans++", embeddings=embeddings)
    assert len(set(chosen.tolist())) == 6


def test_select_landmarks_errors():
    with pytest.raises(ValueError, match="k=11.*num_rows=10"):
        select_landmarks(10, 11)
    with pytest.raises(ValueError):
        select_landmarks(10, 3, method="kmeans++")
    with pytest.raises(ValueError):
        select_landmarks(10, 3, method="random")


# ---------------------------------------------------------------------------------------------
# robust weights


def test_project_to_simplex_matches_definition():
    v = torch.randn(30, generator=generator(0), dtype=torch.float64) * 3
    w = project_to_simplex(v, 30.0)
    assert (w >= 0).all() and w.sum().item() == pytest.approx(30.0)
    # The projection is the closest feasible point: nudging mass between two coordinates never helps.
    support = (w > 0).nonzero().flatten()
    for i, j in [(support[0], support[-1]), (support[0], (w == 0).nonzero().flatten()[0])]:
        moved = w.clone()
        moved[i] -= 1e-3
        moved[j] += 1e-3
        assert (moved - v).norm() > (w - v).norm()


@pytest.mark.parametrize("seed", range(5))
def test_first_order_closed_form_feasible_kkt_and_equals_slsqp(seed):
    p = torch.randn(20, generator=generator(seed), dtype=torch.float64)
    lam = [0.02, 0.1, 1.0, 5.0, 0.005][seed]
    w = robust_weights_first_order(p, lam)
    assert (w >= 0).all() and w.sum().item() == pytest.approx(20.0, abs=1e-10)
    assert kkt_residual(w, p, lam) < 1e-10
    torch.testing.assert_close(w, reference_slsqp(p, lam), atol=1e-5, rtol=0)
    torch.testing.assert_close(robust_weights(p, lam, eta=0.0, Q=random_psd(20, 0)), w)


def test_first_order_top_k_by_weight_is_top_k_by_p():
    p = torch.randn(500, generator=generator(0), dtype=torch.float64)
    w = robust_weights_first_order(p, 0.02)
    support = int((w > 0).sum())
    assert 0 < support < 500
    order = torch.argsort(p, descending=True)
    assert set(torch.topk(w, support).indices.tolist()) == set(order[:support].tolist())
    assert (w[order[:support]][:-1] >= w[order[:support]][1:]).all()
    with pytest.raises(ValueError):
        robust_weights_first_order(p, 0.0)


def second_order_problem(n, seed, k=None):
    p = torch.randn(n, generator=generator(seed), dtype=torch.float64)
    if k is None:
        return p, {"Q": random_psd(n, seed + 1)}
    C = torch.randn(n, k, generator=generator(seed + 2), dtype=torch.float64) / k**0.5
    return p, {"Q_factors": (C, random_psd(k, seed + 3))}


@pytest.mark.parametrize("k", [None, 8], ids=["dense", "factored"])
def test_second_order_slsqp_and_projected_gradient_agree(k):
    p, quadratic = second_order_problem(50, 0, k)
    lam, eta = 0.05, 0.5
    slsqp = robust_weights(p, lam, eta=eta, method="slsqp", tol=1e-12, **quadratic)
    pg = robust_weights(p, lam, eta=eta, method="projected_gradient", **quadratic)
    for w in (slsqp, pg):
        assert (w >= 0).all() and w.sum().item() == pytest.approx(50.0, abs=1e-9)
        assert kkt_residual(w, p, lam, eta, **quadratic) < 1e-5
    torch.testing.assert_close(slsqp, pg, atol=1e-5, rtol=0)
    torch.testing.assert_close(robust_weights(p, lam, eta=eta, tol=1e-12, **quadratic), slsqp)  # auto: small n
    # The second-order term matters here: the answer is not the first-order one.
    assert (pg - robust_weights_first_order(p, lam)).abs().max() > 1e-2
    assert kkt_residual(robust_weights_first_order(p, lam), p, lam, eta, **quadratic) > 1e-2


def test_factored_q_equals_dense_q():
    p, quadratic = second_order_problem(40, 1, k=6)
    C, Q_L = quadratic["Q_factors"]
    factored = robust_weights(p, 0.05, eta=1.0, method="projected_gradient", **quadratic)
    dense = robust_weights(p, 0.05, eta=1.0, Q=C @ Q_L @ C.T, method="projected_gradient")
    torch.testing.assert_close(factored, dense, atol=1e-7, rtol=0)


@pytest.mark.parametrize("k", [None, 8], ids=["dense", "factored"])
def test_non_psd_q_raises_lam_with_warning(k, caplog):
    n, eta, lam = 30, 1.0, 1e-3
    p, quadratic = second_order_problem(n, 2, k)
    if k is None:
        Q = quadratic["Q"] - 2.0 * torch.eye(n, dtype=torch.float64)
        quadratic, lambda_min = {"Q": Q}, torch.linalg.eigvalsh(Q)[0].item()
    else:
        C, Q_L = quadratic["Q_factors"]
        Q_L = Q_L - 2.0 * torch.eye(k, dtype=torch.float64)
        quadratic, lambda_min = {"Q_factors": (C, Q_L)}, torch.linalg.eigvalsh(C @ Q_L @ C.T)[0].item()
    assert -eta * lambda_min / 2 > lam
    with pytest.warns(RuntimeWarning, match="raising lam"):
        w = robust_weights(p, lam, eta=eta, method="projected_gradient", **quadratic)
    assert "raising lam" in caplog.text
    assert (w >= 0).all() and w.sum().item() == pytest.approx(n, abs=1e-9)
    raised = -eta * lambda_min / 2 * 1.01
    assert kkt_residual(w, p, raised, eta, **quadratic) < 1e-6
    with pytest.warns(RuntimeWarning):
        slsqp = robust_weights(p, lam, eta=eta, method="slsqp", tol=1e-12, **quadratic)
    torch.testing.assert_close(slsqp, w, atol=1e-4, rtol=0)


def test_robust_weights_validation():
    p, quadratic = second_order_problem(10, 0)
    with pytest.raises(ValueError):
        robust_weights(p, 0.0, eta=1.0, **quadratic)
    with pytest.raises(ValueError):
        robust_weights(p, 0.1, eta=-1.0, **quadratic)
    with pytest.raises(ValueError):
        robust_weights(p, 0.1, eta=1.0, Q=torch.eye(9))
    with pytest.raises(ValueError):
        robust_weights(p, 0.1, eta=1.0, method="newton", **quadratic)


def test_auto_uses_projected_gradient_for_large_n():
    p, quadratic = second_order_problem(400, 3, k=8)
    pg = robust_weights(p, 0.05, eta=1.0, method="projected_gradient", **quadratic)
    assert torch.equal(robust_weights(p, 0.05, eta=1.0, **quadratic), pg)
    assert kkt_residual(pg, p, 0.05, 1.0, **quadratic) < 1e-6


def test_concatenate_scaled_gives_each_part_a_unit_median_distance():
    generator = torch.Generator().manual_seed(0)
    small, large = torch.randn(40, 3, generator=generator), 1e4 * torch.randn(40, 7, generator=generator)
    joined = concatenate_scaled([small, large])
    assert joined.shape == (40, 10)
    for part in (joined[:, :3], joined[:, 3:]):  # 40 rows: every pair counts, the median is exact
        assert torch.pdist(part.double()).median().item() == pytest.approx(1.0, rel=1e-6)
