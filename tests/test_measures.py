import math
import re
import statistics

import pytest
import torch

from otprune.measures import (
    column_normalise,
    empirical_ot_distance,
    gaussian_w2,
    logdet_objective,
    near_duplicate_share,
    prefill_flops,
    pruned_prefill_flops,
    w2_trace_term,
)
from otprune.selectors import select_otprune

# The paper's text tokens per benchmark and LLaVA-1.6 visual tokens per benchmark (METHOD.md).
TEXT_TOKENS = [15, 15, 23, 83, 25, 113, 15, 39, 21, 91, 57]
VISUAL_16 = [2225, 1922, 2239, 1927, 2108, 1882, 2292, 2249, 2250, 1598, 2116]


def mean_tflops(model, visual, ratio):
    return statistics.mean(pruned_prefill_flops(t, v, ratio, model) for t, v in zip(TEXT_TOKENS, visual)) / 1e12


@pytest.mark.parametrize(
    "model,visual,full,pruned",
    [
        ("llava-1.5-7b", [576] * 11, 3.228, 0.512),
        ("llava-1.5-13b", [576] * 11, 6.281, 1.002),
        ("llava-1.6-7b", VISUAL_16, 11.849, 1.266),
    ],
)
def test_flops_reproduce_paper(model, visual, full, pruned):
    assert round(mean_tflops(model, visual, None), 3) == full
    assert round(mean_tflops(model, visual, 0.098), 3) == pruned


def test_flops_formula_and_layer_index():
    d, m, layers = 4096, 11008, 32
    n = 100
    assert prefill_flops(n) == layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    full = pruned_prefill_flops(20, 576, None)
    assert pruned_prefill_flops(20, 576, 0.098, layer_index=32) == full
    at_two = pruned_prefill_flops(20, 576, 0.098, layer_index=2)
    assert at_two == 2 * prefill_flops(596) / 32 + 30 * prefill_flops(76) / 32
    assert pruned_prefill_flops(20, 576, 0, layer_index=2) == 2 * prefill_flops(596) / 32 + 30 * prefill_flops(20) / 32
    with pytest.raises(ValueError, match="unknown model 'llava-9b'"):
        prefill_flops(10, "llava-9b")
    with pytest.raises(ValueError, match=r"layer_index must be in \[0, 32\]; got 33"):
        pruned_prefill_flops(1, 1, 0.5, layer_index=33)


def test_empirical_ot_known_answers():
    # Points 0 and 2 on a line, kept {0}: half the mass travels distance 2 -> cost 0.5 * 4 = 2.
    tokens = torch.tensor([[0.0], [2.0]])
    assert empirical_ot_distance(tokens, torch.tensor([0]), normalise=False) == pytest.approx(2.0)
    # Four corners of a unit square, kept one diagonal pair: each other corner moves distance 1.
    square = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert empirical_ot_distance(square, torch.tensor([0, 1]), normalise=False) == pytest.approx(0.5)
    x = torch.randn(30, 5)
    assert empirical_ot_distance(x, torch.arange(30)) == pytest.approx(0.0, abs=1e-12)


def test_gaussian_w2_matches_dense_formula():
    x = torch.randn(40, 6, dtype=torch.float64)
    kept = torch.tensor([1, 5, 9, 20, 33])
    xh = column_normalise(x)
    sigma = xh.T @ xh / 40
    sigma_s = xh[kept].T @ xh[kept] / 5
    vals, vecs = torch.linalg.eigh(sigma)
    root = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    inner = torch.linalg.eigvalsh(root @ sigma_s @ root).clamp_min(0).sqrt().sum()
    expected = sigma.trace() + sigma_s.trace() - 2 * inner
    # The dense route takes square roots of round-off-sized zero eigenvalues (k < d): ~1e-8 noise.
    assert w2_trace_term(x, kept).item() == pytest.approx(inner.item(), rel=1e-7)
    assert gaussian_w2(x, kept).item() == pytest.approx(expected.item(), rel=1e-7)
    assert gaussian_w2(x, torch.arange(40)).item() == pytest.approx(0.0, abs=1e-10)


def test_logdet_objective_is_what_otprune_maximises():
    x = torch.randn(20, 8, dtype=torch.float64)
    kept = select_otprune(x, 4)
    xh = column_normalise(x)
    a = xh @ xh.T
    kernel = torch.eye(20, dtype=torch.float64) + 0.01 * a @ a.T
    expected = torch.linalg.slogdet(kernel[kept][:, kept]).logabsdet
    assert logdet_objective(x, kept).item() == pytest.approx(expected.item(), rel=1e-12)
    # Monotone: adding tokens never lowers it.
    assert logdet_objective(x, torch.arange(20)).item() >= logdet_objective(x, kept).item()


def test_measures_reject_bad_indices():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"kept_indices must lie in \[0, 4\]"):
        gaussian_w2(x, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="non-empty 1-D integer"):
        empirical_ot_distance(x, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(N, d\)"):
        logdet_objective(torch.randn(2, 5, 3), torch.tensor([0]))
    assert math.isfinite(logdet_objective(x, [0, 1]).item())


def slow_near_duplicate_share(tokens, threshold):
    """Token by token, after subtracting the mean token: does any other token lie above
    ``threshold`` in cosine similarity?"""
    rows = tokens.tolist()
    mean = [sum(column) / len(rows) for column in zip(*rows)]
    rows = [[x - m for x, m in zip(row, mean)] for row in rows]

    def cosine(a, b):
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        return sum(x * y for x, y in zip(a, b)) / (na * nb) if na and nb else 0.0

    return sum(any(cosine(a, b) > threshold for j, b in enumerate(rows) if j != i) for i, a in enumerate(rows)) / len(rows)


def test_near_duplicate_share_against_a_slow_implementation():
    torch.manual_seed(0)
    base = torch.randn(6, 8)
    # Three base tokens repeated with a little noise: six tokens with a near-duplicate, and one
    # token at the mean, which repeats nothing.
    tokens = torch.cat([base, base[:3] + 0.01 * torch.randn(3, 8)])
    tokens = torch.cat([tokens, tokens.mean(0, keepdim=True)])
    for threshold in (0.95, 0.5, -1.0):
        assert float(near_duplicate_share(tokens, threshold=threshold)) == pytest.approx(slow_near_duplicate_share(tokens, threshold))
    assert float(near_duplicate_share(tokens)) == pytest.approx(6 / 10)
    batch = torch.stack([tokens, torch.randn(10, 8)])
    assert near_duplicate_share(batch).tolist() == pytest.approx([0.6, slow_near_duplicate_share(batch[1], 0.95)])
    # A component every token shares (a vision tower's common offset) changes nothing.
    assert float(near_duplicate_share(tokens + 100 * torch.randn(1, 8))) == pytest.approx(0.6)


@pytest.mark.parametrize(
    "tokens, threshold, message",
    [
        (torch.ones(1, 4), 0.95, "N >= 2; got (1, 4)"),
        (torch.ones(4), 0.95, "got (4,)"),
        (torch.ones(3, 4, dtype=torch.long), 0.95, "floating-point"),
        (torch.ones(3, 4), 1.0, "threshold=1.0 is not allowed; it must be a cosine in [-1, 1)"),
    ],
)
def test_near_duplicate_share_names_bad_input(tokens, threshold, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        near_duplicate_share(tokens, threshold=threshold)
