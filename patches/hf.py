"""transformers' own LLaVA classes (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``).

Their processors expand each image into as many placeholder tokens as it has visual tokens.
``generate`` and ``forward`` are wrapped so that, with pruning on, the image features are
computed first (the model's own ``get_image_features``: CLIP, projector and, for LLaVA-NeXT,
tiling, unpadding and newline vectors), and the model then receives ``inputs_embeds`` built here:
its own token embeddings with each row's image features scattered into that row's placeholders.
No version-specific argument is used (``mm_encoder_outputs`` exists only from transformers 5.23
on), so every transformers otprune declares (pyproject.toml) behaves the same.

- ``LAYER_INDEX = 0``: each image's features are cut to the selector's picks (VTW: none) and
  the unkept placeholders removed from ``input_ids`` (and the attention mask, labels and position
  ids), so the LLM sees a shorter prompt. ``generate`` returns the caller's full ``input_ids`` followed by
  the new tokens, as unpruned; ``forward`` returns logits for the shortened sequence.
- ``K > 0``: the features go in whole and the layer hooks of ``layers.py`` prune inside the LLM.

In ``generate`` the features are computed once and kept for the call: every forward whose input
holds the placeholders (the prefill; each step with ``use_cache=False``; the beams' repeated
rows) gets them scattered in.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from otprune.selection import select_per_image

from .grids import image_grids
from .layers import PrefillState, attach_state
from .model_calls import as_keywords, generation_padding, with_full_prompt, wrap_model_classes
from .splice import (
    IGNORE_INDEX,
    check_prunable_images,
    leave_out,
    left_out_ids,
    padding_mask,
    padding_side,
    question_positions,
    repad,
    spans_by_row,
    visual_spans,
)
from .vision_crops import llava_next_layout
from .vision_tower import aligned_contexts, capture_tower, encoder_layers

CLASS_NAMES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
IMAGE_FEATURE_KWARGS = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")


def check_transformers_version(version: str | None = None) -> None:
    """Refuse a transformers outside the bound otprune declares (pyproject.toml's, read from the
    installed metadata: one place; CI tests its lowest release and the newest) before any model runs."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from otprune.stack import declared_bounds, declared_extras

    bound = declared_bounds(declared_extras()).get("transformers")
    if version is None:
        try:
            import transformers
        except ImportError:
            return
        version = transformers.__version__
    if bound and Version(Version(version).base_version) not in SpecifierSet(bound):
        raise ValueError(f"transformers {version} is not supported by otprune's patch; it needs transformers{bound} (pip install 'transformers{bound}')")


def decoder(model):
    """The decoder stack (``.layers``, ``.norm``) of a transformers LLaVA model."""
    return model.model.language_model


def vision_modules(model) -> tuple:
    """The modules the image passes first and last before the LLM (vision tower, projector), for timing."""
    return model.model.vision_tower, model.model.multi_modal_projector


def install() -> bool:
    """Wrap ``generate`` and ``forward`` of the supported classes; False without transformers."""
    return wrap_model_classes(CLASS_NAMES, _wrap)


def _wrap(original, generating: bool):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        from . import active_config, check_model

        kwargs = as_keywords(signature, self, args, kwargs)
        config = active_config(self)
        if not config.enabled:
            return original(self, **kwargs)
        check_model(self, config)
        input_ids = kwargs.get("input_ids")
        images = None
        check_prunable_images(kwargs, ("pixel_values",))
        if kwargs.get("pixel_values") is not None:
            if generating and kwargs.get("attention_mask") is None:
                kwargs["attention_mask"] = generation_padding(self, kwargs).long()
            kwargs, images = _prepare(self, config, kwargs, generating)
        elif not generating:
            images = getattr(self, "_otprune_images", None)
        if not generating:
            if images is not None and _holds_placeholders(self, kwargs.get("input_ids")):
                kwargs = _with_image_embeddings(self, config, kwargs, images)
            return original(self, **kwargs)
        if images is None:
            return original(self, **kwargs)
        self._otprune_images = images
        # generate may hand forward a 4-D mask (a static cache does); the layer hooks need padding.
        self._otprune_padding = padding_mask(kwargs["input_ids"], kwargs.get("attention_mask"))
        try:
            output = original(self, **kwargs)
        finally:
            del self._otprune_images, self._otprune_padding
        if config.layer_index > 0:
            return output
        return with_full_prompt(output, input_ids, kwargs["input_ids"].shape[1])

    wrapped.otprune_original = original
    return wrapped


def _holds_placeholders(model, input_ids) -> bool:
    return input_ids is not None and input_ids.shape[1] > 1 and bool((input_ids == model.config.image_token_id).any())


def _with_image_embeddings(model, config, kwargs: dict, images: list[list[torch.Tensor]]) -> dict:
    """``kwargs`` with ``input_ids`` replaced by ``inputs_embeds``: the model's token embeddings,
    each row's image features (``images[b]``, one tensor per image) in its placeholder rows.

    A batch repeated in place (beam search) takes its prompt's images. With ``LAYER_INDEX > 0``
    this is a new prefill: the layer hooks get where its visual tokens sit.
    """
    kwargs = dict(kwargs)
    input_ids = kwargs.pop("input_ids")
    rows = input_ids.shape[0]
    if rows % len(images):
        raise ValueError(f"{rows} prompt rows cannot repeat the {len(images)} prompts whose images were encoded")
    images = [row for row in images for _ in range(rows // len(images))]
    placeholders = input_ids == model.config.image_token_id
    spans = spans_by_row(visual_spans(placeholders, [f.shape[0] for row in images for f in row]), rows)
    embeds = model.get_input_embeddings()(input_ids)
    features = torch.cat([f for row in images for f in row]).to(embeds.device, embeds.dtype)
    kwargs["inputs_embeds"] = embeds.masked_scatter(placeholders[..., None].to(embeds.device), features)
    if config.layer_index > 0:
        valid = _prefill_padding(model, input_ids, kwargs.get("attention_mask"))
        grids = [[_grids(model, f) for f in row] for row in images] if "grid" in config.spec.context else None
        _attach(model, config, PrefillState(spans=spans, valid=valid, text_after=_questions(valid, spans, input_ids, left_out_ids(model, config)), grids=grids))
    return kwargs


def _grids(model, features: torch.Tensor):
    """One image's patch grids (``grids.image_grids``): the vision tower's side, NeXT's newline vector."""
    vision = model.config.vision_config
    return image_grids(features, vision.image_size // vision.patch_size, getattr(model.model, "image_newline", None))


def _prefill_padding(model, input_ids: torch.Tensor, attention_mask) -> torch.Tensor:
    """``(B, L)`` non-padding positions of a prefill: from its 2-D mask, else from the mask of the
    ``generate`` call it belongs to (repeated like its rows, for beams)."""
    if attention_mask is None or attention_mask.dim() == 2:
        return padding_mask(input_ids, attention_mask)
    call = getattr(model, "_otprune_padding", None)
    if call is None:
        raise ValueError(f"with LAYER_INDEX > 0, give forward a 2-D (batch, length) attention mask; got one of shape {tuple(attention_mask.shape)}")
    return call.repeat_interleave(input_ids.shape[0] // call.shape[0], dim=0).to(input_ids.device)


def _attach(model, config, state) -> None:
    attach_state(model, config, decoder(model), state)


def _questions(valid: torch.Tensor, spans, input_ids: torch.Tensor, phrases) -> list[list[torch.Tensor]]:
    """Per row, per image, the text positions of its question (the row's one question), less the
    ``phrases`` (runs of token ids, ``splice.left_out_ids``) its method leaves out."""
    visual = torch.zeros_like(valid)
    for b, row_spans in enumerate(spans):
        for start, end in row_spans:
            visual[b, start:end] = True
    questions = [question_positions(visual[b], valid[b]) for b in range(len(spans))]
    questions = [leave_out(input_ids[b, q], q, phrases) for b, q in enumerate(questions)]
    return [[q] * len(row_spans) for q, row_spans in zip(questions, spans)]


def _prepare(model, config, kwargs: dict, generating: bool) -> tuple[dict, list[list[torch.Tensor]]]:
    """Encode the images; at K = 0 also prune them and cut their placeholders from the prompt.

    Returns the model's arguments without ``pixel_values`` and, per row, the features of its
    images that go into its (remaining) placeholders.
    """
    kwargs = dict(kwargs)
    input_ids = kwargs["input_ids"]
    pixel_values = kwargs.pop("pixel_values")
    feature_kwargs = {name: kwargs[name] for name in IMAGE_FEATURE_KWARGS if kwargs.get(name) is not None}
    for name in IMAGE_FEATURE_KWARGS:
        kwargs.pop(name, None)
    with _tower_capture(model, config, feature_kwargs) as tower:
        features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **feature_kwargs).pooler_output
    features = list(features)
    located = visual_spans(input_ids == model.config.image_token_id, [f.shape[0] for f in features])
    images: list[list[torch.Tensor]] = [[] for _ in range(input_ids.shape[0])]
    for (row, _, _), f in zip(located, features):
        images[row].append(f)
    if config.layer_index > 0:
        return kwargs, images
    spans = spans_by_row(located, input_ids.shape[0])
    attention_mask = kwargs.get("attention_mask")
    valid = padding_mask(input_ids, attention_mask)
    questions = _questions(valid, spans, input_ids, left_out_ids(model, config))
    embed = model.get_input_embeddings()
    flat = [f for row in images for f in row]
    context = {}
    if "text" in config.spec.context:
        context["text"] = [embed(input_ids[b, idx]) for b in range(len(spans)) for idx in questions[b]]
    if "grid" in config.spec.context:
        context["grid"] = [_grids(model, f) for f in flat]
    if tower is not None:
        context["vision"] = aligned_contexts(tower.contexts(), flat, _crop_layout(model, feature_kwargs))
    kept = select_per_image(config, flat, context, project=projector(model))
    keep = valid.clone()
    chosen = iter(kept)
    for b, row_spans in enumerate(spans):
        for start, end in row_spans:
            keep[b, start:end] = False
            keep[b, start + next(chosen).indices.to(keep.device)] = True
    columns = [(input_ids, model.config.text_config.pad_token_id or 0)]
    names = ["input_ids"]
    if isinstance(kwargs.get("labels"), torch.Tensor):
        columns.append((kwargs["labels"], IGNORE_INDEX))
        names.append("labels")
    new_mask, *cut = repad(keep, padding_side(valid, default="left" if generating else "right"), *columns)
    kwargs.update(zip(names, cut))
    if isinstance(kwargs.get("position_ids"), torch.Tensor):
        # Renumbered over the kept tokens, as the original LLaVA numbers its spliced sequence.
        kwargs["position_ids"] = (new_mask.long().cumsum(1) - 1).clamp_min(0).masked_fill(~new_mask, 0)
    if attention_mask is not None or not bool(new_mask.all()):
        # Without a mask the model would attend to the padding that pruning added or kept.
        kwargs["attention_mask"] = new_mask.to(attention_mask.dtype if attention_mask is not None else torch.long)
    picks = iter(kept)
    return kwargs, [[_kept_features(f, next(picks)) for f in row] for row in images]


def _tower_capture(model, config, feature_kwargs: dict):
    """Hooks recording the vision context while the tower runs, for a method that needs it."""
    if "vision" not in config.spec.context and not config.spec.before_projector:
        return contextlib.nullcontext()
    return tower_capture(model, feature_kwargs)


def tower_capture(model, feature_kwargs: dict):
    """Hooks recording the vision context (``vision_tower.capture_tower``) while the model's vision
    tower runs, at its one feature layer of patch features: a CLIP tower's, its [CLS] dropped (the
    "default" strategy), or those of a tower without a [CLS] (SigLIP, OneVision's: "full")."""
    layer = feature_kwargs.get("vision_feature_layer", model.config.vision_feature_layer)
    strategy = feature_kwargs.get("vision_feature_select_strategy", model.config.vision_feature_select_strategy)
    tower = model.model.vision_tower
    cls = hasattr(getattr(tower, "vision_model", tower).embeddings, "class_embedding")
    patches_only = "default" if cls else "full"
    if not isinstance(layer, int) or strategy != patches_only:
        raise ValueError(
            f"the vision context needs one feature layer of patch features; this model takes layer {layer!r} with strategy {strategy!r} "
            f"(its tower {'has' if cls else 'has no'} [CLS]: {patches_only!r} takes its patches)"
        )
    return capture_tower(encoder_layers(tower), layer, tower.config.num_attention_heads, cls=cls)


def _crop_layout(model, feature_kwargs: dict):
    """LLaVA-NeXT's images: how its tower crops make each image's tokens; ``None`` for LLaVA's one
    tower row per image."""
    if not hasattr(model.model, "pack_image_features"):
        return None
    strategy = feature_kwargs.get("vision_feature_select_strategy", model.config.vision_feature_select_strategy)
    return llava_next_layout(model, feature_kwargs["image_sizes"], strategy)


def projector(model):
    """The model's projector (``multi_modal_projector``) as ``(m, C_v) -> (m, d)`` in its own dtype."""
    module = model.model.multi_modal_projector
    dtype = next(module.parameters()).dtype
    return lambda features: module(features.to(dtype))


def _kept_features(features: torch.Tensor, kept) -> torch.Tensor:
    """An image's features at its kept placeholders: its own, or a merger's tokens."""
    return features[kept.indices.to(features.device)] if kept.tokens is None else kept.tokens.to(features.device)
