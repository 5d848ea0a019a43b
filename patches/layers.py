"""Pruning inside the LLM (``LAYER_INDEX = K > 0``) through hooks on its decoder layers.

Layers ``0 .. K-1`` run on the full sequence. A pre-hook on layer K picks the kept visual tokens
from the hidden states entering it (or, for FASTV, from the attention of the last prompt token
at layer K-1; VTW keeps none) and cuts the hidden states, the attention mask, the position
embeddings and the position ids down to the kept positions; the pre-hooks of later layers cut
their inputs the same way, so their KV cache holds only kept tokens. Kept tokens keep their
original positions: whatever the layers receive per position (rotary ``(cos, sin)``, position
ids) is gathered by kept index, so 1-D and multi-axis positions are cut alike. During decoding
the mask's columns of dropped tokens are removed for layers >= K. A hook on the final norm
scatters the hidden states back to the full length, so logits (and a loss against labels) keep
the shape callers expect; dropped visual positions get zero hidden states, and their labels are
ignored anyway.

Mask conventions: a 4-D ``(B, 1, q, kv)`` mask (eager, sdpa with padding), a 2-D ``(B, kv)``
padding mask (flash-attention) or none (sdpa or flash-attention without padding). Every index
is moved to the device of the tensor it indexes, so a model split over several devices
(``device_map``) is cut on each layer's own device.

A pre-hook on the decoder stack itself ends a prompt's pruning: an input of several tokens that
is not the prefill the adapter announced (a text-only prompt after an image prompt, which the
original LLaVA's ``generate`` hands over without calling its multimodal preparation) runs
unpruned. Beam search repeats each prompt ``num_beams`` times after the adapter has seen it; the
state follows the repeat.

Works with any decoder stack whose layers take ``hidden_states`` first and ``attention_mask``,
``position_embeddings`` (cos, sin) and ``position_ids`` as keyword arguments (LLaMA-family models
of transformers 5.x, as used by the original LLaVA and by ``LlavaForConditionalGeneration``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from otprune.prune_config import PruneConfig
from otprune.selection import Kept, log_selection, select_per_image, select_top_scores, selection_clock, stop_run
from otprune.selectors import budget


@dataclass
class PrefillState:
    """Where the visual tokens of the current prompt sit, set before each multimodal prefill.

    ``spans[b]``: ``(start, end)`` of each image's visual tokens in row b; ``valid``: ``(B, L)``
    non-padding positions; ``text_after[b]``: per image, the positions of its question (the
    ``text`` context); ``grids[b]``: per image, its patch grids (the ``grid`` context, told from
    the tokens entering the LLM), when the method asks for them.
    """

    spans: list[list[tuple[int, int]]]
    valid: torch.Tensor
    text_after: list[list[torch.Tensor]]
    grids: list[list] | None = None
    pending: bool = True
    kept: torch.Tensor | None = None
    decoding: bool = False
    attention_scores: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def repeated(self, rows: int) -> PrefillState:
        """The state of a batch whose every row is repeated ``rows / B`` times in place (beams)."""
        times = rows // len(self.spans)
        if times * len(self.spans) != rows:
            raise ValueError(f"a prefill of {rows} rows does not repeat the {len(self.spans)} prompts the adapter saw")
        return PrefillState(
            spans=[s for s in self.spans for _ in range(times)],
            valid=self.valid.repeat_interleave(times, dim=0),
            text_after=[t for t in self.text_after for _ in range(times)],
            grids=None if self.grids is None else [g for g in self.grids for _ in range(times)],
        )


class LayerPruner:
    """Holds the hooks of one model; ``state`` is replaced before every multimodal prefill."""

    def __init__(self, config: PruneConfig, decoder, layers, final_norm):
        self.config = config
        self.state: PrefillState | None = None
        k = config.layer_index
        check_layer_index(config, len(layers))
        self.handles = [decoder.register_forward_pre_hook(self._check_prompt, with_kwargs=True)]
        self.handles.append(layers[k].register_forward_pre_hook(self._select_and_cut, with_kwargs=True))
        self.handles += [layer.register_forward_pre_hook(self._cut, with_kwargs=True) for layer in layers[k + 1 :]]
        self.handles.append(final_norm.register_forward_hook(self._restore_length))
        if "attention" in config.spec.context:
            self.handles.append(layers[k - 1].self_attn.register_forward_pre_hook(self._record_attention, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    # -- hooks -------------------------------------------------------------------------------

    def _check_prompt(self, module, args, kwargs):
        state = self.state
        embeds = kwargs.get("inputs_embeds")
        tokens = embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)
        if state is None or tokens is None:
            return None
        rows, length = tokens.shape[:2]
        if length == 1 and not state.pending:
            return None  # a decode step of the pruned prompt
        if not state.pending or length != state.length:
            self.state = None
        elif rows != len(state.spans):
            self.state = state.repeated(rows)
        return None

    def _select_and_cut(self, module, args, kwargs):
        state = self.state
        if state is None:
            return None
        hidden = args[0]
        if state.pending and hidden.shape[1] == state.length:
            state.kept, merged = self._kept_positions(hidden, state)
            state.pending = False
            state.decoding = False
            if merged:
                # A merger's tokens take the places of the tokens they stand for.
                hidden = hidden.clone()
                for b, positions, tokens in merged:
                    hidden[b, positions.to(hidden.device)] = tokens.to(hidden.device, hidden.dtype)
                args = (hidden, *args[1:])
        elif state.kept is not None:
            state.decoding = True
        else:
            return None
        return self._cut(module, args, kwargs)

    def _cut(self, module, args, kwargs):
        state = self.state
        if state is None or state.kept is None:
            return None
        hidden, *rest = args
        kept = state.kept
        mask = kwargs.get("attention_mask")
        fixed = _fixed_length_cache(module, kwargs)
        if state.decoding:
            if isinstance(mask, torch.Tensor):
                kwargs["attention_mask"] = cut_key_columns(mask, kept, state.length, fixed)
            return (hidden, *rest), kwargs
        if hidden.shape[1] == state.length:
            hidden = take(hidden, kept, dim=1)
        if isinstance(mask, torch.Tensor) and mask.shape[-1] >= state.length:
            kwargs["attention_mask"] = cut_mask(mask, kept, state.length, fixed)
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None and cos_sin[0].shape[-2] == state.length:
            kwargs["position_embeddings"] = tuple(take_positions(t, kept, dim=-2) for t in cos_sin)
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == state.length:
            kwargs["position_ids"] = take_positions(position_ids, kept, dim=-1)
        return (hidden, *rest), kwargs

    def _restore_length(self, module, args, output):
        state = self.state
        if state is None or state.kept is None or state.decoding or output.shape[1] != state.kept.shape[1]:
            return None
        full = output.new_zeros(output.shape[0], state.length, output.shape[-1])
        kept = state.kept.to(output.device)
        return full.scatter(1, kept[..., None].expand(-1, -1, output.shape[-1]), output)

    def _record_attention(self, module, args, kwargs):
        state = self.state
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if state is None or not state.pending or hidden.shape[1] != state.length:
            return None
        with torch.no_grad():
            state.attention_scores = last_token_attention(module, hidden, kwargs["position_embeddings"], state.valid)
        return None

    # -- selection ---------------------------------------------------------------------------

    def _kept_positions(self, hidden: torch.Tensor, state: PrefillState):
        """``(B, L')`` sorted positions kept from layer K on (all but the dropped visual tokens), and
        a merger's ``(row, positions, tokens)`` that replace the hidden states there."""
        hidden = hidden.detach()
        _check_prompts_end_with_text(state, self.config.layer_index)
        keep = torch.ones_like(state.valid, device=hidden.device)
        method = self.config.method
        needs = self.config.spec.context
        images, where = [], []
        context = {name: [] for name in ("text", "attention", "grid") if name in needs and method != "FASTV"}
        for b, spans in enumerate(state.spans):
            for i, (start, end) in enumerate(spans):
                keep[b, start:end] = False
                images.append(hidden[b, start:end])
                where.append((b, start))
                if "text" in context:
                    context["text"].append(hidden[b, state.text_after[b][i].to(hidden.device)])
                if "attention" in context:
                    context["attention"].append(state.attention_scores[b, start:end].to(hidden.device))
                if "grid" in context:
                    context["grid"].append(None if state.grids is None else state.grids[b][i])
        began = selection_clock(self.config, images)
        if method == "VTW":
            chosen = [Kept(torch.zeros(0, dtype=torch.long, device=hidden.device)) for _ in images]
        elif method == "FASTV":
            scores = state.attention_scores
            chosen = [
                Kept(select_top_scores(scores[b, start : start + len(tokens)], budget(self.config.ratio, len(tokens))))
                for (b, start), tokens in zip(where, images)
            ]
        else:
            chosen = select_per_image(self.config, images, context)
        if method in ("VTW", "FASTV"):
            log_selection(self.config, images, chosen, began)
        merged = []
        for (b, start), (indices, tokens) in zip(where, chosen):
            keep[b, start + indices.to(keep.device)] = True
            if tokens is not None:
                merged.append((b, start + indices, tokens))
        counts = keep.sum(1)
        if bool((counts != counts[0]).any()):
            stop_run(
                self.config,
                f"LAYER_INDEX={self.config.layer_index} needs every sample of a batch to keep the same number of "
                f"tokens; got {counts.tolist()} (samples with different image counts or sizes, or a merger that "
                "returned fewer tokens for one of them): use batch size 1",
                ValueError,
            )
        return keep.nonzero()[:, 1].view(keep.shape[0], -1), merged


def _check_prompts_end_with_text(state: PrefillState, layer_index: int) -> None:
    """Refuse a prompt whose last token is visual: the next token is predicted at the prompt's last
    position, and above layer K a dropped token has no hidden state to predict from."""
    positions = torch.arange(state.length, device=state.valid.device)
    last = (state.valid.long() * positions).argmax(1).tolist()
    for b, spans in enumerate(state.spans):
        if any(start <= last[b] < end for start, end in spans):
            raise ValueError(
                f"LAYER_INDEX={layer_index} cannot prune prompt {b}: it ends with an image, and the next token is "
                "predicted at its last position, which pruning inside the LLM may drop; end the prompt with text "
                "(a chat template's assistant turn does) or use LAYER_INDEX=0"
            )


def last_token_attention(attention, hidden, position_embeddings, valid) -> torch.Tensor:
    """``(B, L)`` attention of each row's last prompt token over all positions, mean over heads.

    Recomputes the one query row FASTV needs from ``attention``'s projections (LLaMA layout:
    ``q_proj``, ``k_proj``, ``head_dim``, rotary ``(cos, sin)``), since SDPA returns no weights.
    """
    from transformers.models.llama.modeling_llama import rotate_half

    b, length, _ = hidden.shape
    head_dim = attention.head_dim
    valid = valid.to(hidden.device)
    last = (valid.long() * torch.arange(length, device=hidden.device)).argmax(1)
    rows = torch.arange(b, device=hidden.device)
    query = attention.q_proj(hidden[rows, last]).view(b, -1, head_dim)
    keys = attention.k_proj(hidden).view(b, length, -1, head_dim).transpose(1, 2)
    if hasattr(attention, "q_norm"):
        # Qwen3 normalises each head's query and key before the rotary.
        query, keys = attention.q_norm(query), attention.k_norm(keys)
    cos, sin = (t.expand(b, -1, -1) for t in position_embeddings)
    query = query * cos[rows, last][:, None] + rotate_half(query) * sin[rows, last][:, None]
    keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    scores = torch.einsum("bhd,bhld->bhl", query.float(), keys.float()) / head_dim**0.5
    visible = valid & (torch.arange(length, device=hidden.device) <= last[:, None])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return scores.softmax(-1).mean(1)


def take(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` indexed along ``dim`` with per-row positions ``index`` ``(B, M)``, on ``t``'s device.

    ``t``'s leading dimension is ``B`` or 1 (shared by every row); any other dimension is kept.
    """
    index = index.to(t.device)
    t = t.expand(index.shape[0], *t.shape[1:])
    shape = [index.shape[0]] + [1] * (t.dim() - 1)
    shape[dim] = index.shape[1]
    expanded = index.view(shape).expand(*[s if i != dim else index.shape[1] for i, s in enumerate(t.shape)])
    return t.gather(dim, expanded)


def take_positions(t: torch.Tensor, kept: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-position inputs cut to the kept positions: ``(..., B, L)`` position ids (``dim=-1``) or
    ``(..., B, L, d)`` position embeddings (``dim=-2``); leading axes (multi-axis rotary) alike."""
    dim = dim % t.dim()
    if dim > 1:
        return torch.stack([take_positions(part, kept, dim - 1) for part in t])
    return take(t, kept, dim)


def cut_mask(mask: torch.Tensor, kept: torch.Tensor, length: int, fixed: bool = False) -> torch.Tensor:
    """The prefill mask for the kept positions: a 2-D ``(B, kv)`` padding mask its key columns, a
    4-D ``(B, 1, L, kv)`` mask also its query rows (see :func:`cut_key_columns`)."""
    if mask.dim() == 4 and mask.shape[2] == length:
        mask = take(mask, kept, dim=2)
    return cut_key_columns(mask, kept, length, fixed)


def cut_key_columns(mask: torch.Tensor, kept: torch.Tensor, length: int, fixed: bool) -> torch.Tensor:
    """A mask's key columns for a layer whose cache holds only the kept prompt tokens.

    The layer's keys are the kept prompt positions ``kept`` ``(B, L')`` of the ``length`` ones,
    then whatever follows the prompt (decoded tokens; a fixed-size cache's unused slots).
    A fixed-size cache (``StaticCache``) stays ``kv`` wide: its last ``length - L'`` slots are
    never written for this layer and are masked out.
    """
    dim = mask.dim() - 1
    after = torch.arange(length, mask.shape[-1], device=kept.device).expand(kept.shape[0], -1)
    cut = take(mask, torch.cat([kept, after], dim=1), dim=dim)
    if not fixed or cut.shape[-1] == mask.shape[-1]:
        return cut
    masked = False if mask.dtype == torch.bool else 0 if mask.dim() == 2 else torch.finfo(mask.dtype).min
    filler = cut.new_full((*cut.shape[:-1], mask.shape[-1] - cut.shape[-1]), masked)
    return torch.cat([cut, filler], dim=dim)


def _fixed_length_cache(layer, kwargs) -> bool:
    """Whether ``layer``'s key-value cache is preallocated (static), not grown per token."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    index = getattr(getattr(layer, "self_attn", None), "layer_idx", None)
    layers = getattr(cache, "layers", None)
    if not layers or index is None or index >= len(layers):
        return False
    return bool(getattr(layers[index], "is_compileable", False))


def check_layer_index(config: PruneConfig, n_layers: int) -> None:
    """Refuse a ``LAYER_INDEX`` the model does not have before anything runs."""
    if config.enabled and config.layer_index >= n_layers:
        raise ValueError(f"LAYER_INDEX={config.layer_index} is not allowed for this model; it has {n_layers} layers (0 .. {n_layers - 1})")


def attach_state(model, config: PruneConfig, decoder, state: PrefillState | None) -> None:
    """Give ``model``'s layer hooks the next prefill's ``state`` (``None``: nothing to prune).

    ``decoder``: the decoder stack (``.layers``, ``.norm``). The hooks are installed the first
    time a setting with ``LAYER_INDEX > 0`` needs them and replaced when the setting changes.
    """
    pruner = getattr(model, "_otprune_layer_pruner", None)
    if config.enabled and config.layer_index > 0 and (pruner is None or pruner.config != config):
        if pruner is not None:
            pruner.remove()
        pruner = LayerPruner(config, decoder, decoder.layers, decoder.norm)
        model._otprune_layer_pruner = pruner
    elif pruner is not None and pruner.config == config:
        # The same setting from code or from the environment: its faults are raised its way.
        pruner.config = config
    if pruner is not None:
        pruner.state = state
