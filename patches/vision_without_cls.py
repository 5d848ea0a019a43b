"""The vision context (``otprune.contract.VisionContext``) of Qwen's ViT (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL), a tower without a [CLS], captured by hooks while the model's own tower runs.

Hooks record, at one block, its attention's fused ``qkv`` output and the ``cu_seqlens`` and rotary
``position_embeddings`` it is called with, and, at the merger, the input of its MLP. The attention
is computed here from those queries and keys (rotary applied with the model's own
``apply_rotary_pos_emb_vision``), in float32, so it is the same under every attention backend.
Hooks are registered only for a method that asks for the context, and only for the tower's call.

**Choices** (METHOD.md, "Vision context"):

- *the block*: the last block, whose output goes to the merger, when it attends over the whole
  frame (Qwen2-VL, Qwen3-VL, and Qwen2.5-VL's released and tiny configurations, whose last block is
  in ``fullatt_block_indexes``); else Qwen2.5-VL's last full-attention block, so that "all queries"
  are all the frame's patches, never a window's. Both METHOD forms are measured there.
- *no [CLS]*: the score of a patch is the mean attention it receives over all queries of its own
  frame (the ``cu_seqlens`` segment it sits in; a video's temporal step, an image), per head.
- *merged tokens*: each LLM token is the merger's 2 x 2 group of consecutive patches (the
  processor orders patches so), and takes the mean of its patches' values: ``head_attention``
  ``(H, N)`` per head; ``cls_attention`` ``(N,)`` the head average of ``head_attention``;
  ``keys`` ``(N, C)`` the full-width post-rotary keys; ``head_keys`` ``(N, C / H)`` also averaged
  over heads.
- *features* ``(N, 4 C)``: what the merger's MLP receives for the token (its norm applied per
  patch, the four patches side by side); the projector of a method before it is the rest of the
  merger, its MLP. ``cls_feature`` and ``patches`` are ``None``: every token is a merged patch.
- Qwen2.5-VL runs its blocks and merger on patches reordered by window; the rows are put back in
  the model's token order with its own window index.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch

from otprune.contract import VisionContext

__all__ = ["QwenCapture", "capture_qwen_tower", "context_block", "merger_mlp", "received_attention", "unit_contexts"]

# Rows of attention formed at once: bounds the memory of the (heads, rows, patches) scores.
_SCORE_ELEMENTS = 1 << 26


def context_block(visual) -> int:
    """The index of the block the context is measured at (see the module's choices)."""
    last = len(visual.blocks) - 1
    full = getattr(visual, "fullatt_block_indexes", None)
    if full is None or last in full:
        return last
    if not full:
        raise ValueError("the vision context needs a block that attends over whole frames; this Qwen2.5-VL tower has none")
    return max(full)


def merger_mlp(merger):
    """``(module, project)``: the merger's first module after its norm (whose input is the
    features) and the merger's MLP as a function of them (Qwen2/2.5-VL: ``mlp``; Qwen3-VL:
    ``linear_fc1``, ``act_fn``, ``linear_fc2``)."""
    if hasattr(merger, "mlp"):
        return merger.mlp, merger.mlp
    return merger.linear_fc1, lambda features: merger.linear_fc2(merger.act_fn(merger.linear_fc1(features)))


@dataclass
class _Call:
    grid_thw: torch.Tensor
    qkv: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    position_embeddings: tuple | None = None
    features: torch.Tensor | None = None


@dataclass
class QwenCapture:
    """What the hooks recorded, one entry per call of the tower (images, then videos)."""

    visual: object
    calls: list[_Call] = field(default_factory=list)

    def frames(self) -> list[VisionContext]:
        """One :class:`VisionContext` per frame (``t`` of each grid, in the tower's order), float32."""
        return [frame for call in self.calls for frame in _call_frames(self.visual, call)]


def _call_frames(visual, call: _Call) -> list[VisionContext]:
    attention = visual.blocks[context_block(visual)].attn
    heads = attention.num_heads
    unit = visual.spatial_merge_size**2
    patches = call.qkv.shape[0]
    q, k, _ = call.qkv.float().reshape(patches, 3, heads, -1).unbind(1)
    cos, sin = (t.float() for t in call.position_embeddings)
    q, k = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
    received = received_attention(q, k, call.cu_seqlens.tolist())
    order = _token_order(visual, call.grid_thw).to(q.device)

    def merged(per_patch: torch.Tensor) -> torch.Tensor:
        """``(P, ...)`` patch rows to ``(P / unit, ...)`` merged-token rows in token order."""
        return per_patch.reshape(patches // unit, unit, *per_patch.shape[1:]).mean(1)[order]

    head_attention = merged(received.T).T
    keys, head_keys = merged(k.flatten(1)), merged(k.mean(1))
    features = call.features.float()[order]
    frames = []
    start = 0
    for t, h, w in call.grid_thw.tolist():
        for _ in range(t):
            end = start + h * w // unit
            frames.append(
                VisionContext(
                    features=features[start:end],
                    cls_attention=head_attention[:, start:end].mean(0),
                    keys=keys[start:end],
                    head_attention=head_attention[:, start:end],
                    head_keys=head_keys[start:end],
                )
            )
            start = end
    return frames


def received_attention(q: torch.Tensor, k: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
    """``(H, P)``: per head, the mean over the queries of a patch's segment of the softmax
    attention they give it (``q``, ``k`` ``(P, H, D)``; segments ``cu_seqlens``, each softmax over
    its segment's keys). Also the no-[CLS] score of ``vision_tower`` (OneVision's SigLIP crops)."""
    heads, width = q.shape[1], q.shape[2]
    received = q.new_zeros(heads, q.shape[0])
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        keys = k[start:end].transpose(0, 1)
        step = max(1, _SCORE_ELEMENTS // (heads * (end - start)))
        for row in range(start, end, step):
            queries = q[row : min(row + step, end)].transpose(0, 1)
            scores = torch.softmax(queries @ keys.transpose(1, 2) / width**0.5, dim=-1)
            received[:, start:end] += scores.sum(1)
        received[:, start:end] /= end - start
    return received


def _token_order(visual, grid_thw: torch.Tensor) -> torch.Tensor:
    """The merged rows' order back to the tokens' (Qwen2.5-VL's window reordering undone)."""
    tokens = int((grid_thw.prod(-1) // visual.spatial_merge_size**2).sum())
    if getattr(visual, "fullatt_block_indexes", None) is None:
        return torch.arange(tokens)
    if hasattr(visual, "get_window_index"):
        window_index, _ = visual.get_window_index(grid_thw)
    else:
        window_index, _ = sys.modules[type(visual).__module__].get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size, patch_size=visual.patch_size
        )
    return torch.argsort(window_index)


@contextlib.contextmanager
def capture_qwen_tower(visual):
    """Record, while Qwen's vision model ``visual`` runs, what :meth:`QwenCapture.frames` needs;
    yields the :class:`QwenCapture`."""
    capture = QwenCapture(visual)
    attention = visual.blocks[context_block(visual)].attn
    entry, _ = merger_mlp(visual.merger)

    def start_call(module, args, kwargs):
        capture.calls.append(_Call(grid_thw=kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]))

    def keep_attention_inputs(module, args, kwargs):
        call = capture.calls[-1]
        call.cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        if kwargs.get("position_embeddings") is None:
            raise ValueError("the vision context needs the rotary position embeddings Qwen's vision attention is called with; this transformers passes none")
        call.position_embeddings = tuple(t.detach() for t in kwargs["position_embeddings"])

    def keep_qkv(module, args, output):
        capture.calls[-1].qkv = output.detach()

    def keep_features(module, args):
        capture.calls[-1].features = args[0].detach()

    handles = [
        visual.register_forward_pre_hook(start_call, with_kwargs=True),
        attention.register_forward_pre_hook(keep_attention_inputs, with_kwargs=True),
        attention.qkv.register_forward_hook(keep_qkv),
        entry.register_forward_pre_hook(keep_features),
    ]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def unit_contexts(frames: list[VisionContext], counts: list[int], device) -> list[VisionContext]:
    """Each selection unit's context on ``device``, from the frames in token order: a unit of
    ``counts[i]`` tokens takes as many frames as cover them (an image of several temporal steps
    joins its frames; a video's unit is one frame)."""
    remaining = iter(frames)
    contexts = []
    for count in counts:
        taken = [next(remaining)]
        while sum(f.features.shape[0] for f in taken) < count:
            taken.append(next(remaining))
        contexts.append(
            VisionContext(
                **{name: torch.cat([getattr(f, name) for f in taken], dim=-1).to(device) for name in ("cls_attention", "head_attention")},
                **{name: torch.cat([getattr(f, name) for f in taken]).to(device) for name in ("features", "keys", "head_keys")},
            )
        )
    return contexts
