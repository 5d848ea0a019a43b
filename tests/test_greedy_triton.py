"""The fused Triton greedy against the torch greedy: compiled on a GPU, interpreted on a CPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the kernel is defined (on first import of otprune.greedy_triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from otprune.selectors import _cosine_similarity, greedy_logdet, otprune_kernel, select_dpp, select_otprune  # noqa: E402
from otprune.synthetic import clustered_tokens  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("gamma", [0.01, 1.0])
def test_triton_greedy_picks_what_the_torch_greedy_picks(gamma):
    x = clustered_tokens(100, 24, seed=4, batch=3, dtype=torch.float64).to(DEVICE)
    kernel = otprune_kernel(x, gamma)
    for k in (1, 2, 17, 100):
        assert torch.equal(greedy_logdet(kernel, k, path="triton"), greedy_logdet(kernel, k, path="batched"))


def test_triton_greedy_on_a_singular_kernel_agrees_up_to_its_rank_then_fills():
    x = clustered_tokens(60, 12, seed=5, batch=2, dtype=torch.float64).to(DEVICE)
    kernel = _cosine_similarity(x)  # rank <= 12
    fused = greedy_logdet(kernel, 40, path="triton")
    plain = greedy_logdet(kernel, 40, path="batched")
    assert torch.equal(fused[:, :12], plain[:, :12])
    for row in fused:
        assert row.unique().numel() == 40


@pytest.mark.parametrize("n", [37, 130])  # N not a power of two: masked lanes
def test_selectors_take_the_triton_path(n):
    tokens = clustered_tokens(n, 16, seed=6, batch=2, dtype=torch.float64).to(DEVICE)
    assert torch.equal(select_otprune(tokens, 9, greedy="triton"), select_otprune(tokens, 9, greedy="host"))
    assert torch.equal(select_dpp(tokens, 9, greedy="triton"), select_dpp(tokens, 9, greedy="host"))
    single = select_otprune(tokens[0].float(), 9, greedy="triton")
    assert single.shape == (9,) and single.unique().numel() == 9
