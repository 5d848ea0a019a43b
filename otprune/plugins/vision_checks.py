"""Checks of the ``vision`` context (``otprune.contract.VisionContext``) shared by the bundled
plugins that read the vision tower (PRUMERGE, PRUMERGE_PLUS, DIVPRUNE_ADAPTIVE, VISIONZIP,
FASTERVLM). Public API only."""

from __future__ import annotations

import torch

from otprune.contract import VisionContext

__all__ = ["check_finite_tokens", "check_vision", "vision_field"]

# Each field's dimensions, named: N is the image's token count; the other letters are free.
_SHAPES = {
    "features": ("N", "C_v"),
    "cls_attention": ("N",),
    "keys": ("N", "C"),
    "head_attention": ("H", "N"),
    "head_keys": ("N", "c"),
    "cls_feature": ("C_v",),
}


def check_finite_tokens(tokens: torch.Tensor) -> None:
    """``ValueError`` unless every entry of ``tokens`` is finite (one host read-back)."""
    if not bool(torch.isfinite(tokens).all()):
        raise ValueError("tokens contain NaN or Inf; every entry must be finite")


def check_vision(vision, n: int, fields: tuple[str, ...]) -> None:
    """``ValueError`` unless ``vision`` is a :class:`VisionContext` whose ``fields`` are finite
    floating-point tensors of the contract's shapes for an image of ``n`` tokens."""
    if not isinstance(vision, VisionContext):
        raise ValueError(f"vision must be an otprune.contract.VisionContext; got {type(vision).__name__}")
    for name in fields:
        value = getattr(vision, name)
        dims = _SHAPES[name]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            got = f"a tensor of dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"vision.{name} must be a floating-point torch.Tensor of shape ({', '.join(dims)}); got {got}")
        shape = tuple(value.shape)
        if len(shape) != len(dims) or any(size < 1 for size in shape) or any(d == "N" and size != n for d, size in zip(dims, shape, strict=True)):
            raise ValueError(f"vision.{name} must have shape ({', '.join(dims)}) with N = {n}, the image's tokens; got {shape}")
        if value.device.type == "meta":
            raise ValueError(f"vision.{name} is on the meta device, which holds no values")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"vision.{name} contains NaN or Inf; every entry must be finite")


def vision_field(vision: VisionContext, name: str, device: torch.device) -> torch.Tensor:
    """``vision.<name>`` as a detached float32 tensor on ``device`` (never the caller's own storage
    written: every use downstream is out of place)."""
    return getattr(vision, name).detach().to(device=device, dtype=torch.float32)
