"""The original LLaVA (``llava-torch``): prune inside ``prepare_inputs_labels_for_multimodal``.

LLaVA's own method still builds the spliced sequence, so every model variant it handles (1.5,
1.6 anyres with unpadding and newline vectors, any padding side) is handled the same way here.
To learn where each image's tokens landed, the call passes, in place of the labels, each input
position's index: the output then holds, per position, the input token it came from, or
``IGNORE_INDEX`` where a visual token (or padding) sits. A token put after every image
placeholder (and removed again) ends each image's run, which gives each image's own feature
count, so adjacent placeholders (``<image><image>``) split where their images do; the spans then
come from ``splice.visual_spans``, as for every family. The caller's labels are mapped back
through those indices afterwards. Padding: the caller's mask; without one, the pad token as
``generate`` would find it (``splice.padding_mask``), except in a call with labels.

``LAYER_INDEX = 0``: the visual tokens not kept are removed from the sequence here (VTW keeps
none: the LLM gets the prompt without its image); the kept ones keep their order, the sequence
is re-padded on the model's padding side and positions are renumbered, as LLaVA numbers any
sequence. ``K > 0``: the sequence is left whole and the positions of its visual tokens are
handed to the layer hooks (``layers.py``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os

import torch

from otprune.prune_config import PruneConfig
from otprune.selection import select_per_image

from .grids import image_grids
from .layers import PrefillState, attach_state
from .splice import IGNORE_INDEX, leave_out, left_out_ids, padding_mask, question_positions, repad, spans_by_row, visual_spans
from .vision_crops import original_llava_layout
from .vision_tower import aligned_contexts, capture_tower, encoder_layers

IMAGE_TOKEN_INDEX = -200

# The modules of llava-torch 1.2.2 that define a causal LM (imported one by one: the package's
# own __init__ swallows import errors).
_LANGUAGE_MODELS = {
    "llava.model.language_model.llava_llama": "LlavaLlamaForCausalLM",
    "llava.model.language_model.llava_mistral": "LlavaMistralForCausalLM",
    "llava.model.language_model.llava_mpt": "LlavaMptForCausalLM",
}


def install_cache_keyword() -> list[str]:
    """Let the original LLaVA's causal LMs take transformers 5.24's ``cache=``; the classes patched.

    transformers 5.24 renamed the key-value cache argument ``past_key_values`` to ``cache``, and
    its ``generate`` passes ``cache=`` to ``forward``. llava-torch's ``forward`` names only
    ``past_key_values`` (and ends in a ``TypeError``), so every original-LLaVA run, unpruned
    included, broke. The wrapper hands ``cache`` on under the old name, which LLaVA's own
    ``prepare_inputs_labels_for_multimodal`` also reads (a cache means a decode step) and which
    transformers still accepts, deprecated, from LLaVA's call of its parent. Older transformers
    never pass ``cache``, so there the wrapper changes nothing.
    """
    patched = []
    for module_name, class_name in _LANGUAGE_MODELS.items():
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        if getattr(cls.forward, "otprune_cache_keyword", False):
            patched.append(class_name)
            continue
        cls.forward = _forward_taking_cache(cls.forward)
        patched.append(class_name)
    return patched


def install_tower_beside_checkpoint() -> bool:
    """Let an original-LLaVA checkpoint name its vision tower by a path relative to its own folder
    (the shipped ``configs/otprune_synth/synth-llava-1.5`` names ``vision``); whether it is in.

    LLaVA's ``build_vision_tower`` accepts a local tower only where the path exists as given, so
    from any working directory but the checkpoint's own such a checkpoint fails to load ("Unknown
    vision tower"). The wrapper rewrites a relative path that does not exist from the working
    directory but does inside the checkpoint (``config._name_or_path``) to that absolute path in
    the config; every other tower name goes to LLaVA unchanged.
    """
    try:
        arch = importlib.import_module("llava.model.llava_arch")
    except ImportError:
        return False
    build = arch.build_vision_tower
    if getattr(build, "otprune_tower_beside_checkpoint", False):
        return True

    @functools.wraps(build)
    def wrapper(config, **kwargs):
        tower = getattr(config, "mm_vision_tower", None)
        folder = getattr(config, "_name_or_path", None)
        if isinstance(tower, str) and folder and not os.path.isabs(tower) and not os.path.exists(tower):
            beside = os.path.join(folder, tower)
            if os.path.isdir(beside):
                config.mm_vision_tower = os.path.abspath(beside)
        return build(config, **kwargs)

    wrapper.otprune_tower_beside_checkpoint = True
    arch.build_vision_tower = wrapper
    return True


def _forward_taking_cache(forward):
    @functools.wraps(forward)
    def wrapper(self, *args, cache=None, **kwargs):
        if cache is not None:
            if kwargs.get("past_key_values") is not None:
                raise TypeError("LLaVA's forward got both cache= and past_key_values=; pass one of them")
            kwargs["past_key_values"] = cache
        return forward(self, *args, **kwargs)

    # What transformers reads of forward's signature must show ``cache`` too (wraps copies the old one).
    signature = inspect.signature(forward)
    cache = inspect.Parameter("cache", inspect.Parameter.KEYWORD_ONLY, default=None)
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), cache])
    wrapper.otprune_cache_keyword = True
    return wrapper


def install() -> bool:
    """Replace ``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal``; False if no LLaVA."""
    try:
        from llava.model.llava_arch import LlavaMetaForCausalLM
    except ImportError:
        return False
    install_cache_keyword()
    original = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal
    if getattr(original, "otprune_original", None) is not None:
        return True

    @functools.wraps(original)
    def prepare_inputs_labels_for_multimodal(self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None):
        from . import active_config, check_model

        config = active_config(self)
        check_model(self, config)
        prefill = images is not None and input_ids is not None and input_ids.shape[1] > 1
        if not config.enabled or not prefill or self.get_vision_tower() is None:
            # A new prompt without images ends the previous prompt's pruning; a decode step
            # (one new token) keeps it, so layer hooks still cut the mask columns they dropped.
            if prefill or (input_ids is not None and input_ids.shape[1] > 1):
                _set_state(self, config, None)
            return original(self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
        return _prepare_pruned(original, self, config, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)

    prepare_inputs_labels_for_multimodal.otprune_original = original
    LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal = prepare_inputs_labels_for_multimodal
    return True


def decoder(model):
    """The decoder stack (``.layers``, ``.norm``) of an original-LLaVA model."""
    return model.get_model()


def vision_modules(model) -> tuple:
    """The modules the image passes first and last before the LLM (vision tower, projector), for timing."""
    return model.get_model().get_vision_tower(), model.get_model().mm_projector


def _set_state(model, config: PruneConfig, state: PrefillState | None) -> None:
    attach_state(model, config, decoder(model), state)


# Marks, in the labels handed through LLaVA's splice, the token put after each image placeholder.
_END_OF_IMAGE = -1


def _with_image_ends(input_ids: torch.Tensor, mask: torch.Tensor):
    """The prompts with a token after every image placeholder, and each position's source index.

    LLaVA's splice labels every visual token ``IGNORE_INDEX``, so adjacent images would run
    together; the token put after each image (its source ``_END_OF_IMAGE``) ends that image's
    run, which gives each image's own feature count. Returns ``(ids, mask, sources)``, each
    ``(B, L + most images in a row)``, padded on the right (LLaVA drops padding by the mask).
    """
    rows = []
    for b in range(input_ids.shape[0]):
        ids, sources = [], []
        for i, token in enumerate(input_ids[b].tolist()):
            ids.append(token)
            sources.append(i if mask[b, i] else IGNORE_INDEX)
            if token == IMAGE_TOKEN_INDEX and mask[b, i]:
                ids.append(0)
                sources.append(_END_OF_IMAGE)
        rows.append((ids, sources))
    length = max(len(ids) for ids, _ in rows)
    device = input_ids.device
    new_ids = torch.tensor([ids + [0] * (length - len(ids)) for ids, _ in rows], dtype=input_ids.dtype, device=device)
    sources = torch.tensor([src + [IGNORE_INDEX] * (length - len(src)) for _, src in rows], dtype=torch.long, device=device)
    return new_ids, sources != IGNORE_INDEX, sources


def _image_token_counts(visual: torch.Tensor, ends: torch.Tensor) -> list[int]:
    """Each image's visual-token count, in batch order: the run of visual positions before its end token."""
    counts = []
    for b in range(visual.shape[0]):
        boundaries = (~visual[b]).nonzero().flatten()
        for end in ends[b].nonzero().flatten().tolist():
            before = boundaries[boundaries < end]
            counts.append(end - (int(before[-1]) + 1 if before.numel() else 0))
    return counts


def _padding(model, input_ids: torch.Tensor, attention_mask, labels) -> torch.Tensor:
    """``(B, L)`` non-padding positions: the caller's mask; without one, where the pad token is, as
    transformers' ``generate`` decides (LLaVA's own ``generate`` passes no mask of its own), except
    for a call with labels (training), whose every position counts, as in transformers' ``forward``."""
    if attention_mask is not None or labels is not None:
        return padding_mask(input_ids, attention_mask)
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return padding_mask(input_ids, None, getattr(config, "pad_token_id", None), eos)


def _tower_capture(model, config: PruneConfig):
    """Hooks recording the vision context while LLaVA's tower runs, for a method that needs it."""
    if "vision" not in config.spec.context and not config.spec.before_projector:
        return contextlib.nullcontext()
    tower = model.get_vision_tower()
    if getattr(tower, "select_feature", "patch") != "patch":
        raise ValueError(f"the vision context needs the tower's patch features; this LLaVA selects {tower.select_feature!r}")
    clip = tower.vision_tower
    return capture_tower(encoder_layers(clip), tower.select_layer, clip.config.num_attention_heads)


def _projector(model):
    """The model's projector as ``(m, C_v) -> (m, d)`` in its own dtype."""
    projector = model.get_model().mm_projector
    dtype = next(projector.parameters()).dtype
    return lambda features: projector(features.to(dtype))


def _prepare_pruned(original, model, config, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes):
    ids, mask_in, markers = _with_image_ends(input_ids, _padding(model, input_ids, attention_mask, labels))
    limit = getattr(model.config, "tokenizer_model_max_length", None)
    added = ids.shape[1] - input_ids.shape[1]
    try:
        if limit is not None:
            # LLaVA cuts each spliced prompt to this length; the end tokens must not count.
            model.config.tokenizer_model_max_length = limit + added
        with _tower_capture(model, config) as tower:
            _, _, mask_out, past_key_values, embeds, sources = original(model, ids, position_ids, mask_in, past_key_values, markers, images, image_sizes)
    finally:
        if limit is not None:
            model.config.tokenizer_model_max_length = limit
    visual = mask_out.bool() & (sources == IGNORE_INDEX)
    ends = sources == _END_OF_IMAGE
    counts = _image_token_counts(visual, ends)
    keep = mask_out.bool() & ~ends
    if limit is not None and int(keep.sum(1).max()) > limit:
        raise ValueError(
            f"a prompt of {int(keep.sum(1).max())} tokens with its images is longer than the model's "
            f"tokenizer_model_max_length={limit}; LLaVA would cut it, and pruning needs every image whole"
        )
    side_of_padding = getattr(model.config, "tokenizer_padding_side", "right")
    valid, embeds, sources = repad(keep, side_of_padding, (embeds, 0), (sources, IGNORE_INDEX))
    visual = valid & (sources == IGNORE_INDEX)
    batch = input_ids.shape[0]
    spans = spans_by_row(visual_spans(visual, counts), batch)
    phrases = left_out_ids(model, config, use_fast=False)  # as LLaVA's load_pretrained_model loads it
    questions = [question_positions(visual[b], valid[b]) for b in range(batch)]
    # A text position's source is its index in the caller's input_ids.
    questions = [leave_out(input_ids[b, sources[b, q].to(input_ids.device)], q, phrases) for b, q in enumerate(questions)]
    text_after = [[q] * len(spans[b]) for b, q in enumerate(questions)]

    def restore_labels(kept_sources: torch.Tensor) -> torch.Tensor | None:
        if labels is None:
            return None
        mapped = labels.gather(1, kept_sources.clamp_min(0))
        return mapped.masked_fill(kept_sources < 0, IGNORE_INDEX)

    def caller_mask(mask: torch.Tensor):
        if attention_mask is None and bool(mask.all()):
            return None
        return mask.to(attention_mask.dtype if attention_mask is not None else torch.long)

    def renumbered(mask: torch.Tensor):
        if position_ids is None and bool(mask.all()):
            return None
        return (mask.long().cumsum(1) - 1).clamp_min(0).masked_fill(~mask, 0)

    needs = config.spec.context
    grids = None
    if "grid" in needs:
        side, newline = model.get_vision_tower().num_patches_per_side, getattr(model.get_model(), "image_newline", None)
        grids = [[image_grids(embeds[b, s:e], side, newline) for s, e in spans[b]] for b in range(batch)]
    if config.layer_index > 0:
        _set_state(model, config, PrefillState(spans=spans, valid=valid, text_after=text_after, grids=grids))
        return None, renumbered(valid), caller_mask(valid), past_key_values, embeds, restore_labels(sources)

    images_tokens = [embeds[b, s:e] for b in range(batch) for s, e in spans[b]]
    context = {}
    if "text" in needs:
        context["text"] = [embeds[b, idx] for b in range(batch) for idx in text_after[b]]
    if grids is not None:
        context["grid"] = [g for row in grids for g in row]
    if tower is not None:
        context["vision"] = aligned_contexts(tower.contexts(), images_tokens, original_llava_layout(model, images, image_sizes))
    chosen = iter(select_per_image(config, images_tokens, context, project=_projector(model)))
    keep = valid & ~visual
    for b in range(batch):
        for start, _ in spans[b]:
            kept = next(chosen)
            keep[b, start + kept.indices] = True
            if kept.tokens is not None:
                # A merger's tokens take the places of the tokens they stand for (repad made embeds).
                embeds[b, start + kept.indices] = kept.tokens.to(embeds.dtype)
    new_mask, new_embeds, new_sources = repad(keep, side_of_padding, (embeds, 0), (sources, IGNORE_INDEX))
    return None, renumbered(new_mask), caller_mask(new_mask), past_key_values, new_embeds, restore_labels(new_sources)
