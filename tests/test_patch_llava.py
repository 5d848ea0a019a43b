"""The original-LLaVA patch on tiny random checkpoints built offline (tests/conftest.py)."""

import pytest
import torch

pytest.importorskip("llava.model.language_model.llava_llama", reason="needs llava-torch (pip install --no-deps)")

from attention_backends import backend  # noqa: E402
from PIL import Image  # noqa: E402

import otprune.patches as patches  # noqa: E402
from otprune.selectors import SELECTORS, budget  # noqa: E402

# Each test starts unpruned and leaves the models unpruned (conftest).
pytestmark = pytest.mark.usefixtures("pruning_off")

RATIO = 0.098
FEATURE_METHODS = list(SELECTORS)


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    from llava.model.builder import load_pretrained_model

    loaded = {}
    for variant, path in tiny_checkpoints.items():
        tokenizer, model, processor, _ = load_pretrained_model(str(path), None, path.name, device="cpu", device_map="cpu")
        model.float().eval()
        loaded[variant] = (tokenizer, model, processor)
    patches.llava.install()
    return loaded


def make_image(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def encode(models, variant, prompt, images):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token

    tokenizer, model, processor = models[variant]
    ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    pixel = process_images(images, processor, model.config)
    pixel = [p.float() for p in pixel] if isinstance(pixel, list) else pixel.float()
    return ids, pixel, [im.size for im in images]


def spliced(model, ids, pixel, sizes, mask=None):
    """What the LLM receives: (inputs_embeds, attention_mask, labels) from the (patched) splice."""
    ids = ids if ids.dim() == 2 else ids[None]
    mask = torch.ones_like(ids) if mask is None else mask
    labels = ids.clamp_min(0)
    with torch.no_grad():
        _, _, out_mask, _, embeds, out_labels = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, pixel, sizes)
    return embeds, out_mask, out_labels


def generate(model, ids, pixel, sizes, mask=None, tokens=6):
    ids = ids if ids.dim() == 2 else ids[None]
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model.generate(ids, images=pixel, image_sizes=sizes, attention_mask=mask, max_new_tokens=tokens, do_sample=False)


PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"


@pytest.mark.parametrize("variant", ["llava-1.5", "llava-1.6"])
def test_pruning_off_is_identical_to_unpatched(models, variant, monkeypatch):
    from llava.model.llava_arch import LlavaMetaForCausalLM

    _, model, _ = models[variant]
    ids, pixel, sizes = encode(models, variant, PROMPT, [make_image(500, 300, 0)])
    patched = generate(model, ids, pixel, sizes)
    patched_embeds = spliced(model, ids, pixel, sizes)
    original = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal.otprune_original
    monkeypatch.setattr(LlavaMetaForCausalLM, "prepare_inputs_labels_for_multimodal", original)
    assert torch.equal(patched, generate(model, ids, pixel, sizes))
    for a, b in zip(patched_embeds, spliced(model, ids, pixel, sizes)):
        assert torch.equal(a, b)
    # ORIG is pruning off too.
    monkeypatch.undo()
    patches.prune(model, "ORIG")
    assert torch.equal(patched, generate(model, ids, pixel, sizes))


def image_span(ids, full_len):
    """(start, n_visual) of the single image in a spliced sequence of length full_len."""
    start = int((ids == -200).nonzero()[0])
    return start, full_len - (ids.numel() - 1)


@pytest.mark.parametrize("variant", ["llava-1.5", "llava-1.6"])
@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_llm_gets_text_plus_exactly_the_selectors_picks(models, variant, method):
    _, model, _ = models[variant]
    ids, pixel, sizes = encode(models, variant, PROMPT, [make_image(500, 300, 1)])
    full, _, full_labels = spliced(model, ids, pixel, sizes)
    start, n_visual = image_span(ids, full.shape[1])
    visual = full[0, start : start + n_visual]
    k = budget(RATIO, n_visual)
    options = {"text": full[0, start + n_visual :]} if method == "TRIM" else {}
    picks = SELECTORS[method](visual, k, **options)
    expected = torch.cat([full[0, :start], visual[picks], full[0, start + n_visual :]])

    patches.prune(model, method, RATIO)
    pruned, mask, labels = spliced(model, ids, pixel, sizes)
    assert pruned.shape[1] == ids.numel() - 1 + k
    assert torch.equal(pruned[0], expected)
    assert bool(mask.all())
    # Labels follow their tokens: text labels unchanged, kept visual positions ignored.
    assert torch.equal(labels[0, :start], full_labels[0, :start])
    assert bool((labels[0, start : start + k] == -100).all())
    assert torch.equal(labels[0, start + k :], full_labels[0, start + n_visual :])


@pytest.mark.parametrize("variant", ["llava-1.5", "llava-1.6"])
def test_two_image_prompt_prunes_each_image_to_its_budget(models, variant):
    _, model, _ = models[variant]
    prompt = "USER: <image>\nFirst. <image>\nWhich differs? ASSISTANT:"
    images = [make_image(500, 300, 2), make_image(300, 700, 3)]
    ids, pixel, sizes = encode(models, variant, prompt, images)
    pixel = list(pixel) if not isinstance(pixel, list) else pixel
    full, _, _ = spliced(model, ids, pixel, sizes)
    first, second = (ids == -200).nonzero().flatten().tolist()
    text_between = second - first - 1
    n_total = full.shape[1] - (ids.numel() - 2)
    patches.prune(model, "OURS", RATIO)
    pruned, _, _ = spliced(model, ids, pixel, sizes)
    # Recover each image's count from the unpruned splice: image 1 runs from `first` to the
    # text that follows it.
    text_ids = model.get_model().embed_tokens(ids[first + 1 : second])
    n_first = next(n for n in range(1, n_total) if torch.allclose(full[0, first + n : first + n + text_between], text_ids))
    n_second = n_total - n_first
    assert pruned.shape[1] == ids.numel() - 2 + budget(RATIO, n_first) + budget(RATIO, n_second)
    if variant == "llava-1.6":
        assert n_first != n_second  # anyres: different aspect ratios give different counts


def image_features_alone(models, variant, image):
    """One image's visual tokens as the unpruned splice of a one-image prompt gives them."""
    _, model, _ = models[variant]
    ids, pixel, sizes = encode(models, variant, PROMPT, [image])
    embeds, _, labels = spliced(model, ids, pixel, sizes)
    return embeds[0, labels[0] == -100]


@pytest.mark.parametrize("variant", ["llava-1.5", "llava-1.6"])
def test_adjacent_images_each_keep_their_own_selectors_picks(models, variant):
    # Two placeholders with no text between them: LLaVA splices one run of visual tokens, which
    # only each image's own feature count can split (1.6: 1560 and 1976 tokens here).
    _, model, _ = models[variant]
    images = [make_image(500, 300, 2), make_image(300, 700, 3)]
    ids, pixel, sizes = encode(models, variant, "USER: <image><image>\nWhich differs? ASSISTANT:", images)
    alone = [image_features_alone(models, variant, im) for im in images]
    expected = [f[SELECTORS["OURS"](f, budget(RATIO, f.shape[0]))] for f in alone]
    patches.prune(model, "OURS", RATIO)
    pruned, _, labels = spliced(model, ids, list(pixel) if not isinstance(pixel, list) else pixel, sizes)
    assert pruned.shape[1] == ids.numel() - 2 + sum(e.shape[0] for e in expected)
    assert torch.allclose(pruned[0, labels[0] == -100], torch.cat(expected), atol=1e-6)
    if variant == "llava-1.6":
        assert alone[0].shape[0] != alone[1].shape[0]


def pad_batch(id_list, side, pad_id=0):
    length = max(len(i) for i in id_list)
    ids = torch.full((len(id_list), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(id_list), length, dtype=torch.long)
    for row, i in enumerate(id_list):
        target = slice(length - len(i), length) if side == "left" else slice(0, len(i))
        ids[row, target] = i
        mask[row, target] = 1
    return ids, mask


@pytest.mark.parametrize("method", ["OURS", "DIVPRUNE"])
def test_batch_of_two_prompts_generates_as_each_alone(models, method):
    _, model, _ = models["llava-1.5"]
    prompts = [PROMPT, "USER: <image>\nIs there a red car in the picture? Please answer yes or no. ASSISTANT:"]
    images = [make_image(500, 300, 4), make_image(320, 320, 5)]
    encoded = [encode(models, "llava-1.5", p, [im]) for p, im in zip(prompts, images)]
    patches.prune(model, method, RATIO)
    alone = [generate(model, ids, pixel, sizes)[0] for ids, pixel, sizes in encoded]
    model.config.tokenizer_padding_side = "left"
    try:
        ids, mask = pad_batch([e[0] for e in encoded], "left")
        pixel = torch.cat([e[1] for e in encoded])
        together = generate(model, ids, pixel, [e[2][0] for e in encoded], mask)
    finally:
        model.config.tokenizer_padding_side = "right"
    for row, expected in enumerate(alone):
        assert together[row].tolist() == expected.tolist()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_is_kept_and_rows_pruned_independently(models, side):
    _, model, _ = models["llava-1.5"]
    short = encode(models, "llava-1.5", PROMPT, [make_image(400, 300, 6)])
    long = encode(models, "llava-1.5", "USER: <image>\nDescribe the image briefly, with the sky. ASSISTANT:", [make_image(300, 400, 7)])
    ids, mask = pad_batch([short[0], long[0]], side)
    pixel = torch.cat([short[1], long[1]])
    model.config.tokenizer_padding_side = side
    try:
        patches.prune(model, "OURS", RATIO)
        embeds, out_mask, _ = spliced(model, ids, pixel, [short[2][0], long[2][0]], mask)
        alone = [spliced(model, e[0], e[1], e[2])[0][0] for e in (short, long)]
    finally:
        model.config.tokenizer_padding_side = "right"
    for row, expected in enumerate(alone):
        n = expected.shape[0]
        assert int(out_mask[row].sum()) == n
        got = embeds[row, -n:] if side == "left" else embeds[row, :n]
        assert torch.equal(got, expected)


def test_text_only_sample_is_untouched(models):
    tokenizer, model, _ = models["llava-1.5"]
    ids = tokenizer("USER: Hello there. ASSISTANT:", return_tensors="pt").input_ids
    base = generate(model, ids, None, None)
    patches.prune(model, "OURS", RATIO)
    assert torch.equal(base, generate(model, ids, None, None))


def cache_lengths(model, ids, pixel, sizes):
    with torch.no_grad():
        out = model(input_ids=ids[None], images=pixel, image_sizes=sizes, attention_mask=torch.ones_like(ids)[None], use_cache=True)
    return out.logits.shape[1], [layer.keys.shape[-2] for layer in out.past_key_values.layers]


@pytest.mark.parametrize("method", ["OURS", "DIVPRUNE", "FASTV", "VTW"])
def test_layer_k_prunes_hidden_states_and_kv_cache(models, method):
    _, model, _ = models["llava-1.5"]
    ids, pixel, sizes = encode(models, "llava-1.5", PROMPT, [make_image(500, 300, 8)])
    full_len, full_cache = cache_lengths(model, ids, pixel, sizes)
    assert full_cache == [full_len] * 4
    patches.prune(model, method, RATIO, layer_index=2)
    logits_len, cache = cache_lengths(model, ids, pixel, sizes)
    kept_visual = 0 if method == "VTW" else budget(RATIO, 576)
    assert logits_len == full_len  # logits keep the caller's shape
    assert cache == [full_len, full_len] + [full_len - 576 + kept_visual] * 2


def test_layer_k_feature_selector_uses_layer_k_hidden_states(models):
    _, model, _ = models["llava-1.5"]
    ids, pixel, sizes = encode(models, "llava-1.5", PROMPT, [make_image(500, 300, 9)])
    start = int((ids == -200).nonzero()[0])
    layer2 = model.get_model().layers[2]
    captured = []
    # Read layer 2's input with a hook: transformers' output_hidden_states is not reliable here.
    handle = layer2.register_forward_pre_hook(lambda module, args: captured.append(args[0][0].clone()))
    try:
        cache_lengths(model, ids, pixel, sizes)
    finally:
        handle.remove()
    expected = SELECTORS["OURS"](captured[0][start : start + 576], budget(RATIO, 576)) + start
    patches.prune(model, "OURS", RATIO, layer_index=2)
    cache_lengths(model, ids, pixel, sizes)
    kept = model._otprune_layer_pruner.state.kept[0]
    visual_kept = kept[(kept >= start) & (kept < start + 576)]
    assert torch.equal(visual_kept, expected)


def test_fastv_keeps_the_most_attended_tokens(models):
    _, model, _ = models["llava-1.5"]
    ids, pixel, sizes = encode(models, "llava-1.5", PROMPT, [make_image(500, 300, 10)])
    start = int((ids == -200).nonzero()[0])
    # Eager attention returns its weights; both runs use it so layers 0-1 compute identically.
    model.set_attn_implementation("eager")
    weights = []
    handle = model.get_model().layers[1].self_attn.register_forward_hook(lambda m, a, out: weights.append(out[1]))
    try:
        cache_lengths(model, ids, pixel, sizes)
        handle.remove()
        patches.prune(model, "FASTV", RATIO, layer_index=2)
        cache_lengths(model, ids, pixel, sizes)
    finally:
        handle.remove()
        model.set_attn_implementation("sdpa")
    received = weights[0][0, :, -1, start : start + 576].mean(0)  # layer K-1 = 1, last prompt token
    expected = received.topk(budget(RATIO, 576)).indices.sort().values + start
    kept = model._otprune_layer_pruner.state.kept[0]
    assert torch.equal(kept[(kept >= start) & (kept < start + 576)], expected)


def test_vtw_leaves_no_visual_token(models):
    _, model, _ = models["llava-1.5"]
    ids, pixel, sizes = encode(models, "llava-1.5", PROMPT, [make_image(500, 300, 11)])
    start = int((ids == -200).nonzero()[0])
    patches.prune(model, "VTW", None, layer_index=1)
    cache_lengths(model, ids, pixel, sizes)
    kept = model._otprune_layer_pruner.state.kept[0]
    assert not bool(((kept >= start) & (kept < start + 576)).any())
    assert kept.numel() == ids.numel() - 1


def without_image(ids):
    """The prompt with its image placeholder removed: what a text-only model is asked."""
    return ids[ids != -200]


@pytest.mark.parametrize("variant", ["llava-1.5", "llava-1.6"])
def test_vtw_at_k0_is_the_prompt_without_its_image(models, variant):
    _, model, _ = models[variant]
    ids, pixel, sizes = encode(models, variant, PROMPT, [make_image(500, 300, 13)])
    text = without_image(ids)
    expected_embeds = model.get_model().embed_tokens(text)[None]
    expected = generate(model, text, None, None)
    patches.prune(model, "VTW", None, layer_index=0)
    embeds, mask, _ = spliced(model, ids, pixel, sizes)
    assert embeds.shape[1] == text.numel()
    assert torch.equal(embeds, expected_embeds) and bool(mask.all())
    assert torch.equal(generate(model, ids, pixel, sizes), expected)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vtw_at_k0_batch_with_padding_generates_each_prompt_without_its_image(models, attn):
    _, model, _ = models["llava-1.5"]
    prompts = [PROMPT, "USER: <image>\nIs there a red car in the picture? Please answer yes or no. ASSISTANT:"]
    encoded = [encode(models, "llava-1.5", p, [make_image(500, 300, 14 + i)]) for i, p in enumerate(prompts)]
    alone = [generate(model, without_image(ids), None, None)[0] for ids, _, _ in encoded]
    patches.prune(model, "VTW", None, layer_index=0)
    model.config.tokenizer_padding_side = "left"
    try:
        ids, mask = pad_batch([e[0] for e in encoded], "left")
        with backend(model, attn):
            together = generate(model, ids, torch.cat([e[1] for e in encoded]), [e[2][0] for e in encoded], mask)
    finally:
        model.config.tokenizer_padding_side = "right"
    for row, expected in enumerate(alone):
        assert together[row].tolist() == expected.tolist()


def test_layer_index_beyond_the_model_is_refused_before_anything_runs(models, monkeypatch):
    _, model, _ = models["llava-1.5"]
    ids, pixel, sizes = encode(models, "llava-1.5", PROMPT, [make_image(500, 300, 12)])
    with pytest.raises(ValueError, match=r"LAYER_INDEX=9 is not allowed for this model; it has 4 layers"):
        patches.prune(model, "OURS", RATIO, layer_index=9)
    # Set from the environment (no model at hand then): the first forward stops the process
    # (lmms-eval would swallow an exception), before the vision tower runs.
    monkeypatch.setattr(patches, "_env_config", patches.PruneConfig("OURS", RATIO, 9, from_environment=True))
    towers = []
    handle = model.get_vision_tower().register_forward_pre_hook(lambda *a: towers.append(1))
    try:
        with pytest.raises(SystemExit, match=r"otprune: LAYER_INDEX=9 is not allowed for this model; it has 4 layers"):
            cache_lengths(model, ids, pixel, sizes)
    finally:
        handle.remove()
    assert towers == []


def greedy_by_recompute(model, ids, pixel, sizes, tokens=6):
    """Greedy decoding the slow way: every step a full forward over prompt + tokens so far, no cache."""
    ids = ids if ids.dim() == 2 else ids[None]
    new = ids.new_zeros(ids.shape[0], 0)
    for _ in range(tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.cat([ids, new], 1), images=pixel, image_sizes=sizes, use_cache=False).logits
        new = torch.cat([new, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return new


@pytest.mark.parametrize("method", [None, "OURS"])
def test_cached_decoding_matches_a_full_recompute_whatever_transformers_calls_the_cache(models, method):
    """transformers >= 5.24 hands LLaVA's forward the cache as ``cache=`` (older releases as
    ``past_key_values=``): either way, unpruned and pruned at K = 0, the cached generation is the
    slow full recompute's."""
    _, model, _ = models["llava-1.5"]
    ids, pixel, sizes = encode(models, "llava-1.5", PROMPT, [make_image(500, 300, 17)])
    patches.prune(model, method, RATIO if method else None)
    assert generate(model, ids, pixel, sizes).tolist() == greedy_by_recompute(model, ids, pixel, sizes).tolist()


def test_llava_forward_takes_the_cache_under_either_name(models):
    """A decoding step given its prefix's cache as ``cache=`` gives the logits it gives with
    ``past_key_values=``, which equal the last row of a full recompute; both at once is refused."""
    import copy
    import inspect

    _, model, _ = models["llava-1.5"]
    assert patches.llava.install_cache_keyword() == patches.llava.install_cache_keyword()  # wraps once
    assert not getattr(type(model).forward.__wrapped__, "otprune_cache_keyword", False)
    assert "cache" in inspect.signature(type(model).forward).parameters
    ids, pixel, sizes = encode(models, "llava-1.5", PROMPT, [make_image(500, 300, 19)])
    step = torch.tensor([[5]])
    with torch.no_grad():
        prefix = model(input_ids=ids[None], images=pixel, image_sizes=sizes, use_cache=True)
        cache = getattr(prefix, "cache", None) or prefix.past_key_values
        by_new_name = model(input_ids=step, cache=copy.deepcopy(cache), use_cache=True).logits[:, -1]
        by_old_name = model(input_ids=step, past_key_values=copy.deepcopy(cache), use_cache=True).logits[:, -1]
        full = model(input_ids=torch.cat([ids[None], step], 1), images=pixel, image_sizes=sizes, use_cache=False).logits[:, -1]
        with pytest.raises(TypeError, match="both cache= and past_key_values="):
            model(input_ids=step, cache=copy.deepcopy(cache), past_key_values=copy.deepcopy(cache))
    assert torch.equal(by_new_name, by_old_name)
    assert torch.allclose(by_new_name, full, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["OURS", "VTW"])
def test_layer_k_cached_decoding_matches_a_full_recompute(models, attn, method):
    _, model, _ = models["llava-1.5"]
    ids, pixel, sizes = encode(models, "llava-1.5", PROMPT, [make_image(500, 300, 13)])
    patches.prune(model, method, None if method == "VTW" else RATIO, layer_index=2)
    with backend(model, attn):
        cached = generate(model, ids, pixel, sizes)
        recomputed = greedy_by_recompute(model, ids, pixel, sizes)
        with torch.no_grad():
            uncached = model.generate(ids[None], images=pixel, image_sizes=sizes, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == recomputed.tolist()
    assert uncached.tolist() == recomputed.tolist()


@pytest.mark.parametrize("layer_index", [0, 2])
def test_beam_search_scores_its_sequence_as_a_full_recompute_does(models, layer_index):
    _, model, _ = models["llava-1.5"]
    ids, pixel, sizes = encode(models, "llava-1.5", PROMPT, [make_image(500, 300, 17)])
    patches.prune(model, "OURS", RATIO, layer_index=layer_index)
    with torch.no_grad():
        out = model.generate(
            ids[None], images=pixel, image_sizes=sizes, max_new_tokens=4, num_beams=3, do_sample=False,
            length_penalty=0.0, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        new = out.sequences
        logits = model(input_ids=torch.cat([ids[None], new], 1), images=pixel, image_sizes=sizes, use_cache=False).logits
    logprobs = logits[:, -new.shape[1] - 1 : -1].log_softmax(-1)
    assert torch.allclose(out.sequences_scores[0], logprobs.gather(-1, new[..., None]).sum(), atol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_layer_k_text_prompt_after_an_image_prompt_and_back(models, attn):
    tokenizer, model, _ = models["llava-1.5"]
    text_ids = tokenizer("USER: Hello there. ASSISTANT:", return_tensors="pt").input_ids
    ids, pixel, sizes = encode(models, "llava-1.5", PROMPT, [make_image(500, 300, 14)])
    with backend(model, attn):
        text_alone = generate(model, text_ids, None, None)
        patches.prune(model, "OURS", RATIO, layer_index=2)
        image_alone = greedy_by_recompute(model, ids, pixel, sizes)
        assert generate(model, ids, pixel, sizes).tolist() == image_alone.tolist()
        assert generate(model, text_ids, None, None).tolist() == text_alone.tolist()
        assert generate(model, ids, pixel, sizes).tolist() == image_alone.tolist()
        with torch.no_grad():
            text_logits = model(input_ids=text_ids, use_cache=False).logits
        patches.prune(model, None)
        with torch.no_grad():
            assert torch.allclose(text_logits, model(input_ids=text_ids, use_cache=False).logits, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa", "fa2-style"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_layer_k_padded_batch_matches_each_prompt_alone(models, attn, side):
    _, model, _ = models["llava-1.5"]
    short = encode(models, "llava-1.5", PROMPT, [make_image(400, 300, 15)])
    long = encode(models, "llava-1.5", "USER: <image>\nDescribe the image briefly, with the sky. ASSISTANT:", [make_image(300, 400, 16)])
    ids, mask = pad_batch([short[0], long[0]], side)
    pixel = torch.cat([short[1], long[1]])
    sizes = [short[2][0], long[2][0]]
    patches.prune(model, "OURS", RATIO, layer_index=2)
    alone = []
    for e in (short, long):
        with torch.no_grad():
            alone.append(model(input_ids=e[0][None], images=e[1], image_sizes=e[2]).logits[0])
    model.config.tokenizer_padding_side = side
    try:
        with backend(model, attn), torch.no_grad():
            together = model(input_ids=ids, attention_mask=mask, images=pixel, image_sizes=sizes).logits
            generated = generate(model, ids, pixel, sizes, mask, tokens=4) if side == "left" else None
    finally:
        model.config.tokenizer_padding_side = "right"
    for row, expected in enumerate(alone):
        n = expected.shape[0]
        got = together[row, -n:] if side == "left" else together[row, :n]
        assert torch.allclose(got, expected, atol=1e-4)
    if generated is not None:
        for row, e in enumerate((short, long)):
            assert generated[row].tolist() == generate(model, e[0], e[1], e[2], tokens=4)[0].tolist()


def projector_gradient(model, ids, pixel, sizes):
    model.zero_grad()
    labels = ids[None].masked_fill(ids[None] < 0, -100)
    loss = model(input_ids=ids[None], images=pixel, image_sizes=sizes, labels=labels).loss
    loss.backward()
    grad = model.get_model().mm_projector[0].weight.grad.clone()
    model.zero_grad()
    return loss.detach(), grad


@pytest.mark.parametrize("layer_index", [0, 2])
def test_training_backpropagates_as_the_unpatched_model(models, layer_index):
    _, model, _ = models["llava-1.5"]
    ids, pixel, sizes = encode(models, "llava-1.5", PROMPT, [make_image(500, 300, 18)])
    expected = projector_gradient(model, ids, pixel, sizes)
    # Keeping every token, the pruning path must pass gradients through unchanged.
    patches.prune(model, "OURS", 1.0, layer_index=layer_index)
    loss, grad = projector_gradient(model, ids, pixel, sizes)
    assert torch.allclose(loss, expected[0], atol=1e-6) and torch.allclose(grad, expected[1], atol=1e-6)
    patches.prune(model, "OURS", RATIO, layer_index=layer_index)
    loss, grad = projector_gradient(model, ids, pixel, sizes)
    assert grad.abs().sum() > 0 and not grad.isnan().any() and loss.isfinite()


def test_layer_k_sampling_draws_what_a_full_recompute_draws(models):
    _, model, _ = models["llava-1.5"]
    ids, pixel, sizes = encode(models, "llava-1.5", PROMPT, [make_image(500, 300, 19)])
    patches.prune(model, "OURS", RATIO, layer_index=2)
    torch.manual_seed(3)
    with torch.no_grad():
        sampled = model.generate(ids[None], images=pixel, image_sizes=sizes, max_new_tokens=5, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    torch.manual_seed(3)
    new = ids.new_zeros(1, 0)
    for _ in range(5):
        with torch.no_grad():
            logits = model(input_ids=torch.cat([ids[None], new], 1), images=pixel, image_sizes=sizes, use_cache=False).logits
        new = torch.cat([new, torch.multinomial(logits[:, -1].float().softmax(-1), 1)], 1)
    assert sampled.tolist() == new.tolist()
