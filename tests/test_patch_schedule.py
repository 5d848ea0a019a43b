"""Pruning at several layers in one forward (a schedule, ``otprune.schedule``), on the
transformers-native LLaVA: cached decoding against a full recompute, batches against each prompt
alone, each stage's choice against eager attention's own weights, and the one-stage schedule
against the single ``LAYER_INDEX`` path."""

import pytest
import torch

pytest.importorskip("transformers")

from attention_backends import backend  # noqa: E402
from test_patch_hf import forward_logits, generate, greedy_by_recompute, inputs_for, make_image  # noqa: E402

import otprune.patches as patches  # noqa: E402
from otprune import methods  # noqa: E402
from otprune.plugins import pyramiddrop  # noqa: E402
from otprune.prune_config import PruneConfig  # noqa: E402
from otprune.schedule import Stage, check_stages, stage_counts  # noqa: E402

pytestmark = pytest.mark.usefixtures("pruning_off")

LAYERS = [1, 2, 3]  # the tiny LLM has 4 layers
RATIO = 0.5
QUESTIONS = ["What is in the image?", "Is there a red car in the picture? Please answer yes or no."]


@pytest.fixture(scope="module")
def models(tiny_hf_checkpoints):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_hf_checkpoints["llava-hf"]
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    patches.hf.install()
    return {"llava-hf": (processor, model)}


def select_by_norm(tokens, k):
    """A feature schedule: the k alive tokens of largest hidden-state norm. Unlike a ranking by the
    last token's attention, it does not change when generated tokens follow the prompt, so a full
    recompute without cache is the truth of its cached decoding."""
    return tokens.double().norm(dim=-1).argsort(descending=True, stable=True)[:k].sort().values


select_by_norm.stages = pyramiddrop.stages


@pytest.fixture
def norm_schedule(monkeypatch):
    """``BASELINE=NORMDROP``: :func:`select_by_norm` on PyramidDrop's schedule, as a bundled plugin."""
    monkeypatch.setitem(methods.BUNDLED, "NORMDROP", ("selector", f"{__name__}:select_by_norm"))
    methods.get_method.cache_clear()
    yield "NORMDROP"
    methods.get_method.cache_clear()


def pyramid(model, layers=LAYERS, method="PYRAMIDDROP"):
    patches.prune(model, method, RATIO, layers=layers)


def test_stage_counts_never_grow_and_bad_schedules_are_refused():
    assert stage_counts(check_stages([(1, 0.5), (2, 0.25), (3, 0.125)], "X"), 576) == [288, 144, 72]
    assert stage_counts((Stage(2, 0.5), Stage(3, 0.9)), 10) == [5, 5]
    assert stage_counts((Stage(4, 0.0),), 576) == [0]
    for bad, words in [([(2, 0.5), (2, 0.25)], "increasing"), ([(0, 0.5), (2, 0.2)], ">= 1"), ([(1, 1.5)], "in \\[0, 1\\]"), ([], "no stage")]:
        with pytest.raises(ValueError, match=words):
            check_stages(bad, "X")
    with pytest.raises(ValueError, match="LAYER_INDEX=2 is not allowed with BASELINE=PYRAMIDDROP"):
        PruneConfig("PYRAMIDDROP", RATIO, 2, options={"layers": [1, 3]})
    with pytest.raises(ValueError, match="increasing"):
        PruneConfig("PYRAMIDDROP", RATIO, options={"layers": [3, 1]})


def test_a_schedule_beyond_the_model_is_refused(models):
    _, model = models["llava-hf"]
    with pytest.raises(ValueError, match="schedule layer=4 is not allowed for this model; it has 4 layers"):
        pyramid(model, [1, 4])


def test_each_layer_caches_what_its_stage_keeps(models):
    processor, model = models["llava-hf"]
    inputs = inputs_for(processor, QUESTIONS[:1], [[make_image(500, 300, 1)]])
    length = inputs["input_ids"].shape[1]
    pyramid(model)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    text = length - 576
    assert out.logits.shape[1] == length
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [length, text + 288, text + 144, text + 72]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cached_generation_equals_a_full_recompute_at_every_stage(models, norm_schedule, attn, cache):
    processor, model = models["llava-hf"]
    inputs = inputs_for(processor, QUESTIONS, [[make_image(400, 300, 2)], [make_image(400, 300, 3)]])
    pyramid(model, method=norm_schedule)
    with backend(model, attn):
        expected = greedy_by_recompute(model, inputs, tokens=4)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation=cache)
            uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert out[:, -4:].tolist() == expected.tolist()
    assert uncached[:, -4:].tolist() == expected.tolist()


@pytest.mark.parametrize("method", ["PYRAMIDDROP", "NORMDROP"])
@pytest.mark.parametrize("attn", ["eager", "sdpa", "fa2-style"])
def test_a_padded_batch_matches_each_prompt_alone(models, norm_schedule, attn, method):
    processor, model = models["llava-hf"]
    images = [[make_image(500, 300, 4)], [make_image(320, 320, 5)]]
    pyramid(model, method=method)
    alone = [inputs_for(processor, [q], [im]) for q, im in zip(QUESTIONS, images)]
    together = inputs_for(processor, QUESTIONS, images)
    with backend(model, attn):
        alone_logits = [forward_logits(model, a, a["input_ids"][:, :0])[0] for a in alone]
        logits = forward_logits(model, together, together["input_ids"][:, :0])
        generated = generate(model, together, tokens=4)
        for row, expected in enumerate(alone_logits):
            assert torch.allclose(logits[row, -expected.shape[0] :], expected, atol=1e-4)
            assert generated[row, -4:].tolist() == generate(model, alone[row], tokens=4)[0, -4:].tolist()


def test_each_stage_keeps_what_the_last_token_attends_to_most_in_eager_attention(models):
    """The truth is eager attention's own weights at layer K_i - 1 of the pruned forward; the patch
    recomputes them from q and k (the backend here, sdpa, returns none)."""
    processor, model = models["llava-hf"]
    inputs = inputs_for(processor, QUESTIONS[:1], [[make_image(500, 300, 6)]])
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    pyramid(model)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    chosen = model._otprune_layer_pruner.state.kept_by_stage
    weights = {}

    def record(k):
        def hook(module, args, out):
            weights[k] = out[1]

        return hook

    hooks = [model.model.language_model.layers[k - 1].self_attn.register_forward_hook(record(k)) for k in LAYERS]
    try:
        with backend(model, "eager"), torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    alive = torch.arange(inputs["input_ids"].shape[1])
    for stage, k in enumerate(LAYERS):
        received = weights[k][0, :, -1].mean(0)  # the last prompt token's row, over the sequence alive at K-1
        visual = (alive >= start) & (alive < start + 576)
        count = stage_counts(PruneConfig("PYRAMIDDROP", RATIO, options={"layers": LAYERS}).stages, 576)[stage]
        top = received[visual].topk(count).indices.sort().values
        kept = chosen[stage][0]
        assert torch.equal(kept[(kept >= start) & (kept < start + 576)], alive[visual][top]), k
        alive = kept


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_one_stage_schedule_is_the_single_layer_path_exactly(models, attn):
    processor, model = models["llava-hf"]
    inputs = inputs_for(processor, QUESTIONS, [[make_image(400, 300, 7)], [make_image(400, 300, 8)]])
    with backend(model, attn):
        patches.prune(model, "FASTV", RATIO, layer_index=2)
        single = forward_logits(model, inputs, inputs["input_ids"][:, :0]), generate(model, inputs, tokens=4)
        pyramid(model, [2])
        scheduled = forward_logits(model, inputs, inputs["input_ids"][:, :0]), generate(model, inputs, tokens=4)
    assert torch.equal(single[0], scheduled[0])
    assert torch.equal(single[1], scheduled[1])
