"""Differential fuzz of every adapter: a batch prunes and generates as each of its prompts alone.

Random prompts (0-3 images, placeholders adjacent or apart, images first or last), random image
sizes, batches of 1-3, left or right padding, with or without a mask, ``LAYER_INDEX`` 0, 1 or 2,
a dynamic or static key-value cache, on the tiny checkpoint of each family. The truth for a batch is each prompt run alone:

- greedy generations (the batch's with its cache, each alone's with the dynamic one; left
  padding, mask or none: right-padded prompts do not generate as each
  alone even unpatched, as new tokens follow the padding);
- the logits of each row's last prompt token (either side, with a mask: without one a model
  attends to its padding);
- at ratio 1.0 (every method but VTW, which keeps none), each prompt alone equals the unpatched
  model's answer.

At ``LAYER_INDEX > 0`` a batch whose rows drop different numbers of visual tokens is refused
(one cache length per layer); the refusal is checked against the counts each prompt alone drops.
So is a prompt that ends with an image (nothing would be left to predict the next token from).
Seeded; ``OTPRUNE_FUZZ_CASES`` sets the cases per family (default 10, about a minute in all).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("transformers")

from conftest import tiny_vlms  # noqa: E402
from PIL import Image  # noqa: E402

import otprune.patches as patches  # noqa: E402

CASES = int(os.environ.get("OTPRUNE_FUZZ_CASES", "10"))
NEW_TOKENS = 3
WORDS = "what is in the picture describe colour shape left right which one differs red blue square circle".split()
FAMILIES = {
    # family: (placeholder text, smallest and largest image side in pixels)
    "llava-1.5": ("<image>", 64, 640),
    "llava-1.6": ("<image>", 100, 900),
    "llava-hf": ("<image>", 64, 640),
    "llava-next-hf": ("<image>", 100, 900),
    "qwen2.5-vl": ("<|vision_start|><|image_pad|><|vision_end|>", 56, 280),
    "llava-onevision": ("<image>", 56, 200),
}
ORIGINAL = ("llava-1.5", "llava-1.6")
# Qwen wraps each image's placeholders in vision start and end tokens: no prompt ends with a visual one.
WRAPPED = ("qwen2.5-vl",)


@dataclass
class Case:
    prompts: list[list]  # per prompt: text pieces (str) and images (PIL), in order
    side: str
    masked: bool
    layer_index: int
    method: str
    ratio: float
    cache: str

    def describe(self) -> str:
        layouts = ["".join("I" if isinstance(p, Image.Image) else "t" for p in prompt) for prompt in self.prompts]
        sizes = [[p.size for p in prompt if isinstance(p, Image.Image)] for prompt in self.prompts]
        return f"prompts {layouts} images {sizes} side={self.side} mask={self.masked} K={self.layer_index} {self.method} ratio={self.ratio} cache={self.cache}"


def random_case(family: str, seed: int) -> Case:
    rng = random.Random(f"{family}-{seed}")
    _, low, high = FAMILIES[family]
    batch = rng.randint(1, 3)
    prompts = []
    for _ in range(batch):
        # The original LLaVA gives a prompt without an image the next prompt's image (its own splice
        # does, unpatched): in its batches every prompt has one.
        n_images = rng.randint(1 if family in ORIGINAL and batch > 1 else 0, 3)
        pieces: list = []
        if n_images == 0 or rng.random() < 0.6:
            pieces.append(" ".join(rng.choices(WORDS, k=rng.randint(1, 5))))
        for i in range(n_images):
            if i > 0 and rng.random() < 0.5:
                pieces.append(" ".join(rng.choices(WORDS, k=rng.randint(1, 4))))
            pieces.append(image(rng.randint(low, high), rng.randint(low, high), rng.randrange(10**6)))
        if n_images and rng.random() < 0.7:
            pieces.append(" ".join(rng.choices(WORDS, k=rng.randint(1, 6))))
        prompts.append(pieces)
    layer_index = rng.choice([0, 1, 2])
    methods = ["OURS", "DIVPRUNE", "UNIFORM"] + (["FASTV", "VTW"] if layer_index > 0 else [])
    return Case(
        prompts=prompts,
        side=rng.choice(["left", "right"]),
        masked=rng.random() < 0.5,
        layer_index=layer_index,
        method=rng.choice(methods),
        ratio=rng.choice([0.098, 0.25, 1.0]),
        cache=rng.choice(["dynamic", "static"]),
    )


def image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


class Family:
    """One tiny model with a uniform way to batch prompts, generate and score."""

    def __init__(self, name, model, tokenizer, processor):
        self.name, self.model, self.tokenizer, self.processor = name, model, tokenizer, processor

    def text(self, prompt) -> str:
        placeholder = FAMILIES[self.name][0]
        return "".join(placeholder if isinstance(p, Image.Image) else p for p in prompt)

    def inputs(self, prompts, side: str, masked: bool) -> dict:
        images = [p for prompt in prompts for p in prompt if isinstance(p, Image.Image)]
        texts = [self.text(prompt) for prompt in prompts]
        if self.name in ORIGINAL:
            inputs = self._original_inputs(texts, images, side)
        else:
            self.tokenizer.padding_side = side
            inputs = dict(self.processor(images=images or None, text=texts, return_tensors="pt", padding=True))
        if not masked:
            del inputs["attention_mask"]
        return inputs

    def _original_inputs(self, texts, images, side):
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images, tokenizer_image_token

        ids = [tokenizer_image_token(t, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt") for t in texts]
        length = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(ids), length, dtype=torch.long)
        for row, i in enumerate(ids):
            target = slice(length - len(i), length) if side == "left" else slice(0, len(i))
            input_ids[row, target], mask[row, target] = i, 1
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if images:
            pixel = process_images(images, self.processor, self.model.config)
            inputs["images"] = [p.float() for p in pixel] if isinstance(pixel, list) else pixel.float()
            inputs["image_sizes"] = [im.size for im in images]
        return inputs

    def generate(self, inputs, side: str, cache: str) -> torch.Tensor:
        self._side(side)
        inputs = dict(inputs)
        # The original LLaVA's generate takes the prompt as its first argument, ``inputs``.
        prompt = inputs.pop("input_ids")
        with torch.no_grad():
            out = self.model.generate(prompt, **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation=cache)
        return out[:, -NEW_TOKENS:]

    def logits(self, inputs, side: str) -> torch.Tensor:
        self._side(side)
        with torch.no_grad():
            return self.model(**inputs).logits

    def _side(self, side: str) -> None:
        if self.name in ORIGINAL:
            # The original LLaVA pads its spliced sequence on the side its config names.
            self.model.config.tokenizer_padding_side = side

    def dropped(self) -> int:
        """Visual tokens the last prefill dropped at layer K (0 if it pruned nothing)."""
        pruner = getattr(self.model, "_otprune_layer_pruner", None)
        state = None if pruner is None else pruner.state
        if state is None or state.kept is None:
            return 0
        return state.length - state.kept.shape[1]


@pytest.fixture(scope="module")
def families(tiny_checkpoints, tiny_hf_checkpoints, tmp_path_factory):
    from llava.model.builder import load_pretrained_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded = {}
    for name in ORIGINAL:
        path = tiny_checkpoints[name]
        tokenizer, model, processor, _ = load_pretrained_model(str(path), None, path.name, device="cpu", device_map="cpu")
        loaded[name] = Family(name, model.float().eval(), tokenizer, processor)
    for name in ("llava-hf", "llava-next-hf"):
        processor = AutoProcessor.from_pretrained(tiny_hf_checkpoints[name])
        model = AutoModelForImageTextToText.from_pretrained(tiny_hf_checkpoints[name], dtype=torch.float32).eval()
        loaded[name] = Family(name, model, processor.tokenizer, processor)
    for name, (processor, model) in tiny_vlms(tmp_path_factory.mktemp("fuzz_vlm"), ("qwen2.5-vl", "llava-onevision")).items():
        loaded[name] = Family(name, model, processor.tokenizer, processor)
    yield loaded
    for family in loaded.values():
        family.model._otprune_config = None


REFUSAL = "needs every sample of a batch to keep the same number of tokens"


@pytest.mark.parametrize("seed", range(CASES))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_batch_prunes_and_generates_as_each_prompt_alone(families, name, seed):
    family = families[name]
    case = random_case(name, seed)
    about = case.describe()
    patches.prune(family.model, case.method, case.ratio, layer_index=case.layer_index)
    ends_with_image = name not in WRAPPED and any(isinstance(prompt[-1], Image.Image) for prompt in case.prompts)
    if case.layer_index > 0 and ends_with_image:
        # Inside the LLM, the last prompt position (where the next token is predicted) must stay.
        with pytest.raises(ValueError, match="ends with an image"):
            family.generate(family.inputs(case.prompts, "left", case.masked), "left", case.cache)
        return
    alone_tokens, alone_logits, dropped = [], [], []
    for prompt in case.prompts:
        inputs = family.inputs([prompt], "left", True)
        alone_tokens.append(family.generate(inputs, "left", "dynamic")[0])
        dropped.append(family.dropped())
        alone_logits.append(family.logits(inputs, "left")[0])
    if case.ratio == 1.0 and case.method != "VTW":  # VTW keeps no visual token at any ratio
        patches.prune(family.model, None)
        for prompt, tokens in zip(case.prompts, alone_tokens):
            unpatched = family.generate(family.inputs([prompt], "left", True), "left", "dynamic")[0]
            assert unpatched.tolist() == tokens.tolist(), f"ratio 1.0 differs from the unpatched model: {about}"
        patches.prune(family.model, case.method, case.ratio, layer_index=case.layer_index)

    refused = case.layer_index > 0 and len(set(dropped)) > 1
    batch_for_generation = family.inputs(case.prompts, "left", case.masked)
    batch_for_logits = family.inputs(case.prompts, case.side, True)
    if refused:
        with pytest.raises(ValueError, match=REFUSAL):
            family.generate(batch_for_generation, "left", case.cache)
        return
    together = family.generate(batch_for_generation, "left", case.cache)
    for row, expected in enumerate(alone_tokens):
        assert together[row].tolist() == expected.tolist(), f"row {row} generates differently in the batch: {about}"
    logits = family.logits(batch_for_logits, case.side)
    for row, expected in enumerate(alone_logits):
        last = -1 if case.side == "left" else expected.shape[0] - 1
        assert torch.allclose(logits[row, last], expected[-1], atol=1e-4), f"row {row}'s last logits differ: {about}"
