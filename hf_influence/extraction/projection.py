"""
Seeded random projections that compress per-sample gradients from d to k dimensions.

Influence scores and gradient-based data selection compare per-sample gradients through inner
products. A full LLM gradient has d ~ 1e8..1e9 coordinates, far too many to store for every
training example, so each gradient is multiplied by a random k x d matrix with k << d. By the
Johnson-Lindenstrauss lemma such a map preserves all pairwise inner products (and norms) up to
a relative error of about 1/sqrt(k), which is all the downstream scoring needs.

Four projectors, from cheapest to most expensive per coordinate:
- CountSketchProjector: each coordinate is added, with a random sign, to one random bucket.
- SRHTProjector: random signs, a fast Walsh-Hadamard transform, then k sampled coordinates.
- GaussianProjector: a dense N(0, 1/k) matrix, generated block-wise under a memory budget.
- FactoredProjector: the LoGra trick for a Linear layer, projecting its gradient's two factors
  separately so the out x in gradient is never materialised.

Determinism contract: every random table is drawn from a CPU torch.Generator seeded through
derive_seed(), then moved to the input's device, so the projection matrix is bit-identical for
the same (seed, dimensions, config) in any process, on any device and for any input dtype
(random values are always drawn in float32 and cast, so float64 inputs see the same matrix).
Outputs are bit-identical for the same inputs on the same hardware and thread count: CountSketch
(CPU) and SRHT add in a fixed order, Gaussian and Factored rely on the BLAS matmul, which is
deterministic for a given shape and thread count. On CUDA, index_add_ accumulates with atomics, so
CountSketch outputs may differ in the last bits between runs there unless
torch.use_deterministic_algorithms(True) is set. The streams come from torch's CPU generator, so
a different torch version could in principle draw different tables.
"""

import hashlib
import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

PROJECTOR_KINDS = ("countsketch", "srht", "gaussian", "none")

# Random index/sign tables are drawn in blocks of this many coordinates, each from its own
# generator seeded by the block index, so generation never needs more than one block of
# temporaries and a huge table never has to be drawn from one long stream.
_INDEX_BLOCK = 2**20
# Columns of d per Gaussian block; the matrix is defined block by block at this fixed width so that
# it does not depend on how many blocks the memory budget lets us hold at once.
_GAUSSIAN_BLOCK = 4096
_BYTES_PER_MB = 2**20


def derive_seed(seed: int, *names: str | int) -> int:
    """
    Deterministically mix a base seed with names, e.g. derive_seed(seed, "layer", 3).

    Uses blake2b rather than Python's hash(), which is salted per process and would give every
    process a different projection. Each part is type-tagged and length-prefixed so that
    ("1",) and (1,), or ("ab", "c") and ("a", "bc"), give different seeds.

    seed: any Python int. names: str or int parts.
    Returns: int in [0, 2**63), accepted by torch.Generator.manual_seed.
    """
    digest = hashlib.blake2b(digest_size=8)
    for part in (seed, *names):
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise TypeError(f"derive_seed parts must be int or str, got {type(part).__name__}")
        encoded = (("i" if isinstance(part, int) else "s") + str(part)).encode()
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def _generator(seed: int) -> torch.Generator:
    # All randomness comes from CPU generators: CUDA generators produce different streams (and
    # differ across GPU models), so drawing on the CPU is what makes tables device-independent.
    return torch.Generator(device="cpu").manual_seed(seed)


def _check_dim(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _blocked_randint(n: int, high: int, dtype: torch.dtype, seed: int, *names: str) -> Tensor:
    """
    Uniform integers in [0, high), drawn in _INDEX_BLOCK-sized blocks each seeded from
    (seed, *names, block index), written straight into the compact output dtype.

    Returns: Tensor[n] of `dtype` on the CPU.
    """
    out = torch.empty(n, dtype=dtype)
    for block, start in enumerate(range(0, n, _INDEX_BLOCK)):
        stop = min(start + _INDEX_BLOCK, n)
        gen = _generator(derive_seed(seed, *names, block))
        torch.randint(0, high, (stop - start,), generator=gen, dtype=dtype, out=out[start:stop])
    return out


def _random_signs(n: int, seed: int, *names: str) -> Tensor:
    """Returns: Tensor[n] int8 of +-1 on the CPU."""
    return _blocked_randint(n, 2, torch.int8, seed, *names).mul_(2).sub_(1)


class Projector(ABC):
    """
    A fixed, seeded linear map from input_dim (d) to output_dim (k) dimensions.

    project(x) / projector(x): Tensor[B, d] (float32 or float64, any device)
    -> Tensor[B, k] of the same dtype on the same device.
    """

    def __init__(self, input_dim: int, output_dim: int, seed: int):
        _check_dim("input_dim", input_dim)
        _check_dim("output_dim", output_dim)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.seed = seed

    def project(self, x: Tensor) -> Tensor:
        """x: Tensor[B, d] -> Tensor[B, k], same dtype and device."""
        if x.ndim != 2:
            raise ValueError(f"expected a [batch, {self.input_dim}] tensor, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.input_dim:
            raise ValueError(
                f"{type(self).__name__} expects input dimension {self.input_dim}, "
                f"got {x.shape[-1]} (input shape {tuple(x.shape)})"
            )
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"expected a float32 or float64 tensor, got {x.dtype}")
        return self._project(x)

    def __call__(self, x: Tensor) -> Tensor:
        return self.project(x)

    @abstractmethod
    def _project(self, x: Tensor) -> Tensor:
        """x: Tensor[B, d], already validated -> Tensor[B, k]."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_dim={self.input_dim}, output_dim={self.output_dim}, "
            f"seed={self.seed})"
        )


class IdentityProjector(Projector):
    """No compression (kind "none"): project(x) returns x itself, Tensor[B, d] -> Tensor[B, d]."""

    def __init__(self, input_dim: int, seed: int = 0):
        super().__init__(input_dim, input_dim, seed)

    def _project(self, x: Tensor) -> Tensor:
        return x


class CountSketchProjector(Projector):
    """
    CountSketch: y[h(i)] += s(i) * x[i] with a random bucket h(i) in [0, k) and sign s(i) = +-1
    per input coordinate. E[<Sx, Sy>] = <x, y>, and the variance is O(||x||^2 ||y||^2 / k).

    Costs O(B * d) time and 5 bytes per input coordinate (int32 bucket + int8 sign); the tables
    are generated in blocks of 2**20 coordinates, each block from its own generator seeded by
    (seed, block index), so generation needs bounded extra memory.

    project: Tensor[B, d] -> Tensor[B, k].
    """

    def __init__(self, input_dim: int, output_dim: int, seed: int):
        super().__init__(input_dim, output_dim, seed)
        if output_dim >= 2**31:
            raise ValueError(f"output_dim {output_dim} does not fit the int32 bucket table")
        self._buckets = _blocked_randint(
            input_dim, output_dim, torch.int32, seed, "countsketch", "bucket"
        )
        self._signs = _random_signs(input_dim, seed, "countsketch", "sign")

    def _project(self, x: Tensor) -> Tensor:
        # Tables follow the input's device and stay there, so repeated calls don't re-copy them.
        self._buckets = self._buckets.to(x.device)
        self._signs = self._signs.to(x.device)
        y = torch.zeros(x.shape[0], self.output_dim, dtype=x.dtype, device=x.device)
        # Going block by block bounds the signed copy of x to [B, 2**20] and leaves the order in
        # which each bucket accumulates (increasing i) exactly as a single index_add_ would.
        for start in range(0, self.input_dim, _INDEX_BLOCK):
            cols = slice(start, start + _INDEX_BLOCK)
            y.index_add_(1, self._buckets[cols], x[:, cols] * self._signs[cols])
        return y


def fwht(x: Tensor) -> Tensor:
    """
    Unnormalised fast Walsh-Hadamard transform along the last dimension, O(D log D) per row.

    Equals x @ H.T with H = scipy.linalg.hadamard(D) (Sylvester order; H is symmetric), so
    fwht(fwht(x)) = D * x.

    x: Tensor[..., D] floating, D a power of two -> Tensor[..., D], a new tensor.
    """
    size = x.shape[-1]
    if size < 1 or size & (size - 1):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {size}")
    buf = x.reshape(-1, size).clone(memory_format=torch.contiguous_format)
    return _fwht_(buf).view(x.shape)


def _fwht_(x: Tensor) -> Tensor:
    """In-place FWHT of a contiguous Tensor[B, D]; returns x."""
    batch, size = x.shape
    half = 1
    while half < size:
        # View each row as pairs of length-`half` halves and apply the butterfly (a, b) -> (a+b, a-b)
        # to all of them at once; log2(D) such passes give the full transform.
        pairs = x.view(batch, size // (2 * half), 2, half)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        diff = a - b
        a.add_(b)
        b.copy_(diff)
        half *= 2
    return x


class SRHTProjector(Projector):
    """
    Subsampled randomised Hadamard transform: y = sqrt(D/k) * S (H / sqrt(D)) diag(s) x_pad.

    x is zero-padded to D = next power of two >= d, multiplied by random signs s (which spread any
    spiky or structured vector evenly over all coordinates), rotated by the orthonormal Hadamard
    matrix H / sqrt(D), and k of the D coordinates are kept without replacement (S). The
    sqrt(D/k) factor makes E||y||^2 = ||x||^2. Costs O(B * D log D) time and a [B, D] buffer.

    project: Tensor[B, d] -> Tensor[B, k]; requires k <= D.
    """

    def __init__(self, input_dim: int, output_dim: int, seed: int):
        super().__init__(input_dim, output_dim, seed)
        self.padded_dim = 1 << (input_dim - 1).bit_length()
        if self.padded_dim < output_dim:
            raise ValueError(
                f"SRHT can keep at most {self.padded_dim} coordinates (input_dim {input_dim} padded "
                f"to a power of two), got output_dim {output_dim}"
            )
        self._signs = _random_signs(input_dim, seed, "srht", "sign")
        perm = torch.randperm(self.padded_dim, generator=_generator(derive_seed(seed, "srht", "rows")))
        # clone() so the unused tail of the permutation is freed rather than kept alive by a view.
        self._rows = perm[:output_dim].clone()

    def _project(self, x: Tensor) -> Tensor:
        self._signs = self._signs.to(x.device)
        self._rows = self._rows.to(x.device)
        buf = torch.zeros(x.shape[0], self.padded_dim, dtype=x.dtype, device=x.device)
        buf[:, : self.input_dim].copy_(x).mul_(self._signs)
        _fwht_(buf)
        # sqrt(D/k) / sqrt(D) = 1/sqrt(k): the sampling rescale and the Hadamard normalisation.
        return buf[:, self._rows].mul_(self.output_dim**-0.5)


class GaussianProjector(Projector):
    """
    Dense Gaussian projection y = P x with P[k, d] of i.i.d. N(0, 1/k) entries, so E||y||^2 = ||x||^2.

    P is defined block-wise over its columns: block b holds columns [4096 b, 4096 (b+1)), drawn as
    a float32 (width, k) array (i.e. P[:, cols].T) from a generator seeded by (seed, b). So P does
    not depend on max_memory_mb, on the dtype, or on the device.

    max_memory_mb (MiB) bounds the memory held for P at any time, counted in the input dtype plus
    one float32 staging block used while drawing. If the whole of P fits it is generated once and
    cached (per dtype and device); otherwise P is regenerated on every call, as many whole blocks
    at a time as fit. The budget must fit at least one block. Changing max_memory_mb changes only
    the order in which the float sums over d are accumulated (so outputs agree to rounding), never
    the matrix.

    project: Tensor[B, d] -> Tensor[B, k].
    """

    def __init__(self, input_dim: int, output_dim: int, seed: int, max_memory_mb: float = 256.0):
        super().__init__(input_dim, output_dim, seed)
        if not max_memory_mb > 0:
            raise ValueError(f"max_memory_mb must be positive, got {max_memory_mb}")
        self.max_memory_mb = max_memory_mb
        self._num_blocks = math.ceil(input_dim / _GAUSSIAN_BLOCK)
        # The cached P.T [d, k] and the (dtype, device) it was built for; None while not cached.
        self._cache: Tensor | None = None
        self._cache_key: tuple[torch.dtype, torch.device] | None = None
        self._blocks_per_chunk(torch.float32)  # fail at construction on a budget too small for any input

    def _blocks_per_chunk(self, dtype: torch.dtype) -> int:
        """How many whole blocks fit in the budget at once for `dtype`; all of them if P fits."""
        width = min(_GAUSSIAN_BLOCK, self.input_dim)
        staging = width * self.output_dim * 4
        budget = self.max_memory_mb * _BYTES_PER_MB - staging
        item = torch.empty((), dtype=dtype).element_size()
        if self.input_dim * self.output_dim * item <= budget:
            return self._num_blocks
        blocks = int(budget // (width * self.output_dim * item))
        if blocks < 1:
            needed = (width * self.output_dim * item + staging) / _BYTES_PER_MB
            raise ValueError(
                f"max_memory_mb={self.max_memory_mb} is too small for GaussianProjector with "
                f"output_dim {self.output_dim}: one {width}-column block in {dtype} plus its "
                f"float32 staging buffer needs {needed:.2f} MB"
            )
        return blocks

    def _materialize(
        self, first_block: int, stop_block: int, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """
        Rows [4096 first_block, 4096 stop_block) of P.T, i.e. those columns of P, transposed.

        Returns: Tensor[cols, k] of `dtype` on `device`.
        """
        start = first_block * _GAUSSIAN_BLOCK
        stop = min(stop_block * _GAUSSIAN_BLOCK, self.input_dim)
        out = torch.empty(stop - start, self.output_dim, dtype=dtype, device=device)
        # One reusable float32 CPU buffer: every block is drawn in float32 on the CPU whatever the
        # target, which is what keeps P identical across dtypes and devices.
        staging = torch.empty(min(_GAUSSIAN_BLOCK, stop - start), self.output_dim)
        for block in range(first_block, stop_block):
            lo = block * _GAUSSIAN_BLOCK
            hi = min(lo + _GAUSSIAN_BLOCK, self.input_dim)
            drawn = torch.randn(
                hi - lo, self.output_dim,
                generator=_generator(derive_seed(self.seed, "gaussian", block)),
                out=staging[: hi - lo],
            )
            out[lo - start : hi - start].copy_(drawn.mul_(self.output_dim**-0.5))
        return out

    def _project(self, x: Tensor) -> Tensor:
        per_chunk = self._blocks_per_chunk(x.dtype)
        if per_chunk == self._num_blocks:
            key = (x.dtype, x.device)
            if self._cache_key != key:
                self._cache = None  # drop the old copy first so two never coexist
                self._cache = self._materialize(0, self._num_blocks, x.dtype, x.device)
                self._cache_key = key
            return x @ self._cache
        y = torch.zeros(x.shape[0], self.output_dim, dtype=x.dtype, device=x.device)
        for first in range(0, self._num_blocks, per_chunk):
            stop = min(first + per_chunk, self._num_blocks)
            chunk = self._materialize(first, stop, x.dtype, x.device)
            cols = slice(first * _GAUSSIAN_BLOCK, stop * _GAUSSIAN_BLOCK)
            y.addmm_(x[:, cols], chunk)
            del chunk  # free before the next chunk is drawn, keeping one chunk alive at a time
        return y


class FactoredProjector(Projector):
    """
    LoGra-style projection of a Linear layer's per-sample weight gradient G = sum_t delta_t x_t^T
    (delta_t: output gradient [out_features], x_t: layer input [in_features]).

    The projection is P_out G P_in^T with Gaussian P_out [output_out, out_features] ~ N(0, 1/output_out)
    and P_in [output_in, in_features] ~ N(0, 1/output_in), i.e. the Kronecker product P_out (x) P_in
    applied to vec(G), whose entries have variance 1/k for k = output_out * output_in. Because
    P_out G P_in^T = sum_t (P_out delta_t)(P_in x_t)^T, project_factors never forms the
    out_features x in_features gradient: it costs O(B T (out * k_out + in * k_in)) instead.

    Each factor is a GaussianProjector (seeds derived from `seed`), each given half of
    max_memory_mb. Kronecker projections concentrate more weakly than a dense k x d Gaussian:
    inner-product errors scale like sqrt(1/output_out + 1/output_in) rather than 1/sqrt(k).

    project_factors(delta [B, T, out_features], x [B, T, in_features])
        -> Tensor[B, output_out * output_in]
    project(g [B, out_features * in_features], row-major out x in) -> the same Tensor[B, k].
    project_output_side(b [B, out_features]) -> Tensor[B, output_out], e.g. for the bias gradient.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        output_out: int,
        output_in: int,
        seed: int,
        max_memory_mb: float = 256.0,
    ):
        for name, value in [("out_features", out_features), ("in_features", in_features),
                            ("output_out", output_out), ("output_in", output_in)]:
            _check_dim(name, value)
        super().__init__(out_features * in_features, output_out * output_in, seed)
        self.out_features, self.in_features = out_features, in_features
        self.output_out, self.output_in = output_out, output_in
        # Half the budget each, so the two factor matrices together stay within max_memory_mb.
        self._out = GaussianProjector(
            out_features, output_out, derive_seed(seed, "factored", "out"), max_memory_mb / 2
        )
        self._in = GaussianProjector(
            in_features, output_in, derive_seed(seed, "factored", "in"), max_memory_mb / 2
        )

    def project_factors(self, delta: Tensor, x: Tensor) -> Tensor:
        """
        delta: Tensor[B, T, out_features] (output gradients), x: Tensor[B, T, in_features] (inputs)
        -> Tensor[B, output_out * output_in], row-major output_out x output_in.
        """
        if delta.ndim != 3 or x.ndim != 3 or delta.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"expected delta [B, T, {self.out_features}] and x [B, T, {self.in_features}] with "
                f"matching B and T, got {tuple(delta.shape)} and {tuple(x.shape)}"
            )
        if delta.shape[-1] != self.out_features or x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected out_features {self.out_features} and in_features {self.in_features}, "
                f"got delta [..., {delta.shape[-1]}] and x [..., {x.shape[-1]}]"
            )
        if delta.dtype != x.dtype or delta.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"expected float32 or float64 delta and x of one dtype, got {delta.dtype} and {x.dtype}"
            )
        batch, tokens = delta.shape[:2]
        delta_p = self._out.project(delta.reshape(batch * tokens, -1)).view(batch, tokens, -1)
        x_p = self._in.project(x.reshape(batch * tokens, -1)).view(batch, tokens, -1)
        return torch.einsum("bto,bti->boi", delta_p, x_p).reshape(batch, -1)

    def project_output_side(self, b: Tensor) -> Tensor:
        """
        P_out b for a vector on the output side only, such as a bias gradient sum_t delta_t.

        b: Tensor[B, out_features] -> Tensor[B, output_out]; E||P_out b||^2 = ||b||^2.
        """
        return self._out.project(b)

    def _project(self, g: Tensor) -> Tensor:
        batch = g.shape[0]
        # G P_in^T: the in-projector acts on every row of each [out, in] gradient...
        right = self._in.project(g.reshape(batch * self.out_features, self.in_features))
        # ...then P_out (G P_in^T) = ((G P_in^T)^T P_out^T)^T: the out-projector acts on its columns.
        cols = right.view(batch, self.out_features, self.output_in).transpose(1, 2)
        both = self._out.project(cols.reshape(batch * self.output_in, self.out_features))
        return both.view(batch, self.output_in, self.output_out).transpose(1, 2).reshape(batch, -1)


def make_projector(kind: str, input_dim: int, output_dim: int | None, seed: int, **kwargs) -> Projector:
    """
    Build a projector by name: kind in PROJECTOR_KINDS = ("countsketch", "srht", "gaussian", "none").

    "none" is the identity: output_dim must be None or equal to input_dim. kwargs go to the
    projector's constructor (e.g. max_memory_mb for "gaussian").
    Returns: a Projector mapping Tensor[B, input_dim] -> Tensor[B, output_dim].
    """
    if kind == "none":
        if output_dim is not None and output_dim != input_dim:
            raise ValueError(
                f'kind "none" does not compress: output_dim must be None or input_dim ({input_dim}), '
                f"got {output_dim}"
            )
        return IdentityProjector(input_dim, seed, **kwargs)
    classes = {"countsketch": CountSketchProjector, "srht": SRHTProjector, "gaussian": GaussianProjector}
    if kind not in classes:
        raise ValueError(f"unknown projector kind {kind!r}; valid kinds: {', '.join(PROJECTOR_KINDS)}")
    if output_dim is None:
        raise ValueError(f'kind "{kind}" needs an output_dim')
    return classes[kind](input_dim, output_dim, seed, **kwargs)
