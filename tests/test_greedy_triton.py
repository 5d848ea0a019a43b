"""The fused Triton greedy against the torch greedy: compiled on a GPU, interpreted on a CPU."""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the kernel is defined (on first import of otprune.greedy_triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from otprune.selectors import (  # noqa: E402
    DEFAULT_GAMMA,
    _cosine_similarity,
    _interaction_gram,
    greedy_logdet,
    select_dpp,
    select_otprune,
)
from otprune.synthetic_tokens import clustered_tokens  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("gamma", [0.01, 1.0])
def test_triton_greedy_picks_what_the_torch_greedy_picks(gamma):
    x = clustered_tokens(100, 24, seed=4, batch=3, dtype=torch.float64).to(DEVICE)
    kernel = _interaction_gram(x)  # OTPrune's greedy: ridge 1 / gamma on A A^T
    for k in (1, 2, 17, 100):
        fused = greedy_logdet(kernel, k, ridge=1 / gamma, path="triton")
        assert torch.equal(fused, greedy_logdet(kernel, k, ridge=1 / gamma, path="batched"))


@pytest.mark.parametrize("kernel_of", ["otprune", "cosine"])
def test_triton_greedy_in_float32_at_llava_size(kernel_of):
    """N = 576 (one LLaVA-1.5 image) in float32, as the selectors run; the rank of both kernels
    exceeds k, so no pick is a fill. k = 32 keeps the interpreter to seconds."""
    x = clustered_tokens(576, 1024, seed=8, batch=2).to(DEVICE)
    kernel, ridge = (_interaction_gram(x), 1 / DEFAULT_GAMMA) if kernel_of == "otprune" else (_cosine_similarity(x), 0.0)
    fused = greedy_logdet(kernel, 32, ridge=ridge, path="triton")
    assert torch.equal(fused, greedy_logdet(kernel, 32, ridge=ridge, path="batched"))
    assert torch.equal(fused, greedy_logdet(kernel, 32, ridge=ridge, path="host"))


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


COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from otprune.greedy_triton import _greedy_logdet_kernel
for dtype, block_n, block_k, warps in (("fp32", 1024, 8, 4), ("fp32", 4096, 2, 8), ("fp64", 128, 64, 4)):
    pointer = "*" + dtype
    signature = {"kernel_ptr": pointer, "r_ptr": pointer, "floor_ptr": pointer, "ridge_ptr": pointer, "chol_ptr": pointer,
                 "picks_ptr": "*i64", "n": "i32", "k": "i32", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    source = ASTSource(_greedy_logdet_kernel, signature, constexprs={"BLOCK_N": block_n, "BLOCK_K": block_k})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "enable_fp_fusion": False})
    assert compiled.asm["cubin"], dtype
    print("compiled", dtype, block_n)
"""


def test_triton_greedy_compiles_for_an_h100_without_one():
    """Triton's interpreter forgives code its compiler rejects: compile the kernel for sm_90 too
    (N = 576 and 2880 as LLaVA's, float64 as the tests'); no GPU is needed to build a cubin."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 3
