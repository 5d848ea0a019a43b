"""The log-det greedy of ``greedy_logdet`` as one fused Triton kernel: one launch per batch.

The batched torch loop launches ~15 small kernels per selected token, so on a GPU its time is
kernel-launch latency (tens of microseconds per token), not arithmetic. Here one program per image
keeps the residual variances ``d2`` in registers and runs all ``k`` steps itself; the Cholesky rows
go to a ``(B, k, N)`` scratch tensor in global memory (L1/L2-resident at LLaVA sizes) and are read
back ``GREEDY_TILE_ELEMENTS`` at a time for the next step's residual.

Picks agree with the torch paths wherever float rounding does not decide a near-tie: the residual
sums the Cholesky rows in another order. The tests check equality in float64, and that the kernel
compiles for an sm_90 (H100) GPU, which Triton does without one. Requires ``triton``; runs under ``TRITON_INTERPRET=1`` on a CPU
(how the tests check it without a GPU), compiled on CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["greedy_logdet_triton"]

# Elements of the Cholesky tile a program holds at once (rows x padded N): 8192 floats over
# 4-8 warps keeps it in registers.
GREEDY_TILE_ELEMENTS = 8192


@triton.jit
def _greedy_logdet_kernel(kernel_ptr, r_ptr, floor_ptr, ridge_ptr, chol_ptr, picks_ptr, n, k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    image = tl.program_id(0).to(tl.int64)
    kernel_ptr += image * n * n
    chol_ptr += image * k * n
    picks_ptr += image * k
    columns = tl.arange(0, BLOCK_N)
    in_range = columns < n
    rows = tl.arange(0, BLOCK_K)
    r = tl.load(r_ptr + image * n + columns, mask=in_range, other=-float("inf"))
    floor = tl.load(floor_ptr + image)
    ridge = tl.load(ridge_ptr)
    chosen = columns >= n
    j = tl.argmax(r, axis=0)
    for t in range(k):
        tl.store(picks_ptr + t, j.to(tl.int64))
        chosen = chosen | (columns == j)
        dj2 = ridge + tl.max(tl.where(columns == j, r, -float("inf")), axis=0)
        residual = tl.load(kernel_ptr + j * n + columns, mask=in_range, other=0.0)
        for first in range(0, t, BLOCK_K):
            row = first + rows
            earlier = row < t
            c_j = tl.load(chol_ptr + row * n + j, mask=earlier, other=0.0)
            tile = tl.load(chol_ptr + row[:, None] * n + columns[None, :], mask=earlier[:, None] & in_range[None, :], other=0.0)
            residual -= tl.sum(c_j[:, None] * tile, axis=0)
        # Past the kernel's rank the step adds a zero column: every d2 stays, the fill rule.
        e = tl.where(dj2 > floor, residual / tl.sqrt(tl.maximum(dj2, floor)), 0.0)
        tl.store(chol_ptr + t * n + columns, e, mask=in_range)
        # The next step reads this row's entries from other threads.
        tl.debug_barrier()
        r = tl.where(chosen, -float("inf"), tl.maximum(r - e * e, 0.0))
        j = tl.argmax(r, axis=0)


def greedy_logdet_triton(kernel: torch.Tensor, k: int, floor: torch.Tensor, ridge: float) -> torch.Tensor:
    """``greedy_logdet``'s picks for ``kernel`` ``(B, N, N)`` with the per-image rank ``floor``
    ``(B,)`` and the ``ridge``: ``(B, k)`` long indices in the order chosen."""
    b, n, _ = kernel.shape
    kernel = kernel.contiguous()
    r = kernel.diagonal(dim1=-2, dim2=-1).clamp_min(0).contiguous()
    # A tensor, not a scalar argument: Triton would pass a Python float as float32.
    ridge = torch.full((1,), ridge, dtype=kernel.dtype, device=kernel.device)
    chol = kernel.new_empty(b, k, n)
    picks = torch.empty(b, k, dtype=torch.long, device=kernel.device)
    block_n = triton.next_power_of_2(n)
    block_k = max(1, GREEDY_TILE_ELEMENTS // block_n)
    _greedy_logdet_kernel[(b,)](
        kernel,
        r,
        floor.to(kernel.dtype).contiguous(),
        ridge,
        chol,
        picks,
        n,
        k,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4 if block_n <= 1024 else 8,
        # Unfused multiply-adds round as torch's separate operations do.
        enable_fp_fusion=False,
    )
    return picks
