"""The peer methods written as outside plugins (``otprune/plugins``): CDPRUNER and POOL, checked
against slow, obvious implementations and hand-worked answers."""

import ast
import math
from pathlib import Path

import pytest
import torch

import otprune.plugins.cdpruner as cdpruner_module
import otprune.plugins.pool as pool_module
from otprune.contract import PatchGrid, kept_indices_fault, merge_fault
from otprune.methods import get_method
from otprune.plugins.cdpruner import crop_budgets, crops_of, select_cdpruner
from otprune.plugins.pool import merge_pool, pooled_shape, split_budget
from otprune.selectors import __all__ as SELECTORS_PUBLIC
from otprune.selectors import select_dpp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Registration and the public-API-only rule


def test_both_load_by_entry_point():
    cd = get_method("cdpruner")
    assert cd.kind == "selector" and cd.function is select_cdpruner
    assert cd.context == ("text", "grid") and set(cd.options) == {"theta", "negate_relevance"} and cd.required == ()
    assert not cd.accepts_batches and cd.plugin
    pool = get_method("pool")
    assert pool.kind == "merger" and pool.function is merge_pool
    assert pool.context == ("grid",) and pool.options == () and not pool.accepts_batches and pool.plugin


@pytest.mark.parametrize("module", [cdpruner_module, pool_module])
def test_plugins_import_only_the_public_api(module):
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("otprune"), alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("otprune"):
            assert node.module in ("otprune.contract", "otprune.selectors"), node.module
            for alias in node.names:
                assert not alias.name.startswith("_"), alias.name
                if node.module == "otprune.selectors":
                    assert alias.name in SELECTORS_PUBLIC, alias.name


# ---------------------------------------------------------------------------------------------
# CDPRUNER


def whole(tokens):
    """One grid over every token: one DPP, as on LLaVA-1.5."""
    return (PatchGrid(0, 1, tokens.shape[0]),)


def slow_cdpruner(tokens, text, k, theta=1.0, negate=True):
    """Step-by-step greedy on the kernel, each step's gain from torch.logdet (float64)."""
    x = tokens.double()
    t = text.double()
    similarity = torch.nn.functional.cosine_similarity(x[:, None, :], x[None, :, :], dim=-1)
    cos = torch.nn.functional.cosine_similarity(x[:, None, :], t[None, :, :], dim=-1)
    r = (-cos if negate else cos).mean(1)
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    q = r if theta == 1 else torch.exp(theta / (2 * (1 - theta)) * r)
    kernel = q[:, None] * similarity * q[None, :]
    chosen = []
    for _ in range(k):
        gains = {i: float(torch.logdet(kernel[[*chosen, i]][:, [*chosen, i]])) for i in range(len(x)) if i not in chosen}
        chosen.append(max(gains, key=gains.get))
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("theta", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("negate", [False, True])
def test_cdpruner_matches_slow_greedy(seed, theta, negate):
    tokens, text = randn(8, 6, seed=seed), randn(3, 6, seed=100 + seed)
    picks = select_cdpruner(tokens, 3, grid=whole(tokens), text=text, theta=theta, negate_relevance=negate)
    assert picks.tolist() == slow_cdpruner(tokens, text, 3, theta, negate)


def public_code_cdpruner(tokens, text, k):
    """The public code's computation (Theia-4869/CDPruner, ``encode_images``), as read there and
    written anew: cosine similarity of the unit rows in float32; relevance the mean of minus the
    cosine with each text row, then ``(r - min + 1e-6) / (max - min)``; kernel ``r_i S_ij r_j``; its
    greedy keeps, per pick, the residual variances ``d2`` and one row of ``c`` per pick so far."""
    x = tokens.float() / tokens.float().norm(dim=-1, keepdim=True)
    t = text.float() / text.float().norm(dim=-1, keepdim=True)
    similarity = x @ x.T
    r = -(x @ t.T).mean(-1)
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    kernel = r[:, None] * similarity * r[None, :]
    c = torch.zeros(k, len(x))
    d2 = kernel.diagonal().clone()
    picks = []
    for i in range(k):
        j = int(torch.argmax(d2))
        picks.append(j)
        row = (kernel[j] - c[:i, j] @ c[:i]) / torch.sqrt(d2[j])
        c[i] = row
        d2 = d2 - row**2
        d2[j] = -float("inf")
    return sorted(picks)


@pytest.mark.parametrize("seed", range(5))
def test_cdpruner_default_picks_what_the_public_code_picks(seed):
    """Fixed inputs through the default and through an emulation of the authors' code."""
    tokens, text = randn(120, 32, seed=40 + seed, dtype=torch.float32), randn(7, 32, seed=60 + seed, dtype=torch.float32)
    for k in (1, 12, 29):
        assert select_cdpruner(tokens, k, grid=whole(tokens), text=text).tolist() == public_code_cdpruner(tokens, text, k)


def public_code_cdpruner_by_crops(tokens, text, crops, per_crop):
    """The public code on LLaVA-1.6: each crop's tokens through the kernel and greedy of
    :func:`public_code_cdpruner`, but with relevance min-max normalised over every crop at once."""
    x = tokens.float() / tokens.float().norm(dim=-1, keepdim=True)
    t = text.float() / text.float().norm(dim=-1, keepdim=True)
    r_all = -(x @ t.T).mean(-1)
    everything = torch.cat(crops)
    low, high = r_all[everything].min(), r_all[everything].max()
    picks = []
    for crop in crops:
        r = (r_all[crop] - low + 1e-6) / (high - low)
        kernel = r[:, None] * (x[crop] @ x[crop].T) * r[None, :]
        c, d2 = torch.zeros(per_crop, len(crop)), kernel.diagonal().clone()
        for i in range(per_crop):
            j = int(torch.argmax(d2))
            picks.append(int(crop[j]))
            row = (kernel[j] - c[:i, j] @ c[:i]) / torch.sqrt(d2[j])
            c[i], d2 = row, d2 - row**2
            d2[j] = -float("inf")
    return picks


def test_cdpruner_on_any_resolution_tiles_runs_one_dpp_per_crop_and_keeps_the_newlines():
    # A 4 x 4 base image (tokens 0-15), then 8 x 8 tiles each row ended by a newline (tokens 16-87):
    # five crops of 16 patches (the base, four 4 x 4 tile blocks) and 8 newlines.
    tokens, text = randn(88, 12, seed=70, dtype=torch.float32), randn(5, 12, seed=71, dtype=torch.float32)
    grids = (PatchGrid(0, 4, 4), PatchGrid(16, 8, 8, newlines=True))
    crops, kept = crops_of(grids, 88)
    cell = lambda r, c: 16 + 9 * r + c  # noqa: E731
    assert kept.tolist() == [16 + 9 * r + 8 for r in range(8)]
    assert [c.tolist() for c in crops[1:]] == [[cell(r, c) for r in range(top, top + 4) for c in range(left, left + 4)] for top in (0, 4) for left in (0, 4)]
    picks = select_cdpruner(tokens, 8 + 5 * 3, grid=grids, text=text)
    expected = sorted(kept.tolist() + public_code_cdpruner_by_crops(tokens, text, crops, 3))
    assert picks.tolist() == expected
    # A budget below the newlines plus a token a crop: one DPP over every token.
    assert select_cdpruner(tokens, 12, grid=grids, text=text).tolist() == select_cdpruner(tokens, 12, grid=whole(tokens), text=text).tolist()


def test_crop_budgets_split_evenly_and_pass_on_what_a_small_crop_cannot_take():
    assert crop_budgets(15, [16] * 5) == [3] * 5
    assert crop_budgets(17, [16] * 5) == [4, 4, 3, 3, 3]
    assert crop_budgets(20, [16, 2, 16]) == [9, 2, 9]
    assert crop_budgets(0, [4, 4]) == [0, 0]


def test_cdpruner_first_two_steps_by_hand():
    # The greedy's first two picks: the best single token, then the best pair containing it.
    tokens, text = randn(8, 6, seed=3), randn(4, 6, seed=4)
    x = torch.nn.functional.normalize(tokens, dim=-1)
    r = (x @ torch.nn.functional.normalize(text, dim=-1).T).mean(1)
    q = torch.exp(0.5 * (r - r.min() + 1e-6) / (r.max() - r.min()))
    kernel = q[:, None] * (x @ x.T) * q[None, :]
    first = int(kernel.diagonal().argmax())
    second = max((i for i in range(8) if i != first), key=lambda i: float(torch.logdet(kernel[[first, i]][:, [first, i]])))
    assert select_cdpruner(tokens, 2, grid=whole(tokens), text=text, theta=0.5, negate_relevance=False).tolist() == sorted([first, second])


@pytest.mark.parametrize("theta", [0.5, 0.9, 1.0])
def test_cdpruner_constant_relevance_is_plain_dpp(theta):
    # The text lies in a feature no token uses: every cosine is 0, r is constant (zero span).
    tokens = randn(30, 8, seed=5)
    tokens[:, -1] = 0
    text = torch.zeros(2, 8, dtype=torch.float64)
    text[:, -1] = torch.tensor([1.0, 3.0])
    for k in (1, 5, 12, 30):
        assert select_cdpruner(tokens, k, grid=whole(tokens), text=text, theta=theta).tolist() == select_dpp(tokens, k).tolist()


def test_cdpruner_negate_relevance_changes_picks():
    # k = 1 picks the largest diagonal q_i^2: negated (the public code's default), the token least
    # like the question; with the paper text's sign, the most.
    text = torch.tensor([[1.0, 0.0, 0.0]])
    tokens = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.1], [0.0, 0.0, 1.0]])
    assert select_cdpruner(tokens, 1, grid=whole(tokens), text=text).tolist() == [2]
    assert select_cdpruner(tokens, 1, grid=whole(tokens), text=text, negate_relevance=False).tolist() == [0]
    assert select_cdpruner(tokens, 1, grid=whole(tokens), text=text, theta=0.5, negate_relevance=False).tolist() == [0]


@pytest.mark.parametrize("scale", [1e20, 1e-20, 2.0**100, 2.0**-100])
def test_cdpruner_scale_invariant(scale):
    # Up to the kernel's rank (d = 16) at any scale; past it the greedy fills by residual
    # variances that are rounding noise, the same only for inputs scaled exactly (a power of two).
    tokens, text = randn(60, 16, seed=6, dtype=torch.float32), randn(5, 16, seed=7, dtype=torch.float32)
    exact = math.frexp(scale)[0] == 0.5
    for k in (1, 9, 16) + ((30, 60) if exact else ()):
        expected = select_cdpruner(tokens, k, grid=whole(tokens), text=text).tolist()
        assert select_cdpruner(tokens * scale, k, grid=whole(tokens * scale), text=text).tolist() == expected
        assert select_cdpruner(tokens, k, grid=whole(tokens), text=text * scale).tolist() == expected


def test_cdpruner_theta_near_one_does_not_overflow():
    tokens, text = randn(40, 8, seed=8, dtype=torch.float32), randn(3, 8, seed=9, dtype=torch.float32)
    picks = select_cdpruner(tokens, 10, grid=whole(tokens), text=text, theta=1 - 1e-7)
    assert kept_indices_fault(picks, 40, 10, tokens.device) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cdpruner_contract(dtype, device):
    tokens = randn(50, 12, seed=10, dtype=torch.float32).to(device, dtype).requires_grad_(dtype != torch.bfloat16)
    text = randn(4, 12, seed=11, dtype=torch.float32).to(device, dtype)
    for k in (1, 7, 49, 50):
        picks = select_cdpruner(tokens, k, grid=whole(tokens), text=text)
        assert kept_indices_fault(picks, 50, k, tokens.device) is None
    dup = torch.cat([tokens.detach()[:5]] * 4)  # rank <= 5: the greedy fills past it
    assert kept_indices_fault(select_cdpruner(dup, 12, grid=whole(dup), text=text), 20, 12, tokens.device) is None


def test_cdpruner_refuses_bad_input():
    tokens, text = randn(10, 4, seed=12), randn(2, 4, seed=13)
    bad = tokens.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_cdpruner(bad, 3, grid=whole(bad), text=text)
    bad_text = text.clone()
    bad_text[0, 0] = float("inf")
    with pytest.raises(ValueError, match="text"):
        select_cdpruner(tokens, 3, grid=whole(tokens), text=bad_text)
    for k in (0, 11, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            select_cdpruner(tokens, k, grid=whole(tokens), text=text)
    for theta in (0, -0.5, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="theta"):
            select_cdpruner(tokens, 3, grid=whole(tokens), text=text, theta=theta)
    for shape in ((2, 5), (0, 4), (4,)):
        with pytest.raises(ValueError, match="text must have shape"):
            select_cdpruner(tokens, 3, grid=whole(tokens), text=torch.randn(*shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="tokens must have shape"):
        select_cdpruner(tokens[None], 3, grid=whole(tokens[None]), text=text)
    with pytest.raises(ValueError, match="dtype"):
        select_cdpruner(tokens.long(), 3, grid=whole(tokens.long()), text=text)
    with pytest.raises(ValueError, match="negate_relevance"):
        select_cdpruner(tokens, 3, grid=whole(tokens), text=text, negate_relevance=1)


# ---------------------------------------------------------------------------------------------
# POOL


def slow_pool(cells, rows, cols):
    """Adaptive average pooling of ``cells`` ``(h, w, d)`` by explicit windows (float64 means)."""
    h, w, _ = cells.shape
    out = []
    for i in range(rows):
        r0, r1 = math.floor(i * h / rows), math.ceil((i + 1) * h / rows)
        for j in range(cols):
            c0, c1 = math.floor(j * w / cols), math.ceil((j + 1) * w / cols)
            total = torch.zeros(cells.shape[-1], dtype=torch.float64)
            for a in range(r0, r1):
                for b in range(c0, c1):
                    total += cells[a, b].double()
            out.append(total / ((r1 - r0) * (c1 - c0)))
    return torch.stack(out)


def test_pool_llava15_budget_56_is_7_by_8():
    tokens = randn(576, 10, seed=20, dtype=torch.float32)
    merged, positions = merge_pool(tokens, 56, grid=(PatchGrid(0, 24, 24),))
    assert merged.shape == (56, 10) and merged.dtype == torch.float32
    torch.testing.assert_close(merged.double(), slow_pool(tokens.reshape(24, 24, 10), 7, 8), rtol=1e-6, atol=1e-6)
    # Windows over 24 rows into 7: [0,4) [3,7) [6,11) [10,14) [13,18) [17,21) [20,24); centres
    # floor((start + end - 1) / 2). 24 columns into 8: [0,3) [3,6) ... centres 1, 4, ..., 22.
    centre_rows = [1, 4, 8, 11, 15, 18, 21]
    centre_cols = [1, 4, 7, 10, 13, 16, 19, 22]
    assert positions.tolist() == [24 * r + c for r in centre_rows for c in centre_cols]
    assert merge_fault((merged, positions), 576, 56, tokens) is None


def test_pool_shapes():
    assert pooled_shape(24, 24, 56) == (7, 8)
    assert pooled_shape(24, 24, 144) == (12, 12)
    # Near-square windows (aspect within 1.5 of the grid's): 46 is 6 x 7 = 42, not 2 x 23 = 46.
    assert pooled_shape(24, 24, 46) == (6, 7)
    # 53 is prime: the largest near-square h'w' <= 53 is 49 = 7 x 7 (6 x 9 = 54 is over, 5 x 10 too long).
    assert pooled_shape(24, 24, 53) == (7, 7)
    assert pooled_shape(24, 24, 576) == (24, 24)
    assert pooled_shape(24, 24, 575) == (23, 24)
    assert pooled_shape(24, 24, 3) == (1, 1)  # 1 x 3 would be windows of 24 x 8
    assert pooled_shape(24, 24, 0) is None
    assert pooled_shape(12, 24, 50) == (5, 10)  # 50 = 5 x 10, ratio 1/2 exactly as 12/24
    assert pooled_shape(24, 12, 50) == (10, 5)
    assert pooled_shape(1, 30, 7) == (1, 7)  # a one-row grid: no shape within the factor fits
    assert pooled_shape(3, 4, 8, newlines=True) == (2, 3)  # 2*3 + 2 newlines = 8
    assert pooled_shape(3, 4, 1, newlines=True) == (1, 1)  # pooled without its newline


@pytest.mark.parametrize("h, w", [(24, 24), (24, 36), (27, 16), (16, 16)])
def test_every_pool_budget_keeps_windows_near_square(h, w):
    """Against a brute force written from METHOD.md's rule: over every budget, the shape is the
    largest fitting count among shapes whose aspect is within 1.5 of the grid's."""
    for budget in range(1, h * w + 1):
        rows, cols = pooled_shape(h, w, budget)
        assert rows * cols <= budget and rows <= h and cols <= w
        near = [(a, b) for a in range(1, h + 1) for b in range(1, w + 1) if a * b <= budget and max(a * w / (b * h), b * h / (a * w)) <= 1.5 + 1e-12]
        if near:
            assert rows * cols == max(a * b for a, b in near), (budget, rows, cols)
            assert max(rows * w / (cols * h), cols * h / (rows * w)) <= 1.5 + 1e-12, (budget, rows, cols)


def test_pool_prime_budget_gives_fewer_tokens():
    tokens = randn(576, 6, seed=21, dtype=torch.float32)
    merged, positions = merge_pool(tokens, 53, grid=(PatchGrid(0, 24, 24),))
    assert merged.shape == (49, 6)
    torch.testing.assert_close(merged.double(), slow_pool(tokens.reshape(24, 24, 6), 7, 7), rtol=1e-6, atol=1e-6)
    rows = sorted({p // 24 for p in positions.tolist()})
    assert rows == [1, 4, 8, 11, 15, 18, 21]  # windows [0,4) [3,7) [6,11) [10,14) [13,18) [17,21) [20,24)
    assert merge_fault((merged, positions), 576, 53, tokens) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_pool_full_budget_is_identity(dtype):
    tokens = randn(4 + 12 + 15, 5, seed=22, dtype=torch.float32).to(dtype)
    grids = (PatchGrid(0, 2, 2), PatchGrid(4, 3, 4), PatchGrid(16, 3, 4, newlines=True))
    merged, positions = merge_pool(tokens, 31, grid=grids)
    assert merged.dtype == dtype
    assert torch.equal(merged, tokens)
    assert positions.tolist() == list(range(31))


def test_pool_newline_grid_by_hand():
    # A 2 x 2 base grid (tokens 0-3), then 3 rows of 4 patches each ended by a newline (tokens 4-18:
    # row r's patches at 4 + 5r .. 7 + 5r, its newline at 8 + 5r).
    tokens = randn(19, 3, seed=23)
    grids = (PatchGrid(0, 2, 2), PatchGrid(4, 3, 4, newlines=True))
    merged, positions = merge_pool(tokens, 10, grid=grids)

    # Budget 10 over sizes 4 and 15: 40/19 -> 2 (rem 2), 150/19 -> 7 (rem 17): the second gets the last.
    # Base grid, budget 2: no 2 x 2 fits, and 1 x 2 is twice as wide as the grid: 1 x 1, every token.
    # Newline grid, budget 8: 2 x 3 + 2 newlines. Rows [0,2) [1,3) (centres 0, 1); columns [0,2)
    # [1,3) [2,4) (centres 0, 1, 2).
    def mean(*idx):
        return tokens[list(idx)].mean(0)

    def cell(r, c):
        return 4 + 5 * r + c

    expected = [
        mean(0, 1, 2, 3),
        mean(cell(0, 0), cell(0, 1), cell(1, 0), cell(1, 1)),
        mean(cell(0, 1), cell(0, 2), cell(1, 1), cell(1, 2)),
        mean(cell(0, 2), cell(0, 3), cell(1, 2), cell(1, 3)),
        tokens[8],
        mean(cell(1, 0), cell(1, 1), cell(2, 0), cell(2, 1)),
        mean(cell(1, 1), cell(1, 2), cell(2, 1), cell(2, 2)),
        mean(cell(1, 2), cell(1, 3), cell(2, 2), cell(2, 3)),
        tokens[13],
    ]
    torch.testing.assert_close(merged, torch.stack(expected))
    assert positions.tolist() == [0, 4, 5, 6, 8, 9, 10, 11, 13]
    assert merge_fault((merged, positions), 19, 10, tokens) is None


def test_pool_budget_split_proportional():
    assert split_budget(180, [576, 144]) == [144, 36]
    assert split_budget(10, [4, 15]) == [2, 8]
    assert split_budget(3, [5, 5, 5]) == [1, 1, 1]
    assert split_budget(2, [5, 5, 5]) == [1, 1, 0]  # equal remainders: the earlier grids first
    assert split_budget(1, [1, 100]) == [0, 1]
    tokens = randn(720, 4, seed=24, dtype=torch.float32)
    merged, positions = merge_pool(tokens, 180, grid=(PatchGrid(0, 24, 24), PatchGrid(576, 12, 12)))
    assert int((positions < 576).sum()) == 144 and int((positions >= 576).sum()) == 36
    torch.testing.assert_close(merged[144:].double(), slow_pool(tokens[576:].reshape(12, 12, 4), 6, 6), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_pool_contract_every_budget(device):
    grids = (PatchGrid(0, 3, 5), PatchGrid(15, 4, 4, newlines=True), PatchGrid(35, 1, 6), PatchGrid(41, 2, 1, newlines=True))
    n = 45
    tokens = randn(n, 7, seed=25, dtype=torch.float32).to(device)
    for k in range(1, n + 1):
        answer = merge_pool(tokens, k, grid=grids)
        assert merge_fault(answer, n, k, tokens) is None, k
    answer = merge_pool(tokens.half().requires_grad_(), 9, grid=list(grids))
    assert merge_fault(answer, n, 9, tokens.half()) is None


def test_pool_extreme_scales():
    tokens = randn(576, 4, seed=26, dtype=torch.float32)
    grid = (PatchGrid(0, 24, 24),)
    merged, positions = merge_pool(tokens, 56, grid=grid)
    for scale in (1e37, 1e-30):
        big, big_positions = merge_pool(tokens * scale, 56, grid=grid)
        assert torch.equal(big_positions, positions) and bool(torch.isfinite(big).all())
        torch.testing.assert_close(big / scale, merged, rtol=1e-5, atol=1e-6)
    huge = torch.full((4, 2), 3e38)
    merged, _ = merge_pool(huge, 1, grid=(PatchGrid(0, 2, 2),))
    assert bool(torch.isfinite(merged).all())


def test_pool_refuses_bad_input():
    tokens = randn(16, 3, seed=27)
    grid = (PatchGrid(0, 4, 4),)
    bad = tokens.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        merge_pool(bad, 4, grid=grid)
    for k in (0, 17, 3.0, False):
        with pytest.raises(ValueError, match="k must be"):
            merge_pool(tokens, k, grid=grid)
    with pytest.raises(ValueError, match="overlap"):
        merge_pool(tokens, 4, grid=(PatchGrid(0, 2, 4), PatchGrid(4, 2, 4)))
    with pytest.raises(ValueError, match="span past"):
        merge_pool(tokens, 4, grid=(PatchGrid(1, 4, 4),))
    for grid_value in ((), None, ((0, 4, 4),)):
        with pytest.raises(ValueError, match="grid must be"):
            merge_pool(tokens, 4, grid=grid_value)
    with pytest.raises(ValueError, match="tokens must have shape"):
        merge_pool(tokens[None], 4, grid=grid)
