"""Attention backends for the patch tests, flash-attention's mask convention included on a CPU.

``fa2-style``: a flash-attention stand-in registered under its own name; it gets the masks
transformers builds for ``flash_attention_2`` (a 2-D ``(B, kv)`` padding mask, or ``None``
without padding) and computes exact attention from them, causal and aligned bottom-right as
flash-attention aligns a query block shorter than its keys. In a batch of one it reads the
position ids as flash-attention does: a restart at their minimum begins another packed sequence.
"""

import contextlib

import torch

FA2_STYLE = "otprune_fa2_style"


@contextlib.contextmanager
def backend(model, implementation):
    """Run ``model`` under ``eager``, ``sdpa`` or ``fa2-style`` attention, then back to sdpa."""
    if implementation == "fa2-style":
        implementation = register_fa2_style()
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


@contextlib.contextmanager
def tower_attention(tower, implementation):
    """Run a vision tower (a transformers model of its own) under ``implementation``, then back to
    the one it had."""
    before = tower.config._attn_implementation
    tower.set_attn_implementation(implementation)
    try:
        yield
    finally:
        tower.set_attn_implementation(before)


def fa2_style_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    assert attention_mask is None or attention_mask.dim() == 2, f"flash-style mask is 2-D, got {attention_mask.shape}"
    q_len, kv_len = query.shape[2], key.shape[2]
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)).float() * scaling
    rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    allowed = torch.arange(kv_len, device=query.device)[None, :] <= rows
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        allowed = torch.ones_like(allowed)  # the vision tower attends both ways
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and query.shape[0] == 1 and q_len == kv_len > 1:
        # As flash-attention reads position ids in a batch of one: each restart at their minimum
        # begins another packed sequence, which attends only within itself.
        ids = position_ids.reshape(-1)
        sequence = torch.cumsum(ids == ids.min(), 0)
        allowed = allowed & (sequence[:, None] == sequence[None, :])
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return (weights.to(value.dtype) @ value).transpose(1, 2).contiguous(), None


def register_fa2_style() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(FA2_STYLE, fa2_style_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FA2_STYLE, flash_attention_mask)
    return FA2_STYLE
