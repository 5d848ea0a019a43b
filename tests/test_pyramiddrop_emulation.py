"""PyramidDrop against an emulation of its authors' public code, written here from reading it.

The public code: github Cooperx521/PyramidDrop (commit 6444f30), ``llava/model/modeling_llama_pdrop.py``,
``LlamaModel.pdrop_forward`` (the loop over layers) and ``LlamaModel.pdrop_rank_drop`` (the ranking):

- l.1222-1231: after decoder layer ``layer_idx`` it sets ``rank_layer = layer_idx + 1`` and, if
  ``rank_layer`` is in ``layer_list`` (``[8, 16, 24]``), ranks and drops before 0-based layer
  ``rank_layer`` (= K): what otprune calls "before layer K".
- l.1322-1342: the ranking uses **layer K's** ``input_layernorm``, ``q_proj``, ``k_proj`` and rotary on
  the hidden states leaving layer K - 1 (= entering layer K), at the forward's current
  ``position_ids``.
- l.1390-1391: the query is position ``prompt_len + image_tokens - 1``, the prompt's last token
  (LLaVA-1.5's ``ASSISTANT:``) in the sequence still alive.
- l.1395-1401: scores ``q k^T / sqrt(head_dim)`` plus the causal mask, softmax over every key in
  float32 (then cast back to the model's dtype), mean over heads, then the image's keys only.
- l.1306-1307, l.1405-1407: of ``int(N0 * ratio[s])`` image tokens alive it keeps
  ``int(N0 * ratio[s + 1])`` (``ratio = [1.0, 0.5, 0.25, 0.125]``: ``model_vqa_loader.py`` l.96
  inserts the 1.0), by ``topk``, then sorted: the kept tokens stay in order.
- l.1446: after a drop, ``position_ids`` are renumbered ``0 .. L' - 1`` for the shorter sequence.

otprune's ``PYRAMIDDROP`` (``otprune/plugins/pyramiddrop.py``, ``patches/layers.py``) ranks with the
same rule (query, softmax over every key, mean over heads, top-k kept in order), so fed the same
layer's inputs at the same positions it keeps the same indices at every stage (the first test).
It differs in three named choices, each shown exactly here:

1. the layer: otprune measures **layer K - 1's** attention (a pre-hook on its self-attention: its
   own input, its own q/k), the public code layer K's on layer K - 1's output;
2. positions: otprune's kept tokens keep their original positions (``patches/layers.py``), the
   public code renumbers them after each drop, so from the second stage on the rotary differs;
3. counts: otprune keeps ``budget(λ^s, N0)`` (rounding half up), the public code
   ``int(N0 * ratio[s])`` (rounding down): equal for LLaVA-1.5's 576 tokens at λ = 0.5.
"""

import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaModel  # noqa: E402

from otprune.patches.layers import attention_rows  # noqa: E402
from otprune.plugins.pyramiddrop import stages as pdrop_stages  # noqa: E402
from otprune.prune_config import PruneConfig  # noqa: E402
from otprune.schedule import stage_counts  # noqa: E402
from otprune.selection import select_per_image  # noqa: E402

HEADS, HEAD_DIM = 4, 16
HIDDEN = HEADS * HEAD_DIM
EPS = 1e-6
BEFORE, N0, QUESTION = 5, 576, 20  # system text, LLaVA-1.5's image, the question ending in "ASSISTANT:"
PUBLIC_RATIOS = [1.0, 0.5, 0.25, 0.125]  # --image_token_ratio_list "[0.5,0.25,0.125]" with the 1.0 inserted
LAYERS = [1, 2, 3]  # a 4-layer stand-in for [8, 16, 24]
CONFIG = PruneConfig("PYRAMIDDROP", 0.5, options={"layers": LAYERS})


def tiny_llama(seed: int) -> LlamaModel:
    """Four LLaMA layers whose q/k weights and norms are large enough for attention far from uniform."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=4,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=8,
        rms_norm_eps=EPS,
    )
    model = LlamaModel(config).eval()
    with torch.no_grad():
        for layer in model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.normal_(0, 2 / HIDDEN**0.5)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return model


# -- the emulation of the public code (plain tensors; nothing of otprune's or of transformers') ------


def rms_norm(h, weight):
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS))


def rotate(x, positions, base=10000.0):
    """LLaMA's rotary on ``(heads, L, head_dim)``: dims ``i`` and ``i + head_dim/2`` turned by ``pos / base^(2i/head_dim)``."""
    half = x.shape[-1] // 2
    frequency = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = (positions.double()[:, None] * frequency).to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * angle.cos() - second * angle.sin(), second * angle.cos() + first * angle.sin()], -1)


def public_rank_drop(hidden, layer, position_ids, stage, image_index=BEFORE, prompt_len=BEFORE + QUESTION):
    """``pdrop_rank_drop`` at inference for one sample: ``hidden`` ``(L, d)`` the states leaving the
    layer before the stage, ``layer`` the stage's own layer (its norm and q/k weights), ``position_ids``
    ``(L,)`` what the forward holds. Returns the kept image tokens' offsets among those alive."""
    alive = int(N0 * PUBLIC_RATIOS[stage])
    keep = int(N0 * PUBLIC_RATIOS[stage + 1])
    x = rms_norm(hidden, layer.input_layernorm.weight)
    length = x.shape[0]
    q = (x @ layer.self_attn.q_proj.weight.T).view(length, HEADS, HEAD_DIM).transpose(0, 1)
    k = (x @ layer.self_attn.k_proj.weight.T).view(length, HEADS, HEAD_DIM).transpose(0, 1)
    q, k = rotate(q, position_ids), rotate(k, position_ids)
    last = prompt_len + alive - 1
    scores = q[:, last : last + 1] @ k.transpose(1, 2) / math.sqrt(HEAD_DIM)  # (heads, 1, L)
    scores = scores.masked_fill(torch.arange(length) > last, torch.finfo(scores.dtype).min)
    weights = scores.softmax(-1, dtype=torch.float32).mean(0)[:, image_index : image_index + alive].mean(0)
    return weights.topk(keep).indices.sort().values


# -- ours, as patches/layers.py measures the context and calls the selector -----------------------


def ours(hidden, layer, positions, stage, rotary):
    """``hidden`` ``(L, d)`` entering ``layer`` (whose self-attention the patch's pre-hook measures),
    ``positions`` ``(L,)`` the positions otprune's forward gives them. The kept image offsets."""
    normed = layer.input_layernorm(hidden)[None]  # what the self-attention pre-hook receives
    cos_sin = rotary(normed, positions[None])
    valid = torch.ones(1, hidden.shape[0], dtype=torch.bool)
    last = torch.tensor([[hidden.shape[0] - 1]])
    row = attention_rows(layer.self_attn, normed, cos_sin, valid, last)[0, 0]
    alive = int(N0 * PUBLIC_RATIOS[stage])
    held = torch.arange(BEFORE, BEFORE + alive)
    count = stage_counts(CONFIG.stages, N0)[stage]
    [(indices, tokens)] = select_per_image(CONFIG, [hidden[held]], {"attention": [row[held]]}, stage=(LAYERS[stage], [count]))
    assert tokens is None
    return indices


def fixed_hidden(seed, stage):
    torch.manual_seed(1000 + seed)
    return torch.randn(BEFORE + int(N0 * PUBLIC_RATIOS[stage]) + QUESTION, HIDDEN)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("stage", range(3))
def test_fed_the_same_layer_and_positions_each_stage_keeps_what_the_public_code_keeps(seed, stage):
    """The ranking rule: query, softmax over every key, mean over heads, counts and order."""
    model = tiny_llama(seed)
    layer, hidden = model.layers[LAYERS[stage]], fixed_hidden(seed, stage)
    positions = torch.arange(hidden.shape[0])
    with torch.no_grad():
        expected = public_rank_drop(hidden, layer, positions, stage)
        kept = ours(hidden, layer, positions, stage, model.rotary_emb)
    assert len(kept) == [288, 144, 72][stage]
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("seed", range(3))
def test_the_layer_differs_ours_ranks_with_layer_k_minus_1_the_public_code_with_layer_k(seed):
    """At the first stage (K = 2 here): otprune measures layer K - 1 = 1 on its own input, the public
    code layer K = 2 on layer 1's output. Fed layer K's inputs ours keeps the public code's tokens;
    as the patch measures, it keeps others."""
    model = tiny_llama(seed)
    k = 2
    torch.manual_seed(2000 + seed)
    embeds = torch.randn(1, BEFORE + N0 + QUESTION, HIDDEN)
    with torch.no_grad():
        states = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states  # [j]: entering layer j
        positions = torch.arange(embeds.shape[1])
        config = PruneConfig("PYRAMIDDROP", 0.5, options={"layers": [k]})
        expected = public_rank_drop(states[k][0], model.layers[k], positions, stage=0)
        as_public = ours(states[k][0], model.layers[k], positions, 0, model.rotary_emb)
        as_patch = ours(states[k - 1][0], model.layers[k - 1], positions, 0, model.rotary_emb)
    assert config.stages[0].layer == k  # the patch's pre-hook for this stage sits on layer k - 1's self-attention
    assert torch.equal(as_public, expected)
    assert not torch.equal(as_patch, expected)
    assert len(set(as_patch.tolist()) & set(expected.tolist())) < 288


@pytest.mark.parametrize("seed", range(3))
def test_positions_differ_from_the_second_stage_on_the_public_code_renumbers_them(seed):
    """Entering the second stage, the public code's ``position_ids`` are ``0 .. L' - 1`` (l.1446);
    otprune's are the original positions of the tokens alive. Same layer and hidden states: the
    emulation at otprune's positions keeps ours, at its own positions it keeps others."""
    model = tiny_llama(seed)
    layer, hidden = model.layers[LAYERS[1]], fixed_hidden(seed, 1)
    torch.manual_seed(3000 + seed)
    first_kept = BEFORE + torch.randperm(N0)[: N0 // 2].sort().values  # the first stage's choice
    original = torch.cat([torch.arange(BEFORE), first_kept, torch.arange(BEFORE + N0, BEFORE + N0 + QUESTION)])
    renumbered = torch.arange(hidden.shape[0])
    with torch.no_grad():
        kept = ours(hidden, layer, original, 1, model.rotary_emb)
        at_ours = public_rank_drop(hidden, layer, original, 1)
        public = public_rank_drop(hidden, layer, renumbered, 1)
    assert torch.equal(kept, at_ours)
    assert not torch.equal(kept, public)


@pytest.mark.parametrize(
    "n0, ours_counts, public_counts",
    [
        (576, [288, 144, 72], [288, 144, 72]),  # LLaVA-1.5: the same
        (2880, [1440, 720, 360], [1440, 720, 360]),  # LLaVA-NeXT's 5 x 576 without newlines: the same
        (1175, [588, 294, 147], [587, 293, 146]),  # an odd count: otprune rounds half up, the public code down
        (3, [2, 1, 1], [1, 0, 0]),  # the public code can keep none; otprune keeps at least one
    ],
)
def test_counts_ours_round_half_up_the_public_code_rounds_down(n0, ours_counts, public_counts):
    assert stage_counts(CONFIG.stages, n0) == ours_counts
    assert [int(n0 * ratio) for ratio in PUBLIC_RATIOS[1:]] == public_counts
    assert [kept for _, kept in pdrop_stages(ratio=0.5)] == PUBLIC_RATIOS[1:]
