"""POOL (``BASELINE=POOL``; the downsampling baseline of VTC-Bench, arXiv 2510.07143) as an outside
plugin: adaptive average pooling of each patch grid's tokens to a smaller grid.

Written against the public API only (``torch``, ``otprune.contract``), as a package outside
otprune would write it; found as the merger ``POOL = "otprune.plugins.pool:merge_pool"``
(``otprune.methods.BUNDLED``).
"""

from __future__ import annotations

import itertools
import math

import torch

from otprune.contract import PatchGrid, check_grids, check_image_tokens

__all__ = ["merge_pool", "pooled_shape", "split_budget"]


# h'/w' within this factor (high / low) of h/w: METHOD.md's bound on a pooled grid's aspect.
ASPECT_FACTOR = (3, 2)


@torch.no_grad()
def merge_pool(tokens: torch.Tensor, k: int, *, grid: tuple[PatchGrid, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """POOL: average-pool each patch grid of one image to a smaller grid that fits the budget.

    ``tokens``: ``(N, d)``, one image's visual tokens (float16, bfloat16, float32 or float64,
    finite); ``k``: an int in ``[1, N]``; ``grid``: a tuple of :class:`PatchGrid` in token order
    (context; tokens in no grid, such as a single-tile image's lone newline, are dropped). Returns ``(merged, positions)``: ``merged`` ``(m, d)`` in
    ``tokens``' dtype and device, ``1 <= m <= k``; ``positions`` ``(m,)`` ``torch.long``, distinct,
    sorted, the token each merged token stands in for. Output is in token order.

    For one ``h x w`` grid with budget ``k_g`` it pools to ``h' x w'`` (:func:`pooled_shape`): each
    pooled token is the mean of its window of tokens, windows as
    ``torch.nn.functional.adaptive_avg_pool2d`` defines them (rows ``floor(i h / h')`` to
    ``ceil((i + 1) h / h')``, exclusive, columns alike); the mean is taken in float32 (float64
    stays float64).

    **Choices** (METHOD.md):

    - budget split: ``k`` is split over the grids in proportion to each grid's ``size`` (newline
      tokens included), ``k * size / N`` rounded down, the remaining tokens going to the largest
      remainders (the earlier grid on ties); a grid may get 0 and is then dropped whole;
    - shape (:func:`pooled_shape`, METHOD.md's rule): the largest token count ``t = h' w'`` (``+ h'``
      for a grid with newline tokens: one kept newline per pooled row) with ``t <= k_g``,
      ``h' <= h``, ``w' <= w`` and the aspect ``h'/w'`` within a factor 1.5 of ``h/w``, so that
      windows stay near-square as plain 2-D pooling's do (24 x 24 at 56 -> 7 x 8, at 144 -> 12 x 12,
      at 46 -> 6 x 7 = 42, not 2 x 23); among equal ``t`` the ratio closest to ``h/w`` in log scale,
      then fewer rows. A budget without a fitting near-square factor pair gets **fewer than**
      ``k_g`` tokens (24 x 24 at 53 -> 7 x 7 = 49). **Choice**: where no shape within the factor
      fits (a grid one row wide with a small budget), the nearest aspect among all fitting shapes;
      a newline grid whose budget is 1 pools to 1 x 1 without its newline;
    - positions: each pooled token takes the position of the cell nearest its window's centre
      (centre row ``floor((start + end - 1) / 2)``, column alike), so a rotary model reads it
      where its window sits, at that token's unpruned rotary position (Qwen's 3-D ``(t, h, w)``
      included), not where the shortened sequence puts it;
    - newline grids (LLaVA-NeXT / OneVision any-resolution): after each pooled row the grid's
      newline token of that pooled row's centre row is kept as it is (its own vector at its own
      position), so the row structure the model was trained on survives;
    - no DeepStack: only the tokens fed to the LLM's input are pooled; a model that injects
      vision features into later layers (Qwen3-VL's DeepStack) is not pooled alike here.

    Notes: tokens beyond ``2**64`` in magnitude are scaled by a power of two (exact) for the mean,
    so the float32 window sums cannot overflow. Runs without autograd.
    """
    k, grids = _check_inputs(tokens, k, grid)
    work = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    x = tokens.detach()
    # One read-back (a host synchronisation on a GPU) gives both the finiteness check and the scale.
    peak = float(x.abs().amax())
    if not math.isfinite(peak):
        raise ValueError("tokens contain NaN or Inf; every entry must be finite")
    exponent = math.frexp(peak)[1]
    scale = exponent if exponent > 64 else 0
    device = tokens.device
    pieces: list[torch.Tensor] = []
    positions: list[int] = []
    for patch_grid, share in zip(grids, split_budget(k, [g.size for g in grids]), strict=True):
        shape = pooled_shape(patch_grid.rows, patch_grid.cols, share, patch_grid.newlines)
        if shape is None:
            continue
        rows, cols = shape
        keep_newlines = patch_grid.newlines and share >= rows * cols + rows
        cells = patch_grid.cell_positions()
        values = x[patch_grid.cell_positions(device)].to(work)  # (h, w, d)
        if scale:
            # In two factors: 2**-scale or 2**scale itself need not be a finite float32.
            values = values * math.ldexp(1.0, -(scale // 2)) * math.ldexp(1.0, -(scale - scale // 2))
        pooled = torch.nn.functional.adaptive_avg_pool2d(values.permute(2, 0, 1)[None], (rows, cols))[0]
        pooled = pooled.permute(1, 2, 0)  # (h', w', d)
        if scale:
            pooled = pooled * math.ldexp(1.0, scale // 2) * math.ldexp(1.0, scale - scale // 2)
        pooled = pooled.to(tokens.dtype)
        row_centres = _centres(patch_grid.rows, rows)
        col_centres = _centres(patch_grid.cols, cols)
        newline_at = patch_grid.newline_positions().tolist()
        for i, row in enumerate(row_centres):
            pieces.append(pooled[i])
            positions.extend(int(cells[row, col]) for col in col_centres)
            if keep_newlines:
                pieces.append(x[newline_at[row]][None])
                positions.append(newline_at[row])
    if not all(a < b for a, b in itertools.pairwise(positions)) or not 1 <= len(positions) <= k:
        raise AssertionError(f"POOL built positions out of order or over budget (k={k}, grids {grids}): please report this input")
    merged = torch.cat(pieces)
    return merged, torch.tensor(positions, dtype=torch.long, device=device)


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """``k`` split over parts of the given ``sizes`` in proportion, by largest remainder.

    Part ``g`` gets ``floor(k * size_g / total)``; the tokens left go one each to the parts of
    largest remainder ``k * size_g mod total``, the earlier part first on ties. Exact integer
    arithmetic; the shares sum to ``k``.
    """
    total = sum(sizes)
    shares = [k * size // total for size in sizes]
    left = k - sum(shares)
    order = sorted(range(len(sizes)), key=lambda g: (-(k * sizes[g] % total), g))
    for g in order[:left]:
        shares[g] += 1
    return shares


def pooled_shape(h: int, w: int, budget: int, newlines: bool = False) -> tuple[int, int] | None:
    """The pooled ``(h', w')`` of an ``h x w`` grid for a ``budget`` of tokens (``None``: no token).

    Token count ``t = h' w'`` (``+ h'`` with ``newlines``), ``t <= budget``, ``h' <= h``,
    ``w' <= w``. Candidates are the pairs whose aspect ``h'/w'`` is within a factor
    ``ASPECT_FACTOR`` (1.5) of ``h/w``, as plain 2-D pooling keeps its windows near-square
    (METHOD.md); where none fits (a budget below a thin grid's narrowest such shape) every fitting
    pair is a candidate (**choice**). Best: the largest ``t``; then the ratio ``h'/w'`` closest to
    ``h/w`` in log scale (compared exactly, in integers); then the fewer rows. A newline grid with
    budget 1 (1 x 1 plus a newline needs 2) gets ``(1, 1)``, pooled without its newline.
    """
    if budget < 1:
        return None

    def count(rows: int, cols: int) -> int:
        return rows * cols + (rows if newlines else 0)

    fitting = [(a, b) for a in range(1, h + 1) for b in range(1, w + 1) if count(a, b) <= budget]
    if not fitting:
        return (1, 1)
    near = [(a, b) for a, b in fitting if _aspect_within(a, b, h, w)]
    best = None
    for a, b in near or fitting:
        if best is None or _better((a, b), best, h, w, count):
            best = (a, b)
    return best


def _aspect_within(a: int, b: int, h: int, w: int) -> bool:
    """Whether ``a/b`` is within a factor ``ASPECT_FACTOR`` of ``h/w`` (exactly, in integers)."""
    high, low = ASPECT_FACTOR
    p, q = a * w, b * h
    return low * max(p, q) <= high * min(p, q)


def _better(one: tuple[int, int], other: tuple[int, int], h: int, w: int, count) -> bool:
    t1, t2 = count(*one), count(*other)
    if t1 != t2:
        return t1 > t2
    # |log(a/b) - log(h/w)| = log(max(p, q) / min(p, q)) with p = a w, q = b h: compare the
    # fractions max/min by cross-multiplying.
    p1, q1 = one[0] * w, one[1] * h
    p2, q2 = other[0] * w, other[1] * h
    left = max(p1, q1) * min(p2, q2)
    right = max(p2, q2) * min(p1, q1)
    if left != right:
        return left < right
    return one[0] < other[0]


def _centres(size: int, pooled: int) -> list[int]:
    """The centre index ``floor((start + end - 1) / 2)`` of each of ``pooled`` adaptive windows over ``size``."""
    centres = []
    for i in range(pooled):
        start = (i * size) // pooled
        end = -((-(i + 1) * size) // pooled)
        centres.append((start + end - 1) // 2)
    return centres


def _check_inputs(tokens, k, grid) -> tuple[int, tuple[PatchGrid, ...]]:
    k = check_image_tokens(tokens, k)
    n, d = tokens.shape
    if isinstance(grid, PatchGrid):
        grid = (grid,)
    if not isinstance(grid, (tuple, list)) or not grid or not all(isinstance(g, PatchGrid) for g in grid):
        raise ValueError(f"grid must be a non-empty tuple of otprune.contract.PatchGrid in the {n} tokens; got {grid!r}")
    grids = tuple(grid)
    check_grids(grids, n)
    return k, grids
