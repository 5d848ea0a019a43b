"""transformers' own LLaVA classes (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``).

Their processors expand each image into as many placeholder tokens as it has visual tokens, and
the model scatters the image features into those placeholders. ``generate`` and ``forward`` are
wrapped so that, with pruning on, the image features are computed first (the model's own
``get_image_features``: CLIP, projector and, for LLaVA-NeXT, tiling, unpadding and newline
vectors) and handed to the model through transformers' ``mm_encoder_outputs`` argument:

- ``LAYER_INDEX = 0``: each image's features are cut to the selector's picks and the unkept
  placeholders removed from ``input_ids`` (and the attention mask, labels and position ids), so
  the LLM sees a shorter prompt. ``generate`` returns the caller's full ``input_ids`` followed by
  the new tokens, as unpruned; ``forward`` returns logits for the shortened sequence.
- ``K > 0``: the features go in whole and the layer hooks of ``layers.py`` prune inside the LLM.
"""

from __future__ import annotations

import functools
import inspect

import torch

from otprune.prune import select_per_image

from .layers import PrefillState, attach_state
from .splice import IGNORE_INDEX, question_positions, repad

CLASS_NAMES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
IMAGE_FEATURE_KWARGS = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")


def install() -> bool:
    """Wrap ``generate`` and ``forward`` of the supported classes; False without transformers."""
    try:
        import transformers
    except ImportError:
        return False
    for name in CLASS_NAMES:
        cls = getattr(transformers, name, None)
        if cls is None or getattr(cls.forward, "otprune_original", None) is not None:
            continue
        cls.forward = _wrap(cls.forward, restore_prompt=False)
        cls.generate = _wrap(cls.generate, restore_prompt=True)
    return True


def _as_keywords(signature: inspect.Signature, model, args, kwargs) -> dict:
    """Every argument by name (``generate`` calls its first one ``inputs``: that is ``input_ids``)."""
    bound = signature.bind_partial(model, *args, **kwargs).arguments
    named = {}
    for name, value in bound.items():
        parameter = signature.parameters[name]
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif name != next(iter(signature.parameters)):
            named[name] = value
    if "inputs" in named and "input_ids" not in named:
        named["input_ids"] = named.pop("inputs")
    return named


def _wrap(original, restore_prompt: bool):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        from . import active_config

        kwargs = _as_keywords(signature, self, args, kwargs)
        config = active_config(self)
        input_ids = kwargs.get("input_ids")
        pixel_values = kwargs.get("pixel_values")
        new_prompt = input_ids is not None and input_ids.shape[1] > 1 and not kwargs.get("mm_encoder_outputs")
        if not config.enabled or pixel_values is None or input_ids is None:
            if new_prompt:
                _attach(self, config, None)
            return original(self, **kwargs)
        prepared = _prepare(self, config, kwargs)
        output = original(self, **prepared)
        if not restore_prompt or config.layer_index > 0:
            return output
        return _with_full_prompt(output, input_ids, prepared["input_ids"].shape[1])

    wrapped.otprune_original = original
    return wrapped


def _attach(model, config, state) -> None:
    language_model = model.model.language_model
    attach_state(model, config, language_model.layers, language_model.norm, state)


def _with_full_prompt(output, input_ids: torch.Tensor, pruned_length: int):
    """Put the caller's prompt back in front of the generated tokens (callers strip it by length)."""
    if isinstance(output, torch.Tensor):
        return torch.cat([input_ids, output[:, pruned_length:]], dim=1)
    output.sequences = torch.cat([input_ids, output.sequences[:, pruned_length:]], dim=1)
    return output


def _image_spans(input_ids: torch.Tensor, image_token_id: int, counts: list[int]) -> list[list[tuple[int, int]]]:
    """Each image's placeholder run per row, consuming images in order across the batch."""
    spans: list[list[tuple[int, int]]] = []
    image = 0
    for row in input_ids:
        positions = (row == image_token_id).nonzero().flatten().tolist()
        row_spans, cursor = [], 0
        while cursor < len(positions):
            if image >= len(counts):
                raise ValueError(f"the prompts hold more image placeholders than the {len(counts)} images' features")
            start, n = positions[cursor], counts[image]
            if positions[cursor : cursor + n] != list(range(start, start + n)):
                raise ValueError(f"image {image} needs {n} consecutive placeholder tokens at position {start}")
            row_spans.append((start, start + n))
            cursor += n
            image += 1
        spans.append(row_spans)
    if image != len(counts):
        raise ValueError(f"{len(counts)} images' features but placeholders for only {image}")
    return spans


def _prepare(model, config, kwargs: dict) -> dict:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    kwargs = dict(kwargs)
    input_ids = kwargs["input_ids"]
    pixel_values = kwargs.pop("pixel_values")
    feature_kwargs = {name: kwargs[name] for name in IMAGE_FEATURE_KWARGS if kwargs.get(name) is not None}
    for name in IMAGE_FEATURE_KWARGS:
        kwargs.pop(name, None)
    features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **feature_kwargs).pooler_output
    features = list(features)
    spans = _image_spans(input_ids, model.config.image_token_id, [f.shape[0] for f in features])
    attention_mask = kwargs.get("attention_mask")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    visual = torch.zeros_like(valid)
    for b, row_spans in enumerate(spans):
        for start, end in row_spans:
            visual[b, start:end] = True
    questions = [question_positions(row_spans, valid[b] & ~visual[b]) for b, row_spans in enumerate(spans)]
    if config.layer_index > 0:
        _attach(model, config, PrefillState(spans=spans, valid=valid, text_after=questions))
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        return kwargs

    embed = model.get_input_embeddings()
    texts = [embed(input_ids[b, idx]) for b in range(len(spans)) for idx in questions[b]] if config.method == "TRIM" else None
    kept = select_per_image(config, features, texts)
    keep = ~visual
    chosen = iter(kept)
    for b, row_spans in enumerate(spans):
        for start, _ in row_spans:
            keep[b, start + next(chosen)] = True
    columns = [(input_ids, model.config.text_config.pad_token_id or 0)]
    names = ["input_ids"]
    if isinstance(kwargs.get("labels"), torch.Tensor):
        columns.append((kwargs["labels"], IGNORE_INDEX))
        names.append("labels")
    side = "left" if bool((~valid[:, 0]).any()) else "right"
    new_mask, *cut = repad(keep & valid, side, *columns)
    kwargs.update(zip(names, cut))
    if isinstance(kwargs.get("position_ids"), torch.Tensor):
        # Renumbered over the kept tokens, as the original LLaVA numbers its spliced sequence.
        kwargs["position_ids"] = (new_mask.long().cumsum(1) - 1).clamp_min(0).masked_fill(~new_mask, 0)
    if attention_mask is not None:
        kwargs["attention_mask"] = new_mask.to(attention_mask.dtype)
    kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[f[k] for f, k in zip(features, kept)])}
    return kwargs
