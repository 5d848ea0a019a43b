"""The vision context of Qwen's ViT and of LLaVA-OneVision's SigLIP tower (neither has a [CLS])
through patches/vlm.py, methods that run before the projector (Qwen: its merger's MLP), and the
bundled vision-side methods on Qwen2.5-VL and OneVision.

On Qwen the truth is the tower run on its own with eager attention, and the attention recomputed
from its context block's own modules (``norm1``, ``attn.qkv``, the model's
``apply_rotary_pos_emb_vision``) on that block's inputs: the mean attention each patch receives
from the queries of its frame, per head, averaged over each merged 2 x 2 group (Qwen's attention
modules return no attention weights). On OneVision: the tower run on its own with eager attention
and ``output_attentions=True``, each token matched to its crop patch by its unpruned LLM input
(the projector of that patch's feature, bit for bit) or to the newline vector."""

import logging
import sys
from types import SimpleNamespace

import pytest
import torch
from attention_backends import tower_attention

pytest.importorskip("transformers")

from conftest import tiny_vlms  # noqa: E402
from test_patch_hf import inputs_for, llm_inputs, make_image  # noqa: E402
from test_patch_vlm import qwen_video_inputs  # noqa: E402
from test_vision_context import plugins, traced_sources  # noqa: E402, F401

import otprune.methods  # noqa: E402
import otprune.patches as patches  # noqa: E402
from otprune.patches import vision_without_cls  # noqa: E402
from otprune.selectors import budget  # noqa: E402
from patches.vision_tower import encoder_layers  # noqa: E402

pytestmark = pytest.mark.usefixtures("pruning_off")

QWEN = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    loaded = tiny_vlms(tmp_path_factory.mktemp("vision_vlm_checkpoints"), [*QWEN, "llava-onevision"], padding_side="left")
    patches.vlm.install()
    return loaded


def merger_mlp_input(merger):
    """The module whose input is the merger's 4 C features (Qwen2/2.5-VL: its MLP; Qwen3-VL: fc1)."""
    return merger.mlp if hasattr(merger, "mlp") else merger.linear_fc1


def merger_mlp(merger, features):
    with torch.no_grad():
        if hasattr(merger, "mlp"):
            return merger.mlp(features)
        return merger.linear_fc2(merger.act_fn(merger.linear_fc1(features)))


def tower_truth(model, pixels, grid_thw):
    """The tower alone, eager, for ``pixels`` of patch grids ``grid_thw``: per merged token in token order, its
    ``(head_attention (H, M), keys (M, C), head_keys (M, C / H), features (M, 4 C))``."""
    visual = model.model.visual
    block = visual.blocks[-1]
    assert getattr(visual, "fullatt_block_indexes", [len(visual.blocks) - 1])[-1] == len(visual.blocks) - 1
    seen = {}

    def block_inputs(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["cu_seqlens"] = kwargs["cu_seqlens"]
        seen["cos_sin"] = kwargs["position_embeddings"]

    handles = [
        block.register_forward_pre_hook(block_inputs, with_kwargs=True),
        merger_mlp_input(visual.merger).register_forward_pre_hook(lambda m, a: seen.__setitem__("features", a[0].clone())),
        visual.merger.register_forward_hook(lambda m, a, out: seen.__setitem__("merged", out.clone())),
    ]
    try:
        with tower_attention(visual, "eager"), torch.no_grad():
            out = visual(pixels, grid_thw=grid_thw)
    finally:
        for handle in handles:
            handle.remove()
    # The merger's rows (window order on Qwen2.5-VL) to the tower's output rows (token order).
    order = torch.cdist(out.pooler_output, seen["merged"]).argmin(1)
    assert torch.equal(order.sort().values, torch.arange(order.numel()))
    attention = block.attn
    with torch.no_grad():
        qkv = attention.qkv(block.norm1(seen["hidden"]))
    q, k, _ = qkv.reshape(qkv.shape[0], 3, attention.num_heads, -1).unbind(1)
    q, k = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision(q, k, *seen["cos_sin"])
    bounds = seen["cu_seqlens"].tolist()
    received = torch.cat(
        [
            torch.softmax(q[s:e].transpose(0, 1) @ k[s:e].transpose(0, 1).transpose(1, 2) * attention.scaling, -1).mean(1)
            for s, e in zip(bounds[:-1], bounds[1:])
        ],
        dim=1,
    )
    groups = visual.spatial_merge_size**2

    def per_token(rows):
        return rows.reshape(rows.shape[0] // groups, groups, *rows.shape[1:]).mean(1)[order]

    return per_token(received.T).T, per_token(k.flatten(1)), per_token(k.mean(1)), seen["features"][order]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", QWEN)
def test_the_qwen_vision_context_is_the_towers_own_received_attention_keys_and_features(models, plugins, variant, attn):  # noqa: F811
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 0)]])
    patches.prune(model, "TOWERTOP", ratio=0.1)
    with tower_attention(model.model.visual, attn):
        llm_inputs(model, inputs)
    tokens, vision, adaptive = plugins[-1]
    head_attention, keys, head_keys, features = tower_truth(model, inputs["pixel_values"], inputs["image_grid_thw"])
    assert adaptive is False
    assert tokens.shape[0] == features.shape[0] == head_attention.shape[1]
    torch.testing.assert_close(vision.head_attention, head_attention)
    torch.testing.assert_close(vision.cls_attention, head_attention.mean(0))
    torch.testing.assert_close(vision.keys, keys)
    torch.testing.assert_close(vision.head_keys, head_keys)
    torch.testing.assert_close(vision.features, features)
    assert vision.cls_feature is None and vision.patches is None
    # Each patch's received attention is a mean of softmax rows over its frame: they sum to 1 per head.
    torch.testing.assert_close(vision.head_attention.sum(1) * 4, torch.ones(head_attention.shape[0]))


@pytest.mark.parametrize("variant", ["qwen2.5-vl", "qwen3-vl"])
def test_a_video_gets_a_context_per_frame_over_that_frames_queries(models, plugins, variant):  # noqa: F811
    processor, model = models[variant]
    inputs = qwen_video_inputs(processor, model, (3, 8, 12), seed=7)
    patches.prune(model, "TOWERTOP", ratio=0.25)
    llm_inputs(model, inputs)
    head_attention, keys, head_keys, features = tower_truth(model, inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert len(plugins) == 3
    for frame, (tokens, vision, _) in enumerate(plugins):
        rows = slice(frame * 24, (frame + 1) * 24)
        assert tokens.shape[0] == 24
        torch.testing.assert_close(vision.head_attention, head_attention[:, rows])
        torch.testing.assert_close(vision.keys, keys[rows])
        torch.testing.assert_close(vision.head_keys, head_keys[rows])
        torch.testing.assert_close(vision.features, features[rows])
        torch.testing.assert_close(vision.head_attention.sum(1) * 4, torch.ones(head_attention.shape[0]))


def test_a_batch_of_two_prompts_gives_each_image_its_own_context(models, plugins, monkeypatch):  # noqa: F811
    """Two prompts, images of different sizes, left padding (Qwen2.5-VL, its window reordering
    over several images): each image's context is the one it gets alone, also with the scores
    formed a few query rows at a time."""
    processor, model = models["qwen2.5-vl"]
    patches.prune(model, "TOWERTOP", ratio=0.1)
    images = [[make_image(500, 300, 1), make_image(200, 420, 2)], [make_image(320, 320, 3)]]
    questions = ["Which differs?", "Is there a car?"]
    alone = []
    for question, image in zip(questions, [[i] for row in images for i in row]):
        llm_inputs(model, inputs_for(processor, [question], [image]))
        alone.append(plugins[-1][1])
    del plugins[:]
    monkeypatch.setattr(vision_without_cls, "_SCORE_ELEMENTS", 200)
    llm_inputs(model, inputs_for(processor, ["Which differs?", "Is there a car?"], images))
    assert len(plugins) == 3
    for (_, vision, _), expected in zip(plugins, alone):
        for name in ("features", "cls_attention", "keys", "head_attention", "head_keys"):
            torch.testing.assert_close(getattr(vision, name), getattr(expected, name), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["qwen2.5-vl", "qwen3-vl"])
def test_a_merger_before_the_projector_gives_the_llm_the_merger_mlp_of_its_features(models, plugins, variant):  # noqa: F811
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 4)]])
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    unpruned = llm_inputs(model, inputs)[0]
    *_, features = tower_truth(model, inputs["pixel_values"], inputs["image_grid_thw"])
    n, k = features.shape[0], 8
    patches.prune(model, "FEATUREWINDOWS", ratio=k / n)
    got = llm_inputs(model, inputs)[0]
    assert plugins[-1][0].shape == features.shape, "the merger was not given the merger's features"
    parts = torch.arange(n).tensor_split(k)
    expected = merger_mlp(model.model.visual.merger, torch.stack([features[p].mean(0) for p in parts]))
    torch.testing.assert_close(got[start : start + k], expected, rtol=1e-4, atol=1e-5)
    assert got.shape[0] == unpruned.shape[0] - n + k
    torch.testing.assert_close(got[start + k :], unpruned[start + n :])


VISION_METHODS = ["PRUMERGE", "PRUMERGE_PLUS", "DIVPRUNE_ADAPTIVE", "VISIONZIP", "FASTERVLM"]


def onevision_crops(inputs):
    """Every crop OneVision's tower sees, in order: each image's crops (zero-padded to the most),
    or its base crop alone where its prompt holds several images (``batch_num_images``)."""
    tiled = [n == 1 for n in inputs["batch_num_images"].tolist() for _ in range(n)]
    return torch.cat([image[image.flatten(1).abs().sum(1) > 0] if tile else image[:1] for image, tile in zip(inputs["pixel_values"], tiled)])


def onevision_truth(model, inputs):
    """The SigLIP tower alone, eager, on every crop the model sees: per crop row, what its patches'
    context rows should be: the mean attention each patch receives over its crop's queries, per
    head (``(R, H, P)``), its head mean, the last block's keys from its own modules, and the
    features the projector gets."""
    tower = model.model.vision_tower
    crops = onevision_crops(inputs)
    assert model.config.vision_feature_layer == -1, "the truth below reads the last block"
    with tower_attention(tower, "eager"), torch.no_grad():
        out = tower(crops, output_hidden_states=True, output_attentions=True)
        last = encoder_layers(tower)[-1]
        keys = last.self_attn.k_proj(last.layer_norm1(out.hidden_states[-2]))
    head_attention = out.attentions[-1].mean(2)
    rows, positions, _ = keys.shape
    return {
        "features": out.hidden_states[-1],
        "cls_attention": head_attention.mean(1),
        "keys": keys,
        "head_keys": keys.view(rows, positions, tower.config.num_attention_heads, -1).mean(2),
        "head_attention": head_attention,
    }


def onevision_parts(model):
    """What ``test_vision_context.traced_sources`` reads of a model: its projector and newline vector."""
    return SimpleNamespace(projector=model.model.multi_modal_projector, newline=model.model.image_newline)


@pytest.fixture
def aligned(monkeypatch):
    """Each list of image contexts the OneVision patch aligns, as it hands it to the selection."""
    seen = []

    def record(*args, align=patches.vlm.aligned_contexts):
        seen.append(align(*args))
        return seen[-1]

    monkeypatch.setattr(patches.vlm, "aligned_contexts", record)
    return seen


def check_onevision_context(vision, sources, truth):
    """``vision`` holds, at each patch token, its crop patch's truth; zeros at the newline tokens."""
    patch = sources >= 0
    at = sources[patch]
    assert torch.equal(vision.patches.cpu(), patch)
    for name in ("features", "cls_attention", "keys", "head_keys"):
        torch.testing.assert_close(getattr(vision, name)[patch], truth[name].flatten(0, 1)[at])
        assert not getattr(vision, name)[~patch].any(), f"{name} is not zero at the newline tokens"
    head_attention = truth["head_attention"].transpose(0, 1).flatten(1)
    torch.testing.assert_close(vision.head_attention[:, patch], head_attention[:, at])
    assert not vision.head_attention[:, ~patch].any()
    assert vision.cls_feature is None


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_on_onevision_each_token_gets_its_siglip_crop_patchs_received_attention(models, plugins, aligned, attn):  # noqa: F811
    """A wide image (500 x 300): its base crop and four tiles, the tiles' grid unpadded to fewer
    rows, a newline vector ending each; SigLIP has no [CLS]: a patch's score is the attention it
    receives from its crop's queries."""
    processor, model = models["llava-onevision"]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 6)]])
    truth = onevision_truth(model, inputs)
    patches.prune(model, None)
    with tower_attention(model.model.vision_tower, "eager"):
        (sources,) = traced_sources(onevision_parts(model), llm_inputs(model, inputs)[0], truth)
    patch = sources >= 0
    crops, positions = truth["features"].shape[:2]
    assert crops == 5 and 0 < int((~patch).sum()) and int(patch.sum()) < crops * positions, "no unpadding to test"
    patches.prune(model, "TOWERTOP", ratio=0.1)
    with tower_attention(model.model.vision_tower, attn):
        llm_inputs(model, inputs)
    ((vision,),) = aligned
    check_onevision_context(vision, sources, truth)
    # The method is given the patch tokens alone, and their rows.
    tokens, given, adaptive = plugins[-1]
    assert adaptive is False and tokens.shape[0] == given.features.shape[0] == int(patch.sum())
    torch.testing.assert_close(given.head_attention, vision.head_attention[:, patch])
    torch.testing.assert_close(given.keys, vision.keys[patch])
    # Each crop's received attention is a mean of softmax rows over that crop: it sums to 1 per head.
    torch.testing.assert_close(truth["head_attention"].sum(-1), torch.ones(crops, truth["head_attention"].shape[1]))


@pytest.mark.parametrize("nested", [False, True])
def test_on_onevision_a_prompt_of_two_images_gives_each_its_own_crops(models, plugins, aligned, nested):  # noqa: F811
    """Two images in one prompt: given as one list (``batch_num_images`` 1 each), each is tiled;
    given as the prompt's list of two (``batch_num_images`` 2), OneVision gives each its base crop
    alone and one newline vector."""
    processor, model = models["llava-onevision"]
    images = [make_image(500, 300, 7), make_image(200, 420, 8)]
    content = [{"type": "image"}] * 2 + [{"type": "text", "text": "Which differs?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[images] if nested else images, text=[prompt], return_tensors="pt")
    truth = onevision_truth(model, inputs)
    patches.prune(model, None)
    with tower_attention(model.model.vision_tower, "eager"):
        traced = traced_sources(onevision_parts(model), llm_inputs(model, inputs)[0], truth)
    assert truth["features"].shape[0] == (2 if nested else 9)
    assert len(traced) == 2 and (not nested or [int((s < 0).sum()) for s in traced] == [1, 1])
    patches.prune(model, "TOWERTOP", ratio=0.25)  # k leaves patches beside the tiled image's 8 newline vectors
    llm_inputs(model, inputs)
    (contexts,) = aligned
    assert len(contexts) == 2
    for vision, sources in zip(contexts, traced):
        check_onevision_context(vision, sources, truth)


def test_a_merger_before_onevisions_projector_gives_the_llm_the_projector_of_its_features(models, plugins):  # noqa: F811
    """The merger gets the patch tokens' SigLIP features alone; the LLM gets its merged features
    through OneVision's ``multi_modal_projector``, and the newline vectors as they were."""
    processor, model = models["llava-onevision"]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 12)]])
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    truth = onevision_truth(model, inputs)
    patches.prune(model, None)
    with tower_attention(model.model.vision_tower, "eager"):
        unpruned = llm_inputs(model, inputs)[0]
    (sources,) = traced_sources(onevision_parts(model), unpruned, truth)
    patch = sources >= 0
    n, newlines = sources.numel(), int((~patch).sum())
    patches.prune(model, "FEATUREWINDOWS", ratio=(newlines + 8) / n)
    got = llm_inputs(model, inputs)[0]
    features = truth["features"].flatten(0, 1)[sources[patch]]
    torch.testing.assert_close(plugins[-1][0], features, msg="the merger was not given the patch tokens' features")
    kept = got.shape[0] - (unpruned.shape[0] - n)
    image = got[start : start + kept]
    is_newline = (image == model.model.image_newline).all(-1)
    assert int(is_newline.sum()) == newlines
    parts = torch.arange(features.shape[0]).tensor_split(kept - newlines)
    with torch.no_grad():
        expected = model.model.multi_modal_projector(torch.stack([features[p].mean(0) for p in parts]))
    torch.testing.assert_close(image[~is_newline], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[start + kept :], unpruned[start + n :])


@pytest.mark.parametrize("variant, seed", [("qwen2.5-vl", 5), ("llava-onevision", 9)])
@pytest.mark.parametrize("method", VISION_METHODS)
def test_each_bundled_vision_method_prunes_keeping_the_text_and_every_newline(models, method, variant, seed, caplog):
    """At SUBSET_RATIO = 0.098 at most budget(0.098, N) tokens reach the LLM (adaptive: at most N,
    the count it chose logged), its text unchanged, every newline vector among them (OneVision's)."""
    processor, model = models[variant]
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, seed)]])
    placeholders = inputs["input_ids"][0] == model.config.image_token_id
    start, n = int(placeholders.nonzero()[0]), int(placeholders.sum())
    unpruned = llm_inputs(model, inputs)[0]
    newline = getattr(model.model, "image_newline", None)

    def newlines(embeds):
        return 0 if newline is None else int((embeds == newline.to(embeds)).all(-1).sum())

    assert (newlines(unpruned) > 0) == (newline is not None)
    ratios = [0.098, None] if "adaptive" in otprune.methods.get_method(method).context else [0.098]
    for ratio in ratios:
        caplog.clear()
        patches.prune(model, method, ratio=ratio, log=True)
        with caplog.at_level(logging.INFO, logger="otprune"):
            got = llm_inputs(model, inputs)[0]
        kept = got.shape[0] - (unpruned.shape[0] - n)
        assert newlines(unpruned) < kept <= (budget(0.098, n) if ratio else n)
        assert f"{n}->{kept}" in caplog.text
        assert newlines(got[start : start + kept]) == newlines(unpruned)
        torch.testing.assert_close(got[:start], unpruned[:start])
        torch.testing.assert_close(got[start + kept :], unpruned[start + n :])


def test_onevision_refuses_an_image_its_anyres_max_cap_downsamples_naming_why(models, plugins, monkeypatch):  # noqa: F811
    """Past the cap (here anyres_max_1: one tile's patches) OneVision blends the tiles' features
    bilinearly: no tower patch stands for a token."""
    processor, model = models["llava-onevision"]
    monkeypatch.setattr(model.config, "vision_aspect_ratio", "anyres_max_1")
    monkeypatch.setattr(processor, "vision_aspect_ratio", "anyres_max_1")
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 10)]])
    patches.prune(model, None)
    llm_inputs(model, inputs)
    patches.prune(model, "TOWERTOP", ratio=0.1)
    message = r"BASELINE=TOWERTOP needs the vision tower's view, .* an image of 500 x 300 px: .* downsampled by OneVision's anyres_max cap"
    with pytest.raises(ValueError, match=message):
        llm_inputs(model, inputs)
    assert not plugins


def test_onevision_refuses_the_vision_context_of_a_video_naming_why(models, plugins):  # noqa: F811
    processor, model = models["llava-onevision"]
    frames = 2
    content = [{"type": "video"}, {"type": "text", "text": "What is in the video?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    pixels = torch.randn(1, frames, 3, 56, 56, generator=torch.Generator().manual_seed(11))
    per_frame = model.model.get_video_features(pixels, return_dict=True).pooler_output.shape[1] // frames
    inputs = {**processor.tokenizer(prompt.replace("<video>", "<video>" * (frames * per_frame + 1)), return_tensors="pt"), "pixel_values_videos": pixels}
    patches.prune(model, "TOWERTOP", ratio=0.1)
    with pytest.raises(ValueError, match="LLaVA-OneVision does not give for videos: each frame's projected features are pooled bilinearly"):
        llm_inputs(model, inputs)
