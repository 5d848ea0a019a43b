"""Pruning inside the LLM (``LAYER_INDEX = K > 0``, or a schedule of stages ``K_1 < K_2 < ...``,
``otprune.schedule``) through hooks on its decoder layers.

Layers ``0 .. K_1-1`` run on the full sequence. A pre-hook on each stage's layer ``K_i`` has the
method pick, among the visual tokens still alive, those kept from there on (from the hidden states
entering it and the context it asks for; the attention context is measured from ``q`` and ``k`` in
a pre-hook on layer ``K_i - 1``'s self-attention, whatever the backend) and cuts the hidden states
to them; every layer from ``K_1`` on cuts the attention mask, the position embeddings and the
position ids (computed once for the full sequence) down to the positions it holds, so its KV
cache holds only those. A single ``LAYER_INDEX`` is the one-stage schedule. Kept tokens keep their
original positions: whatever the layers receive per position (rotary ``(cos, sin)``, position
ids) is gathered by kept index, so 1-D and multi-axis positions are cut alike. During decoding
the mask's columns of the tokens a layer does not hold are removed. A hook on the final norm
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

from dataclasses import dataclass, field
from functools import partial

import torch

from otprune.contract import ATTENTION_CONTEXT, PER_IMAGE_CONTEXT
from otprune.prune_config import PruneConfig
from otprune.schedule import stage_counts
from otprune.selection import select_per_image, stop_run


@dataclass
class PrefillState:
    """Where the visual tokens of the current prompt sit, set before each multimodal prefill.

    ``spans[b]``: ``(start, end)`` of each image's visual tokens in row b; ``valid``: ``(B, L)``
    non-padding positions; ``text_after[b]``: per image, the positions of its question (the
    ``text`` context, less the phrases its method leaves out); ``grids[b]``: per image, its patch grids (the ``grid`` context, told from
    the tokens entering the LLM), when the method asks for them. Filled while the prefill runs:
    ``kept_by_stage[i]`` ``(B, L_i)`` the sorted positions held from stage i's layer on (``kept``:
    the last stage's); ``measured`` the attention measured for the next stage.
    """

    spans: list[list[tuple[int, int]]]
    valid: torch.Tensor
    text_after: list[list[torch.Tensor]]
    grids: list[list] | None = None
    pending: bool = True
    kept_by_stage: list[torch.Tensor] = field(default_factory=list)
    decoding: bool = False
    measured: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @property
    def kept(self) -> torch.Tensor | None:
        """``(B, L')`` the positions the last layers hold (``None`` before the first stage)."""
        return self.kept_by_stage[-1] if self.kept_by_stage else None

    @kept.setter
    def kept(self, positions: torch.Tensor) -> None:
        self.kept_by_stage = [positions]

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

    def alive(self, stage: int, device) -> torch.Tensor:
        """``(B, L')`` sorted positions entering stage ``stage``: all, or the previous stage's kept."""
        if stage:
            return self.kept_by_stage[stage - 1].to(device)
        return torch.arange(self.length, device=device).expand(self.valid.shape[0], -1)


class LayerPruner:
    """Holds the hooks of one model; ``state`` is replaced before every multimodal prefill."""

    def __init__(self, config: PruneConfig, decoder, layers, final_norm):
        self.config = config
        self.state: PrefillState | None = None
        check_layer_index(config, len(layers))
        self.stages = config.stages
        first = self.stages[0].layer
        self.stage_at = {stage.layer: i for i, stage in enumerate(self.stages)}
        # The stage whose kept positions layer j holds.
        self.holds = {j: sum(stage.layer <= j for stage in self.stages) - 1 for j in range(first, len(layers))}
        self.handles = [decoder.register_forward_pre_hook(self._check_prompt, with_kwargs=True)]
        self.layer_of = {id(layers[j]): j for j in range(first, len(layers))}
        self.handles += [layers[j].register_forward_pre_hook(self._enter, with_kwargs=True) for j in range(first, len(layers))]
        self.handles.append(final_norm.register_forward_hook(self._restore_length))
        self.measures = ATTENTION_CONTEXT & set(config.spec.context)
        if self.measures:
            self.handles += [
                layers[stage.layer - 1].self_attn.register_forward_pre_hook(partial(self._measure_attention, i), with_kwargs=True)
                for i, stage in enumerate(self.stages)
            ]

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

    def _enter(self, module, args, kwargs):
        """A decoder layer's pre-hook: a stage's selection where one prunes, then the cut."""
        state = self.state
        if state is None:
            return None
        hidden = args[0]
        stage = self.stage_at.get(self.layer_of[id(module)])
        if stage == 0:
            if state.pending and hidden.shape[1] == state.length:
                state.pending, state.decoding, state.kept_by_stage = False, False, []
            elif state.kept_by_stage:
                state.decoding = True
            else:
                return None
        if stage is not None and not state.decoding and len(state.kept_by_stage) == stage:
            args = (self._select(stage, hidden, state), *args[1:])
        return self._cut(module, args, kwargs)

    def _cut(self, module, args, kwargs):
        state = self.state
        if state is None or not state.kept_by_stage:
            return None
        hidden, *rest = args
        stage = self.holds[self.layer_of[id(module)]]
        kept = state.kept_by_stage[stage]
        mask = kwargs.get("attention_mask")
        fixed = _fixed_length_cache(module, kwargs)
        if state.decoding:
            if isinstance(mask, torch.Tensor):
                kwargs["attention_mask"] = cut_key_columns(mask, kept, state.length, fixed)
            return (hidden, *rest), kwargs
        entering = state.alive(stage, kept.device)
        if hidden.shape[1] == entering.shape[1] != kept.shape[1]:
            # The stage's layer: the hidden states of the tokens alive before it, cut to those it keeps.
            hidden = take(hidden, torch.searchsorted(entering.contiguous(), kept), dim=1)
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

    def _measure_attention(self, stage: int, module, args, kwargs):
        """Self-attention pre-hook of the layer before stage ``stage``: the rows its method needs."""
        state = self.state
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if state is None or hidden is None:
            return None
        if stage == 0:
            prefill = state.pending and hidden.shape[1] == state.length
        else:
            prefill = not state.decoding and len(state.kept_by_stage) == stage and hidden.shape[1] == state.kept_by_stage[stage - 1].shape[1]
        if not prefill:
            return None
        valid = take(state.valid, state.alive(stage, state.valid.device), dim=1).to(hidden.device)
        last = last_positions(valid)
        if self.measures == {"attention"}:
            queries, last_row = last[:, None], torch.zeros_like(last)
        else:
            queries, last_row = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1), last
        with torch.no_grad():
            rows = attention_rows(module, hidden.detach(), kwargs["position_embeddings"], valid, queries)
        # The last prompt token's row (the ``attention`` context), then every row measured.
        state.measured = (rows[torch.arange(rows.shape[0], device=rows.device), last_row.to(rows.device)], rows)
        return None

    # -- selection ---------------------------------------------------------------------------

    def _select(self, stage: int, hidden: torch.Tensor, state: PrefillState) -> torch.Tensor:
        """Stage ``stage``'s choice, appended to ``state.kept_by_stage``; the hidden states entering its
        layer, a merger's tokens put in the places of the tokens they stand for."""
        config, layer = self.config, self.stages[stage].layer
        detached = hidden.detach()
        if stage == 0:
            _check_prompts_end_with_text(state, layer)
        alive = state.alive(stage, hidden.device)
        keep = torch.ones(alive.shape, dtype=torch.bool, device=hidden.device)
        needs = config.spec.context
        images, where, counts = [], [], []
        context = {name: [] for name in PER_IMAGE_CONTEXT if name in needs}
        last_row, rows = state.measured if state.measured is not None else (None, None)
        for b, spans in enumerate(state.spans):
            for i, (start, end) in enumerate(spans):
                inside = (alive[b] >= start) & (alive[b] < end)
                held = inside.nonzero()[:, 0]
                keep[b] &= ~inside
                images.append(detached[b, held])
                where.append((b, held))
                counts.append(stage_counts(self.stages, end - start)[stage])
                text = torch.searchsorted(alive[b], state.text_after[b][i].to(hidden.device))
                if "text" in context:
                    context["text"].append(detached[b, text])
                if "attention" in context:
                    context["attention"].append(last_row[b, held.to(last_row.device)].to(hidden.device))
                if "text_attention" in context:
                    context["text_attention"].append(rows[b][text.to(rows.device)][:, held.to(rows.device)].to(hidden.device))
                if "visual_attention" in context:
                    context["visual_attention"].append(rows[b][held.to(rows.device)][:, held.to(rows.device)].to(hidden.device))
                if "grid" in context:
                    context["grid"].append(None if state.grids is None or stage else state.grids[b][i])
        chosen = select_per_image(config, images, context, stage=(layer, counts))
        if any(tokens is not None for _, tokens in chosen):
            hidden = hidden.clone()
        for (b, held), (indices, tokens) in zip(where, chosen):
            positions = held[indices.to(held.device)]
            keep[b, positions] = True
            if tokens is not None:
                # A merger's tokens take the places of the tokens they stand for.
                hidden[b, positions.to(hidden.device)] = tokens.to(hidden.device, hidden.dtype)
        row_counts = keep.sum(1)
        if bool((row_counts != row_counts[0]).any()):
            stop_run(
                config,
                f"LAYER_INDEX={layer} needs every sample of a batch to keep the same number of "
                f"tokens; got {row_counts.tolist()} (samples with different image counts or sizes, or a merger that "
                "returned fewer tokens for one of them): use batch size 1",
                ValueError,
            )
        state.kept_by_stage.append(alive[keep].view(keep.shape[0], -1))
        state.measured = None
        return hidden


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


def attention_rows(attention, hidden, position_embeddings, valid, queries: torch.Tensor) -> torch.Tensor:
    """``(B, Q, L)``: the attention of the positions ``queries`` ``(B, Q)`` over all positions of
    their row, mean over heads.

    Recomputed from ``attention``'s projections (LLaMA layout: ``q_proj``, ``k_proj``,
    ``head_dim``, rotary ``(cos, sin)``), since SDPA and flash-attention return no weights; the
    softmax is the causal one over the non-padding positions ``valid`` ``(B, L)``.
    """
    from transformers.models.llama.modeling_llama import rotate_half

    b, length, _ = hidden.shape
    head_dim = attention.head_dim
    valid = valid.to(hidden.device)
    queries = queries.to(hidden.device)
    query = attention.q_proj(take(hidden, queries, dim=1)).view(b, queries.shape[1], -1, head_dim).transpose(1, 2)
    keys = attention.k_proj(hidden).view(b, length, -1, head_dim).transpose(1, 2)
    if hasattr(attention, "q_norm"):
        # Qwen3 normalises each head's query and key before the rotary.
        query, keys = attention.q_norm(query), attention.k_norm(keys)
    cos, sin = (t.expand(b, -1, -1) for t in position_embeddings)
    query = query * take(cos, queries, dim=1)[:, None] + rotate_half(query) * take(sin, queries, dim=1)[:, None]
    keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    scores = torch.einsum("bhqd,bhld->bhql", query.float(), keys.float()) / head_dim**0.5
    visible = valid[:, None, :] & (torch.arange(length, device=hidden.device) <= queries[..., None])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return scores.softmax(-1).mean(1)


def last_positions(valid: torch.Tensor) -> torch.Tensor:
    """``(B,)`` each row's last non-padding position."""
    return (valid.long() * torch.arange(valid.shape[1], device=valid.device)).argmax(1)


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
    """Refuse a ``LAYER_INDEX`` (or a schedule's layer) the model does not have before anything runs."""
    if not config.enabled:
        return
    last = config.stages[-1].layer
    if last >= n_layers:
        name = "LAYER_INDEX" if len(config.stages) == 1 else f"BASELINE={config.method}'s schedule layer"
        raise ValueError(f"{name}={last} is not allowed for this model; it has {n_layers} layers (0 .. {n_layers - 1})")


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
