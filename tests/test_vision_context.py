"""The vision context, methods that run before the projector, and adaptive counts, through the
original-LLaVA and transformers-LLaVA patches on the tiny checkpoints.

The truth for the context is the tower run on its own, with eager attention and
``output_attentions=True`` (its attention matrices) and ``output_hidden_states=True`` (its
features), and the next block's own modules applied to those features."""

import contextlib
import logging
import math
import sys

import pytest
import torch
from PIL import Image

import otprune.methods
import otprune.patches as patches
from otprune.contract import VisionContext
from otprune.prune_config import PruneConfig
from otprune.selection import select_per_image
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
'''
ENTRY_POINTS = """[otprune.selectors]
TOWERTOP = otprune_vision_test_plugins:select_by_tower

[otprune.mergers]
FEATUREWINDOWS = otprune_vision_test_plugins:merge_features
"""
PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    info = tmp_path / "otprune_vision_test_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: otprune-vision-test-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE, raising=False)
    otprune.methods.get_method.cache_clear()
    seen = otprune.methods.get_method("TOWERTOP").function.__globals__["SEEN"]
    yield seen
    otprune.methods.get_method.cache_clear()
    sys.modules.pop(PLUGIN_MODULE, None)


def make_image(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


class Original:
    """The original LLaVA: its CLIP tower, feature layer and projector, and one prompt."""

    def __init__(self, loaded, image):
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images, tokenizer_image_token

        tokenizer, self.model, processor = loaded
        self.ids = tokenizer_image_token(PROMPT, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        pixel = process_images([image], processor, self.model.config)
        self.pixel = [p.float() for p in pixel] if isinstance(pixel, list) else pixel.float()
        self.sizes = [image.size]
        self.start = int((self.ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0])
        tower = self.model.get_vision_tower()
        self.clip, self.layer = tower.vision_tower, tower.select_layer
        self.projector = self.model.get_model().mm_projector

    def llm_input(self):
        mask = torch.ones_like(self.ids)
        with torch.no_grad():
            return self.model.prepare_inputs_labels_for_multimodal(self.ids, None, mask, None, None, self.pixel, self.sizes)[4][0]

    def tower_pixels(self):
        return self.pixel if torch.is_tensor(self.pixel) else torch.cat(self.pixel)


class Transformers:
    """transformers' LLaVA: the same, through ``model(**inputs)``."""

    def __init__(self, loaded, image):
        processor, self.model = loaded
        content = [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        self.inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        self.start = int((self.inputs["input_ids"][0] == self.model.config.image_token_id).nonzero()[0])
        self.clip, self.layer = self.model.model.vision_tower, self.model.config.vision_feature_layer
        self.projector = self.model.model.multi_modal_projector

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
        return self.inputs["pixel_values"]


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


@contextlib.contextmanager
def tower_attention(clip, implementation):
    before = clip.config._attn_implementation
    clip.set_attn_implementation(implementation)
    try:
        yield
    finally:
        clip.set_attn_implementation(before)


def tower_truth(f):
    """The tower on its own, eager: ``(hidden_states, attentions)`` of its one image."""
    with tower_attention(f.clip, "eager"), torch.no_grad():
        out = f.clip(f.tower_pixels(), output_hidden_states=True, output_attentions=True)
    return [h[0] for h in out.hidden_states], [a[0] for a in out.attentions]


LLAVA_15 = ["llava-1.5", "llava-hf"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", LLAVA_15)
def test_the_vision_context_is_the_towers_own_attention_keys_and_features(families, plugins, variant, attn):
    f = family(families, variant)
    patches.prune(f.model, "TOWERTOP", ratio=0.1)
    with tower_attention(f.clip, attn):
        f.llm_input()
    tokens, vision, adaptive = plugins[-1]
    hidden, attentions = tower_truth(f)
    layers = encoder_layers(f.clip)
    state = f.layer % len(hidden)
    features = hidden[state]
    assert adaptive is False
    assert vision.features.shape == (576, features.shape[-1]) == (tokens.shape[0], features.shape[-1])
    torch.testing.assert_close(vision.features, features[1:])
    torch.testing.assert_close(vision.cls_feature, features[0])
    # attentions[i] is block i's; the features are block (state - 1)'s output.
    torch.testing.assert_close(vision.head_attention, attentions[state - 1][:, 0, 1:])
    reading = layers[min(state, len(layers) - 1)]
    normed = reading.layer_norm1(features[None])[0] if state < len(layers) else layers[state - 1].layer_norm1(hidden[state - 1][None])[0]
    with torch.no_grad():
        q, k = reading.self_attn.q_proj(normed), reading.self_attn.k_proj(normed)
    width = q.shape[-1]
    torch.testing.assert_close(vision.cls_attention, torch.softmax(q[0] @ k.T / math.sqrt(width), -1)[1:])
    torch.testing.assert_close(vision.keys, k[1:])
    heads = f.clip.config.num_attention_heads
    producing = layers[state - 1]
    with torch.no_grad():
        k_producing = producing.self_attn.k_proj(producing.layer_norm1(hidden[state - 1][None])[0])
    torch.testing.assert_close(vision.head_keys, k_producing[1:].view(576, heads, -1).mean(1))


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


@pytest.mark.parametrize("variant", ["llava-1.6", "llava-next-hf"])
def test_any_resolution_images_are_refused_naming_why(families, plugins, variant):
    image = make_image(500, 300, 4)
    f = (Original if variant == "llava-1.6" else Transformers)(families[variant], image)
    patches.prune(f.model, "TOWERTOP", ratio=0.1)
    with pytest.raises(ValueError, match="not yet on any-resolution crops"):
        f.llm_input()


def test_vision_methods_prune_before_the_llm_only(plugins):
    with pytest.raises(ValueError, match="LAYER_INDEX=2 is not allowed with BASELINE=TOWERTOP"):
        PruneConfig(method="TOWERTOP", ratio=0.1, layer_index=2)
    with pytest.raises(ValueError, match="LAYER_INDEX=2 is not allowed with BASELINE=FEATUREWINDOWS"):
        PruneConfig(method="FEATUREWINDOWS", ratio=0.1, layer_index=2)
    assert PruneConfig(method="TOWERTOP").adaptive
    with pytest.raises(ValueError, match="needs SUBSET_RATIO"):
        PruneConfig(method="FEATUREWINDOWS")


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
