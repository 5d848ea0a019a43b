"""The Qwen-VL / LLaVA-OneVision patch (patches/vlm.py) on tiny checkpoints of each family."""

import pytest
import torch

pytest.importorskip("transformers")

from conftest import tiny_vlms  # noqa: E402
from test_patch_hf import generate, inputs_for, make_image  # noqa: E402
from test_patch_hf import llm_inputs as llm_embeds  # noqa: E402

import otprune.patches as patches  # noqa: E402
from otprune.selectors import SELECTORS, budget  # noqa: E402

# Each test starts unpruned and leaves the models unpruned (conftest).
pytestmark = pytest.mark.usefixtures("pruning_off")

RATIO = 0.25
FAMILIES = ["qwen2.5-vl", "qwen3-vl", "llava-onevision", "qwen2-vl"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    loaded = tiny_vlms(tmp_path_factory.mktemp("vlm_checkpoints"), FAMILIES, padding_side="left")
    patches.vlm.install()
    return loaded


def first_layer_inputs(model, inputs, **options):
    """What the LLM's first decoder layer receives on each call: ``(hidden, cos, sin)``."""
    seen = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        seen.append((hidden.clone(), cos.expand(hidden.shape[0], -1, -1).clone(), sin.expand(hidden.shape[0], -1, -1).clone()))

    handle = model.model.language_model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            if options:
                model.generate(**inputs, **options)
            else:
                model(**inputs)
    finally:
        handle.remove()
    return seen


def image_runs(model, input_ids):
    """Per row, each image's placeholder positions (images are separated by other tokens)."""
    runs = []
    for row in input_ids:
        positions = (row == model.config.image_token_id).nonzero().flatten().tolist()
        row_runs = []
        for p in positions:
            if row_runs and row_runs[-1][-1] == p - 1:
                row_runs[-1].append(p)
            else:
                row_runs.append([p])
        runs.append([torch.tensor(r) for r in row_runs])
    return runs


def question(model, inputs, full, row, after):
    """Row ``row``'s question: its text after position ``after - 1`` (the end of its last image),
    past Qwen's vision end token, padding left out."""
    ids = inputs["input_ids"][row]
    start = after + int(int(ids[after]) == getattr(model.config, "vision_end_token_id", None))
    return full[row, start:][inputs["attention_mask"][row, start:].bool()]


def expected_kept(model, inputs, full, method):
    """Per row, the positions an independent selection keeps: all text plus each image's picks."""
    kept = []
    for b, row_runs in enumerate(image_runs(model, inputs["input_ids"])):
        keep = inputs["attention_mask"][b].bool().clone()
        for run in row_runs:
            keep[run] = False
        options = {"text": question(model, inputs, full, b, int(row_runs[-1][-1]) + 1)} if method == "TRIM" else {}
        for run in row_runs:
            keep[run[SELECTORS[method](full[b, run], budget(RATIO, run.numel()), **options)]] = True
        kept.append(keep.nonzero().flatten())
    return kept


@pytest.mark.parametrize("variant", FAMILIES)
def test_pruning_off_is_identical(models, variant, monkeypatch):
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 0)]])
    patched = generate(model, inputs)
    cls = type(model)
    monkeypatch.setattr(cls, "generate", cls.generate.otprune_original)
    monkeypatch.setattr(cls, "forward", cls.forward.otprune_original)
    assert torch.equal(patched, generate(model, inputs))


@pytest.mark.parametrize("variant", FAMILIES)
def test_a_layer_index_beyond_the_llm_is_refused_before_it_runs(models, variant):
    _, model = models[variant]
    layers = len(model.model.language_model.layers)
    with pytest.raises(ValueError, match=f"LAYER_INDEX={layers}"):
        patches.prune(model, "OURS", RATIO, layer_index=layers)
    patches.prune(model, "OURS", RATIO, layer_index=layers - 1)


@pytest.mark.parametrize("variant", FAMILIES)
@pytest.mark.parametrize("method", ["OURS", "DIVPRUNE", "TRIM", "UNIFORM"])
def test_llm_gets_text_plus_exactly_the_selectors_picks(models, variant, method):
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 1)]])
    full = llm_embeds(model, inputs)
    kept = expected_kept(model, inputs, full, method)[0]
    patches.prune(model, method, RATIO)
    pruned = llm_embeds(model, inputs)[0]
    n = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert pruned.shape[0] == inputs["input_ids"].shape[1] - n + budget(RATIO, n)
    assert torch.equal(pruned, full[0, kept])
    out = generate(model, inputs)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])  # prompt given back whole


@pytest.mark.parametrize("variant", FAMILIES)
def test_several_images_per_prompt_padded_batch_keep_features_and_rotary(models, variant):
    """Images of different sizes, two prompts with left padding: each image keeps its own budget,
    the LLM sees exactly the kept rows, and the first layer's (cos, sin) of every kept token is the
    unpruned model's for that token."""
    processor, model = models[variant]
    images = [[make_image(500, 300, 2), make_image(200, 420, 3)], [make_image(320, 320, 4)]]
    inputs = inputs_for(processor, ["Which differs?", "Is there a red car in the picture? Please answer yes or no."], images)
    (full, full_cos, full_sin), *_ = first_layer_inputs(model, inputs)
    kept = expected_kept(model, inputs, full, "OURS")
    sizes = [run.numel() for row in image_runs(model, inputs["input_ids"]) for run in row]
    assert len(set(sizes)) > 1
    patches.prune(model, "OURS", RATIO)
    (pruned, cos, sin), *_ = first_layer_inputs(model, inputs)
    assert sum(k.numel() for k in kept) == int(inputs["attention_mask"].sum()) - sum(sizes) + sum(budget(RATIO, s) for s in sizes)
    for b, positions in enumerate(kept):
        m = positions.numel()
        assert torch.equal(pruned[b, -m:], full[b, positions])
        assert torch.equal(cos[b, -m:], full_cos[b, positions])
        assert torch.equal(sin[b, -m:], full_sin[b, positions])


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no mask"])
@pytest.mark.parametrize("variant", FAMILIES)
def test_batch_of_two_prompts_generates_as_each_alone(models, variant, masked):
    # Without a mask, the left padding is where the pad token is, as generate itself decides.
    processor, model = models[variant]
    questions = ["What is in the image?", "Is there a red car in the picture? Please answer yes or no."]
    images = [[make_image(500, 300, 5)], [make_image(320, 320, 6), make_image(180, 300, 7)]]
    patches.prune(model, "OURS", RATIO)
    alone = [generate(model, inputs_for(processor, [q], [im]))[0, -5:] for q, im in zip(questions, images)]
    inputs = inputs_for(processor, questions, images)
    if not masked:
        del inputs["attention_mask"]
    together = generate(model, inputs)
    for row, expected in enumerate(alone):
        assert together[row, -5:].tolist() == expected.tolist()


@pytest.mark.parametrize("variant", FAMILIES)
def test_decoding_continues_from_the_unpruned_models_positions(models, variant):
    """Every decoding step's rotary (cos, sin) equals the unpruned model's at the same step."""
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?", "Describe the image briefly."], [[make_image(500, 300, 8)], [make_image(300, 300, 9)]])
    options = dict(max_new_tokens=3, do_sample=False)
    unpruned = first_layer_inputs(model, inputs, **options)
    patches.prune(model, "OURS", RATIO)
    pruned = first_layer_inputs(model, inputs, **options)
    assert pruned[0][0].shape[1] < unpruned[0][0].shape[1]
    assert len(pruned) == len(unpruned) == 3
    for (_, cos, sin), (_, full_cos, full_sin) in zip(pruned[1:], unpruned[1:]):
        assert torch.equal(cos, full_cos) and torch.equal(sin, full_sin)


@pytest.mark.parametrize("variant", ["qwen2.5-vl", "qwen3-vl"])
def test_a_hand_written_decoding_step_gets_the_unpruned_position(models, variant):
    """Qwen decoding without position ids (the model's rope_deltas): the step after a pruned prompt
    gets the rotary the unpruned model gives the same step. (transformers' own step with an
    attention mask and no positions is broken, so the step goes without either.)"""
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 16)]])

    def decoding_step_rotary():
        with torch.no_grad():
            cache = model(**inputs, use_cache=True).past_key_values
        (_, cos, sin), *_ = first_layer_inputs(model, {"input_ids": torch.tensor([[5]]), "past_key_values": cache})
        return cos, sin

    full = decoding_step_rotary()
    patches.prune(model, "OURS", RATIO)
    pruned = decoding_step_rotary()
    assert torch.equal(pruned[0], full[0]) and torch.equal(pruned[1], full[1])


@pytest.mark.parametrize("variant", ["qwen2.5-vl", "llava-onevision"])
def test_cached_decoding_equals_a_full_recompute(models, variant):
    """The pruned prompt plus the generated tokens, run again without a cache at the same positions,
    predicts the same tokens."""
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 10)]])
    patches.prune(model, "OURS", RATIO)
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
    try:
        out = generate(model, inputs, tokens=4)
    finally:
        handle.remove()
    prompt = seen[0]
    new = out[:, inputs["input_ids"].shape[1] :]
    embeds = torch.cat([prompt["inputs_embeds"], model.get_input_embeddings()(new[:, :-1])], dim=1)
    positions = prompt["position_ids"]
    steps = torch.arange(1, new.shape[1], dtype=positions.dtype)
    positions = torch.cat([positions, positions[..., -1:] + steps], dim=-1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    model._otprune_config = None
    with torch.no_grad():
        logits = model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=False).logits
    assert logits[0, -new.shape[1] :].argmax(-1).tolist() == new[0].tolist()


def qwen_video_inputs(processor, model, grid, seed):
    """A prompt with one video given as patches (transformers' video processors need torchvision)."""
    t, h, w = grid
    tokens = t * h * w // model.config.vision_config.spatial_merge_size**2
    content = [{"type": "video"}, {"type": "text", "text": "What is in the image?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    if type(model).__name__.startswith("Qwen3"):
        # Qwen3-VL's layout: each temporal step its own placeholder run, after its timestamp.
        frame = "<|vision_start|>" + "<|video_pad|>" * (tokens // t) + "<|vision_end|>"
        prompt = prompt.replace("<|vision_start|><|video_pad|><|vision_end|>", "".join(f"<{i}.0 seconds>{frame}" for i in range(t)))
    else:
        prompt = prompt.replace("<|video_pad|>", "<|video_pad|>" * tokens)
    ids = processor.tokenizer(prompt, return_tensors="pt")
    vision = model.config.vision_config
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    g = torch.Generator().manual_seed(seed)
    return {
        **ids,
        "pixel_values_videos": torch.randn(t * h * w, width, generator=g),
        "video_grid_thw": torch.tensor([grid]),
        "mm_token_type_ids": (ids["input_ids"] == model.config.video_token_id).int() * 2,
    }


@pytest.mark.parametrize("variant", ["qwen2.5-vl", "qwen3-vl"])
def test_qwen_video_keeps_a_budget_per_frame_at_its_own_positions(models, variant):
    processor, model = models[variant]
    inputs = qwen_video_inputs(processor, model, (3, 8, 12), seed=11)
    (full, full_cos, full_sin), *_ = first_layer_inputs(model, inputs)
    patches.prune(model, "OURS", RATIO)
    (pruned, cos, sin), *_ = first_layer_inputs(model, inputs)
    per_frame = 8 * 12 // 4
    assert pruned.shape[1] == full.shape[1] - 3 * per_frame + 3 * budget(RATIO, per_frame)
    video = inputs["input_ids"][0] == model.config.video_token_id
    keep = ~video
    for frame in range(3):
        positions = video.nonzero().flatten()[frame * per_frame : (frame + 1) * per_frame]
        keep[positions[SELECTORS["OURS"](full[0, positions], budget(RATIO, per_frame))]] = True
    assert torch.equal(pruned[0], full[0, keep])
    assert torch.equal(cos[0], full_cos[0, keep]) and torch.equal(sin[0], full_sin[0, keep])


def test_onevision_video_keeps_a_budget_per_frame_and_its_newline(models):
    processor, model = models["llava-onevision"]
    frames = 3
    content = [{"type": "video"}, {"type": "text", "text": "What is in the image?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    g = torch.Generator().manual_seed(12)
    pixels = torch.randn(1, frames, 3, 56, 56, generator=g)
    per_frame = model.model.get_video_features(pixels, return_dict=True).pooler_output.shape[1] // frames
    prompt = prompt.replace("<video>", "<video>" * (frames * per_frame + 1))
    inputs = {**processor.tokenizer(prompt, return_tensors="pt"), "pixel_values_videos": pixels}
    full = llm_embeds(model, inputs)
    patches.prune(model, "OURS", RATIO)
    pruned = llm_embeds(model, inputs)
    assert pruned.shape[1] == full.shape[1] - frames * per_frame + frames * budget(RATIO, per_frame)
    video = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten()
    newline = int(video[-1])
    after = full.shape[1] - newline
    assert torch.equal(pruned[0, -after:], full[0, newline:])


@pytest.mark.parametrize("variant", FAMILIES)
@pytest.mark.parametrize("method", ["OURS", "FASTV", "VTW"])
def test_layer_k_prunes_the_kv_cache(models, variant, method):
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 13)]])
    length = inputs["input_ids"].shape[1]
    n = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    layer = 1 if variant == "qwen3-vl" else 2  # Qwen3-VL: DeepStack's second level lands after the cut
    with torch.no_grad():
        unpruned = model(**inputs, use_cache=True)
    patches.prune(model, method, RATIO, layer_index=layer)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    kept = 0 if method == "VTW" else budget(RATIO, n)
    assert out.logits.shape[1] == length
    lengths = [layer_cache.keys.shape[-2] for layer_cache in out.past_key_values.layers]
    assert lengths == [length] * layer + [length - n + kept] * (len(lengths) - layer)
    for before, after in zip(unpruned.past_key_values.layers[:layer], out.past_key_values.layers[:layer]):
        assert torch.equal(before.keys, after.keys)  # layers before K see the full, unchanged prompt
    generated = generate(model, inputs)
    assert torch.equal(generated[:, :length], inputs["input_ids"])
    assert generated.shape[1] == length + 5


@pytest.mark.parametrize("variant", FAMILIES)
def test_vtw_at_k0_gives_the_llm_only_the_text_at_its_unpruned_positions(models, variant):
    """No visual token reaches the LLM; each text token keeps its hidden state and rotary position
    of the unpruned call (positions are gathered, not renumbered: the module's **choice**)."""
    processor, model = models[variant]
    questions = ["What is in the image?", "Is there a red car in the picture? Please answer yes or no."]
    inputs = inputs_for(processor, questions, [[make_image(500, 300, 19)], [make_image(320, 320, 20)]])
    text = [mask.bool() & (ids != model.config.image_token_id) for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    full = first_layer_inputs(model, inputs)[0]
    patches.prune(model, "VTW", None, layer_index=0)
    pruned = first_layer_inputs(model, inputs)[0]
    length = max(int(t.sum()) for t in text)
    assert pruned[0].shape[1] == length
    for row, keep in enumerate(text):
        n = int(keep.sum())
        for got, expected in zip(pruned, full):
            assert torch.equal(got[row, length - n :], expected[row, keep])
    generated = generate(model, inputs)
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("layer_index", [0, 1])
def test_qwen3_deepstack_features_are_added_at_the_kept_visual_tokens(models, layer_index):
    """After decoder layer i Qwen3-VL adds DeepStack level i at visual tokens: with pruning at
    K <= i, each kept visual token gets its own row of it, and text tokens nothing."""
    processor, model = models["qwen3-vl"]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 14)]])
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten().tolist()
    levels = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True).deepstack_features
    level = levels[layer_index]
    level = torch.cat(list(level)) if isinstance(level, (list, tuple)) else level  # split per image from 5.23 on
    kept = expected_kept(model, inputs, llm_embeds(model, inputs), "OURS")[0]
    seen = {}

    def record(name, tensor):
        seen.setdefault(name, tensor.clone())

    layers = model.model.language_model.layers
    handles = [
        layers[layer_index].register_forward_hook(lambda m, a, out: record("out", out)),
        layers[layer_index + 1].register_forward_pre_hook(lambda m, a, k: record("in", a[0]), with_kwargs=True),
    ]
    patches.prune(model, "OURS", RATIO, layer_index=layer_index)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    if layer_index > 0:
        kept = model._otprune_layer_pruner.state.kept[0]
    expected = torch.stack([level[visual.index(p)] if p in visual else torch.zeros(level.shape[-1]) for p in kept.tolist()])
    assert seen["in"].shape[1] == kept.numel() < inputs["input_ids"].shape[1]
    assert torch.allclose(seen["in"][0] - seen["out"][0], expected, atol=1e-5)
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("variant", FAMILIES)
def test_fastv_keeps_the_tokens_the_last_prompt_token_attends_most(models, variant):
    """FASTV's picks at layer K equal the top visual tokens of layer K-1's eager attention weights
    (the last prompt token's row, mean over heads)."""
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 15)]])
    layer = 3 if variant == "qwen3-vl" else 2
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    scores = attentions[layer - 1][0, :, -1, visual].mean(0)
    expected = visual[scores.topk(budget(RATIO, visual.numel())).indices].sort().values
    patches.prune(model, "FASTV", RATIO, layer_index=layer)
    with torch.no_grad():
        model(**inputs)
    kept = model._otprune_layer_pruner.state.kept[0]
    assert kept[torch.isin(kept, visual)].tolist() == expected.tolist()


def test_environment_variables_prune_each_family(models):
    """What lmms-eval's entry point does: the variables alone make every family prune."""
    import transformers

    inputs = {variant: inputs_for(processor, ["What is in the image?"], [[make_image(400, 300, 18)]]) for variant, (processor, _) in models.items()}
    full = {variant: llm_embeds(model, inputs[variant]).shape[1] for variant, (_, model) in models.items()}
    try:
        patches.activate_from_env({"BASELINE": "OURS", "SUBSET_RATIO": str(RATIO)})
        assert all(hasattr(getattr(transformers, name).generate, "otprune_original") for name in patches.vlm.CLASS_NAMES)
        for variant, (_, model) in models.items():
            n = int((inputs[variant]["input_ids"] == model.config.image_token_id).sum())
            assert llm_embeds(model, inputs[variant]).shape[1] == full[variant] - n + budget(RATIO, n)
    finally:
        patches.activate_from_env({})


def test_trim_scores_every_video_frame_against_the_question_after_the_video(models):
    processor, model = models["qwen2.5-vl"]
    inputs = qwen_video_inputs(processor, model, (2, 8, 8), seed=20)  # a seed where the text before the video picks otherwise
    full = llm_embeds(model, inputs)[0]
    video = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten()
    text = question(model, inputs, full[None], 0, int(video[-1]) + 1)
    per_frame = 16
    patches.prune(model, "TRIM", RATIO)
    pruned = llm_embeds(model, inputs)[0]
    start = int(video[0])
    for frame in range(2):
        positions = video[frame * per_frame : (frame + 1) * per_frame]
        picks = SELECTORS["TRIM"](full[positions], budget(RATIO, per_frame), text=text)
        kept = pruned[start + frame * budget(RATIO, per_frame) :][: picks.numel()]
        assert torch.equal(kept, full[positions[picks]])


@pytest.mark.parametrize("variant", ["qwen2.5-vl", "llava-onevision"])
def test_layer_k_batch_with_padding_generates_as_each_alone(models, variant):
    processor, model = models[variant]
    questions = ["What is in the image?", "Is there a red car in the picture? Please answer yes or no."]
    images = [[make_image(400, 300, 20)], [make_image(400, 300, 21)]]
    patches.prune(model, "OURS", RATIO, layer_index=2)
    alone = [generate(model, inputs_for(processor, [q], [im]))[0, -5:] for q, im in zip(questions, images)]
    together = generate(model, inputs_for(processor, questions, images))
    for row, expected in enumerate(alone):
        assert together[row, -5:].tolist() == expected.tolist()


@pytest.mark.parametrize("variant", FAMILIES)
def test_images_given_in_a_form_the_patch_cannot_prune_are_refused(models, variant):
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 16)]])
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    patches.prune(model, "OURS", RATIO)
    with pytest.raises(ValueError, match="give the images as pixel_values or pixel_values_videos together with input_ids"):
        model(inputs_embeds=embeds, **inputs)
