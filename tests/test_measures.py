import math
import statistics

import pytest
import torch

from otprune.measures import (
    column_normalise,
    empirical_ot_distance,
    gaussian_w2,
    logdet_objective,
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
