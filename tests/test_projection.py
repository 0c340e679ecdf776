"""Tests for hf_influence.extraction.projection: determinism (also across processes), JL accuracy, memory budget."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from hf_influence.extraction.projection import (
    PROJECTOR_KINDS,
    CountSketchProjector,
    FactoredProjector,
    GaussianProjector,
    IdentityProjector,
    SRHTProjector,
    derive_seed,
    fwht,
    make_projector,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small config shared by the generic tests. d spans two Gaussian blocks (4096 columns each);
# the factored projector sees the same d as a 40 x 150 Linear gradient and the same k as 8 x 8.
D, K = 6000, 64
RANDOM_KINDS = ["countsketch", "srht", "gaussian", "factored"]
ALL_KINDS = RANDOM_KINDS + ["none"]


def _build(kind: str, seed: int = 0):
    if kind == "factored":
        return FactoredProjector(40, 150, 8, 8, seed)
    return make_projector(kind, D, None if kind == "none" else K, seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _assert_gram_preserved(true_gram, y, *, cos_tol=None, norm_tol=0.1):
    """
    true_gram: [n, n] inner products of the original vectors; y: [n, k] their projections.
    Asserts every norm is kept within norm_tol (relative) and every pairwise cosine within
    cos_tol (default 4/sqrt(k), the JL scale for a dense k-dimensional projection).
    """
    cos_tol = 4 / math.sqrt(y.shape[1]) if cos_tol is None else cos_tol
    true_gram = true_gram.double()
    proj_gram = y.double() @ y.double().T
    true_norm = true_gram.diagonal().sqrt()
    proj_norm = proj_gram.diagonal().sqrt()
    norm_err = (proj_norm / true_norm - 1).abs().max().item()
    assert norm_err < norm_tol, f"norm relative error {norm_err:.4f} >= {norm_tol}"
    true_cos = true_gram / torch.outer(true_norm, true_norm)
    proj_cos = proj_gram / torch.outer(proj_norm, proj_norm)
    cos_err = (proj_cos - true_cos).abs().max().item()
    assert cos_err < cos_tol, f"cosine error {cos_err:.4f} >= {cos_tol:.4f}"


def _assert_inner_products_preserved(x, y, *, cos_tol=None, norm_tol=0.1):
    """x: [n, d] original vectors, y: [n, k] their projections; see _assert_gram_preserved."""
    x = x.double()
    _assert_gram_preserved(x @ x.T, y, cos_tol=cos_tol, norm_tol=norm_tol)


def _structured_low_rank(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """
    n vectors [n, d] in the span of 6 coordinate-structured directions (constant, step, slow
    cosine, block indicator, a few spikes, ramp): highly correlated and far from "random
    looking", the cases where a projection without proper randomisation (e.g. SRHT without
    signs, or plain subsampling) breaks down.
    """
    i = torch.arange(d, dtype=torch.float64)
    spikes = torch.zeros(d, dtype=torch.float64)
    spikes[[7, 999, d // 3, d // 2 + 1, d - 2]] = 30.0
    basis = torch.stack([
        torch.ones(d, dtype=torch.float64),
        torch.where(i < d // 2, 1.0, -1.0),
        torch.cos(2 * math.pi * 3 * i / d),
        ((i >= 1000) & (i < 1400)).double(),
        spikes,
        i / d,
    ])
    return (_randn(n, basis.shape[0], seed=seed, dtype=torch.float64) @ basis).float()


# ----------------------------------------------------------------------------- derive_seed

def test_derive_seed_is_stable_and_separates_names():
    # Pinned value: if the mixing ever changes, every stored projection silently changes with it.
    assert derive_seed(0, "layer", 3) == 3708989540825118072
    assert derive_seed(0, "layer", 3) == derive_seed(0, "layer", 3)
    seeds = {
        derive_seed(0, "layer", 3), derive_seed(0, "layer", "3"), derive_seed(0, 3, "layer"),
        derive_seed(1, "layer", 3), derive_seed(0, "layer", 4), derive_seed(0, "lay", "er3"),
        derive_seed(0),
    }
    assert len(seeds) == 7
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(TypeError):
        derive_seed(0, 1.5)


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_same_seed_is_bit_identical(kind):
    x = _randn(5, D)
    first = _build(kind, seed=3)
    y = first(x)
    assert y.shape == (5, K)
    assert torch.equal(y, first(x))  # repeated calls (Gaussian: cached path) agree
    assert torch.equal(y, _build(kind, seed=3).project(x))  # a fresh projector agrees


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_different_seeds_give_different_projections(kind):
    x = _randn(5, D)
    y0, y1 = _build(kind, seed=0)(x), _build(kind, seed=1)(x)
    # Independent projections of the same x are nearly uncorrelated, so ||y0 - y1|| ~ sqrt(2) ||y0||.
    assert (y0 - y1).norm() > 0.5 * y0.norm()


_CHILD = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("child_test_projection", sys.argv[1])
tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tests)
x, delta, acts = torch.load(sys.argv[2])
out = {kind: tests._build(kind, seed=11)(x) for kind in tests.RANDOM_KINDS}
out["factored_factors"] = tests._build("factored", seed=11).project_factors(delta, acts)
out["derive_seed"] = torch.tensor(tests.derive_seed(11, "layer", 5))
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def child_outputs(tmp_path_factory):
    """Projections computed by a separate Python process (with a different hash seed)."""
    tmp = tmp_path_factory.mktemp("child")
    inputs = (_randn(4, D, seed=5), _randn(4, 6, 40, seed=6), _randn(4, 6, 150, seed=7))
    torch.save(inputs, tmp / "inputs.pt")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, __file__, str(tmp / "inputs.pt"), str(tmp / "out.pt")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == 0, child.stderr
    return inputs, torch.load(tmp / "out.pt")


@pytest.mark.parametrize("kind", RANDOM_KINDS)
@pytest.mark.slow
def test_bit_identical_across_processes(kind, child_outputs):
    (x, delta, acts), out = child_outputs
    assert torch.equal(_build(kind, seed=11)(x), out[kind])
    if kind == "factored":
        assert torch.equal(_build(kind, seed=11).project_factors(delta, acts), out["factored_factors"])


def test_derive_seed_across_processes(child_outputs):
    assert child_outputs[1]["derive_seed"].item() == derive_seed(11, "layer", 5)


# ----------------------------------------------------------------------------- dtype / validation

@pytest.mark.parametrize("kind", ALL_KINDS)
def test_dtype_preserved_and_float64_uses_the_same_matrix(kind):
    projector = _build(kind)
    x = _randn(3, D)
    y32, y64 = projector(x), projector(x.double())
    assert y32.dtype == torch.float32 and y64.dtype == torch.float64
    # Random tables are drawn in float32 whatever the input dtype, so the two results differ only
    # by float32 rounding.
    torch.testing.assert_close(y64, y32.double(), rtol=1e-5, atol=1e-5 * y64.abs().max().item())


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_wrong_input_dimension_names_both_numbers(kind):
    projector = _build(kind)
    with pytest.raises(ValueError, match=rf"(?s){D}.*{D + 1}"):
        projector(torch.zeros(2, D + 1))
    with pytest.raises(ValueError):
        projector(torch.zeros(D))  # not [batch, d]
    with pytest.raises(TypeError):
        projector(torch.zeros(2, D, dtype=torch.int64))


def test_make_projector_rejects_unknown_kind_listing_valid_ones():
    with pytest.raises(ValueError) as info:
        make_projector("fjlt", D, K, 0)
    assert all(kind in str(info.value) for kind in PROJECTOR_KINDS)


def test_make_projector_builds_each_kind_and_passes_kwargs():
    assert isinstance(make_projector("countsketch", D, K, 0), CountSketchProjector)
    assert isinstance(make_projector("srht", D, K, 0), SRHTProjector)
    gaussian = make_projector("gaussian", D, K, 0, max_memory_mb=3.0)
    assert isinstance(gaussian, GaussianProjector) and gaussian.max_memory_mb == 3.0
    with pytest.raises(ValueError, match="output_dim"):
        make_projector("srht", D, None, 0)


def test_none_kind_is_identity_and_checks_output_dim():
    x = _randn(2, D)
    for output_dim in (None, D):
        projector = make_projector("none", D, output_dim, 0)
        assert isinstance(projector, IdentityProjector) and projector.output_dim == D
        assert torch.equal(projector(x), x)
    with pytest.raises(ValueError, match=rf"(?s){D}.*{K}"):
        make_projector("none", D, K, 0)


# ----------------------------------------------------------------------------- JL accuracy

JL_D, JL_K = 20000, 4096


@pytest.mark.parametrize("vectors", ["random", "structured_low_rank"])
@pytest.mark.parametrize("kind", ["countsketch", "srht", "gaussian"])
def test_inner_products_preserved(kind, vectors):
    x = _randn(16, JL_D, seed=1) if vectors == "random" else _structured_low_rank(16, JL_D)
    y = make_projector(kind, JL_D, JL_K, seed=2)(x)
    assert y.shape == (16, JL_K)
    _assert_inner_products_preserved(x, y)


def test_inner_product_helper_rejects_a_non_jl_map():
    # Keeping the first k coordinates (rescaled) is a linear map too, but not a JL one: on the
    # structured vectors it confuses the step with the constant. The helper must notice.
    x = _structured_low_rank(16, JL_D)
    with pytest.raises(AssertionError):
        _assert_inner_products_preserved(x, x[:, :JL_K] * math.sqrt(JL_D / JL_K))


# ----------------------------------------------------------------------------- CountSketch

def test_countsketch_with_partial_last_block_matches_reference():
    d, k = 2**20 + 37, 50  # one full 2**20 block plus a 37-coordinate tail
    projector = CountSketchProjector(d, k, seed=4)
    buckets, signs = projector._buckets, projector._signs
    assert buckets.dtype == torch.int32 and signs.dtype == torch.int8
    assert buckets.shape == signs.shape == (d,)
    assert int(buckets.min()) >= 0 and int(buckets.max()) < k
    assert set(signs.unique().tolist()) == {-1, 1}
    # Buckets and signs are uniform: each bucket gets d/k ~ 21000 coordinates (sd ~ 145).
    counts = torch.bincount(buckets.long(), minlength=k)
    assert (counts - d / k).abs().max() < 0.05 * d / k
    assert abs(signs.double().mean().item()) < 0.01
    # Each block has its own seed: the tail block is not a copy of the start of the first one.
    assert not torch.equal(buckets[-37:], buckets[:37])

    x = _randn(2, d, dtype=torch.float64)
    expected = np.zeros((2, k))
    np.add.at(expected.T, buckets.numpy(), (x * signs).numpy().T)
    y = projector(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, torch.from_numpy(expected))

    # The tail block is projected too: input living only there maps to its buckets, not to zero.
    tail = torch.zeros(1, d, dtype=torch.float64)
    tail[0, -37:] = torch.arange(1, 38, dtype=torch.float64)
    expected_tail = torch.zeros(1, k, dtype=torch.float64)
    expected_tail[0].index_add_(0, buckets[-37:].long(), tail[0, -37:] * signs[-37:])
    y_tail = projector(tail)
    assert y_tail.abs().sum() > 0
    torch.testing.assert_close(y_tail, expected_tail)


# ----------------------------------------------------------------------------- SRHT

@pytest.mark.parametrize("size", [1, 2, 4, 8, 64, 256])
def test_fwht_matches_scipy_hadamard(size):
    hadamard = torch.from_numpy(scipy.linalg.hadamard(size)).double()
    x = _randn(3, 2, size, dtype=torch.float64)
    before = x.clone()
    out = fwht(x)
    assert out.shape == x.shape and torch.equal(x, before)  # input left untouched
    torch.testing.assert_close(out, x @ hadamard.T)
    ints = torch.randint(-5, 6, (4, size), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(fwht(ints), ints @ hadamard.T.float())  # exact on small integers


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(2, 12))


def test_srht_matrix_is_scaled_orthogonal_subsampled_hadamard():
    d, k = 128, 32
    matrix = SRHTProjector(d, k, seed=0)(torch.eye(d, dtype=torch.float64))  # rows = images of e_i
    # Every entry is +-1/sqrt(k): a signed Hadamard entry 1/sqrt(D) rescaled by sqrt(D/k).
    torch.testing.assert_close(matrix.abs(), torch.full((d, k), k**-0.5, dtype=torch.float64))
    # k distinct Hadamard rows are orthogonal with squared norm D, so after scaling M^T M = (D/k) I.
    torch.testing.assert_close(matrix.T @ matrix, (d / k) * torch.eye(k, dtype=torch.float64))


def test_srht_pads_to_power_of_two_and_rejects_k_above_it():
    matrix = SRHTProjector(100, 128, seed=0)(torch.eye(100, dtype=torch.float64))  # D = 128 = k
    assert matrix.shape == (100, 128)
    torch.testing.assert_close(matrix.abs(), torch.full((100, 128), 128**-0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"(?s)128.*129"):
        SRHTProjector(100, 129, seed=0)


# ----------------------------------------------------------------------------- Gaussian

G_D, G_K = 10000, 64  # blocks of 4096 x 64 floats = 1 MiB in float32; all of P = 2.44 MiB


def _spy_materialize(projector):
    """Record the row count and dtype of every piece of P.T the projector generates."""
    calls = []
    original = projector._materialize

    def spy(first, stop, dtype, device):
        out = original(first, stop, dtype, device)
        calls.append((out.shape[0], dtype))
        return out

    projector._materialize = spy
    return calls


@pytest.mark.parametrize(
    "dtype, rtol, budget_mb, chunks_per_call",
    [
        (torch.float32, 1e-5, 2.0, 3),  # staging + 1 block of 1 MiB
        (torch.float32, 1e-5, 3.2, 2),  # staging + 2 blocks, still short of all of P (3.44 MiB)
        (torch.float64, 1e-6, 3.0, 3),  # staging + 1 block of 2 MiB
        (torch.float64, 1e-6, 5.5, 2),  # staging + 2 blocks
    ],
)
def test_gaussian_budget_changes_rounding_only_and_is_respected(dtype, rtol, budget_mb, chunks_per_call):
    x = _randn(6, G_D, dtype=dtype)
    cached = GaussianProjector(G_D, G_K, seed=9, max_memory_mb=256.0)
    reference = cached(x)
    assert cached._cache is not None and cached._cache.shape == (G_D, G_K)

    projector = GaussianProjector(G_D, G_K, seed=9, max_memory_mb=budget_mb)
    calls = _spy_materialize(projector)
    y1, y2 = projector(x), projector(x)
    torch.testing.assert_close(y1, reference, rtol=rtol, atol=rtol * reference.abs().max().item())
    assert torch.equal(y1, y2)  # same budget -> same summation order -> bit-identical

    # Regenerated on every call, never cached, and never more than the budget at once: the
    # generated rows (in the input dtype) plus the float32 staging block of 4096 rows.
    assert projector._cache is None
    assert sum(rows for rows, _ in calls) == 2 * G_D
    assert len(calls) == 2 * chunks_per_call
    item = torch.empty((), dtype=dtype).element_size()
    for rows, call_dtype in calls:
        assert call_dtype == dtype
        assert rows * G_K * item + 4096 * G_K * 4 <= budget_mb * 2**20


def test_gaussian_large_budget_generates_once():
    projector = GaussianProjector(G_D, G_K, seed=9)
    calls = _spy_materialize(projector)
    x = _randn(2, G_D)
    projector(x)
    projector(x)
    assert calls == [(G_D, torch.float32)]
    projector(x.double())  # a new dtype replaces the cache
    assert calls[-1] == (G_D, torch.float64) and projector._cache.dtype == torch.float64


def test_gaussian_rejects_budget_below_one_block():
    with pytest.raises(ValueError, match="max_memory_mb"):
        GaussianProjector(G_D, G_K, seed=0, max_memory_mb=1.5)  # one block + staging = 2 MiB
    # 2.5 MiB fits a float32 block and staging, but a float64 block (2 MiB) + staging does not.
    projector = GaussianProjector(G_D, G_K, seed=0, max_memory_mb=2.5)
    projector(_randn(1, G_D))
    with pytest.raises(ValueError, match="max_memory_mb"):
        projector(_randn(1, G_D, dtype=torch.float64))


def test_gaussian_entries_are_n0_1_over_k():
    d, k = 600, 64
    matrix = GaussianProjector(d, k, seed=0)(torch.eye(d, dtype=torch.float64))  # P.T
    assert abs(matrix.mean().item()) < 0.005  # sd of the mean over d * k entries is ~0.0006
    assert abs(matrix.var().item() * k - 1) < 0.05
    # Each 4096-column block has its own seed: column 4096 is not a copy of column 0.
    units = torch.zeros(2, 8192)
    units[0, 0] = units[1, 4096] = 1.0
    columns = GaussianProjector(8192, k, seed=0)(units)
    assert (columns[0] - columns[1]).norm() > 0.5 * columns[0].norm()


# ----------------------------------------------------------------------------- Factored

@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_factored_project_factors_matches_materialised_gradient(dtype, tol):
    batch, tokens, out_f, in_f = 3, 5, 24, 40
    projector = FactoredProjector(out_f, in_f, output_out=6, output_in=7, seed=2)
    assert (projector.input_dim, projector.output_dim) == (out_f * in_f, 42)
    delta = _randn(batch, tokens, out_f, seed=1, dtype=dtype)
    acts = _randn(batch, tokens, in_f, seed=2, dtype=dtype)
    grads = torch.einsum("bto,bti->boi", delta, acts).reshape(batch, -1)  # row-major out x in
    y = projector.project_factors(delta, acts)
    assert y.shape == (batch, 42) and y.dtype == dtype
    torch.testing.assert_close(y, projector(grads), rtol=tol, atol=tol * y.abs().max().item())
    # And both equal the explicit P_out G P_in^T.
    p_out = projector._out(torch.eye(out_f, dtype=dtype)).T
    p_in = projector._in(torch.eye(in_f, dtype=dtype)).T
    explicit = (p_out @ grads.view(batch, out_f, in_f) @ p_in.T).reshape(batch, -1)
    torch.testing.assert_close(y, explicit, rtol=tol, atol=tol * y.abs().max().item())
    # The bias gradient sum_t delta_t is projected by P_out alone.
    bias = delta.sum(1)
    torch.testing.assert_close(projector.project_output_side(bias), bias @ p_out.T, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match=r"(?s)24.*40"):
        projector.project_output_side(torch.zeros(batch, in_f, dtype=dtype))


def test_factored_rejects_mismatched_factors():
    projector = FactoredProjector(24, 40, 6, 7, seed=0)
    with pytest.raises(ValueError, match=r"(?s)40.*41"):
        projector.project_factors(torch.zeros(2, 5, 24), torch.zeros(2, 5, 41))
    with pytest.raises(ValueError):
        projector.project_factors(torch.zeros(2, 5, 24), torch.zeros(2, 4, 40))
    with pytest.raises(ValueError):
        projector.project_factors(torch.zeros(2, 24), torch.zeros(2, 40))
    with pytest.raises(TypeError):
        projector.project_factors(torch.zeros(2, 5, 24), torch.zeros(2, 5, 40, dtype=torch.float64))


def test_factored_preserves_inner_products():
    batch, tokens, out_f, in_f, k_out, k_in = 12, 16, 2048, 2048, 1024, 1024
    # Per-sample gradients that share a few token directions, so true cosines are spread out.
    shared_delta, shared_acts = _randn(3, out_f, seed=3), _randn(3, in_f, seed=4)
    delta = _randn(batch, tokens, 3, seed=5) @ shared_delta + 0.5 * _randn(batch, tokens, out_f, seed=6)
    acts = _randn(batch, tokens, 3, seed=7) @ shared_acts + 0.5 * _randn(batch, tokens, in_f, seed=8)
    # <G_a, G_b> = sum_{t,s} <delta_at, delta_bs> <x_at, x_bs>, without forming the 2048 x 2048 G.
    d64, a64 = delta.double().flatten(0, 1), acts.double().flatten(0, 1)
    token_gram = ((d64 @ d64.T) * (a64 @ a64.T)).view(batch, tokens, batch, tokens)
    y = FactoredProjector(out_f, in_f, k_out, k_in, seed=1).project_factors(delta, acts)
    # Kronecker projections concentrate like sqrt(1/k_out + 1/k_in), not 1/sqrt(k_out * k_in).
    _assert_gram_preserved(token_gram.sum(dim=(1, 3)), y, cos_tol=4 * math.sqrt(1 / k_out + 1 / k_in))
