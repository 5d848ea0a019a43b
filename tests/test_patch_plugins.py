"""Outside plugins (selectors and mergers registered by entry point) running through every patch.

The plugins are a module written in ``tmp_path`` with a ``*.dist-info`` folder beside it, which
``importlib.metadata`` finds on ``sys.path``: no pip. Each test compares what the model does
with a plugin against an independent truth: the same model pruned by an equivalent built-in, the
unpruned model's own inputs cut or merged by hand, or the unpruned model fed those inputs.
"""

import functools
import logging
import re

import pytest
import torch

pytest.importorskip("transformers")

from conftest import installed_plugins, tiny_vlms  # noqa: E402
from PIL import Image  # noqa: E402

import otprune.methods  # noqa: E402
import otprune.patches as patches  # noqa: E402
from otprune.contract import PatchGrid  # noqa: E402
from otprune.selection import PluginFault  # noqa: E402
from otprune.selectors import budget  # noqa: E402

RATIO = 0.098
PLUGIN_MODULE = "otprune_test_plugins"
PLUGIN_SOURCE = '''
import torch

SEEN = []


def select_norm(tokens, k):
    """The k tokens of largest L2 norm, sorted."""
    order = tokens.float().norm(dim=-1).argsort(descending=True, stable=True)
    return order[:k].sort().values


def select_uniform_copy(tokens, k):
    """The built-in UNIFORM's indices, written anew."""
    n = tokens.shape[0]
    return torch.linspace(0, n - 1, k, dtype=torch.float64).round().long().to(tokens.device)


def select_recording(tokens, k, *, text, grid, layer_index):
    SEEN.append(dict(tokens=tokens.clone(), k=k, text=text.clone(), grid=grid, layer_index=layer_index))
    return torch.arange(k, device=tokens.device)


def select_recording_attention(tokens, k, *, text, grid, layer_index, attention):
    SEEN.append(dict(tokens=tokens.clone(), k=k, text=text.clone(), grid=grid, layer_index=layer_index, attention=attention.clone()))
    return torch.arange(k, device=tokens.device)


def select_normalising_in_place(tokens, k):
    """A common slip: normalising the tokens it was handed, in place."""
    tokens /= tokens.norm(dim=-1, keepdim=True)
    return torch.arange(k, device=tokens.device)


def select_writing_the_question(tokens, k, *, text):
    text.zero_()
    return torch.arange(k, device=tokens.device)


def merge_windows(tokens, k):
    """k windows along the token axis (torch.tensor_split), each merged into its mean, placed at its centre."""
    windows = torch.arange(tokens.shape[0], device=tokens.device).tensor_split(k)
    merged = torch.stack([tokens[w].mean(0) for w in windows])
    positions = torch.tensor([(int(w[0]) + int(w[-1])) // 2 for w in windows], dtype=torch.long, device=tokens.device)
    return merged, positions


def select_unsorted(tokens, k):
    return torch.arange(k, device=tokens.device).flip(0)


BATCHED = []


def select_uniform_batch(tokens, k):
    """UNIFORMCOPY for one image (N, d) or for a batch (B, N, d) of images sharing k."""
    BATCHED.append(tuple(tokens.shape))
    n = tokens.shape[-2]
    indices = torch.linspace(0, n - 1, k, dtype=torch.float64).round().long().to(tokens.device)
    return indices.expand(*tokens.shape[:-2], k).clone()


select_uniform_batch.accepts_batches = True


def select_needing_grid(tokens, k, *, grid):
    return torch.arange(k, device=tokens.device)


UNEVEN = []


def merge_uneven(tokens, k):
    """WINDOWS, but every second image it merges (the second of a batch of two) gets one window fewer."""
    UNEVEN.append(tokens.shape[0])
    return merge_windows(tokens, k if len(UNEVEN) % 2 else k - 1)
'''
ENTRY_POINTS = """[otprune.selectors]
NORM = otprune_test_plugins:select_norm
UNIFORMCOPY = otprune_test_plugins:select_uniform_copy
RECORD = otprune_test_plugins:select_recording
RECORDATT = otprune_test_plugins:select_recording_attention
UNSORTED = otprune_test_plugins:select_unsorted
UNIFORMBATCH = otprune_test_plugins:select_uniform_batch
GRIDONLY = otprune_test_plugins:select_needing_grid
INPLACE = otprune_test_plugins:select_normalising_in_place
TEXTWRITER = otprune_test_plugins:select_writing_the_question

[otprune.mergers]
WINDOWS = otprune_test_plugins:merge_windows
UNEVEN = otprune_test_plugins:merge_uneven
"""


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The test plugins, installed for one test; returns their module's namespace (``SEEN``: what RECORD got)."""
    for module in installed_plugins(tmp_path, monkeypatch, PLUGIN_MODULE, PLUGIN_SOURCE, ENTRY_POINTS, "RECORD"):
        yield vars(module)


def windows(tokens, k):
    """What WINDOWS returns, computed here: ``(merged, positions)``."""
    parts = torch.arange(tokens.shape[0]).tensor_split(k)
    merged = torch.stack([tokens[p].mean(0) for p in parts])
    return merged, torch.tensor([(int(p[0]) + int(p[-1])) // 2 for p in parts])


def top_norm(tokens, k):
    return tokens.float().norm(dim=-1).argsort(descending=True, stable=True)[:k].sort().values


def make_image(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


# -- the three families, behind one interface ------------------------------------------------------

LOADED = []


class Family:
    """One tiny model with one prompt of one image (``image`` seeds it)."""

    def __init__(self, name, model, inputs, start, n):
        self.name, self.model, self.inputs, self.start, self.n = name, model, inputs, start, n

    @property
    def decoder(self):
        return patches._decoder(self.model)

    def forward(self, **extra):
        with torch.no_grad():
            return self.model(**self.inputs, **extra)

    def generate(self, tokens=4):
        with torch.no_grad():
            return self.model.generate(**self.generate_inputs(), max_new_tokens=tokens, do_sample=False)

    def generate_inputs(self):
        return self.inputs

    def llm_call(self):
        """The keyword arguments the decoder stack gets on the prefill."""
        seen = []
        handle = self.decoder.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
        try:
            self.forward()
        finally:
            handle.remove()
        return seen[0]

    def layer_inputs(self, index):
        """What decoder layer ``index``'s attention gets on the prefill (after any cut there):
        ``(hidden (L, d) after its input norm's input, cos (L, r), sin (L, r))``."""
        layer = self.decoder.layers[index]
        seen = {}

        def norm_input(module, args):
            seen.setdefault("hidden", args[0][0].clone())

        def attention_input(module, args, kwargs):
            cos, sin = kwargs["position_embeddings"]
            seen.setdefault("cos", cos[0].clone())
            seen.setdefault("sin", sin[0].clone())

        handles = [
            layer.input_layernorm.register_forward_pre_hook(norm_input),
            layer.self_attn.register_forward_pre_hook(attention_input, with_kwargs=True),
        ]
        try:
            self.forward()
        finally:
            for handle in handles:
                handle.remove()
        return seen["hidden"], seen["cos"], seen["sin"]

    def text_embeddings(self):
        """The embedded tokens of the question after the image (the ``text`` context at K = 0)."""
        raise NotImplementedError

    def logits_of(self, embeds, **extra):
        """The unpruned model's logits for ``embeds`` ``(L, d)`` given as the LLM's input."""
        config = getattr(self.model, "_otprune_config", None)
        self.model._otprune_config = None
        try:
            with torch.no_grad():
                return self.model(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long), **extra).logits[0]
        finally:
            self.model._otprune_config = config


class OriginalLlava(Family):
    def __init__(self, name, tokenizer, model, processor, prompt, image):
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images, tokenizer_image_token

        ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        pixel = process_images([image], processor, model.config)
        pixel = [p.float() for p in pixel] if isinstance(pixel, list) else pixel.float()
        inputs = dict(input_ids=ids, images=pixel, image_sizes=[image.size], attention_mask=torch.ones_like(ids))
        self.ids = ids[0]
        super().__init__(name, model, inputs, int((self.ids == IMAGE_TOKEN_INDEX).nonzero()[0]), None)
        with torch.no_grad():
            full = self.model.prepare_inputs_labels_for_multimodal(ids, None, inputs["attention_mask"], None, None, pixel, [image.size])[4]
        self.n = full.shape[1] - (ids.shape[1] - 1)
        self.question_start = self.start + self.n

    def generate_inputs(self):
        # LLaVA's own generate takes the prompt as ``inputs``.
        inputs = dict(self.inputs)
        inputs["inputs"] = inputs.pop("input_ids")
        return inputs

    def text_embeddings(self):
        return self.model.get_model().embed_tokens(self.ids[self.start + 1 :])


class HfModel(Family):
    def __init__(self, name, processor, model, question, image):
        content = [{"type": "image"}, {"type": "text", "text": question}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        placeholders = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
        super().__init__(name, model, dict(inputs), int(placeholders[0]), placeholders.numel())
        # Qwen frames an image with vision start and end tokens: the question begins after the end.
        after = int(inputs["input_ids"][0, self.start + self.n])
        self.question_start = self.start + self.n + int(after == getattr(model.config, "vision_end_token_id", None))

    def text_embeddings(self):
        with torch.no_grad():
            return self.model.get_input_embeddings()(self.inputs["input_ids"][0, self.question_start :])


PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def original_models(tiny_checkpoints):
    from llava.model.builder import load_pretrained_model

    loaded = {}
    for variant, path in tiny_checkpoints.items():
        tokenizer, model, processor, _ = load_pretrained_model(str(path), None, path.name, device="cpu", device_map="cpu")
        model.float().eval()
        loaded[variant] = (tokenizer, model, processor)
        LOADED.append(model)
    return loaded


@pytest.fixture(scope="module")
def hf_models(tiny_hf_checkpoints):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded = {}
    for variant, path in tiny_hf_checkpoints.items():
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        loaded[variant] = (processor, model)
        LOADED.append(model)
    return loaded


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory):
    ((processor, model),) = tiny_vlms(tmp_path_factory.mktemp("qwen_checkpoints"), ["qwen2.5-vl"]).values()
    LOADED.append(model)
    return processor, model


OTHER_FAMILIES = ["qwen2-vl", "qwen3-vl", "llava-onevision"]


@pytest.fixture(scope="module")
def vlm_models(tmp_path_factory):
    """The tiny Qwen2-VL, Qwen3-VL and LLaVA-OneVision: ``{variant: (processor, model)}``."""
    loaded = tiny_vlms(tmp_path_factory.mktemp("vlm_checkpoints"), OTHER_FAMILIES)
    LOADED.extend(model for _, model in loaded.values())
    return loaded


def reset(model):
    model._otprune_config = None
    pruner = model.__dict__.pop("_otprune_layer_pruner", None)
    if pruner is not None:
        pruner.remove()


@pytest.fixture(autouse=True)
def unpruned():
    """Every model starts and ends the test unpruned and without layer hooks."""
    for model in LOADED:
        reset(model)
    yield
    for model in LOADED:
        reset(model)


def family(request, name, image_seed=0):
    """The family ``name`` with a fresh prompt (its models loaded once per module)."""
    image = make_image(500, 300, image_seed)
    if name in ("llava-1.5", "llava-1.6"):
        tokenizer, model, processor = request.getfixturevalue("original_models")[name]
        return OriginalLlava(name, tokenizer, model, processor, PROMPT, image)
    if name in ("llava-hf", "llava-next-hf"):
        processor, model = request.getfixturevalue("hf_models")[name]
        return HfModel(name, processor, model, QUESTION, image)
    if name in OTHER_FAMILIES:
        processor, model = request.getfixturevalue("vlm_models")[name]
        return HfModel(name, processor, model, QUESTION, image)
    processor, model = request.getfixturevalue("qwen_model")
    return HfModel(name, processor, model, QUESTION, image)


FAMILIES = ["llava-1.5", "llava-hf", "qwen2.5-vl"]


def full_llm_input(fam):
    """The unpruned LLM input ``(L, d)`` and its position ids (``None`` where the model makes them)."""
    call = fam.llm_call()
    return call["inputs_embeds"][0].clone(), call.get("position_ids")


def first_layer_rotary(fam):
    _, cos, sin = fam.layer_inputs(0)
    return cos, sin


# -- 1. an outside selector prunes as the built-ins do -------------------------------------------


@pytest.mark.parametrize("layer_index", [0, 2])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_plugin_copying_uniform_prunes_exactly_as_the_built_in(request, plugins, name, layer_index, caplog):
    check_copy_of_uniform(family(request, name, image_seed=1), layer_index, caplog)


# Qwen3-VL at K = 1, as its family tests: DeepStack's second level is then added after the cut.
@pytest.mark.parametrize(
    "name, layer_index", [("qwen2-vl", 0), ("qwen2-vl", 2), ("qwen3-vl", 0), ("qwen3-vl", 1), ("llava-onevision", 0), ("llava-onevision", 2)]
)
def test_a_plugin_copying_uniform_prunes_the_other_families_exactly_as_the_built_in(request, plugins, name, layer_index, caplog):
    check_copy_of_uniform(family(request, name, image_seed=1), layer_index, caplog)


def check_copy_of_uniform(fam, layer_index, caplog):
    """UNIFORMCOPY gives ``fam`` the logits and tokens UNIFORM gives, and logs the same counts."""
    patches.prune(fam.model, "UNIFORM", RATIO, layer_index=layer_index)
    expected_logits = fam.forward().logits
    expected_tokens = fam.generate()
    caplog.set_level(logging.INFO, logger="otprune")
    patches.prune(fam.model, "uniformcopy", RATIO, layer_index=layer_index, log=True)
    logits = fam.forward().logits
    assert torch.equal(logits, expected_logits)
    assert fam.generate().tolist() == expected_tokens.tolist()
    k = budget(RATIO, fam.n)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("otprune UNIFORMCOPY: visual tokens")]
    assert lines and all(f"visual tokens {fam.n}->{k};" in line for line in lines)
    if layer_index == 0:
        assert logits.shape[1] == fam.llm_call()["inputs_embeds"].shape[1]
        fam.model._otprune_config = None
        assert logits.shape[1] == fam.llm_call()["inputs_embeds"].shape[1] - fam.n + k


@pytest.mark.parametrize("name", FAMILIES)
def test_a_norm_plugin_at_k0_gives_the_llm_the_text_and_its_picks(request, plugins, name):
    fam = family(request, name, image_seed=2)
    full, full_positions = full_llm_input(fam)
    start, n = fam.start, fam.n
    k = budget(RATIO, n)
    picks = top_norm(full[start : start + n], k)
    keep = torch.cat([torch.arange(start), start + picks, torch.arange(start + n, full.shape[0])])
    patches.prune(fam.model, "NORM", RATIO)
    call = fam.llm_call()
    assert call["inputs_embeds"].shape[1] == full.shape[0] - n + k
    assert torch.equal(call["inputs_embeds"][0], full[keep])
    if name == "qwen2.5-vl":
        # The kept tokens keep the unpruned 3-D positions.
        assert torch.equal(call["position_ids"][..., 0, :], full_positions[..., 0, keep])
    # Independent truth: the unpruned model given those embeddings (at those positions) predicts alike.
    extra = {"position_ids": full_positions[..., keep]} if name == "qwen2.5-vl" else {}
    assert torch.allclose(fam.forward().logits[0], fam.logits_of(full[keep], **extra), atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_norm_plugin_at_k2_keeps_the_largest_layer_2_hidden_states(request, plugins, name):
    fam = family(request, name, image_seed=3)
    hidden, cos, sin = fam.layer_inputs(2)
    start, n = fam.start, fam.n
    k = budget(RATIO, n)
    keep = torch.cat([torch.arange(start), start + top_norm(hidden[start : start + n], k), torch.arange(start + n, hidden.shape[0])])
    patches.prune(fam.model, "NORM", RATIO, layer_index=2)
    pruned_hidden, pruned_cos, pruned_sin = fam.layer_inputs(2)
    assert torch.equal(fam.model._otprune_layer_pruner.state.kept[0], keep)
    assert torch.equal(pruned_hidden, hidden[keep])
    assert torch.equal(pruned_cos, cos[keep]) and torch.equal(pruned_sin, sin[keep])
    assert fam.forward().logits.shape[1] == hidden.shape[0]  # logits keep the caller's length
    assert fam.generate().shape[1] > 0


# -- 2. the context a plugin gets ---------------------------------------------------------------


def expected_grid(fam):
    if fam.name.startswith("qwen"):
        t, h, w = fam.inputs["image_grid_thw"][0].tolist()
        merge = fam.model.config.vision_config.spatial_merge_size
        return (PatchGrid(0, h // merge, w // merge),)
    side = 336 // 14
    return (PatchGrid(0, side, side),)


@pytest.mark.parametrize("name", [*FAMILIES, "qwen2-vl", "qwen3-vl"])
def test_a_plugin_gets_its_context_before_the_llm(request, plugins, name):
    fam = family(request, name, image_seed=4)
    full, _ = full_llm_input(fam)
    patches.prune(fam.model, "RECORD", RATIO)
    fam.forward()
    (seen,) = plugins["SEEN"]
    assert seen["layer_index"] == 0 and seen["k"] == budget(RATIO, fam.n)
    assert torch.equal(seen["tokens"], full[fam.start : fam.start + fam.n])
    assert seen["grid"] == expected_grid(fam)
    if name.startswith("qwen"):
        assert seen["grid"][0].rows * seen["grid"][0].cols == fam.n
    assert torch.equal(seen["text"], fam.text_embeddings())
    assert torch.equal(seen["text"], full[fam.question_start :])


def eager_last_token_attention(fam, layer):
    """The unpruned model's eager attention weights of layer ``layer``, last prompt token over the
    image, mean over heads."""
    weights = []
    attention = fam.decoder.layers[layer].self_attn
    handle = attention.register_forward_hook(lambda m, a, out: weights.append(out[1]))
    fam.model.set_attn_implementation("eager")
    try:
        fam.forward()
    finally:
        handle.remove()
        fam.model.set_attn_implementation("sdpa")
    return weights[0][0, :, -1, fam.start : fam.start + fam.n].mean(0)


@pytest.mark.parametrize("name", [*FAMILIES, "qwen2-vl", "qwen3-vl"])
def test_a_plugin_gets_its_context_inside_the_llm(request, plugins, name):
    fam = family(request, name, image_seed=5)
    hidden, _, _ = fam.layer_inputs(2)
    attention = eager_last_token_attention(fam, 1)
    patches.prune(fam.model, "RECORDATT", RATIO, layer_index=2)
    fam.forward()
    (seen,) = plugins["SEEN"]
    assert seen["layer_index"] == 2
    assert torch.equal(seen["tokens"], hidden[fam.start : fam.start + fam.n])
    assert seen["grid"] == expected_grid(fam)
    # The question's hidden states entering layer K, as the image's tokens are.
    assert torch.equal(seen["text"], hidden[fam.question_start :])
    got = seen["attention"]
    assert got.shape == (fam.n,) and bool((got >= 0).all()) and float(got.sum()) <= 1 + 1e-6
    assert torch.allclose(got, attention, atol=1e-5)


@pytest.mark.parametrize("name", ["llava-1.6", "llava-next-hf"])
def test_a_next_image_grid_is_the_base_grid_then_a_newline_grid(request, plugins, name):
    fam = family(request, name, image_seed=6)
    newline = fam.model.get_model().image_newline if name == "llava-1.6" else fam.model.model.image_newline
    check_base_then_newline_grid(fam, plugins, 24, newline)


def test_a_onevision_image_grid_is_the_base_grid_then_a_newline_grid(request, plugins):
    fam = family(request, "llava-onevision", image_seed=6)
    vision = fam.model.config.vision_config
    check_base_then_newline_grid(fam, plugins, vision.image_size // vision.patch_size, fam.model.model.image_newline)


def check_base_then_newline_grid(fam, plugins, side, newline):
    """RECORD gets ``fam``'s any-resolution image as its ``side x side`` base grid, then the tiles'
    grid whose newline positions hold ``newline`` exactly, the same before and inside the LLM."""
    base_size = side * side
    full, _ = full_llm_input(fam)
    patches.prune(fam.model, "RECORD", RATIO)
    fam.forward()
    (seen,) = plugins["SEEN"]
    tokens, grid = seen["tokens"], seen["grid"]
    assert tokens.shape[0] == fam.n > base_size
    assert torch.equal(tokens, full[fam.start : fam.start + fam.n])
    base, tiles = grid
    assert base == PatchGrid(0, side, side)
    assert tiles.start == base_size and tiles.newlines and tiles.size == fam.n - base_size and tiles.rows > 1 and tiles.cols > 1
    cells, rows = tiles.cell_positions().flatten(), tiles.newline_positions()
    assert torch.equal(torch.cat([cells, rows]).sort().values, torch.arange(base_size, fam.n))
    # The newline positions hold the model's newline vector exactly, and no patch does.
    assert bool((tokens[rows] == newline).all())
    assert not bool((tokens[cells] == newline).all(-1).any())
    assert not bool((tokens[:base_size] == newline).all(-1).any())
    # Inside the LLM the grid is the same: it is told from the tokens entering the LLM.
    plugins["SEEN"].clear()
    patches.prune(fam.model, "RECORD", RATIO, layer_index=2)
    fam.forward()
    (inside,) = plugins["SEEN"]
    assert inside["grid"] == grid and inside["layer_index"] == 2


def test_each_image_of_a_onevision_multi_image_prompt_is_its_base_grid_and_a_lone_newline(request, plugins):
    # Several images in one prompt: transformers gives each its base tile only, then one newline.
    processor, model = request.getfixturevalue("vlm_models")["llava-onevision"]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[[make_image(500, 300, 30), make_image(200, 420, 31)]], text=[prompt], return_tensors="pt")
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    placeholders = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    assert placeholders.numel() == 2 * (side * side + 1)
    fam = Family("llava-onevision", model, dict(inputs), int(placeholders[0]), placeholders.numel())
    full, _ = full_llm_input(fam)
    grids = []
    for layer_index in (0, 2):
        plugins["SEEN"].clear()
        patches.prune(model, "RECORD", RATIO, layer_index=layer_index)
        fam.forward()
        assert len(plugins["SEEN"]) == 2
        for image, seen in zip(placeholders.view(2, -1), plugins["SEEN"]):
            tokens = seen["tokens"]
            if layer_index == 0:
                assert torch.equal(tokens, full[image])
                # The lone newline token ends the image and belongs to no grid; no patch is a newline.
                assert torch.equal(tokens[-1], model.model.image_newline)
                assert not bool((tokens[:-1] == model.model.image_newline).all(-1).any())
            assert tokens.shape[0] == side * side + 1
            grids.append(seen["grid"])
    assert grids == [(PatchGrid(0, side, side),)] * 4


TWO_IMAGES_TAIL = "\nWhat is in the image? ASSISTANT:"


def two_images_then_question(request, name):
    """``name`` with a prompt of two images, then the question ``TWO_IMAGES_TAIL`` (no chat
    template: the text after the last image is exactly that string), and the question tokenised
    on its own."""
    images = [make_image(500, 300, 33), make_image(300, 500, 34)]
    if name == "llava-1.5":
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import tokenizer_image_token

        tokenizer, model, processor = request.getfixturevalue("original_models")[name]
        prompt = "USER: <image>\n<image>" + TWO_IMAGES_TAIL
        ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        pixel = torch.stack([processor.preprocess(im, return_tensors="pt")["pixel_values"][0] for im in images])
        inputs = dict(input_ids=ids, images=pixel, image_sizes=[im.size for im in images], attention_mask=torch.ones_like(ids))
        question = tokenizer(TWO_IMAGES_TAIL, add_special_tokens=False).input_ids
        return Family(name, model, inputs, None, None), torch.tensor(question), model.get_model().embed_tokens
    processor, model = request.getfixturevalue("qwen_model") if name == "qwen2.5-vl" else request.getfixturevalue("hf_models")[name]
    image = "<|vision_start|><|image_pad|><|vision_end|>" if name == "qwen2.5-vl" else "<image>"
    inputs = processor(images=images, text=["USER: " + image + "\n" + image + TWO_IMAGES_TAIL], return_tensors="pt")
    question = processor.tokenizer(TWO_IMAGES_TAIL, add_special_tokens=False).input_ids
    return Family(name, model, dict(inputs), None, None), torch.tensor(question), model.get_input_embeddings()


@pytest.mark.parametrize("name", ["llava-1.5", "llava-hf", "qwen2.5-vl"])
def test_every_image_of_a_prompt_gets_the_question_after_its_last_image(request, plugins, name):
    fam, question, embed = two_images_then_question(request, name)
    if name != "llava-1.5":
        assert fam.inputs["input_ids"][0, -question.numel() :].tolist() == question.tolist()
    patches.prune(fam.model, "RECORD", RATIO)
    fam.forward()
    assert len(plugins["SEEN"]) == 2
    with torch.no_grad():
        expected = embed(question)
    for seen in plugins["SEEN"]:
        assert torch.equal(seen["text"], expected)
    # Inside the LLM: the question's hidden states entering layer K, for both images alike.
    reset(fam.model)
    hidden, _, _ = fam.layer_inputs(2)
    plugins["SEEN"].clear()
    patches.prune(fam.model, "RECORD", RATIO, layer_index=2)
    fam.forward()
    assert len(plugins["SEEN"]) == 2
    for seen in plugins["SEEN"]:
        assert torch.equal(seen["text"], hidden[-question.numel() :])


ASKED = "\nWhat is in the image?"
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
TURN_END = " ASSISTANT:"


def one_image_then(request, name, tail):
    """``name`` with a prompt of one image, then ``tail`` (no chat template: the text after the image
    is exactly that string); with the family's tokenizer and token embedding."""
    image = make_image(500, 300, 35)
    if name == "llava-1.5":
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import tokenizer_image_token

        tokenizer, model, processor = request.getfixturevalue("original_models")[name]
        ids = tokenizer_image_token("USER: <image>" + tail, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        pixel = processor.preprocess(image, return_tensors="pt")["pixel_values"]
        inputs = dict(input_ids=ids, images=pixel, image_sizes=[image.size], attention_mask=torch.ones_like(ids))
        return Family(name, model, inputs, None, None), tokenizer, model.get_model().embed_tokens
    processor, model = request.getfixturevalue("qwen_model") if name == "qwen2.5-vl" else request.getfixturevalue("hf_models")[name]
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>" if name == "qwen2.5-vl" else "<image>"
    inputs = processor(images=[image], text=["USER: " + placeholder + tail], return_tensors="pt")
    return Family(name, model, dict(inputs), None, None), processor.tokenizer, model.get_input_embeddings()


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def cdpruner_texts(monkeypatch):
    """Every ``text`` the bundled CDPRUNER gets (it still selects as it does)."""
    import otprune.plugins.cdpruner as cdpruner

    texts = []
    select = cdpruner.select_cdpruner

    @functools.wraps(select)  # its signature and its text_leaves_out with it
    def recording(tokens, k, **context):
        texts.append(context["text"].clone())
        return select(tokens, k, **context)

    monkeypatch.setattr(cdpruner, "select_cdpruner", recording)
    otprune.methods.get_method.cache_clear()
    yield texts
    otprune.methods.get_method.cache_clear()


@pytest.mark.parametrize("name", ["llava-1.5", "llava-hf", "qwen2.5-vl"])
def test_cdpruner_s_question_at_k0_leaves_out_the_short_answer_instruction(request, cdpruner_texts, name):
    fam, tokenizer, embed = one_image_then(request, name, ASKED + SHORT_ANSWER + TURN_END)
    patches.prune(fam.model, "CDPRUNER", RATIO)
    fam.forward()
    with torch.no_grad():
        expected = embed(torch.tensor(ids_of(tokenizer, ASKED + TURN_END)))
    assert len(cdpruner_texts) == 1 and torch.equal(cdpruner_texts[0], expected)


@pytest.mark.parametrize("name", ["llava-1.5", "llava-hf", "qwen2.5-vl"])
def test_cdpruner_s_question_at_k2_leaves_out_the_short_answer_instruction(request, cdpruner_texts, name):
    tail = ASKED + SHORT_ANSWER + TURN_END
    fam, tokenizer, _ = one_image_then(request, name, tail)
    asked, end = ids_of(tokenizer, ASKED), ids_of(tokenizer, TURN_END)
    assert ids_of(tokenizer, tail) == asked + ids_of(tokenizer, SHORT_ANSWER) + end, "the tail must tokenise as its three parts"
    hidden, _, _ = fam.layer_inputs(2)
    start = hidden.shape[0] - len(ids_of(tokenizer, tail))
    expected = torch.cat([hidden[start : start + len(asked)], hidden[-len(end) :]])
    patches.prune(fam.model, "CDPRUNER", RATIO, layer_index=2)
    fam.forward()
    assert len(cdpruner_texts) == 1 and torch.equal(cdpruner_texts[0], expected)


@pytest.mark.parametrize("name", ["llava-1.5", "llava-hf", "qwen2.5-vl"])
def test_a_question_without_the_instruction_is_left_whole(request, cdpruner_texts, name):
    fam, tokenizer, embed = one_image_then(request, name, ASKED + TURN_END)
    patches.prune(fam.model, "CDPRUNER", RATIO)
    fam.forward()
    with torch.no_grad():
        expected = embed(torch.tensor(ids_of(tokenizer, ASKED + TURN_END)))
    assert len(cdpruner_texts) == 1 and torch.equal(cdpruner_texts[0], expected)


@pytest.mark.parametrize("layer_index", [0, 2])
@pytest.mark.parametrize("name", ["llava-1.5", "llava-hf", "qwen2.5-vl"])
def test_a_method_that_leaves_nothing_out_gets_the_instruction_too(request, plugins, name, layer_index):
    tail = ASKED + SHORT_ANSWER + TURN_END
    fam, tokenizer, embed = one_image_then(request, name, tail)
    question = torch.tensor(ids_of(tokenizer, tail))
    with torch.no_grad():
        expected = embed(question) if layer_index == 0 else fam.layer_inputs(2)[0][-question.numel() :]
    patches.prune(fam.model, "RECORD", RATIO, layer_index=layer_index)
    fam.forward()
    assert len(plugins["SEEN"]) == 1 and torch.equal(plugins["SEEN"][0]["text"], expected)


def test_leave_out_drops_every_occurrence_but_never_the_whole_question():
    from patches.splice import leave_out

    positions = torch.arange(10, 17)
    ids = torch.tensor([5, 1, 2, 6, 1, 2, 1])
    assert leave_out(ids, positions, [(1, 2)]).tolist() == [10, 13, 16]
    assert leave_out(ids, positions, [(1, 2), (6,)]).tolist() == [10, 16]
    assert leave_out(ids, positions, [(2, 1, 2, 6)]).tolist() == positions.tolist()
    assert leave_out(ids, positions, [(5, 1, 2, 6, 1, 2, 1)]).tolist() == positions.tolist()
    assert leave_out(ids, positions, ()).tolist() == positions.tolist()


def test_a_tokenizer_that_cannot_be_loaded_stops_the_run(request, tmp_path, monkeypatch):
    fam, _, _ = one_image_then(request, "llava-hf", ASKED + SHORT_ANSWER + TURN_END)
    monkeypatch.setattr(fam.model.config, "_name_or_path", str(tmp_path))
    patches.prune(fam.model, "CDPRUNER", RATIO)
    with pytest.raises(ValueError, match="tokenizer") as raised:
        fam.forward()
    assert str(tmp_path) in str(raised.value) and "CDPRUNER" in str(raised.value)


def qwen_video(processor, model, t, h, w, seed):
    """A prompt of one video of ``t`` temporal steps of ``h x w`` patches, given as patches; each
    step one placeholder run (Qwen3-VL: each after its timestamp)."""
    merge = model.config.vision_config.spatial_merge_size
    per_step = h * w // merge**2
    content = [{"type": "video"}, {"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    if type(model).__name__.startswith("Qwen3"):
        steps = "".join(f"<{i}.0 seconds><|vision_start|>{'<|video_pad|>' * per_step}<|vision_end|>" for i in range(t))
    else:
        steps = f"<|vision_start|>{'<|video_pad|>' * (t * per_step)}<|vision_end|>"
    ids = processor.tokenizer(prompt.replace(video, steps), return_tensors="pt")
    vision = model.config.vision_config
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(t * h * w, vision.in_channels * vision.temporal_patch_size * vision.patch_size**2, generator=g)
    types = (ids["input_ids"] == model.config.video_token_id).int() * 2
    return {**ids, "pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[t, h, w]]), "mm_token_type_ids": types}


@pytest.mark.parametrize("name", ["qwen2.5-vl", "qwen3-vl"])
def test_each_frame_of_a_qwen_video_gets_its_own_grid(request, plugins, name):
    processor, model = request.getfixturevalue("qwen_model") if name == "qwen2.5-vl" else request.getfixturevalue("vlm_models")[name]
    t, h, w = 3, 8, 12
    inputs = qwen_video(processor, model, t, h, w, seed=32)
    frames = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten().view(t, -1)
    fam = Family(name, model, inputs, int(frames[0, 0]), frames.numel())
    full, _ = full_llm_input(fam)
    patches.prune(model, "RECORD", RATIO)
    fam.forward()
    assert len(plugins["SEEN"]) == t
    for frame, seen in zip(frames, plugins["SEEN"]):
        assert seen["grid"] == (PatchGrid(0, h // 2, w // 2),) and seen["k"] == budget(RATIO, h * w // 4)
        assert torch.equal(seen["tokens"], full[frame])


# -- 3. a merger's tokens reach the LLM at the positions it returns -----------------------------


@pytest.mark.parametrize("name", ["llava-1.5", "qwen2.5-vl", "llava-hf"])
def test_a_merger_at_k0_puts_its_tokens_at_its_positions(request, plugins, name):
    fam = family(request, name, image_seed=7)
    full, full_positions = full_llm_input(fam)
    start, n = fam.start, fam.n
    k = budget(RATIO, n)
    merged, positions = windows(full[start : start + n], k)
    expected = full.clone()
    expected[start + positions] = merged
    keep = torch.cat([torch.arange(start), start + positions, torch.arange(start + n, full.shape[0])])
    patches.prune(fam.model, "WINDOWS", RATIO)
    call = fam.llm_call()
    assert torch.allclose(call["inputs_embeds"][0], expected[keep], atol=1e-6)
    assert torch.equal(call["inputs_embeds"][0, start : start + k], merged)
    extra = {}
    if name == "qwen2.5-vl":
        assert torch.equal(call["position_ids"], full_positions[..., keep])
        extra = {"position_ids": full_positions[..., keep]}
        cos, sin = first_layer_rotary(fam)
        fam.model._otprune_config = None
        full_cos, full_sin = first_layer_rotary(fam)
        assert torch.equal(cos, full_cos[keep]) and torch.equal(sin, full_sin[keep])
        patches.prune(fam.model, "WINDOWS", RATIO)
    # Independent truth: the unpruned model fed the merged sequence by hand.
    assert torch.allclose(fam.forward().logits[0], fam.logits_of(expected[keep], **extra), atol=1e-5)


@pytest.mark.parametrize("name", ["llava-1.5", "qwen2.5-vl", "llava-hf"])
def test_a_merger_at_k2_replaces_the_hidden_states_at_its_positions(request, plugins, name):
    fam = family(request, name, image_seed=8)
    hidden, cos, sin = fam.layer_inputs(2)
    start, n = fam.start, fam.n
    k = budget(RATIO, n)
    merged, positions = windows(hidden[start : start + n], k)
    expected = hidden.clone()
    expected[start + positions] = merged
    keep = torch.cat([torch.arange(start), start + positions, torch.arange(start + n, hidden.shape[0])])
    patches.prune(fam.model, "WINDOWS", RATIO, layer_index=2)
    got, got_cos, got_sin = fam.layer_inputs(2)
    assert torch.equal(fam.model._otprune_layer_pruner.state.kept[0], keep)
    assert torch.allclose(got, expected[keep], atol=1e-6)
    assert torch.equal(got_cos, cos[keep]) and torch.equal(got_sin, sin[keep])
    # Layers before K see the unpruned prompt.
    fam.model._otprune_config = None
    before = fam.layer_inputs(1)[0]
    patches.prune(fam.model, "WINDOWS", RATIO, layer_index=2)
    assert torch.equal(fam.layer_inputs(1)[0], before)
    assert fam.generate().shape[1] > 0


# -- 4. a plugin breaking its contract stops the run, naming itself ------------------------------


FAULT = r"selector plugin UNSORTED \(otprune-test-plugins 0\.1\) returned indices that are not sorted ascending \(N = \d+ tokens, k = \d+\)"


@pytest.mark.parametrize("route", ["code", "environment"])
@pytest.mark.parametrize("layer_index", [0, 2])
@pytest.mark.parametrize("name", ["llava-1.5", "qwen2.5-vl"])
def test_a_plugin_returning_unsorted_indices_is_stopped(request, plugins, name, layer_index, route):
    fam = family(request, name, image_seed=9)
    if route == "code":
        # An exception naming the plugin, its package and what is wrong.
        patches.prune(fam.model, "UNSORTED", RATIO, layer_index=layer_index)
        with pytest.raises(PluginFault, match=FAULT):
            fam.forward()
        return
    # From the environment (lmms-eval's way, which swallows exceptions): the process stops.
    try:
        patches.activate_from_env({"BASELINE": "unsorted", "SUBSET_RATIO": str(RATIO), "LAYER_INDEX": str(layer_index)})
        with pytest.raises(SystemExit, match="otprune: " + FAULT):
            fam.forward()
    finally:
        patches.activate_from_env({})


@pytest.mark.parametrize("layer_index", [0, 2])
@pytest.mark.parametrize("name", ["llava-1.5", "llava-hf", "qwen2.5-vl"])
def test_a_plugin_writing_its_input_in_place_is_stopped_before_the_model_reads_it(request, plugins, name, layer_index):
    fam = family(request, name, image_seed=9)
    for method, written in (("INPLACE", "tokens"), ("TEXTWRITER", "text")):
        patches.prune(fam.model, method, RATIO, layer_index=layer_index)
        with pytest.raises(PluginFault, match=f"selector plugin {method} \\(otprune-test-plugins 0.1\\) wrote its input {written} in place"):
            fam.forward()


def test_a_plugin_fault_from_the_environment_stops_even_after_the_same_setting_in_code(request, plugins):
    fam = family(request, "llava-1.5", image_seed=9)
    patches.prune(fam.model, "UNSORTED", RATIO, layer_index=2)
    with pytest.raises(PluginFault, match=FAULT):
        fam.forward()
    fam.model._otprune_config = None
    try:
        patches.activate_from_env({"BASELINE": "unsorted", "SUBSET_RATIO": str(RATIO), "LAYER_INDEX": "2"})
        with pytest.raises(SystemExit, match="otprune: " + FAULT):
            fam.forward()
    finally:
        patches.activate_from_env({})


# -- 5. the built-in POOL merger -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llava-1.5", "qwen2.5-vl"])
def test_pool_prunes_to_its_pooled_grid(request, name):
    """The LLM's input against a slow loop over METHOD.md's windows (adaptive average pooling:
    rows floor(i h / h') to ceil((i + 1) h / h'), columns alike), each window's mean placed at the
    cell nearest its centre (index floor((first + last) / 2) on each axis)."""
    from otprune.plugins.pool import pooled_shape

    fam = family(request, name, image_seed=10)
    full, full_positions = full_llm_input(fam)
    start, n = fam.start, fam.n
    k = budget(RATIO, n)
    (grid,) = expected_grid(fam)
    rows, cols = pooled_shape(grid.rows, grid.cols, k)
    if name == "llava-1.5":
        assert (grid.rows, grid.cols, k, rows, cols) == (24, 24, 56, 7, 8)  # METHOD.md's example
    cells = grid.cell_positions()
    means, centres = [], []
    for i in range(rows):
        top, bottom = i * grid.rows // rows, -(-(i + 1) * grid.rows // rows)
        for j in range(cols):
            left, right = j * grid.cols // cols, -(-(j + 1) * grid.cols // cols)
            window = [int(cells[r, c]) for r in range(top, bottom) for c in range(left, right)]
            means.append(full[[start + w for w in window]].mean(0))
            centres.append(int(cells[(top + bottom - 1) // 2, (left + right - 1) // 2]))
    patches.prune(fam.model, "POOL", RATIO)
    call = fam.llm_call()
    assert call["inputs_embeds"].shape[1] == full.shape[0] - n + rows * cols
    keep = torch.cat([torch.arange(start), start + torch.tensor(centres), torch.arange(start + n, full.shape[0])])
    got = call["inputs_embeds"][0]
    assert torch.equal(got[:start], full[:start]) and torch.equal(got[start + rows * cols :], full[start + n :])
    assert torch.allclose(got[start : start + rows * cols], torch.stack(means), atol=1e-5)
    if name == "qwen2.5-vl":
        assert torch.equal(call["position_ids"], full_positions[..., keep])


# -- 6. batches of padded prompts --------------------------------------------------------------


QUESTIONS = [QUESTION, "Is there a red car in the picture? Please answer yes or no."]


class OriginalLlavaBatch(Family):
    generate_inputs = OriginalLlava.generate_inputs


def padded_batch(request, monkeypatch, name, side, seeds):
    """Two prompts of different lengths, each with one 500 x 300 image (so of equal token counts),
    padded on ``side``; ``n``: each image's visual tokens."""
    images = [make_image(500, 300, seed) for seed in seeds]
    if name == "llava-1.5":
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images, tokenizer_image_token

        tokenizer, model, processor = request.getfixturevalue("original_models")[name]
        # The original LLaVA re-pads its spliced sequence on the side its config names.
        monkeypatch.setattr(model.config, "tokenizer_padding_side", side)
        prompts = [tokenizer_image_token(f"USER: <image>\n{q} ASSISTANT:", tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt") for q in QUESTIONS]
        length = max(p.numel() for p in prompts)
        ids = torch.zeros(2, length, dtype=torch.long)
        mask = torch.zeros(2, length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            where = slice(length - prompt.numel(), length) if side == "left" else slice(0, prompt.numel())
            ids[row, where], mask[row, where] = prompt, 1
        pixel = process_images(images, processor, model.config).float()
        inputs = {"input_ids": ids, "images": pixel, "image_sizes": [im.size for im in images], "attention_mask": mask}
        return OriginalLlavaBatch(name, model, inputs, None, model.get_vision_tower().num_patches)
    processor, model = request.getfixturevalue("hf_models")[name] if name == "llava-hf" else request.getfixturevalue("qwen_model")
    monkeypatch.setattr(processor.tokenizer, "padding_side", side)
    prompts = [
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in QUESTIONS
    ]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1)
    assert counts[0] == counts[1]
    return Family(name, model, dict(inputs), None, int(counts[0]))


def padding_side_of(mask):
    lengths = mask.sum(1)
    assert lengths[0] != lengths[1]
    return "left" if bool(mask[:, -1].all()) else "right" if bool(mask[:, 0].all()) else None


@pytest.mark.parametrize("layer_index", [0, 2])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_padded_batch_prunes_with_a_plugin_exactly_as_with_the_built_in(request, monkeypatch, plugins, name, side, layer_index):
    """UNIFORMCOPY (image by image) and its batching twin UNIFORMBATCH (one (2, N, d) call) give
    the logits and tokens the built-in UNIFORM gives a padded batch of two prompts."""
    batch = padded_batch(request, monkeypatch, name, side, seeds=(40, 41))
    assert padding_side_of(batch.inputs["attention_mask"]) == side
    # The unpruned LLM input: the prompt with each image's placeholder(s) (LLaVA-1.5: one) as its n tokens.
    placeholders = 1 if name == "llava-1.5" else batch.n
    unpruned_length = batch.inputs["input_ids"].shape[1] - placeholders + batch.n
    outcomes = {}
    for method in ("UNIFORM", "UNIFORMCOPY", "UNIFORMBATCH"):
        patches.prune(batch.model, method, RATIO, layer_index=layer_index)
        outcomes[method] = (batch.forward().logits, batch.generate(tokens=3).tolist())
    logits, tokens = outcomes["UNIFORM"]
    cut = batch.n - budget(RATIO, batch.n) if layer_index == 0 else 0
    assert logits.shape[:2] == (2, unpruned_length - cut)
    for method in ("UNIFORMCOPY", "UNIFORMBATCH"):
        assert torch.equal(outcomes[method][0], logits), method
        assert outcomes[method][1] == tokens, method
    # The twin got both images at once, in each of its two forwards (the generate's prefill).
    assert len(plugins["BATCHED"]) == 2 and {shape[:2] for shape in plugins["BATCHED"]} == {(2, batch.n)}


@pytest.mark.parametrize("name", FAMILIES)
def test_a_merger_at_k2_prunes_a_padded_batch_of_equal_images(request, monkeypatch, plugins, name):
    batch = padded_batch(request, monkeypatch, name, "left", seeds=(42, 43))
    n = batch.n
    k = budget(RATIO, n)
    _, positions = windows(torch.zeros(n, 1), k)
    patches.prune(batch.model, "WINDOWS", RATIO, layer_index=2)
    logits = batch.forward().logits
    state = batch.model._otprune_layer_pruner.state
    assert logits.shape[1] == state.length
    assert tuple(state.kept.shape) == (2, state.length - n + k)
    for row, ((start, end),) in enumerate(state.spans):
        assert end - start == n
        assert torch.equal(state.kept[row].cpu(), torch.cat([torch.arange(start), start + positions, torch.arange(end, state.length)]))
    assert batch.generate().shape[0] == 2


@pytest.mark.parametrize("route", ["code", "environment"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_merger_keeping_unequal_counts_in_a_batch_at_k2_is_stopped(request, monkeypatch, plugins, name, route):
    batch = padded_batch(request, monkeypatch, name, "left", seeds=(44, 45))
    message = r"LAYER_INDEX=2 needs every sample of a batch to keep the same number of tokens; got \[(\d+), (\d+)\].*use batch size 1"
    if route == "code":
        patches.prune(batch.model, "UNEVEN", RATIO, layer_index=2)
        with pytest.raises(ValueError, match=message) as raised:
            batch.forward()
        first, second = (int(c) for c in re.search(message, str(raised.value)).groups())
        assert first == second + 1
    else:
        try:
            patches.activate_from_env({"BASELINE": "uneven", "SUBSET_RATIO": str(RATIO), "LAYER_INDEX": "2"})
            with pytest.raises(SystemExit, match="otprune: " + message):
                batch.forward()
        finally:
            patches.activate_from_env({})
    assert plugins["UNEVEN"] == [batch.n, batch.n]


# -- 7. a plugin asking for a grid the patch cannot tell -----------------------------------------


def without_grid(request, monkeypatch, name):
    """One prompt whose image is 577 tokens, the CLS token before the 24 x 24 patches: no grid."""
    if name == "llava-1.5":
        _, model, _ = request.getfixturevalue("original_models")[name]
        monkeypatch.setattr(model.get_vision_tower(), "select_feature", "cls_patch")
        return family(request, name, image_seed=50)
    processor, model = request.getfixturevalue("hf_models")[name]
    monkeypatch.setattr(processor, "vision_feature_select_strategy", "full")
    fam = family(request, name, image_seed=50)
    fam.inputs["vision_feature_select_strategy"] = "full"
    return fam


@pytest.mark.parametrize("route", ["code", "environment"])
@pytest.mark.parametrize("layer_index", [0, 2])
@pytest.mark.parametrize("name", ["llava-1.5", "llava-hf"])
def test_a_plugin_asking_for_a_grid_the_patch_cannot_tell_is_stopped(request, monkeypatch, plugins, name, layer_index, route):
    fam = without_grid(request, monkeypatch, name)
    assert fam.n == 24 * 24 + 1
    message = r"BASELINE=GRIDONLY asks for grid \(.*\), which this model and prompt do not give for an image of 577 tokens"
    # A method asking for no grid prunes the same prompt.
    patches.prune(fam.model, "UNIFORMCOPY", RATIO, layer_index=layer_index)
    fam.forward()
    fam.model._otprune_config = None
    if route == "code":
        patches.prune(fam.model, "GRIDONLY", RATIO, layer_index=layer_index)
        with pytest.raises(ValueError, match=message):
            fam.forward()
        return
    try:
        patches.activate_from_env({"BASELINE": "gridonly", "SUBSET_RATIO": str(RATIO), "LAYER_INDEX": str(layer_index)})
        with pytest.raises(SystemExit, match="otprune: " + message):
            fam.forward()
    finally:
        patches.activate_from_env({})
