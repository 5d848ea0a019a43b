"""The vision context, methods that run before the projector, and adaptive counts, through the
original-LLaVA and transformers-LLaVA patches on the tiny checkpoints.

The truth for the context is the tower run on its own, with eager attention and
``output_attentions=True`` (its attention matrices) and ``output_hidden_states=True`` (its
features), and the next block's own modules applied to those features."""

import logging
import math

import pytest
import torch
from attention_backends import tower_attention
from conftest import installed_plugins
from PIL import Image

import otprune.methods
import otprune.patches as patches
from otprune.contract import VisionContext
from otprune.prune_config import PruneConfig, config_from_env
from otprune.selection import PluginFault, select_per_image
from otprune.selectors import budget
from patches.vision_tower import encoder_layers

PLUGIN_MODULE = "otprune_vision_test_plugins"
PLUGIN_SOURCE = '''
import torch

SEEN = []


def select_by_tower(tokens, k, *, vision, adaptive):
    """Top tokens by [CLS] attention summed over heads; adaptive: those above the mean."""
    SEEN.append((tokens, vision, adaptive))
    scores = vision.head_attention.sum(0)
    if adaptive:
        k = max(1, int((scores > scores.mean()).sum()))
    return scores.topk(k).indices.sort().values


def merge_features(tokens, k, *, vision):
    """Means of k consecutive runs of the tower features, at each run's first position."""
    SEEN.append((tokens, vision, None))
    parts = torch.arange(tokens.shape[0]).tensor_split(k)
    return torch.stack([tokens[p].mean(0) for p in parts]), torch.tensor([int(p[0]) for p in parts])


merge_features.before_projector = True


def select_writing_the_tower_attention(tokens, k, *, vision):
    vision.cls_attention.zero_()
    return torch.arange(k)


def select_first_half_batched(tokens, k, *, adaptive):
    """Batches of equal N; adaptive: each image keeps its first half."""
    SEEN.append((tokens, None, adaptive))
    if tokens.dim() == 3:
        return torch.arange(k).expand(tokens.shape[0], k)
    return torch.arange(max(1, tokens.shape[0] // 2) if adaptive else k)


select_first_half_batched.accepts_batches = True
'''
ENTRY_POINTS = """[otprune.selectors]
TOWERTOP = otprune_vision_test_plugins:select_by_tower
TOWERWRITER = otprune_vision_test_plugins:select_writing_the_tower_attention
HALFBATCH = otprune_vision_test_plugins:select_first_half_batched

[otprune.mergers]
FEATUREWINDOWS = otprune_vision_test_plugins:merge_features
"""
PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The test plugins, installed for one test; returns what each call was given (``SEEN``)."""
    for module in installed_plugins(tmp_path, monkeypatch, PLUGIN_MODULE, PLUGIN_SOURCE, ENTRY_POINTS, "TOWERTOP"):
        yield module.SEEN


def make_image(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


class Original:
    """The original LLaVA: its CLIP tower, feature layer, projector and newline vector, and one
    prompt with its images (placeholders in a row)."""

    def __init__(self, loaded, *images):
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images, tokenizer_image_token

        tokenizer, self.model, processor = loaded
        prompt = PROMPT.replace("<image>\n", "<image>\n" * len(images))
        self.ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        pixel = process_images(list(images), processor, self.model.config)
        self.pixel = [p.float() for p in pixel] if isinstance(pixel, list) else pixel.float()
        self.sizes = [image.size for image in images]
        self.start = int((self.ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0])
        self.text_tokens = self.ids.shape[1] - len(images)
        tower = self.model.get_vision_tower()
        self.clip, self.layer = tower.vision_tower, tower.select_layer
        self.projector = self.model.get_model().mm_projector
        self.newline = getattr(self.model.get_model(), "image_newline", None)

    def llm_input(self):
        mask = torch.ones_like(self.ids)
        with torch.no_grad():
            return self.model.prepare_inputs_labels_for_multimodal(self.ids, None, mask, None, None, self.pixel, self.sizes)[4][0]

    def tower_pixels(self):
        """Every crop the tower sees, in the model's order."""
        return torch.cat(self.pixel) if isinstance(self.pixel, list) else self.pixel.flatten(0, self.pixel.dim() - 4)


class Transformers:
    """transformers' LLaVA: the same, through ``model(**inputs)``."""

    def __init__(self, loaded, *images):
        processor, self.model = loaded
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": "What is in the image?"}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        self.inputs = processor(images=list(images), text=[prompt], return_tensors="pt")
        placeholders = self.inputs["input_ids"][0] == self.model.config.image_token_id
        self.start = int(placeholders.nonzero()[0])
        self.text_tokens = int((~placeholders).sum())
        self.clip, self.layer = self.model.model.vision_tower, self.model.config.vision_feature_layer
        self.projector = self.model.model.multi_modal_projector
        self.newline = getattr(self.model.model, "image_newline", None)

    def llm_input(self):
        seen = []
        decoder = self.model.model.language_model
        handle = decoder.register_forward_pre_hook(lambda m, a, k: seen.append(k["inputs_embeds"][0].clone()), with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(**self.inputs)
        finally:
            handle.remove()
        return seen[0]

    def tower_pixels(self):
        """Every crop the tower sees: LLaVA-NeXT's images of fewer crops are padded with zeros."""
        pixels = self.inputs["pixel_values"]
        if pixels.dim() == 4:
            return pixels
        crops = pixels.flatten(0, 1)
        return crops[crops.flatten(1).abs().sum(1) > 0]


@pytest.fixture(scope="module")
def families(tiny_checkpoints, tiny_hf_checkpoints):
    from llava.model.builder import load_pretrained_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded = {}
    for variant, path in tiny_checkpoints.items():
        tokenizer, model, processor, _ = load_pretrained_model(str(path), None, path.name, device="cpu", device_map="cpu")
        loaded[variant] = (tokenizer, model.float().eval(), processor)
    for variant, path in tiny_hf_checkpoints.items():
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        loaded[variant] = (AutoProcessor.from_pretrained(path), model)
    patches.llava.install()
    patches.hf.install()
    yield loaded
    for entry in loaded.values():
        entry[1]._otprune_config = None


def family(families, variant, seed=0):
    image = make_image(336, 336, seed)
    return (Original if variant.startswith("llava-1.") else Transformers)(families[variant], image)


def tower_truth(f):
    """The tower on its own, eager: ``(hidden_states, attentions)`` of its one image."""
    with tower_attention(f.clip, "eager"), torch.no_grad():
        out = f.clip(f.tower_pixels(), output_hidden_states=True, output_attentions=True)
    return [h[0] for h in out.hidden_states], [a[0] for a in out.attentions]


def crop_truth(f):
    """The tower on its own, eager, on every crop it sees: per tower row, what its patches'
    context rows should be (``(R, 576, ...)``; ``head_attention`` ``(R, H, 576)``;
    ``cls_feature`` ``(R, C_v)``)."""
    with tower_attention(f.clip, "eager"), torch.no_grad():
        out = f.clip(f.tower_pixels(), output_hidden_states=True, output_attentions=True)
        hidden, attentions = out.hidden_states, out.attentions
        layers = encoder_layers(f.clip)
        state = f.layer % len(hidden)
        features = hidden[state]
        # attentions[i] is block i's; the features are block (state - 1)'s output, read by block state.
        reading = layers[min(state, len(layers) - 1)]
        normed = reading.layer_norm1(features) if state < len(layers) else layers[state - 1].layer_norm1(hidden[state - 1])
        q, k = reading.self_attn.q_proj(normed), reading.self_attn.k_proj(normed)
        producing = layers[state - 1]
        k_producing = producing.self_attn.k_proj(producing.layer_norm1(hidden[state - 1]))
    rows, positions, width = q.shape
    return {
        "features": features[:, 1:],
        "cls_feature": features[:, 0],
        "cls_attention": torch.softmax(q[:, :1] @ k.transpose(1, 2) / math.sqrt(width), -1)[:, 0, 1:],
        "keys": k[:, 1:],
        "head_attention": attentions[state - 1][:, :, 0, 1:],
        "head_keys": k_producing[:, 1:].view(rows, positions - 1, f.clip.config.num_attention_heads, -1).mean(2),
    }


LLAVA_15 = ["llava-1.5", "llava-hf"]
ANY_RESOLUTION = ["llava-1.6", "llava-next-hf"]
CONTEXT_ROWS = ("features", "cls_attention", "keys", "head_keys")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", LLAVA_15)
def test_the_vision_context_is_the_towers_own_attention_keys_and_features(families, plugins, variant, attn):
    f = family(families, variant)
    patches.prune(f.model, "TOWERTOP", ratio=0.1)
    with tower_attention(f.clip, attn):
        f.llm_input()
    tokens, vision, adaptive = plugins[-1]
    truth = crop_truth(f)
    assert adaptive is False
    assert vision.features.shape == truth["features"][0].shape == (tokens.shape[0], truth["features"].shape[-1])
    for name in (*CONTEXT_ROWS, "head_attention", "cls_feature"):
        torch.testing.assert_close(getattr(vision, name), truth[name][0])


@pytest.fixture
def recorded(monkeypatch):
    """Each list of image contexts the patches align, as they hand it to the selection."""
    seen = []
    for module in (patches.llava, patches.hf):

        def record(*args, align=module.aligned_contexts):
            seen.append(align(*args))
            return seen[-1]

        monkeypatch.setattr(module, "aligned_contexts", record)
    return seen


def any_resolution(families, variant, *images):
    return (Original if variant == "llava-1.6" else Transformers)(families[variant], *images)


def traced_sources(f, llm_input, truth):
    """Per image, each of its tokens' crop patch (flat, ``tower row * 576 + patch``), or -1 for
    the newline vector, found without the patch's tracing: the one crop patch whose projected
    feature the unpruned model put at that token (equal in every bit; no two crop patches
    project alike on random weights). The images are the runs of such tokens."""
    with torch.no_grad():
        projected = f.projector(truth["features"]).flatten(0, 1)
    assert torch.unique(projected, dim=0).shape[0] == projected.shape[0], "two crop patches project alike"
    nearest = torch.cdist(llm_input, projected).argmin(1)
    patch = (llm_input == projected[nearest]).all(-1)
    newline = (llm_input == f.newline.to(llm_input)).all(-1)
    sources = torch.where(newline, -1, nearest)
    positions = (patch | newline).nonzero().flatten()
    runs = positions.tensor_split((positions.diff() > 1).nonzero().flatten() + 1)
    return [sources[run] for run in runs]


def check_traced_context(vision, sources, truth):
    """``vision`` holds, at each patch token, its crop patch's truth; zeros at the newline tokens."""
    patch = sources >= 0
    at = sources[patch]
    assert torch.equal(vision.patches.cpu(), patch)
    for name in CONTEXT_ROWS:
        torch.testing.assert_close(getattr(vision, name)[patch], truth[name].flatten(0, 1)[at])
        assert not getattr(vision, name)[~patch].any(), f"{name} is not zero at the newline tokens"
    head_attention = truth["head_attention"].transpose(0, 1).flatten(1)
    torch.testing.assert_close(vision.head_attention[:, patch], head_attention[:, at])
    assert not vision.head_attention[:, ~patch].any()
    # The choice: the base crop's [CLS] feature, the crop of the image's first token.
    torch.testing.assert_close(vision.cls_feature, truth["cls_feature"][int(sources[0]) // 576])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ANY_RESOLUTION)
def test_on_an_any_resolution_image_each_token_gets_its_crop_patchs_context(families, plugins, recorded, variant, attn):
    """A wide image (500 x 300): its base crop and two tiles, the tiles' grid unpadded to rows of
    fewer patches, a newline vector ending each."""
    f = any_resolution(families, variant, make_image(500, 300, 4))
    truth = crop_truth(f)
    patches.prune(f.model, None)
    with tower_attention(f.clip, "eager"):
        (sources,) = traced_sources(f, f.llm_input(), truth)
    patch = sources >= 0
    crops = truth["features"].shape[0]
    assert crops == 3 and 0 < int((~patch).sum()) and int(patch.sum()) < crops * 576, "no unpadding to test"
    patches.prune(f.model, "TOWERTOP", ratio=0.1)
    with tower_attention(f.clip, attn):
        f.llm_input()
    (contexts,) = recorded
    (vision,) = contexts
    check_traced_context(vision, sources, truth)


@pytest.mark.parametrize("variant", ANY_RESOLUTION)
def test_on_a_prompt_of_two_any_resolution_images_each_gets_its_own_crops(families, plugins, recorded, variant):
    """A wide image (three crops) and a tall one (four crops, unpadded the other way) in one prompt."""
    f = any_resolution(families, variant, make_image(500, 300, 8), make_image(300, 1000, 9))
    truth = crop_truth(f)
    patches.prune(f.model, None)
    with tower_attention(f.clip, "eager"):
        traced = traced_sources(f, f.llm_input(), truth)
    assert [len(set((s[s >= 0] // 576).tolist())) for s in traced] == [3, 4]
    patches.prune(f.model, "TOWERTOP", ratio=0.1)
    f.llm_input()
    (contexts,) = recorded
    assert len(contexts) == len(traced) == 2
    for vision, sources in zip(contexts, traced):
        check_traced_context(vision, sources, truth)


@pytest.mark.parametrize("variant", LLAVA_15)
def test_a_merger_before_the_projector_gives_the_llm_its_projected_features(families, plugins, variant):
    f = family(families, variant, seed=1)
    k = 56
    patches.prune(f.model, "FEATUREWINDOWS", ratio=k / 576)
    got = f.llm_input()
    hidden, _ = tower_truth(f)
    features = hidden[f.layer % len(hidden)][1:]
    parts = torch.arange(576).tensor_split(k)
    with torch.no_grad():
        expected = f.projector(torch.stack([features[p].mean(0) for p in parts]))
    assert plugins[-1][0].shape == features.shape, "the merger was not given the tower's features"
    torch.testing.assert_close(got[f.start : f.start + k], expected, rtol=1e-4, atol=1e-5)
    patches.prune(f.model, None)
    unpruned = f.llm_input()
    assert got.shape[0] == unpruned.shape[0] - 576 + k
    torch.testing.assert_close(got[f.start + k :], unpruned[f.start + 576 :])


@pytest.mark.parametrize("variant", LLAVA_15)
def test_an_adaptive_method_keeps_the_count_it_chooses_per_image(families, plugins, variant, caplog):
    counts = []
    for seed in (2, 3):
        f = family(families, variant, seed=seed)
        patches.prune(f.model, "TOWERTOP", log=True)
        with caplog.at_level(logging.INFO, logger="otprune"):
            got = f.llm_input()
        _, attentions = tower_truth(f)
        scores = attentions[f.layer % (len(attentions) + 1) - 1][:, 0, 1:].sum(0)
        chosen = int((scores > scores.mean()).sum())
        assert plugins[-1][2] is True
        patches.prune(f.model, None)
        assert got.shape[0] == f.llm_input().shape[0] - 576 + chosen
        assert f"576->{chosen}" in caplog.text
        counts.append(chosen)
    assert 1 <= min(counts) and max(counts) < 576


@pytest.mark.parametrize("variant", ANY_RESOLUTION)
def test_features_with_the_cls_among_the_patches_are_refused_naming_why(families, plugins, variant, monkeypatch):
    """No context where the model's features hold the [CLS] (LLaVA's ``cls_patch``, transformers'
    ``full`` strategy): no token would be that row's patch."""
    f = any_resolution(families, variant, make_image(500, 300, 4))
    patches.prune(f.model, "TOWERTOP", ratio=0.1)
    if variant == "llava-1.6":
        monkeypatch.setattr(f.model.get_vision_tower(), "select_feature", "cls_patch")
        message = "the vision context needs the tower's patch features; this LLaVA selects 'cls_patch'"
    else:
        f.inputs["vision_feature_select_strategy"] = "full"
        message = "the vision context needs one feature layer of patch features; this model takes layer -2 with strategy 'full'"
    with pytest.raises(ValueError, match=message):
        f.llm_input()


def test_vision_methods_prune_before_the_llm_only(plugins):
    with pytest.raises(ValueError, match="LAYER_INDEX=2 is not allowed with BASELINE=TOWERTOP"):
        PruneConfig(method="TOWERTOP", ratio=0.1, layer_index=2)
    with pytest.raises(ValueError, match="LAYER_INDEX=2 is not allowed with BASELINE=FEATUREWINDOWS"):
        PruneConfig(method="FEATUREWINDOWS", ratio=0.1, layer_index=2)
    assert PruneConfig(method="TOWERTOP").adaptive
    with pytest.raises(ValueError, match="needs SUBSET_RATIO"):
        PruneConfig(method="FEATUREWINDOWS")


@pytest.mark.parametrize("ratio", ["", "0.1"])
@pytest.mark.parametrize("method", ["PRUMERGE", "DIVPRUNE_ADAPTIVE"])
def test_an_adaptive_vision_method_inside_the_llm_is_told_k_must_be_0_not_to_set_a_ratio(method, ratio):
    """LAYER_INDEX = 2 with SUBSET_RATIO unset: setting a ratio (the old advice) cannot help a
    method on the vision tower; the one answer, with or without a ratio, is K = 0."""
    with pytest.raises(ValueError) as raised:
        config_from_env({"BASELINE": method, "LAYER_INDEX": "2", "SUBSET_RATIO": ratio})
    message = str(raised.value)
    assert message.startswith(f"LAYER_INDEX=2 is not allowed with BASELINE={method}: it ") and message.endswith("so K must be 0")
    assert "set SUBSET_RATIO" not in message


def test_a_batch_of_two_prompts_keeps_each_images_own_adaptive_count(families, plugins):
    """Two prompts in one call (original LLaVA-1.5, right padding): each row gets what it gets alone."""
    alone = []
    for seed in (5, 6):
        f = family(families, "llava-1.5", seed=seed)
        patches.prune(f.model, "TOWERTOP")
        alone.append(f.llm_input())
    first, second = family(families, "llava-1.5", seed=5), family(families, "llava-1.5", seed=6)
    ids = torch.cat([first.ids, second.ids])
    pixel = torch.cat([first.tower_pixels(), second.tower_pixels()])
    with torch.no_grad():
        _, _, mask, _, embeds, _ = first.model.prepare_inputs_labels_for_multimodal(ids, None, torch.ones_like(ids), None, None, pixel, first.sizes * 2)
    assert alone[0].shape[0] != alone[1].shape[0], "the two images should choose different counts"
    for row, expected in enumerate(alone):
        got = embeds[row][mask[row].bool()] if mask is not None else embeds[row]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


VISION_METHODS = ["PRUMERGE", "PRUMERGE_PLUS", "DIVPRUNE_ADAPTIVE", "VISIONZIP", "FASTERVLM"]


@pytest.mark.parametrize("variant", LLAVA_15)
@pytest.mark.parametrize("method", VISION_METHODS)
def test_each_bundled_vision_method_prunes_both_llava_15_families(families, variant, method, caplog):
    """At SUBSET_RATIO = 0.098 at most 56 tokens of 576 reach the LLM, its text unchanged; an
    adaptive method left without a ratio logs the count it chose."""
    f = family(families, variant, seed=7)
    patches.prune(f.model, None)
    unpruned = f.llm_input()
    ratios = [0.098, None] if "adaptive" in otprune.methods.get_method(method).context else [0.098]
    for ratio in ratios:
        caplog.clear()
        patches.prune(f.model, method, ratio=ratio, log=True)
        with caplog.at_level(logging.INFO, logger="otprune"):
            got = f.llm_input()
        kept = got.shape[0] - (unpruned.shape[0] - 576)
        assert 1 <= kept <= (56 if ratio else 576)
        assert f"576->{kept};" in caplog.text
        torch.testing.assert_close(got[: f.start], unpruned[: f.start])
        torch.testing.assert_close(got[f.start + kept :], unpruned[f.start + 576 :])


def synthetic_vision(n, newlines, seed=0):
    """A VisionContext for ``n`` tokens whose tokens ``newlines`` no patch stands for (zero rows)."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.ones(n, dtype=torch.bool)
    patches[newlines] = False
    rows = patches[:, None].float()
    return VisionContext(
        features=torch.randn(n, 8, generator=g) * rows,
        cls_attention=torch.rand(n, generator=g) * patches,
        keys=torch.randn(n, 6, generator=g) * rows,
        head_attention=torch.rand(2, n, generator=g) * patches,
        head_keys=torch.randn(n, 3, generator=g) * rows,
        cls_feature=torch.randn(8, generator=g),
        patches=patches,
    )


@pytest.mark.parametrize("ratio", [0.25, None])
def test_a_vision_method_gets_the_patch_tokens_alone_and_every_newline_is_kept(plugins, ratio):
    newlines = torch.tensor([4, 9, 14, 19])
    vision = synthetic_vision(20, newlines)
    tokens = torch.randn(20, 5)
    config = PruneConfig(method="TOWERTOP", ratio=ratio)
    (kept,) = select_per_image(config, [tokens], {"vision": [vision]})
    seen_tokens, seen_vision, _ = plugins[-1]
    patch_rows = vision.patches.nonzero().flatten()
    torch.testing.assert_close(seen_tokens, tokens[patch_rows])
    torch.testing.assert_close(seen_vision.head_attention, vision.head_attention[:, patch_rows])
    assert seen_vision.patches is None
    scores = vision.head_attention[:, patch_rows].sum(0)
    count = int((scores > scores.mean()).sum()) if ratio is None else budget(ratio, 20) - newlines.numel()
    expected = torch.cat([patch_rows[scores.topk(count).indices], newlines]).sort().values
    assert kept.indices.tolist() == expected.tolist()


@pytest.mark.parametrize("method", ["TOWERTOP", "FEATUREWINDOWS"])
def test_a_budget_that_the_newline_vectors_fill_stops_the_run_rather_than_exceed_it(plugins, method):
    """20 tokens, 4 of them newlines, SUBSET_RATIO 0.1: k = 2, yet the newlines alone are 4 and
    one patch more makes 5; the selection never hands back more than k tokens."""
    vision = synthetic_vision(20, torch.tensor([4, 9, 14, 19]))
    with pytest.raises(ValueError) as raised:
        select_per_image(PruneConfig(method=method, ratio=0.1), [torch.randn(20, 8)], {"vision": [vision]}, project=lambda f: f)
    message = str(raised.value)
    assert f"BASELINE={method} keeps k = 2 of an image's 20 tokens, and 4 of them no tower patch stands for" in message
    assert "SUBSET_RATIO must leave k >= 5" in message


def test_a_merger_before_the_projector_keeps_the_newline_vectors_as_they_are(plugins):
    newlines = torch.tensor([5, 11])
    vision = synthetic_vision(12, newlines, seed=1)
    tokens = torch.randn(12, 4)
    (kept,) = select_per_image(PruneConfig(method="FEATUREWINDOWS", ratio=0.5), [tokens], {"vision": [vision]}, project=lambda f: f[:, :4] * 2)
    patch_rows = vision.patches.nonzero().flatten()
    parts = torch.arange(10).tensor_split(6 - 2)
    merged = torch.stack([vision.features[patch_rows][p].mean(0) for p in parts])[:, :4] * 2
    positions = torch.tensor([int(patch_rows[p[0]]) for p in parts])
    assert kept.indices.tolist() == sorted([*positions.tolist(), 5, 11])
    order = torch.cat([positions, newlines]).argsort()
    torch.testing.assert_close(kept.tokens, torch.cat([merged, tokens[newlines]])[order])


@pytest.mark.parametrize("variant", ANY_RESOLUTION)
@pytest.mark.parametrize("method", VISION_METHODS)
def test_each_bundled_vision_method_prunes_any_resolution_images_keeping_their_newlines(families, variant, method):
    """At SUBSET_RATIO = 0.098 at most that share of the image's tokens reaches the LLM (adaptive:
    at most all), every newline token of the image among them, the text unchanged."""
    f = any_resolution(families, variant, make_image(500, 300, 10))
    patches.prune(f.model, None)
    unpruned = f.llm_input()
    n = unpruned.shape[0] - f.text_tokens
    newline = f.newline.to(unpruned)
    rows = int((unpruned[f.start : f.start + n] == newline).all(-1).sum())
    assert rows > 0
    ratios = [0.098, None] if "adaptive" in otprune.methods.get_method(method).context else [0.098]
    for ratio in ratios:
        patches.prune(f.model, method, ratio=ratio)
        got = f.llm_input()
        kept = got.shape[0] - f.text_tokens
        assert rows < kept <= (budget(ratio, n) if ratio else n)
        assert int((got[f.start : f.start + kept] == newline).all(-1).sum()) == rows
        torch.testing.assert_close(got[: f.start], unpruned[: f.start])
        torch.testing.assert_close(got[f.start + kept :], unpruned[f.start + n :])


def test_a_plugin_that_writes_its_vision_context_in_place_stops_the_run(plugins):
    vision = synthetic_vision(6, torch.tensor([], dtype=torch.long))
    with pytest.raises(PluginFault, match="wrote its input vision.cls_attention in place"):
        select_per_image(PruneConfig(method="TOWERWRITER", ratio=0.5), [torch.randn(6, 3)], {"vision": [vision]})


def test_an_adaptive_run_calls_a_batching_selector_image_by_image(plugins):
    images = [torch.randn(8, 3), torch.randn(8, 3)]
    kept = select_per_image(PruneConfig(method="HALFBATCH"), images)
    assert [k.indices.tolist() for k in kept] == [[0, 1, 2, 3]] * 2
    assert [seen[0].dim() for seen in plugins[-2:]] == [2, 2]
    batched = select_per_image(PruneConfig(method="HALFBATCH", ratio=0.25), images)
    assert plugins[-1][0].dim() == 3 and [k.indices.tolist() for k in batched] == [[0, 1]] * 2
