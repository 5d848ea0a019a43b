"""The transformers-native patch (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)."""

import pytest
import torch

pytest.importorskip("transformers")

from attention_backends import backend  # noqa: E402
from PIL import Image  # noqa: E402

import otprune.patches as patches  # noqa: E402
from otprune.selectors import SELECTORS, budget  # noqa: E402

# Each test starts unpruned and leaves the models unpruned (conftest).
pytestmark = pytest.mark.usefixtures("pruning_off")

RATIO = 0.098


@pytest.fixture(scope="module")
def models(tiny_hf_checkpoints):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded = {}
    for variant, path in tiny_hf_checkpoints.items():
        processor = AutoProcessor.from_pretrained(path)
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        loaded[variant] = (processor, model)
    patches.hf.install()
    return loaded


def make_image(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


def inputs_for(processor, questions, images_per_prompt):
    prompts = []
    for question, images in zip(questions, images_per_prompt):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        prompts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
    flat = [im for images in images_per_prompt for im in images]
    return processor(images=flat, text=prompts, return_tensors="pt", padding=True)


def llm_inputs(model, inputs):
    """The inputs_embeds the language model receives for one forward pass."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["inputs_embeds"].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen[0]


def generate(model, inputs, tokens=5):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=tokens, do_sample=False)


@pytest.mark.parametrize("variant", ["llava-hf", "llava-next-hf"])
def test_pruning_off_is_identical(models, variant, monkeypatch):
    import transformers

    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 0)]])
    patched = generate(model, inputs)
    cls = type(model)
    monkeypatch.setattr(cls, "generate", cls.generate.otprune_original)
    monkeypatch.setattr(cls, "forward", cls.forward.otprune_original)
    assert torch.equal(patched, generate(model, inputs))
    assert hasattr(transformers, cls.__name__)


def positions_in_order(kept: torch.Tensor, full: torch.Tensor) -> list[int]:
    """Where each row of ``kept`` ``(m, d)`` stands in ``full`` ``(n, d)``, found by value: the first
    equal row after the previous one's, so that equal rows are taken in order; fails where none is
    left (a row that is none of ``full``'s, or the order lost)."""
    positions = []
    for row in (kept[:, None, :] == full[None, :, :]).all(-1):
        later = [int(p) for p in row.nonzero().flatten() if not positions or p > positions[-1]]
        assert later, f"row {len(positions)} is none of the rows after position {positions[-1:]}: order lost"
        positions.append(later[0])
    return positions


@pytest.mark.parametrize("variant", ["llava-hf", "llava-next-hf"])
@pytest.mark.parametrize("method", ["OURS", "DIVPRUNE", "DPP", "TRIM", "STP", "UNIFORM"])
def test_llm_gets_text_plus_exactly_the_selectors_picks(models, variant, method):
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 1)]])
    full = llm_inputs(model, inputs)[0]
    placeholders = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    start, n = int(placeholders[0]), placeholders.numel()
    visual = full[start : start + n]
    k = budget(RATIO, n)
    patches.prune(model, method, RATIO)
    pruned = llm_inputs(model, inputs)[0]
    assert pruned.shape[0] == inputs["input_ids"].shape[1] - n + k
    # The text around the image, whole and in place.
    assert torch.equal(pruned[:start], full[:start]) and torch.equal(pruned[start + k :], full[start + n :])
    # The k visual tokens: each one of the image's own, found by value, in the image's order
    # (NeXT's row-end newline tokens are equal to one another: they are taken in order).
    positions = positions_in_order(pruned[start : start + k], visual)
    # Which ones: the method's picks on these tokens, as its selector gives them.
    options = {"text": full[start + n :]} if method == "TRIM" else {}
    assert set(positions) == set(SELECTORS[method](visual, k, **options).tolist())
    out = generate(model, inputs)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])  # prompt given back whole
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5


def test_two_images_of_different_size_each_get_their_budget(models):
    processor, model = models["llava-next-hf"]
    inputs = inputs_for(processor, ["Which differs?"], [[make_image(500, 300, 2), make_image(300, 700, 3)]])
    full = llm_inputs(model, inputs)
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True).pooler_output
    sizes = [f.shape[0] for f in features]
    assert sizes[0] != sizes[1]
    patches.prune(model, "OURS", RATIO)
    pruned = llm_inputs(model, inputs)
    assert pruned.shape[1] == full.shape[1] - sum(sizes) + sum(budget(RATIO, s) for s in sizes)


@pytest.mark.parametrize("variant", ["llava-hf", "llava-next-hf"])
def test_batch_of_two_prompts_generates_as_each_alone(models, variant):
    processor, model = models[variant]
    questions = ["What is in the image?", "Is there a red car in the picture? Please answer yes or no."]
    images = [[make_image(500, 300, 4)], [make_image(320, 320, 5)]]
    patches.prune(model, "OURS", RATIO)
    alone = [generate(model, inputs_for(processor, [q], [im]))[0, -5:] for q, im in zip(questions, images)]
    together = generate(model, inputs_for(processor, questions, images))
    for row, expected in enumerate(alone):
        assert together[row, -5:].tolist() == expected.tolist()


@pytest.mark.parametrize("variant", ["llava-hf", "llava-next-hf"])
def test_a_left_padded_batch_without_a_mask_generates_as_each_alone(models, variant):
    # Without a mask, padding is where the pad token is, as generate itself decides; the pruned
    # rows are re-padded on the same side and the mask handed on. (Right-padded prompts do not
    # generate as each alone even unpatched: new tokens follow the padding.)
    processor, model = models[variant]
    questions = ["What is in the image?", "Is there a red car in the picture? Please answer yes or no."]
    images = [[make_image(500, 300, 4)], [make_image(300, 700, 5)]]
    patches.prune(model, "OURS", RATIO)
    alone = [generate(model, inputs_for(processor, [q], [im]))[0, -5:] for q, im in zip(questions, images)]
    inputs = inputs_for(processor, questions, images)
    del inputs["attention_mask"]
    together = generate(model, inputs)
    for row, expected in enumerate(alone):
        assert together[row, -5:].tolist() == expected.tolist()


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("layer_index", [0, 2])
@pytest.mark.parametrize("variant", ["llava-hf", "llava-next-hf"])
def test_a_static_cache_generates_what_a_full_recompute_does(models, variant, layer_index, cache):
    processor, model = models[variant]
    questions = ["What is in the image?", "Is there a red car in the picture? Please answer yes or no."]
    images = [[make_image(400, 300, 8)], [make_image(400, 300, 9)]]
    inputs = inputs_for(processor, questions, images)
    patches.prune(model, "OURS", RATIO, layer_index=layer_index)
    expected = greedy_by_recompute(model, inputs, tokens=4)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation=cache)
    assert out[:, -4:].tolist() == expected.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the offloaded caches need CUDA (the GPU check runs this)")
@pytest.mark.parametrize("cache", ["static", "offloaded", "offloaded_static"])
@pytest.mark.parametrize("layer_index", [0, 2])
def test_every_cache_of_generate_decodes_as_the_dynamic_one_on_cuda(models, layer_index, cache):
    import copy

    processor, model = models["llava-hf"]
    model = copy.deepcopy(model).cuda()
    questions = ["What is in the image?", "Is there a red car in the picture? Please answer yes or no."]
    images = [[make_image(400, 300, 10)], [make_image(400, 300, 11)]]
    inputs = {k: v.cuda() for k, v in inputs_for(processor, questions, images).items()}
    patches.prune(model, "OURS", RATIO, layer_index=layer_index)
    with torch.no_grad():
        dynamic = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        other = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation=cache)
    assert other.tolist() == dynamic.tolist()


@pytest.mark.parametrize("method", ["OURS", "FASTV", "VTW"])
def test_layer_k_prunes_the_kv_cache(models, method):
    processor, model = models["llava-hf"]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 6)]])
    length = inputs["input_ids"].shape[1]
    patches.prune(model, method, RATIO, layer_index=2)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    kept = 0 if method == "VTW" else budget(RATIO, 576)
    assert out.logits.shape[1] == length
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [length] * 2 + [length - 576 + kept] * 2
    assert torch.equal(generate(model, inputs, tokens=4)[:, :length], inputs["input_ids"])


@pytest.mark.parametrize("attn", ["eager", "sdpa", "fa2-style"])
@pytest.mark.parametrize("variant", ["llava-hf", "llava-next-hf"])
def test_vtw_at_k0_is_each_prompt_without_its_image(models, variant, attn):
    processor, model = models[variant]
    questions = ["What is in the image?", "Is there a red car in the picture? Please answer yes or no."]
    inputs = inputs_for(processor, questions, [[make_image(500, 300, 17)], [make_image(320, 320, 18)]])
    texts = [ids[mask.bool() & (ids != model.config.image_token_id)][None] for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    alone = [generate(model, {"input_ids": t, "attention_mask": torch.ones_like(t)})[0, t.shape[1] :] for t in texts]
    first = {name: value[:1] for name, value in inputs.items()}
    patches.prune(model, "VTW", None, layer_index=0)
    assert torch.equal(llm_inputs(model, first), model.get_input_embeddings()(texts[0]))
    with backend(model, attn):
        together = generate(model, inputs)
    length = inputs["input_ids"].shape[1]
    assert torch.equal(together[:, :length], inputs["input_ids"])
    for row, expected in enumerate(alone):
        assert together[row, length:].tolist() == expected.tolist()


def test_positional_arguments_are_pruned_too(models):
    processor, model = models["llava-hf"]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 7)]])
    patches.prune(model, "OURS", RATIO)
    by_name = generate(model, inputs)
    with torch.no_grad():
        positional = model.generate(
            inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"],
            max_new_tokens=5, do_sample=False,
        )  # fmt: skip
    assert torch.equal(by_name, positional)
    seen = llm_inputs(model, inputs)
    assert seen.shape[1] == inputs["input_ids"].shape[1] - 576 + budget(RATIO, 576)


def test_images_given_in_a_form_the_patch_cannot_prune_are_refused(models):
    processor, model = models["llava-hf"]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 16)]])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    patches.prune(model, "OURS", RATIO)
    with pytest.raises(ValueError, match="give the images as pixel_values together with input_ids"):
        model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(TypeError, match="does not support Linear; it supports the original LLaVA"):
        patches.prune(torch.nn.Linear(2, 2), "OURS", 0.5)


def forward_logits(model, inputs, new):
    """Logits of one full forward over the prompt and the tokens ``new`` after it, no cache."""
    ids = torch.cat([inputs["input_ids"], new], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits


def greedy_by_recompute(model, inputs, tokens=5):
    new = inputs["input_ids"].new_zeros(inputs["input_ids"].shape[0], 0)
    for _ in range(tokens):
        new = torch.cat([new, forward_logits(model, inputs, new)[:, -1].argmax(-1, keepdim=True)], 1)
    return new


@pytest.mark.parametrize("variant", ["llava-hf", "llava-next-hf"])
@pytest.mark.parametrize("layer_index", [0, 2])
def test_cached_and_uncached_decoding_match_a_full_recompute(models, variant, layer_index):
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 8)]])
    length = inputs["input_ids"].shape[1]
    patches.prune(model, "OURS", RATIO, layer_index=layer_index)
    expected = greedy_by_recompute(model, inputs)
    assert generate(model, inputs)[:, length:].tolist() == expected.tolist()
    with torch.no_grad():
        uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert uncached[:, length:].tolist() == expected.tolist()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_layer_k_text_prompt_after_an_image_prompt_and_back(models, attn):
    processor, model = models["llava-hf"]
    image_inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 9)]])
    text_inputs = processor(text=["USER: Hello there. ASSISTANT:"], return_tensors="pt")
    with backend(model, attn):
        text_alone = generate(model, text_inputs)
        patches.prune(model, "OURS", RATIO, layer_index=2)
        image_alone = greedy_by_recompute(model, image_inputs)
        length = image_inputs["input_ids"].shape[1]
        assert generate(model, image_inputs)[:, length:].tolist() == image_alone.tolist()
        assert generate(model, text_inputs).tolist() == text_alone.tolist()
        assert generate(model, image_inputs)[:, length:].tolist() == image_alone.tolist()


@pytest.mark.parametrize("attn", ["eager", "sdpa", "fa2-style"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_layer_k_padded_batch_matches_each_prompt_alone(models, attn, side):
    processor, model = models["llava-hf"]
    questions = ["What is in the image?", "Is there a red car in the picture? Please answer yes or no."]
    images = [[make_image(500, 300, 10)], [make_image(320, 320, 11)]]
    patches.prune(model, "OURS", RATIO, layer_index=2)
    alone = [inputs_for(processor, [q], [im]) for q, im in zip(questions, images)]
    alone_logits = [forward_logits(model, a, a["input_ids"][:, :0])[0] for a in alone]
    processor.tokenizer.padding_side = side
    try:
        together = inputs_for(processor, questions, images)
    finally:
        processor.tokenizer.padding_side = "left"
    with backend(model, attn):
        logits = forward_logits(model, together, together["input_ids"][:, :0])
        generated = generate(model, together, tokens=4) if side == "left" else None
    for row, expected in enumerate(alone_logits):
        n = expected.shape[0]
        assert torch.allclose(logits[row, -n:] if side == "left" else logits[row, :n], expected, atol=1e-4)
        if generated is not None:
            assert generated[row, -4:].tolist() == generate(model, alone[row], tokens=4)[0, -4:].tolist()


def layer_inputs(model, inputs) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (hidden states, position ids)}`` each decoder layer's own forward receives in one
    model forward: after every hook, the patch's pruning ones included."""
    seen = {}

    def recording(index, forward):
        def wrapper(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[index] = (hidden.clone(), kwargs["position_ids"].clone())
            return forward(*args, **kwargs)

        return wrapper

    layers = model.model.language_model.layers
    for i, layer in enumerate(layers):
        layer.forward = recording(i, layer.forward)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for layer in layers:
            del layer.forward
    return seen


@pytest.mark.parametrize("side", ["left", "right"])
def test_layers_from_k_on_receive_the_unpruned_position_ids_of_the_tokens_they_hold(models, side):
    """Found without the patch's indices: the layers before K are unchanged by pruning, so each
    hidden state that enters layer K pruned is the unpruned run's at one position; every
    layer from K on must receive the unpruned run's position ids of those positions (flash-attention
    reads them to find packed sequences)."""
    processor, model = models["llava-hf"]
    processor.tokenizer.padding_side = side
    try:
        inputs = inputs_for(
            processor, ["What is in the image?", "Is there a red car? Answer yes or no."], [[make_image(500, 300, 12)], [make_image(320, 320, 13)]]
        )
    finally:
        processor.tokenizer.padding_side = "left"
    k = 2
    unpruned = layer_inputs(model, inputs)
    patches.prune(model, "OURS", RATIO, layer_index=k)
    pruned = layer_inputs(model, inputs)
    full_hidden, full_ids = unpruned[k]
    full_ids = full_ids.expand(full_hidden.shape[0], -1)
    cut_hidden = pruned[k][0]
    assert cut_hidden.shape[1] == inputs["input_ids"].shape[1] - 576 + budget(RATIO, 576)
    for b in range(full_hidden.shape[0]):
        # Padding positions share one hidden state: the kept ones, in order, take them in order.
        positions = positions_in_order(cut_hidden[b], full_hidden[b])
        for layer in range(k, len(pruned)):
            received = pruned[layer][1].expand(full_hidden.shape[0], -1)[b]
            assert received.tolist() == full_ids[b, positions].tolist(), (layer, b)
    for layer in range(k):
        assert torch.equal(pruned[layer][1], unpruned[layer][1])


@pytest.mark.parametrize("layer_index", [0, 2])
def test_beam_search_scores_its_sequence_as_a_full_recompute_does(models, layer_index):
    processor, model = models["llava-hf"]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 12)]])
    length = inputs["input_ids"].shape[1]
    patches.prune(model, "OURS", RATIO, layer_index=layer_index)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=4, num_beams=3, do_sample=False, length_penalty=0.0,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    new = out.sequences[:, length:]
    assert torch.equal(out.sequences[:, :length], inputs["input_ids"])
    with torch.no_grad():
        two = model.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2, length_penalty=0.0)
    assert torch.equal(two[:1], out.sequences) and torch.equal(two[:, :length], inputs["input_ids"].expand(2, -1))
    logprobs = forward_logits(model, inputs, new)[:, -new.shape[1] - 1 : -1].log_softmax(-1)
    recomputed = logprobs.gather(-1, new[..., None]).sum()
    assert torch.allclose(out.sequences_scores[0], recomputed, atol=1e-4)


@pytest.mark.parametrize("layer_index", [0, 2])
def test_sampling_draws_what_a_full_recompute_draws(models, layer_index):
    processor, model = models["llava-hf"]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 13)]])
    length = inputs["input_ids"].shape[1]
    patches.prune(model, "OURS", RATIO, layer_index=layer_index)
    torch.manual_seed(7)
    with torch.no_grad():
        sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    torch.manual_seed(7)
    new = inputs["input_ids"][:, :0]
    for _ in range(5):
        probs = forward_logits(model, inputs, new)[:, -1].float().softmax(-1)
        new = torch.cat([new, torch.multinomial(probs, 1)], 1)
    assert sampled[:, length:].tolist() == new.tolist()


def projector_gradient(model, **inputs):
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    grad = model.model.multi_modal_projector.linear_1.weight.grad.clone()
    model.zero_grad()
    return loss.detach(), grad


def test_training_at_k0_backpropagates_through_the_kept_features_only(models):
    processor, model = models["llava-hf"]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 14)]])
    ids = inputs["input_ids"]
    placeholders = ids[0] == model.config.image_token_id
    labels = ids.masked_fill(placeholders, -100)
    patches.prune(model, "OURS", RATIO)
    loss, grad = projector_gradient(model, **inputs, labels=labels)
    # The same by hand on the unpatched forward: the selector's picks of the features (with their
    # graph) in the kept placeholder rows.
    start, n = int(placeholders.nonzero()[0]), int(placeholders.sum())
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output[0]
    picks = SELECTORS["OURS"](features.detach(), budget(RATIO, n))
    short = torch.cat([ids[0, : start + len(picks)], ids[0, start + n :]])[None]
    embeds = model.get_input_embeddings()(short)
    embeds = torch.cat([embeds[:, :start], features[picks][None], embeds[:, start + len(picks) :]], 1)
    short_labels = short.masked_fill(short == model.config.image_token_id, -100)
    model._otprune_config = None
    original = type(model).forward.otprune_original
    model.zero_grad()
    expected_loss = original(model, inputs_embeds=embeds, attention_mask=torch.ones_like(short), labels=short_labels).loss
    expected_loss.backward()
    assert torch.allclose(loss, expected_loss.detach(), atol=1e-6)
    assert torch.allclose(grad, model.model.multi_modal_projector.linear_1.weight.grad, atol=1e-6)
    assert grad.abs().sum() > 0


def test_training_at_layer_k_backpropagates_as_the_unpatched_model(models):
    processor, model = models["llava-hf"]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 15)]])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    expected = projector_gradient(model, **inputs, labels=labels)
    # Keeping every token, the hooks' cuts and scatter must pass gradients through unchanged.
    patches.prune(model, "OURS", 1.0, layer_index=2)
    loss, grad = projector_gradient(model, **inputs, labels=labels)
    assert torch.allclose(loss, expected[0], atol=1e-6) and torch.allclose(grad, expected[1], atol=1e-6)
    patches.prune(model, "OURS", RATIO, layer_index=2)
    loss, grad = projector_gradient(model, **inputs, labels=labels)
    with torch.no_grad():
        assert torch.allclose(loss, model(**inputs, labels=labels).loss, atol=1e-6)
    assert grad.abs().sum() > 0 and not grad.isnan().any()
