"""Visual-token selectors: OTPrune and the baselines it is compared with.

Every selector is a plain function ``select_x(tokens, k, **options) -> kept_indices``:

- ``tokens``: ``(N, d)`` for one image or ``(B, N, d)`` for a batch (``B >= 1``) sharing one
  budget ``k``; float32, float16 or bfloat16 (float64 is kept as float64, which the exactness
  tests use); finite. Other dtypes (float8 among them), meta tensors and empty batches are refused.
- ``k``: the number of tokens to keep, an int in ``[1, N]``.
- returns a ``torch.long`` tensor of shape ``(k,)`` or ``(B, k)``: distinct indices into the
  token axis, sorted ascending (so kept tokens keep their order), on ``tokens.device``.

Kernels and greedy state are float32 whatever the input dtype. Vectors are divided by their
largest magnitude before anything is squared (``_unit_norm``), so no finite input overflows or
underflows a kernel, and the scale-invariant methods pick the same at any scale. Selection runs
without autograd. On a GPU the greedy loops run a fixed number of steps with no host
synchronisation and no Python branching on tensor values, so the selection is queued without
waiting (one finiteness check per call, of the kernel or scores where there are some, is the only
sync); a batch runs all its greedies at once. On a CPU, where a read-back costs nothing,
``greedy_logdet`` runs image by image instead (same picks; see its ``path``).

``SELECTORS`` maps the ``BASELINE`` names of the reference code to these functions. The formulas
are those of ``METHOD.md`` (kept beside the project as ``shared/METHOD.md``); the places where it
marks a *choice* are named in each docstring.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable

import torch

from otprune.checks import as_int, check_unit_interval

__all__ = [
    "GAMMA_RANGE",
    "GREEDY_PATHS",
    "SEED_RANGE",
    "SELECTORS",
    "TOKEN_DTYPES",
    "budget",
    "check_gamma",
    "check_greedy_path",
    "check_seed",
    "get_selector",
    "greedy_logdet",
    "otprune_kernel",
    "select_by_attention",
    "select_divprune",
    "select_dpp",
    "select_first",
    "select_last",
    "select_otprune",
    "select_random",
    "select_stp",
    "select_top_scores",
    "select_trim",
    "select_uniform",
]

DEFAULT_GAMMA = 0.01
DEFAULT_STP_ALPHA = 0.3
DEFAULT_TRIM_KEEP_RATIO = 0.8
# Below this residual variance a DPP candidate adds nothing; the greedy then fills its budget.
SINGULAR_EPS = 1e-10
# OTPrune's greedy runs on L / gamma = I / gamma + A A^T (see select_otprune): the ridge 1 / gamma
# must be a finite normal float32, so gamma lies in [1 / float32 max, 1 / float32's smallest normal]
# = [2.9e-39, 8.5e37]. Past the top, the ridge is lost to underflow; below the bottom it overflows.
GAMMA_RANGE = (1 / torch.finfo(torch.float32).max, 1 / torch.finfo(torch.float32).tiny)
# Dtypes the selectors take; the float8 types (no reductions on a CPU) and the rest are refused.
TOKEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch.Generator takes 64-bit unsigned seeds.
SEED_RANGE = (0, 2**64 - 1)
# How greedy_logdet may run (see its docstring).
GREEDY_PATHS = ("host", "batched", "triton")
# Guards divisions by norms of all-zero rows or columns.
NORM_EPS = 1e-12
# The CPU Gram product (``_gram``) goes by panels of this many rows (within 3 % of the fastest
# of 96-960 at both N = 576 and 2880, m = 4096), once N x m reaches GRAM_PANEL_MIN_SIZE: below
# that (A A^T at N = 576) the extra calls cost more than the flops they save.
GRAM_PANEL_ROWS = 192
GRAM_PANEL_MIN_SIZE = 1 << 20


def budget(ratio: float, n_tokens: int) -> int:
    """Tokens kept for a ``ratio`` of ``n_tokens``: ``round(ratio * n_tokens)`` clamped to ``[1, N]``.

    Rounds half up (0.098 x 576 = 56.4 -> 56), so the count never depends on banker's rounding.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a number in (0, 1]; got {ratio!r}")
    n = as_int(n_tokens, "n_tokens")
    if n < 1:
        raise ValueError(f"n_tokens must be >= 1; got {n}")
    return min(n, max(1, math.floor(ratio * n + 0.5)))


def _validate(tokens, k) -> int:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of shape (N, d) or (B, N, d); got {type(tokens).__name__}")
    if tokens.dim() not in (2, 3):
        raise ValueError(f"tokens must have shape (N, d) or (B, N, d); got shape {tuple(tokens.shape)}")
    if tokens.dtype not in TOKEN_DTYPES:
        allowed = ", ".join(str(dtype).removeprefix("torch.") for dtype in TOKEN_DTYPES)
        raise TypeError(f"tokens must be a floating-point tensor of dtype {allowed}; got {tokens.dtype}")
    if tokens.device.type == "meta":
        raise ValueError("tokens are on the meta device, which holds no values; selection reads them: pass a CPU or GPU tensor")
    if tokens.dim() == 3 and tokens.shape[0] < 1:
        raise ValueError(f"a batch of tokens must hold at least one image; got shape {tuple(tokens.shape)}")
    k = as_int(k, "k")
    n = tokens.shape[-2]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N] = [1, {n}] for tokens of shape {tuple(tokens.shape)}; got k={k}")
    if tokens.shape[-1] < 1:
        raise ValueError(f"tokens must have at least one feature; got shape {tuple(tokens.shape)}")
    return k


def _check_finite(tokens: torch.Tensor, kernel: torch.Tensor | None = None) -> None:
    """Raises unless ``tokens`` (and the ``kernel`` or scores built from them, if given) are all finite.

    min and max propagate NaN and are +-Inf when any entry is: one pass with no (B, N, d) mask,
    which torch.isfinite would allocate. Given a kernel, only the kernel is read (a non-finite
    token makes its kernel non-finite): the one host synchronisation of a call either way.
    """
    low, high = torch.aminmax(tokens if kernel is None else kernel)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    if kernel is None or not bool(torch.isfinite(torch.stack(torch.aminmax(tokens))).all()):
        raise ValueError("tokens contain NaN or Inf; every entry must be finite")
    # The kernels are built to stay finite for every finite input: this is a bug, not bad input.
    raise ArithmeticError(
        f"the selector's kernel is not finite although the tokens are (largest |token| {float(tokens.abs().max()):.3g}); please report this input"
    )


def _work_dtype(tokens: torch.Tensor) -> torch.dtype:
    return torch.float64 if tokens.dtype == torch.float64 else torch.float32


def _selector(core: Callable | None = None, *, image_by_image_on_cpu: bool = True, checks_own_kernel: bool = False) -> Callable:
    """Wraps a core ``(x: (B, N, d) float, k, **options) -> (B, k)`` into the public contract.

    ``image_by_image_on_cpu``: on a CPU, run the core on one image at a time (cores with
    batch-shaped tensor options, TRIM's ``text``, opt out); on a GPU the batch runs as one.
    ``checks_own_kernel``: the core checks its kernel's finiteness itself with
    ``_check_finite(x, kernel)``; otherwise the tokens are checked here. Selection runs without
    autograd: indices have no gradient, and tokens that require one are read like detached ones.
    ``select.__wrapped__`` is the core itself, for tests of the batched path on a CPU.

    Notes: why image by image on a CPU: a whole batch's float32 working copy (150 MB for 16 images
    of 576 x 4096) is a fresh allocation whose every page faults in on first touch, and every pass
    over it misses the caches; an image's 9 MB copy is reused from call to call. At N = 576,
    d = 4096 a batch of 16 OTPrune selections took 22x one image's time as one batch and takes 15x
    image by image (2 cores, ``otprune bench selectors``).
    """
    if core is None:
        return functools.partial(_selector, image_by_image_on_cpu=image_by_image_on_cpu, checks_own_kernel=checks_own_kernel)

    def run(tokens: torch.Tensor, k: int, options: dict) -> torch.Tensor:
        if not checks_own_kernel:
            # Checked before the float32 copy: half the bytes for float16, and a cast keeps
            # non-finite values non-finite and finite ones finite.
            _check_finite(tokens)
        return core(tokens.to(_work_dtype(tokens)), k, **options)

    @functools.wraps(core)
    @torch.no_grad()
    def select(tokens: torch.Tensor, k: int, **options) -> torch.Tensor:
        k = _validate(tokens, k)
        single = tokens.dim() == 2
        batch = tokens.unsqueeze(0) if single else tokens
        if image_by_image_on_cpu and batch.device.type == "cpu":
            picks = torch.cat([run(image, k, options) for image in batch.split(1)])
        else:
            picks = run(batch, k, options)
        kept_indices = picks.sort(dim=-1).values
        return kept_indices[0] if single else kept_indices

    return select


def _unit_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` scaled to unit L2 norm along ``dim`` (all-zero vectors stay zero), for any finite ``x``.

    ``x``: ``(..., N, m)`` float; ``dim``: -1 (rows) or -2 (columns); returns a new tensor of
    ``x``'s shape and dtype. The result does not depend on the input's scale: no float32 overflow
    (tokens of 1e20) or underflow (tokens of 1e-20), and inputs scaled by a power of two give
    bit-identical results. A non-finite entry makes its vector non-finite, which the kernel's
    finiteness check catches.

    Notes: columns (``dim=-2``, OTPrune's ``X_hat``) on a CPU, where reading a value back costs
    nothing, take a faster way than per-vector peaks, whose strided reductions cost more than the
    rest of the normalisation: one contiguous reduction finds the tensor's largest magnitude; where squaring could overflow or underflow, ``x`` is first scaled by
    a power of two (exact, so the result is the same). Only where a vector's sum of squares is tiny
    next to that largest magnitude (its own squares may have lost digits) is the tensor redone
    vector by vector (:func:`_unit_norm_by_vector_peak`). Rows, whose per-vector reductions are
    contiguous and cheap, and every tensor on a GPU (deciding would wait for the device) take the
    vector-by-vector form.
    """
    if x.device.type != "cpu" or x.numel() == 0 or dim % x.dim() != x.dim() - 2:
        return _unit_norm_by_vector_peak(x, dim)
    low, high = torch.aminmax(x)
    exponent = math.frexp(max(float(high), -float(low)))[1]
    if not _SAFE_PEAK_EXPONENTS[0] <= exponent <= _SAFE_PEAK_EXPONENTS[1]:
        # In two factors: 2**-exponent itself need not be a finite float32 (tokens of 1e-40).
        half = -exponent // 2
        x = x * math.ldexp(1.0, half) * math.ldexp(1.0, -exponent - half)
        exponent = 0
    squares = torch.mul(x, x)
    norm = squares.sum(dim, keepdim=True)
    if bool((norm < math.ldexp(1.0, 2 * exponent + _SMALLEST_RELATIVE_SQUARED_NORM_EXPONENT)).any()):
        return _unit_norm_by_vector_peak(x, dim)
    return torch.div(x, norm.sqrt_(), out=squares)


# The largest magnitudes (as 2**e, e = frexp's exponent) whose squares, summed over a few thousand
# entries, neither overflow nor lose the digits of the vectors that matter in float32; and the sum
# of squares, relative to the largest square, below which a vector is redone by its own peak
# (above it, entries whose squares underflow are below 2**-20 of the vector's norm).
_SAFE_PEAK_EXPONENTS = (-20, 50)
_SMALLEST_RELATIVE_SQUARED_NORM_EXPONENT = -40


def _unit_norm_by_vector_peak(x: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`_unit_norm` with each vector divided by its own largest magnitude first: its squares
    lie in [0, 1] and its norm in [1, sqrt(length)] whatever the scales of the other vectors."""
    # amax and amin rather than aminmax: 50x faster for the strided column reduction on a CPU.
    peak = torch.maximum(x.amax(dim, keepdim=True), x.amin(dim, keepdim=True).neg_())
    peak.clamp_min_(torch.finfo(x.dtype).smallest_normal)
    # Sum of squares rather than torch.norm: the same value, 5x faster for the strided column
    # reduction on a CPU. The squares' buffer then takes the result: one (N, d) allocation fewer,
    # whose fresh pages cost a CPU more time than the division that refills it.
    unit = torch.div(x, peak)
    norm = unit.square_().sum(dim, keepdim=True).sqrt_().clamp_min_(NORM_EPS)
    return torch.div(x, peak, out=unit).div_(norm)


def _image_peak(x: torch.Tensor) -> torch.Tensor:
    """The largest magnitude in each image of ``x`` ``(B, M, d)``: ``(B, 1, 1)``, at least the
    smallest normal number (so that an all-zero image divides to zeros)."""
    return x.abs().amax((-2, -1), keepdim=True).clamp_min_(torch.finfo(x.dtype).smallest_normal)


def _cosine_similarity(x: torch.Tensor) -> torch.Tensor:
    return _gram(_unit_norm(x, dim=-1))


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x @ x^T`` for ``x`` of shape ``(..., N, m)``; returns ``(..., N, N)``.

    Notes: on a CPU a large product multiplies only the upper triangle, one panel of
    ``GRAM_PANEL_ROWS`` rows at a time (rows ``i..i+p`` against rows ``i..N``), and mirrors it: up
    to half the flops; on 2 cores 25-35 % less time for m = 4096 at N = 576 and 2880, 35 % for
    ``A A^T`` at N = 2880. On a GPU one product is faster than several smaller ones, so the BLAS
    gets it whole.
    """
    n, m = x.shape[-2:]
    if x.device.type != "cpu" or n <= GRAM_PANEL_ROWS or n * m < GRAM_PANEL_MIN_SIZE:
        return x @ x.transpose(-1, -2)
    gram = x.new_empty(*x.shape[:-1], n)
    for start in range(0, n, GRAM_PANEL_ROWS):
        stop = min(start + GRAM_PANEL_ROWS, n)
        panel = x[..., start:stop, :] @ x[..., start:, :].transpose(-1, -2)
        gram[..., start:stop, start:] = panel
        gram[..., stop:, start:stop] = panel[..., stop - start :].transpose(-1, -2)
    return gram


def _batch_index(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[0], device=x.device)


def greedy_logdet(kernel: torch.Tensor, k: int, eps: float = SINGULAR_EPS, *, ridge: float = 0.0, path: str | None = None) -> torch.Tensor:
    """Greedy MAP of ``log det(L_S)`` for ``L = ridge * I + kernel`` by incremental Cholesky
    (Chen, Zhang & Zhou 2018).

    ``kernel``: ``(B, N, N)`` symmetric PSD float tensor; ``ridge >= 0``. Returns the ``(B, k)``
    picks in the order chosen (not sorted). ``d2[i] = ridge + r[i]`` is the residual variance of
    candidate ``i`` given the picks so far, so ``log d2[i]`` is its marginal gain; each step takes
    the largest. The loop tracks ``r`` (``kernel``'s share) apart from the ridge: ``ridge + r``
    would lose ``r``'s digits in float32 wherever ``r << ridge``. ``r >= 0`` in exact arithmetic,
    so rounding that takes it below 0 is clamped.

    ``ridge > 0`` (OTPrune's ``I / gamma + A A^T``): every ``d2 >= ridge > 0``, so every step is a
    Cholesky step and the greedy never runs out of candidates (METHOD.md: ``d2 >= 1`` for
    ``I + gamma A A^T``).

    ``ridge = 0`` (DPP): when the largest remaining ``d2`` is ``<= max(eps, 100 * machine epsilon
    * max diag(kernel))`` the kernel has no rank left (**deviation** from METHOD.md's plain
    ``1e-10``, which float32 rounding noise exceeds, so the fill rule would never fire there): the
    step then adds a zero Cholesky column, which leaves every ``d2`` unchanged, so the remaining
    picks are the unchosen candidates of largest ``d2`` (METHOD.md's fill rule for a singular DPP
    kernel), decided without reading any value back to the host.

    A batch gives each image the picks it gets alone, except where float32 rounding (which BLAS
    may do differently for different batch sizes and thread counts) decides a near-tie; in
    float64 they agree exactly.

    ``path`` says how the same greedy runs (default ``"host"`` for CPU tensors, else ``"batched"``):

    - ``"host"``: one image at a time, each pick read back as a Python int. On a GPU every
      read-back stalls the queue; on a CPU it is free, and this loop needs half the tensor
      operations per step of the batched one.
    - ``"batched"``: every image at once, a fixed number of steps, no host synchronisation.
    - ``"triton"``: ``otprune.greedy_triton``'s fused kernel, one launch for the whole greedy
      (needs ``triton``). Opt-in: its GPU speed is still to be measured (``bench_selectors``).

    All pick the same indices (tested in float64; for ``"triton"`` up to the kernel's rank, past
    which the fill order follows rounding noise that it sums in another order).
    """
    path = _greedy_path(path, kernel.device)
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0; got {ridge!r}")
    r = kernel.diagonal(dim1=-2, dim2=-1).clamp_min(0)
    if ridge > 0:
        floor = r.new_zeros(r.shape[0])
    else:
        # Residual variances are exact only to rounding of the kernel's scale: below that, "no
        # rank left" (float32 noise would otherwise pass for volume).
        floor = torch.clamp_min(100 * torch.finfo(kernel.dtype).eps * r.amax(-1), eps)
    if path == "host":
        return torch.stack([_greedy_logdet_one(kernel[i], r[i], floor[i], ridge, k) for i in range(kernel.shape[0])])
    if path == "triton":
        from otprune.greedy_triton import greedy_logdet_triton

        return greedy_logdet_triton(kernel, k, floor, ridge)
    b, n, _ = kernel.shape
    batch = _batch_index(kernel)
    # Row t holds the t-th Cholesky column for every candidate; rows stay contiguous as they grow.
    chol = kernel.new_zeros(b, k, n)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=kernel.device)
    picks = torch.empty(b, k, dtype=torch.long, device=kernel.device)
    j = r.argmax(dim=-1)
    for t in range(k):
        picks[:, t] = j
        if t == k - 1:
            break
        chosen[batch, j] = True
        dj2 = ridge + r[batch, j]
        c_j = chol[batch, :t, j]
        residual = kernel[batch, j] - (c_j[:, None, :] @ chol[:, :t]).squeeze(1)
        has_rank = dj2 > floor
        e = torch.where(has_rank[:, None], residual / torch.maximum(dj2, floor).sqrt()[:, None], 0.0)
        chol[:, t] = e
        # Chosen candidates are excluded for good.
        r = (r - e.square()).clamp_min_(0).masked_fill_(chosen, -math.inf)
        j = r.argmax(dim=-1)
    return picks


def check_greedy_path(path: str) -> str:
    """``path`` if it is one of ``GREEDY_PATHS`` and can run here (``"triton"`` needs triton)."""
    if path not in GREEDY_PATHS:
        raise ValueError(f"greedy path must be one of {', '.join(GREEDY_PATHS)} (or None for the device's default); got {path!r}")
    if path == "triton" and importlib.util.find_spec("triton") is None:
        raise ImportError("the 'triton' greedy path needs the triton package (pip install triton); use 'batched' or 'host'")
    return path


def _greedy_path(path: str | None, device: torch.device) -> str:
    if path is None:
        return "host" if device.type == "cpu" else "batched"
    return check_greedy_path(path)


def _greedy_logdet_one(kernel: torch.Tensor, r: torch.Tensor, floor: torch.Tensor, ridge: float, k: int) -> torch.Tensor:
    """``greedy_logdet`` for one ``(N, N)`` kernel, picks read back to the host (its ``"host"`` path)."""
    chol = kernel.new_zeros(k, kernel.shape[0])
    chosen = torch.zeros(kernel.shape[0], dtype=torch.bool, device=kernel.device)
    picks = []
    j = int(r.argmax())
    for t in range(k):
        picks.append(j)
        if t == k - 1:
            break
        chosen[j] = True
        dj2 = ridge + r[j]
        if dj2 > floor:
            chol[t] = (kernel[j] - chol[:t, j] @ chol[:t]) / dj2.sqrt()
            r.sub_(chol[t].square()).clamp_min_(0)
        r.masked_fill_(chosen, -math.inf)
        j = int(r.argmax())
    return torch.tensor(picks, dtype=torch.long, device=kernel.device)


def check_gamma(value, name: str = "gamma") -> float:
    """``value`` as a float if it is a number in ``GAMMA_RANGE`` (OTPrune's gamma)."""
    low, high = GAMMA_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low:.3g}, {high:.3g}] (where OTPrune's float32 ridge 1/gamma is a normal number); got {value!r}")
    return float(value)


def _interaction_gram(x: torch.Tensor) -> torch.Tensor:
    """``A A^T`` with ``A = X_hat X_hat^T``: ``(..., N, d) -> (..., N, N)`` in ``x``'s dtype.

    ``X_hat`` scales each embedding dimension (column) to unit L2 norm over the N tokens, without
    centring (METHOD.md step 1), whatever the tokens' scale (``_unit_norm``). Its entries lie in
    [-1, 1], so every entry of ``A A^T`` is at most ``d^2`` in magnitude: finite for any finite
    input. Built the cheaper way: as the Gram products ``A = X_hat X_hat^T`` and ``A A^T``
    (``2N^2 d + 2N^3`` flops, halved on a CPU by ``_gram``) when ``d >= N``, as for LLaVA's
    4096-wide tokens, else as ``X_hat (X_hat^T X_hat) X_hat^T`` (``2N d^2 + 2N^2 d``).
    """
    n, d = x.shape[-2:]
    x_hat = _unit_norm(x, dim=-2)
    if d >= n:
        return _gram(_gram(x_hat))
    x_hat_t = x_hat.transpose(-1, -2)
    return (x_hat @ (x_hat_t @ x_hat)) @ x_hat_t


def otprune_kernel(x: torch.Tensor, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """OTPrune's kernel ``L = I + gamma * A A^T`` with ``A = X_hat X_hat^T`` (see ``_interaction_gram``).

    ``x``: ``(..., N, d)``; returns ``(..., N, N)`` in ``x``'s dtype. ``select_otprune`` runs its
    greedy on ``L / gamma`` instead, which keeps in float32 the digits that ``1 + gamma * ...``
    loses for a small ``gamma``.
    """
    kernel = check_gamma(gamma) * _interaction_gram(x)
    kernel.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return kernel


@_selector(checks_own_kernel=True)
def select_otprune(x: torch.Tensor, k: int, *, gamma: float = DEFAULT_GAMMA, greedy: str | None = None) -> torch.Tensor:
    """OTPrune (``BASELINE=OURS``): greedy maximisation of ``log det(I + gamma A_S A_S^T)``.

    The objective is the log-det lower bound of the Gaussian 2-Wasserstein alignment between the
    kept and the full token set; it is monotone submodular, so the greedy is within ``1 - 1/e`` of
    the best subset. Because ``L = I + PSD``, every unchosen candidate keeps ``d2 >= 1``: the
    greedy never runs out of candidates, whatever the tokens (one dominant token included).

    The greedy runs on ``L / gamma = I / gamma + A A^T`` (``greedy_logdet`` with ``ridge = 1 /
    gamma``): scaling a kernel by ``c`` adds ``k log c`` to the log det of every k-subset, so the
    picks are ``L``'s, while float32 keeps ``A A^T``'s digits that ``1 + gamma * A A^T`` rounds
    away for a small ``gamma`` (``I + 1e-9 A A^T`` is ``I`` in float32) and no entry overflows for
    a large one. ``gamma`` must lie in ``GAMMA_RANGE``, where ``1 / gamma`` is a normal float32.

    **Choice** (METHOD.md): ``gamma = 0.01`` by default, the value the paper's sensitivity study
    favours; pass ``gamma=`` to override. ``greedy`` is ``greedy_logdet``'s ``path``.
    """
    gamma = check_gamma(gamma)
    interaction = _interaction_gram(x)
    _check_finite(x, interaction)
    return greedy_logdet(interaction, k, ridge=1 / gamma, path=greedy)


@_selector(checks_own_kernel=True)
def select_dpp(x: torch.Tensor, k: int, *, greedy: str | None = None) -> torch.Tensor:
    """DPP (``BASELINE=DPP``): the same greedy MAP on the cosine-similarity kernel ``X~ X~^T``.

    **Choice** (METHOD.md): the paper names the method, not its kernel; rows are L2-normalised.
    The kernel has rank <= d and is singular for duplicate tokens: once no candidate adds any
    volume the budget is filled with the unchosen tokens of largest residual variance.
    ``greedy`` is ``greedy_logdet``'s ``path``.
    """
    kernel = _cosine_similarity(x)
    _check_finite(x, kernel)
    return greedy_logdet(kernel, k, path=greedy)


@_selector(checks_own_kernel=True)
def select_divprune(x: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune (``BASELINE=DIVPRUNE``): greedy max-min diversity under cosine distance.

    ``D = 1 - cos``. The first pick is the token farthest from its nearest other token; each
    later pick is the unchosen token whose distance to the nearest chosen token is largest.
    """
    similarity = _cosine_similarity(x)
    _check_finite(x, similarity)
    distance = 1.0 - similarity
    b, n, _ = distance.shape
    batch = _batch_index(x)
    nearest_other = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), math.inf).amin(-1)
    j = nearest_other.argmax(-1)
    min_to_chosen = torch.full((b, n), math.inf, dtype=distance.dtype, device=x.device)
    picks = torch.empty(b, k, dtype=torch.long, device=x.device)
    for t in range(k):
        picks[:, t] = j
        min_to_chosen = torch.minimum(min_to_chosen, distance[batch, j])
        min_to_chosen[batch, j] = -math.inf
        j = min_to_chosen.argmax(-1)
    return picks


def check_seed(value, name: str = "seed") -> int:
    """``value`` as an int if it is in ``SEED_RANGE``, the seeds ``torch.Generator`` takes."""
    seed = as_int(value, name)
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise ValueError(f"{name} must be an int in [{low}, 2**64 - 1]; got {seed}")
    return seed


@_selector
def select_random(x: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Random (``BASELINE=RANDOM``): k distinct tokens uniformly at random.

    The draw comes from a CPU generator seeded with ``seed``: the same N, k and seed give the same
    subset on every device, alone or in a batch (every batch element gets that subset), so a batch
    prunes as its images do one by one. Vary ``seed`` for other draws.
    """
    seed = check_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    b, n, _ = x.shape
    scores = torch.rand(n, generator=generator)
    return scores.argsort(stable=True)[:k].to(x.device).expand(b, k)


def select_top_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(N,)`` scores -> the sorted indices of the ``k`` largest (ties: lower index first)."""
    order = scores.float().argsort(descending=True, stable=True)
    return order[:k].sort().values


def select_by_attention(tokens: torch.Tensor, k: int, *, attention: torch.Tensor) -> torch.Tensor:
    """FastV: the ``k`` tokens the last prompt token attends to most (``attention`` ``(N,)``)."""
    return select_top_scores(attention, k).to(tokens.device)


@_selector
def select_first(x: torch.Tensor, k: int) -> torch.Tensor:
    """First (``BASELINE=FIRST``): tokens ``0 .. k-1``."""
    return torch.arange(k, device=x.device).expand(x.shape[0], k)


@_selector
def select_last(x: torch.Tensor, k: int) -> torch.Tensor:
    """Last (``BASELINE=LAST``): tokens ``N-k .. N-1``."""
    n = x.shape[-2]
    return torch.arange(n - k, n, device=x.device).expand(x.shape[0], k)


@_selector
def select_uniform(x: torch.Tensor, k: int) -> torch.Tensor:
    """Uniform (``BASELINE=UNIFORM``): ``round(linspace(0, N-1, k))``.

    For ``k <= N`` the step is >= 1, so the rounded positions are already distinct.
    """
    n = x.shape[-2]
    positions = torch.linspace(0, n - 1, k, dtype=torch.float64).round().long()
    return positions.to(x.device).expand(x.shape[0], k)


@_selector(image_by_image_on_cpu=False, checks_own_kernel=True)
def select_trim(x: torch.Tensor, k: int, *, text: torch.Tensor | None = None, keep_ratio: float = DEFAULT_TRIM_KEEP_RATIO) -> torch.Tensor:
    """TrimTokenator (``BASELINE=TRIM``): a text-alignment filter, then RepMax coverage.

    ``text``: ``(T, d)`` or ``(B, T, d)`` embeddings of the prompt's text tokens (required).
    Stage 1 scores ``alpha_i = -mean_j ||x_i - t_j||`` and keeps the ``N1 = max(k, floor(keep_ratio
    * N))`` best-aligned tokens. Stage 2 (RepMax) starts from the token least similar on average to
    the others and repeatedly adds the token least covered so far (smallest summed cosine
    similarity to the chosen ones).

    **Choice** (METHOD.md): ``text`` is the embedded text that follows the image in the prompt
    (the question); ``keep_ratio = 0.8``.
    """
    keep_ratio = check_unit_interval(keep_ratio, "keep_ratio", closed_low=False)
    b, n, d = x.shape
    text = _check_text(text, b, d).to(device=x.device, dtype=x.dtype)
    # Distances scale with the tokens: measured on tokens and text divided by their largest
    # magnitude, the ranking is the same and cannot overflow (tokens of 1e20) or underflow.
    peak = torch.maximum(_image_peak(x), _image_peak(text))
    alignment = -torch.cdist(x / peak, text / peak).mean(-1)
    _check_finite(x, alignment)
    n1 = max(k, math.floor(keep_ratio * n))
    candidates = alignment.argsort(dim=-1, descending=True, stable=True)[:, :n1]
    x1 = x.gather(1, candidates[..., None].expand(b, n1, d))
    similarity = _cosine_similarity(x1)
    batch = _batch_index(x)
    j = similarity.mean(-1).argmin(-1)
    coverage = torch.zeros(b, n1, dtype=x.dtype, device=x.device)
    picks = torch.empty(b, k, dtype=torch.long, device=x.device)
    for t in range(k):
        picks[:, t] = j
        coverage = coverage + similarity[batch, j]
        coverage[batch, j] = math.inf
        j = coverage.argmin(-1)
    # A chosen candidate's coverage was set to +inf, later additions keep it there.
    return candidates.gather(1, picks)


def _check_text(text, batch: int, width: int) -> torch.Tensor:
    if text is None:
        raise ValueError("TRIM needs the prompt's text-token embeddings: pass text= of shape (T, d) or (B, T, d)")
    if not isinstance(text, torch.Tensor) or not text.is_floating_point():
        raise TypeError(f"text must be a floating-point torch.Tensor; got {type(text).__name__}")
    given = tuple(text.shape)
    if text.dim() == 2:
        text = text.unsqueeze(0).expand(batch, -1, -1)
    if text.dim() != 3 or text.shape[0] != batch or text.shape[-1] != width or text.shape[1] < 1:
        raise ValueError(f"text must have shape (T, {width}) or ({batch}, T, {width}) with T >= 1 to match the tokens; got {given}")
    if not bool(torch.isfinite(text).all()):
        raise ValueError("text contains NaN or Inf; every entry must be finite")
    return text


def _min_max(v: torch.Tensor) -> torch.Tensor:
    low = v.amin(-1, keepdim=True)
    span = v.amax(-1, keepdim=True) - low
    return (v - low) / span.clamp_min(NORM_EPS)


@_selector(checks_own_kernel=True)
def select_stp(x: torch.Tensor, k: int, *, alpha: float = DEFAULT_STP_ALPHA) -> torch.Tensor:
    """STP (``BASELINE=STP``): top-k of ``alpha * diversity + (1 - alpha) * importance``.

    Diversity ``z_i``: cosine distance from token i to its nearest other token. Importance
    ``h_i = ||(x_i - mu) / (sigma + 1e-6)|| * max_c |x_ic|`` with the per-dimension mean and
    (population) standard deviation over the N tokens.

    **Choice** (METHOD.md): both scores are min-max normalised to [0, 1] over the N tokens before
    mixing; unnormalised, ``h`` is ~sqrt(d) times larger than ``z`` and ``alpha`` would do nothing.
    ``alpha = 0.3`` by default.
    """
    alpha = check_unit_interval(alpha, "alpha", closed_low=True)
    n = x.shape[-2]
    similarity = _cosine_similarity(x)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    diversity = 1.0 - similarity.masked_fill(eye, -math.inf).amax(-1)
    if n == 1:
        diversity = torch.zeros_like(diversity)
    # h on the tokens divided by their largest magnitude p: (x - mu) / (sigma + 1e-6) is
    # (y - mu_y) / (sigma_y + 1e-6 / p) and max |x| is p max |y|, a factor the min-max removes;
    # in y no square or product overflows (tokens near float32's maximum gave the first k).
    peak = _image_peak(x)
    y = x / peak
    mu = y.mean(-2, keepdim=True)
    sigma = y.std(-2, keepdim=True, unbiased=False)
    importance = ((y - mu) / (sigma + 1e-6 / peak)).norm(dim=-1) * y.abs().amax(-1)
    score = alpha * _min_max(diversity) + (1 - alpha) * _min_max(importance)
    _check_finite(x, score)
    return score.argsort(dim=-1, descending=True, stable=True)[:, :k]


SELECTORS: dict[str, Callable[..., torch.Tensor]] = {
    "OURS": select_otprune,
    "DIVPRUNE": select_divprune,
    "DPP": select_dpp,
    "RANDOM": select_random,
    "FIRST": select_first,
    "LAST": select_last,
    "UNIFORM": select_uniform,
    "TRIM": select_trim,
    "STP": select_stp,
}


def get_selector(name: str) -> Callable[..., torch.Tensor]:
    """The selector registered as ``name`` (case-insensitive)."""
    key = name.upper() if isinstance(name, str) else name
    if key not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; allowed: {', '.join(SELECTORS)}")
    return SELECTORS[key]
