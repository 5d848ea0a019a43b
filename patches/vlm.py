"""transformers' Qwen-VL and LLaVA-OneVision classes: prune before the LLM, keep the model's own positions.

Covers ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration`` and ``LlavaOnevisionForConditionalGeneration``. Their
processors expand each image (or video) into as many placeholder tokens as it has visual tokens.
``generate`` and ``forward`` are wrapped; with pruning on they compute, from the caller's full
sequence, what the model would: the token embeddings with the image and video features scattered
into their placeholders, and the positions of every token (Qwen: the 3-D (time, height, width)
rotary positions of the model's own ``get_rope_index``, text after an image continuing from the
grid's largest position; OneVision: the 1-D positions the unpruned call would use). Then:

- ``LAYER_INDEX = 0``: each selection unit keeps ``budget(ratio, N)`` of its ``N`` tokens
  (VTW: none); the LLM gets ``inputs_embeds`` and ``position_ids`` cut to the kept tokens (and re-padded), so each
  kept token keeps the position the unpruned model gives it: **choice**: positions are gathered,
  never renumbered, as renumbering would scramble the image grid's spatial layout. Decoding goes
  on from the last prompt token's position, which is the unpruned model's next position (prompts
  end with text). Qwen3-VL's DeepStack features are added at the kept visual positions only.
  ``generate`` returns the caller's full ``input_ids`` followed by the new tokens, as unpruned;
  ``forward`` returns logits for the shortened sequence.
- ``K > 0``: the LLM gets the same inputs uncut (the vision tower runs once) and the layer hooks
  of ``layers.py`` prune inside it.

Selection units: each image is one unit. **Choice** for video: per frame: each temporal step of
a video (Qwen: one ``t`` of its grid, two input frames merged; OneVision: one pooled frame) is
pruned to its own budget, as an image would be, so a clip keeps the same share of every moment;
OneVision's one newline token after a video is always kept.

The vision context (a method asking for ``vision`` or running before the projector), per
selection unit: from Qwen's tower (``vision_without_cls``; the merger's MLP is the projector), or
from OneVision's SigLIP crops (``vision_tower``, no [CLS]), each token traced to its crop patch
through the model's own packing (``vision_crops``; newline tokens kept); the projector is its
``multi_modal_projector``. Where no patch stands for OneVision's tokens such a method stops the
run, naming why: an image whose tiles' features its ``anyres_max`` cap downsamples, and videos
(each frame's projected features are pooled bilinearly).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from otprune.contract import PatchGrid
from otprune.selection import select_per_image, stop_run

from .grids import image_grids
from .hf import decoder, tower_capture
from .hf import projector as llava_projector
from .hf import vision_modules as llava_vision_modules
from .layers import PrefillState, attach_state
from .model_calls import as_keywords, generation_padding, with_full_prompt, wrap_model_classes
from .splice import IGNORE_INDEX, check_prunable_images, leave_out, left_out_ids, padding_mask, padding_side, question_positions, repad, visual_spans
from .vision_crops import onevision_layout
from .vision_tower import aligned_contexts
from .vision_without_cls import capture_qwen_tower, merger_mlp, unit_contexts

QWEN_CLASSES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration")
ONEVISION_CLASS = "LlavaOnevisionForConditionalGeneration"
CLASS_NAMES = (*QWEN_CLASSES, ONEVISION_CLASS)
PIXEL_INPUTS = ("pixel_values", "pixel_values_videos")
# Inputs that only describe the images and videos: the pruned call gets embeddings instead.
VISUAL_INPUTS = (
    "pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids",
    "image_sizes", "image_sizes_videos", "batch_num_images", "vision_feature_layer", "vision_feature_select_strategy",
    "vision_aspect_ratio",
)  # fmt: skip


@dataclass
class Visual:
    """One placeholder token's features: ``features`` ``(M, d)`` in placeholder order over the batch,
    ``units`` the consecutive ``(count, selectable, grids)`` runs they split into (``selectable=False``:
    always kept; ``grids``: the unit's patch grids, ``None`` if unknown), ``deepstack`` Qwen3-VL's
    per-level ``(M, d)`` features added in the first layers."""

    token_id: int
    features: torch.Tensor
    units: list[tuple[int, bool, tuple | None]]
    deepstack: list[torch.Tensor] | None = None


def vision_modules(model) -> tuple:
    """The modules the image passes first and last before the LLM, for timing: Qwen's vision model
    (its merger is the projector), OneVision's vision tower and projector."""
    if type(model).__name__ == ONEVISION_CLASS:
        return llava_vision_modules(model)
    return model.model.visual, model.model.visual


def install() -> bool:
    """Wrap ``generate`` and ``forward`` of the supported classes; False without transformers."""
    if not wrap_model_classes(CLASS_NAMES, _wrap):
        return False
    import transformers

    text_model = getattr(transformers, "Qwen3VLTextModel", None)
    if text_model is not None and not hasattr(text_model._deepstack_process, "otprune_original"):
        text_model._deepstack_process = _deepstack_at_kept(text_model._deepstack_process)
    return True


def _wrap(original, generating: bool):
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        from . import active_config, check_model

        kwargs = as_keywords(signature, self, args, kwargs)
        config = active_config(self)
        if config.enabled:
            check_model(self, config)
            check_prunable_images(kwargs, PIXEL_INPUTS)
        input_ids = kwargs.get("input_ids")
        has_visual = any(kwargs.get(key) is not None for key in PIXEL_INPUTS)
        if not config.enabled or not has_visual or input_ids is None:
            if input_ids is not None and input_ids.shape[1] > 1:
                _attach(self, config, None)
            return original(self, **kwargs)
        if generating and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = generation_padding(self, kwargs).long()
        full = _unpruned_inputs(self, kwargs, generating, _tower_capture(self, config, kwargs))
        if config.layer_index > 0:
            _attach(self, config, _prefill_state(full, left_out_ids(self, config)))
            prepared, deepstack = _llm_call(self, kwargs, full, None, generating)
        else:
            prepared, deepstack = _llm_call(self, kwargs, full, _kept_before_llm(self, config, full, left_out_ids(self, config)), generating)
        with _deepstack_injected(self, deepstack):
            output = original(self, **prepared)
        if not generating or config.layer_index > 0:
            return output
        return with_full_prompt(output, input_ids, prepared["input_ids"].shape[1])

    wrapped.otprune_original = original
    return wrapped


def _attach(model, config, state) -> None:
    language_model = decoder(model)
    attach_state(model, config, language_model, state)
    # Not a module attribute: the text model must not hold its parent as a submodule.
    language_model.__dict__["_otprune_prefill_state"] = lambda: getattr(getattr(model, "_otprune_layer_pruner", None), "state", None)


def _deepstack_at_kept(original):
    """Qwen3-VL adds DeepStack features after its first layers at the prompt's visual positions; once
    the hooks of ``layers.py`` have cut the sequence (``LAYER_INDEX`` below the number of levels),
    add them at the kept visual tokens, each its own token's features."""

    @functools.wraps(original)
    def process(self, hidden_states, visual_pos_masks, visual_embeds):
        state = self.__dict__.get("_otprune_prefill_state", lambda: None)()
        if state is None or state.kept is None or hidden_states.shape[1] == visual_pos_masks.shape[1]:
            return original(self, hidden_states, visual_pos_masks, visual_embeds)
        visual_pos_masks = visual_pos_masks.to(state.kept.device)
        rank = (visual_pos_masks.flatten().long().cumsum(0) - 1).view_as(visual_pos_masks)
        kept_visual = visual_pos_masks.gather(1, state.kept)
        return original(self, hidden_states, kept_visual, visual_embeds[rank.gather(1, state.kept)[kept_visual]])

    process.otprune_original = original
    return process


# -- what the unpruned model computes --------------------------------------------------------------


def _visuals(model, kwargs: dict) -> list[Visual]:
    """The image and video features the model would scatter into its placeholders."""
    config = model.config
    inner = model.model
    visuals = []
    if type(model).__name__ == ONEVISION_CLASS:
        options = {k: kwargs[k] for k in ("vision_feature_layer", "vision_feature_select_strategy") if kwargs.get(k) is not None}
        if kwargs.get("pixel_values") is not None:
            image_options = {**options, "vision_aspect_ratio": kwargs["vision_aspect_ratio"]} if kwargs.get("vision_aspect_ratio") else options
            out = inner.get_image_features(
                kwargs["pixel_values"], kwargs["image_sizes"], batch_num_images=kwargs.get("batch_num_images"), return_dict=True, **image_options
            )
            features = list(out.pooler_output)
            side = config.vision_config.image_size // config.vision_config.patch_size
            newline = getattr(inner, "image_newline", None)
            units = [(f.shape[0], True, image_grids(f, side, newline)) for f in features]
            visuals.append(Visual(config.image_token_id, torch.cat(features), units))
        if kwargs.get("pixel_values_videos") is not None:
            videos = inner.get_video_features(kwargs["pixel_values_videos"], return_dict=True, **options).pooler_output
            placeholders = int((kwargs["input_ids"] == config.video_token_id).sum())
            if placeholders == videos.shape[0] * (videos.shape[1] + 1):
                # transformers < 5.23 appends each video's newline token in forward, not in get_video_features.
                newline = inner.image_newline[None, None].expand(videos.shape[0], 1, -1).to(videos)
                videos = torch.cat([videos, newline], dim=1)
            frames = kwargs["pixel_values_videos"].shape[1]
            per_frame = (videos.shape[1] - 1) // frames
            units = [(per_frame, True, image_grids(videos[0, :per_frame], None, None))] * frames + [(1, False, None)]
            visuals.append(Visual(config.video_token_id, videos.flatten(0, 1), units * videos.shape[0]))
        return visuals
    merge = config.vision_config.spatial_merge_size**2
    for token_id, pixels, grid_name, encode in (
        (config.image_token_id, "pixel_values", "image_grid_thw", inner.get_image_features),
        (config.video_token_id, "pixel_values_videos", "video_grid_thw", inner.get_video_features),
    ):
        if kwargs.get(pixels) is None:
            continue
        grids = kwargs[grid_name]
        out = encode(kwargs[pixels], grids, return_dict=True)
        deepstack = getattr(out, "deepstack_features", None)
        if deepstack is not None:
            deepstack = [torch.cat(list(level)) if isinstance(level, (list, tuple)) else level for level in deepstack]
        units = _grid_units(grids, merge, per_frame=pixels == "pixel_values_videos")
        visuals.append(Visual(token_id, torch.cat(list(out.pooler_output)), units, deepstack))
    return visuals


def _positions(model, kwargs: dict, valid: torch.Tensor, generating: bool) -> torch.Tensor:
    """``(R, B, L)`` positions of the unpruned call: Qwen's 3-D rope index (R = 3), else ``(1, B, L)``."""
    input_ids = kwargs["input_ids"]
    given = kwargs.get("position_ids")
    if isinstance(given, torch.Tensor):
        return given[-3:] if given.dim() == 3 else given[None]
    if type(model).__name__ == ONEVISION_CLASS:
        if generating:
            return ((valid.long().cumsum(1) - 1).masked_fill(~valid, 0))[None]
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(1, *input_ids.shape)
    config = model.config
    token_types = kwargs.get("mm_token_type_ids")
    if token_types is None:
        token_types = (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()
    extra = {"second_per_grid_ts": kwargs["second_per_grid_ts"]} if kwargs.get("second_per_grid_ts") is not None else {}
    positions, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=token_types,
        image_grid_thw=kwargs.get("image_grid_thw"),
        video_grid_thw=kwargs.get("video_grid_thw"),
        attention_mask=kwargs.get("attention_mask"),
        **extra,
    )
    return positions


def _units(input_ids: torch.Tensor, visual: Visual) -> list[tuple[int, torch.Tensor, bool, tuple | None]]:
    """Each unit's ``(row, positions, selectable, grids)``, consuming placeholders in batch order."""
    spans = visual_spans(input_ids == visual.token_id, [n for n, _, _ in visual.units])
    device = input_ids.device
    return [(row, torch.arange(start, end, device=device), selectable, grids) for (row, start, end), (_, selectable, grids) in zip(spans, visual.units)]


def _questions(units, full: UnprunedInputs, phrases) -> list[torch.Tensor]:
    """Per unit, the text positions of its prompt's question (``splice.question_positions``), less
    the ``phrases`` (runs of token ids, ``splice.left_out_ids``) its method leaves out."""
    rows = {b for b, _, _, _ in units}
    question = {b: question_positions(full.visual_mask[b] | full.markers[b], full.valid[b]) for b in rows}
    question = {b: leave_out(full.input_ids[b, q], q, phrases) for b, q in question.items()}
    return [question[b] for b, _, _, _ in units]


@dataclass
class UnprunedInputs:
    """What the unpruned model's LLM would get, over the caller's full ``(B, L)`` sequence:
    ``embeds`` with the visual features scattered in, ``positions`` ``(R, B, L)``, the selection
    ``units`` (``(row, positions, selectable, grids)``), Qwen3-VL's per-level DeepStack ``(B, L, d)``,
    and ``markers`` ``(B, L)``: the text tokens that frame an image (Qwen's vision start and end),
    part of no question."""

    input_ids: torch.Tensor
    valid: torch.Tensor
    embeds: torch.Tensor
    positions: torch.Tensor
    visual_mask: torch.Tensor
    units: list[tuple[int, torch.Tensor, bool, tuple | None]]
    deepstack: list[torch.Tensor] | None
    markers: torch.Tensor
    vision: list | None = None


def _tower_capture(model, config, kwargs: dict):
    """Hooks recording the vision context while the tower runs, for a method that needs it. They
    yield a function of the call's ``visuals`` and a device that gives each selection unit's
    context (``None`` where the tower's rows do not map onto its tokens)."""
    if "vision" not in config.spec.context and not config.spec.before_projector:
        return contextlib.nullcontext()
    if type(model).__name__ == ONEVISION_CLASS:
        return _onevision_tower(model, config, kwargs)
    return _qwen_tower(model.model.visual)


@contextlib.contextmanager
def _qwen_tower(visual):
    """Qwen's tower, per frame, its frames joined into the selection units (``unit_contexts``)."""
    with capture_qwen_tower(visual) as capture:
        yield lambda visuals, device: unit_contexts(capture.frames(), [count for v in visuals for count, _, _ in v.units], device)


def _onevision_tower(model, config, kwargs: dict):
    """OneVision's SigLIP crops, each image's tokens traced to them (``vision_crops.onevision_layout``);
    the run stops, naming why, before the tower runs where no patch stands for a token."""
    why = f"BASELINE={config.spec.name} needs the vision tower's view, which LLaVA-OneVision does not give"
    if kwargs.get("pixel_values_videos") is not None:
        stop_run(config, f"{why} for videos: each frame's projected features are pooled bilinearly, so no tower patch stands for a video token", ValueError)
    sizes = kwargs["image_sizes"]
    aspect = kwargs.get("vision_aspect_ratio") or model.config.vision_aspect_ratio
    layout, downsampled = onevision_layout(model, sizes, kwargs.get("batch_num_images"), aspect)
    if downsampled:
        height, width = sizes[downsampled[0]].tolist()
        stop_run(
            config,
            f"{why} for an image of {width} x {height} px: its tiles' features are downsampled by OneVision's anyres_max cap "
            f"(vision_aspect_ratio {aspect!r}), so each of its tokens blends several tower patches",
            ValueError,
        )
    feature_kwargs = {k: kwargs[k] for k in ("vision_feature_layer", "vision_feature_select_strategy") if kwargs.get(k) is not None}
    return _aligned_by(tower_capture(model, feature_kwargs), layout)


@contextlib.contextmanager
def _aligned_by(capture, layout):
    """The tower rows ``capture`` records, each image's tokens given theirs by ``layout``."""
    with capture as tower:

        def contexts(visuals, device):
            (images,) = visuals
            tokens = images.features.to(device).split([count for count, _, _ in images.units])
            return aligned_contexts(tower.contexts(), list(tokens), layout)

        yield contexts


def _projector(model):
    """The projector of a method before it, as ``(m, C) -> (m, d)`` in its own dtype: OneVision's
    ``multi_modal_projector``; Qwen's merger MLP (``vision_without_cls``: the features are its input)."""
    if type(model).__name__ == ONEVISION_CLASS:
        return llava_projector(model)
    _, mlp = merger_mlp(model.model.visual.merger)
    dtype = next(model.model.visual.merger.parameters()).dtype
    return lambda features: mlp(features.to(dtype))


def _unpruned_inputs(model, kwargs: dict, generating: bool, tower=None) -> UnprunedInputs:
    input_ids = kwargs["input_ids"]
    attention_mask = kwargs.get("attention_mask")
    valid = padding_mask(input_ids, attention_mask)
    positions = _positions(model, kwargs, valid, generating)
    embeds = model.get_input_embeddings()(input_ids)
    visual_mask = torch.zeros_like(valid)
    deepstack = None
    units = []
    with tower or contextlib.nullcontext() as unit_vision:
        visuals = _visuals(model, kwargs)
    for visual in visuals:
        where = input_ids == visual.token_id
        visual_mask |= where
        embeds = embeds.masked_scatter(where[..., None], visual.features.to(embeds.device, embeds.dtype))
        if visual.deepstack is not None:
            deepstack = deepstack or [embeds.new_zeros(embeds.shape) for _ in visual.deepstack]
            deepstack = [d.masked_scatter(where[..., None], f.to(d.device, d.dtype)) for d, f in zip(deepstack, visual.deepstack)]
        units += _units(input_ids, visual)
    frame_ids = [getattr(model.config, name, None) for name in ("vision_start_token_id", "vision_end_token_id")]
    markers = torch.isin(input_ids, torch.tensor([i for i in frame_ids if i is not None], dtype=input_ids.dtype, device=input_ids.device))
    vision = None if unit_vision is None else unit_vision(visuals, embeds.device)
    return UnprunedInputs(input_ids, valid, embeds, positions, visual_mask, units, deepstack, markers, vision)


# -- LAYER_INDEX = 0 -------------------------------------------------------------------------------


def _kept_before_llm(model, config, full: UnprunedInputs, phrases) -> torch.Tensor:
    """``(B, L)`` positions the LLM gets: all text, each unit's picks, the always-kept tokens
    (``phrases``: what the method leaves out of its question, ``_questions``).

    A merger's tokens replace ``full.embeds`` at the positions they take, so each is read at the
    unpruned position (3-D for Qwen) of the token it stands for; Qwen3-VL's DeepStack features
    there stay that token's (**choice**: a merger returns no DeepStack levels)."""
    selectable = [u for u in full.units if u[2]]
    context = {}
    if "text" in config.spec.context:
        questions = _questions(selectable, full, phrases)
        context["text"] = [full.embeds[b, q] for (b, _, _, _), q in zip(selectable, questions)]
    if "grid" in config.spec.context:
        context["grid"] = [grids for _, _, _, grids in selectable]
    project = None
    if full.vision is not None:
        context["vision"] = full.vision
        project = _projector(model)
    kept = select_per_image(config, [full.embeds[b, p] for b, p, _, _ in selectable], context, project=project)
    keep = full.valid & ~full.visual_mask
    for (b, p, _, _), (indices, tokens) in zip(selectable, kept):
        keep[b, p[indices]] = True
        if tokens is not None:
            full.embeds[b, p[indices]] = tokens.to(full.embeds.dtype)
    for b, p, is_selectable, _ in full.units:
        if not is_selectable:
            keep[b, p] = True
    return keep


def _llm_call(model, kwargs: dict, full: UnprunedInputs, keep: torch.Tensor | None, generating: bool):
    """The call's arguments with the LLM's inputs cut to the ``keep`` ``(B, L)`` positions and
    re-padded (``None``: all, as at K > 0), and Qwen3-VL's DeepStack inputs for it (else ``None``)."""
    columns = [
        (full.input_ids, model.config.get_text_config().pad_token_id or 0),
        (full.embeds, 0),
        (full.positions.permute(1, 2, 0), 0),
        (full.visual_mask, False),
    ]
    names = ["input_ids", "inputs_embeds", "position_ids", "visual_mask"]
    if isinstance(kwargs.get("labels"), torch.Tensor):
        columns.append((kwargs["labels"], IGNORE_INDEX))
        names.append("labels")
    columns += [(d, 0) for d in full.deepstack or []]
    if keep is None:
        new_mask, cut = full.valid, [t for t, _ in columns]
    else:
        new_mask, *cut = repad(keep, padding_side(full.valid, default="left" if generating else "right"), *columns)
    prepared = {k: v for k, v in kwargs.items() if k not in VISUAL_INPUTS}
    prepared.update(zip(names, cut))
    kept_visual = prepared.pop("visual_mask")
    prepared["position_ids"] = prepared["position_ids"].permute(2, 0, 1)
    if prepared["position_ids"].shape[0] == 1:
        prepared["position_ids"] = prepared["position_ids"][0]
    else:
        # Qwen decodes a cached sequence at (its kept length + rope_deltas) when no positions are
        # given: the offset that puts the next token where the unpruned model would.
        next_position = full.positions.masked_fill(~full.valid, 0).amax(dim=(0, 2)) + 1
        model.model.rope_deltas = (next_position - new_mask.sum(1))[:, None]
    if kwargs.get("attention_mask") is not None:
        prepared["attention_mask"] = new_mask.to(kwargs["attention_mask"].dtype)
    elif not bool(new_mask.all()):
        # Without a mask the model would attend to the padding that pruning added.
        prepared["attention_mask"] = new_mask.long()
    if not generating:
        prepared["input_ids"] = None
    injected = None
    if full.deepstack is not None:
        injected = (kept_visual, [level[kept_visual] for level in cut[len(names) :]])
    return prepared, injected


@contextlib.contextmanager
def _deepstack_injected(model, deepstack):
    """Hand Qwen3-VL's text model the kept tokens' DeepStack features during the pruned prefill.

    The multimodal model computes them only from ``pixel_values``, which the pruned call no longer
    passes; a one-shot pre-hook on its text model adds them to the prefill's arguments.
    """
    if deepstack is None:
        yield
        return
    mask, levels = deepstack
    language_model = decoder(model)

    def inject(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[:2] != mask.shape:
            return None
        handle.remove()
        kwargs["visual_pos_masks"] = mask
        kwargs["deepstack_visual_embeds"] = levels
        return args, kwargs

    handle = language_model.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# -- LAYER_INDEX > 0 -------------------------------------------------------------------------------


def _prefill_state(full: UnprunedInputs, phrases) -> PrefillState:
    """Where each selection unit sits, and its question less ``phrases`` (``_questions``), for the
    layer hooks (each unit is one run of placeholders)."""
    selectable = sorted((u for u in full.units if u[2]), key=lambda u: (u[0], int(u[1][0])))
    questions = _questions(selectable, full, phrases)
    spans: list[list[tuple[int, int]]] = [[] for _ in range(full.input_ids.shape[0])]
    text_after: list[list[torch.Tensor]] = [[] for _ in spans]
    grids: list[list] = [[] for _ in spans]
    for (b, positions, _, unit_grids), question in zip(selectable, questions):
        spans[b].append((int(positions[0]), int(positions[-1]) + 1))
        text_after[b].append(question)
        grids[b].append(unit_grids)
    return PrefillState(spans=spans, valid=full.valid, text_after=text_after, grids=grids)


def _grid_units(grids: torch.Tensor, merge: int, per_frame: bool) -> list[tuple[int, bool, tuple]]:
    """Qwen's units from ``(t, h, w)`` patch grids: one per image, or one per temporal step of a
    video; each frame's merged tokens are one ``(h / s) x (w / s)`` grid (``merge = s * s``)."""
    side = math.isqrt(merge)
    units = []
    for t, h, w in grids.tolist():
        frame = (PatchGrid(0, h // side, w // side),)
        if per_frame:
            units += [(h * w // merge, True, frame)] * t
        else:
            # An image's temporal steps (one, for a still image) stack their grids in order.
            units.append((t * h * w // merge, True, tuple(PatchGrid(i * (h * w // merge), h // side, w // side) for i in range(t))))
    return units
