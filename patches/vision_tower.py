"""The vision context (``otprune.contract.VisionContext``): a ViT tower's attention, keys and
features at the feature layer, captured by hooks while the model's own tower runs; a CLIP tower
with its [CLS] (LLaVA), or one without (OneVision's SigLIP).

Hooks on the ``q_proj`` / ``k_proj`` of two encoder blocks and on the output of the block whose
output the model takes (``hidden_states[feature_layer]``) record what the tower computes; the
attention is then computed here from those queries and keys, so it is the same under every
attention backend (sdpa and flash attention never form the attention matrix). Hooks are
registered only for a method that asks for the context, and only for the tower's call.

- the block that produces the features: ``hidden_states[s]`` is the output of encoder block
  ``s - 1`` (``s`` counted as Python counts, negative from the end of the ``L + 1`` states);
  VisionZip reads its attention (``attentions[s]``) and keys;
- the block that reads them, the next one: PruMerge hooks it (layer 23 of 24 for LLaVA's -2).
  **Choice**: a tower whose features are its last block's output (OneVision's -1) has no such
  block; both forms are then measured at that last block.

A tower without a [CLS] (**choice**, METHOD.md "Vision context"): a patch's score is the mean
attention it receives from all queries of its crop (softmax over the crop's keys), per head
(``head_attention``, at the producing block); ``cls_attention`` is its head average at the
reading block (the same block at the last layer, so then exactly ``head_attention``'s mean);
``keys`` the reading block's full-width keys, ``head_keys`` the producing block's, averaged over
heads; ``features`` every position (the "full" strategy: no [CLS] to drop); ``cls_feature`` none.

Images map to the tower's rows in order: one row (a 336 px crop: [CLS] + 576 patches) per image,
or, for any-resolution images (LLaVA-1.6 / NeXT, OneVision), each image's crops traced token by
token through the model's arrangement (``patches.vision_crops``, which names its choices).
Qwen's ViT, whose tokens merge 2 x 2 patches, is in ``patches.vision_without_cls``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from otprune.contract import VisionContext

from .vision_crops import CropLayout, crop_contexts
from .vision_without_cls import received_attention

__all__ = ["TowerCapture", "aligned_contexts", "capture_tower", "encoder_layers", "feature_blocks"]


def encoder_layers(clip) -> torch.nn.ModuleList:
    """A transformers CLIP or SigLIP vision model's encoder blocks (under ``vision_model`` before
    transformers 5.2x, on the model itself after)."""
    return getattr(clip, "vision_model", clip).encoder.layers


def feature_blocks(layers: int, feature_layer: int) -> tuple[int, int]:
    """``(producing, reading)`` block indices of a tower of ``layers`` encoder blocks whose
    features are ``hidden_states[feature_layer]`` (``layers + 1`` states, the embeddings first)."""
    state = feature_layer + layers + 1 if feature_layer < 0 else feature_layer
    if not 1 <= state <= layers:
        raise ValueError(
            f"the vision context needs features taken after an encoder block; feature layer {feature_layer} of a "
            f"{layers}-block tower is {'its embeddings' if state == 0 else 'outside it'}"
        )
    producing = state - 1
    return producing, min(producing + 1, layers - 1)


@dataclass
class TowerCapture:
    """What the hooks recorded over the tower's calls, each ``(rows, P, C)``, rows in call order."""

    heads: int
    cls: bool = True
    queries: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {"producing": [], "reading": []})
    keys: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {"producing": [], "reading": []})
    outputs: list[torch.Tensor] = field(default_factory=list)

    def contexts(self) -> list[VisionContext]:
        """One :class:`VisionContext` per tower row (float32), patches only: the [CLS], if the
        tower has one, is row 0."""
        if not self.outputs:
            return []
        joined = {
            "q_producing": torch.cat(self.queries["producing"]),
            "k_producing": torch.cat(self.keys["producing"]),
            "q_reading": torch.cat(self.queries["reading"]),
            "k_reading": torch.cat(self.keys["reading"]),
        }
        outputs = torch.cat(self.outputs)
        context = _context if self.cls else _context_without_cls
        return [
            context(
                outputs[row],
                joined["q_producing"][row],
                joined["k_producing"][row],
                joined["q_reading"][row],
                joined["k_reading"][row],
                self.heads,
            )
            for row in range(outputs.shape[0])
        ]


def _context(output, q_producing, k_producing, q_reading, k_reading, heads: int) -> VisionContext:
    """One row's context from its block output ``(P, C_v)`` and the two blocks' ``(P, C)`` q and k."""
    output, q_producing, k_producing, q_reading, k_reading = (t.float() for t in (output, q_producing, k_producing, q_reading, k_reading))
    width = q_reading.shape[-1]
    # PruMerge's form: the [CLS] query against every key as one head over the full width.
    cls_attention = torch.softmax(q_reading[0] @ k_reading.T / math.sqrt(width), dim=-1)[1:]
    per_head = width // heads
    q_heads = q_producing.view(-1, heads, per_head).transpose(0, 1)
    k_heads = k_producing.view(-1, heads, per_head).transpose(0, 1)
    head_attention = torch.softmax(q_heads[:, :1] @ k_heads.transpose(1, 2) / math.sqrt(per_head), dim=-1)[:, 0, 1:]
    return VisionContext(
        features=output[1:],
        cls_attention=cls_attention,
        keys=k_reading[1:],
        head_attention=head_attention,
        head_keys=k_heads[:, 1:].mean(0),
        cls_feature=output[0],
    )


def _context_without_cls(output, q_producing, k_producing, q_reading, k_reading, heads: int) -> VisionContext:
    """One row's context on a tower without a [CLS] (the module's choice), from the same inputs
    as :func:`_context`."""
    output, q_producing, k_producing, q_reading, k_reading = (t.float() for t in (output, q_producing, k_producing, q_reading, k_reading))
    positions, width = q_reading.shape

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return t.view(positions, heads, width // heads)

    return VisionContext(
        features=output,
        cls_attention=received_attention(per_head(q_reading), per_head(k_reading), [0, positions]).mean(0),
        keys=k_reading,
        head_attention=received_attention(per_head(q_producing), per_head(k_producing), [0, positions]),
        head_keys=per_head(k_producing).mean(1),
    )


@contextlib.contextmanager
def capture_tower(layers, feature_layer: int, heads: int, cls: bool = True):
    """Record, while the tower runs, what :meth:`TowerCapture.contexts` needs from a ViT encoder's
    ``layers`` (each with ``self_attn.q_proj`` / ``k_proj``) whose features are
    ``hidden_states[feature_layer]``, with a [CLS] at position 0 or (``cls=False``) without;
    yields the :class:`TowerCapture`."""
    producing, reading = feature_blocks(len(layers), feature_layer)
    capture = TowerCapture(heads, cls)
    handles = []

    def keep(store: list):
        def hook(module, args, output):
            store.append(output.detach())

        return hook

    def keep_output(module, args, output):
        capture.outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    try:
        for name, index in (("producing", producing), ("reading", reading)):
            attention = layers[index].self_attn
            handles.append(attention.q_proj.register_forward_hook(keep(capture.queries[name])))
            handles.append(attention.k_proj.register_forward_hook(keep(capture.keys[name])))
        handles.append(layers[producing].register_forward_hook(keep_output))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def aligned_contexts(contexts: list[VisionContext], images: list[torch.Tensor], layout: CropLayout | None = None) -> list[VisionContext | None]:
    """Each image's context on its tokens' device, or ``None`` (the selection then stops the run,
    naming the method) where the tower's rows do not map onto the images' tokens. Without a
    ``layout``: one to one, a tower row per image, a patch per token; with one (any-resolution
    crops): as it traces each token (``vision_crops.crop_contexts``)."""
    if layout is not None:
        return crop_contexts(contexts, layout, images)
    if len(contexts) != len(images) or any(c.features.shape[0] != t.shape[0] for c, t in zip(contexts, images)):
        return [None] * len(images)
    return [VisionContext(**{name: _on(getattr(c, name), t.device) for name in VisionContext.__dataclass_fields__}) for c, t in zip(contexts, images)]


def _on(value: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if value is None else value.to(device)
