"""Build tiny, randomly initialised Qwen-VL and LLaVA-OneVision checkpoints offline (processor included).

    python scripts/build_tiny_qwen.py OUT_DIR [--variant qwen2-vl|qwen2.5-vl|qwen3-vl|llava-onevision] [--seed 0]

- ``qwen2-vl`` / ``qwen2.5-vl`` / ``qwen3-vl``: transformers' ``Qwen2VLForConditionalGeneration``,
  ``Qwen2_5_VLForConditionalGeneration`` or ``Qwen3VLForConditionalGeneration``: a 2-block vision
  tower that merges 2x2 patches (so an image's token count follows its resolution, between
  ``MIN_TOKENS`` and ``MAX_TOKENS``), a 4-layer LLM of hidden size 64 with 3-D (multimodal) rotary
  positions; Qwen3-VL also feeds two DeepStack feature levels into the first LLM layers.
- ``llava-onevision``: ``LlavaOnevisionForConditionalGeneration``: a 56 px SigLIP tower (16 tokens
  per tile), anyres tiling with unpadding and a newline vector, a Qwen2 LLM.

The tokenizer is the byte-level BPE of ``build_tiny_llava.py`` with each family's placeholder
tokens and chat template. transformers builds these families' processors only with torchvision
installed (their video processors need it, and this project does not install it), so the processor
is written as its parts: the tokenizer, the image processor, the video processor's and the
processor's JSON files, which ``AutoProcessor`` loads where torchvision is present. Without it,
``load_processor`` builds the family's own processor class for images only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from build_tiny_llava import TEXT_FFN, TEXT_HIDDEN, TEXT_LAYERS, build_tokenizer, command_line

VARIANTS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-onevision")
QWEN_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
VISION_HIDDEN = 32
HEAD_DIM = 16
# Rotary frequencies per (time, height, width) axis: half the head dimension in all.
MROPE_SECTION = [2, 3, 3]
MIN_TOKENS, MAX_TOKENS = 4, 96
ONEVISION_TILE = 56
ONEVISION_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ONEVISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def text_fields(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_FFN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_qwen(path: Path, variant: str, seed: int) -> None:
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(path, extra_special_tokens=QWEN_TOKENS)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    ]}  # fmt: skip
    vision = dict(depth=2, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_heads=2, spatial_merge_size=2, temporal_patch_size=2)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE_SECTION}
    patch = 16 if variant == "qwen3-vl" else 14
    if variant == "qwen3-vl":
        config = transformers.Qwen3VLConfig(
            vision_config=transformers.Qwen3VLVisionConfig(
                **vision, patch_size=patch, out_hidden_size=TEXT_HIDDEN, num_position_embeddings=256, deepstack_visual_indexes=[0, 1]
            ),
            text_config=transformers.Qwen3VLTextConfig(**text_fields(tokenizer), head_dim=HEAD_DIM, rope_parameters={**rope, "mrope_interleaved": True}),
            **ids,
        )
        model_class, processor_class = transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLProcessor
    elif variant == "qwen2.5-vl":
        config = transformers.Qwen2_5_VLConfig(
            vision_config=transformers.Qwen2_5_VLVisionConfig(
                **vision, patch_size=patch, out_hidden_size=TEXT_HIDDEN, window_size=56, fullatt_block_indexes=[1]
            ),
            text_config=transformers.Qwen2_5_VLTextConfig(**text_fields(tokenizer), rope_parameters=rope),
            **ids,
        )
        model_class, processor_class = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLProcessor
    else:
        vision["embed_dim"] = vision.pop("hidden_size")
        vision["mlp_ratio"] = 2
        config = transformers.Qwen2VLConfig(
            vision_config=transformers.Qwen2VLVisionConfig(**vision, patch_size=patch, hidden_size=TEXT_HIDDEN),
            text_config=transformers.Qwen2VLTextConfig(**text_fields(tokenizer), rope_parameters=rope),
            **ids,
        )
        model_class, processor_class = transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLProcessor
    torch.manual_seed(seed)
    model_class(config).save_pretrained(path)
    unit = (patch * 2) ** 2
    grid = dict(patch_size=patch, merge_size=2, temporal_patch_size=2)
    size = {"shortest_edge": MIN_TOKENS * unit, "longest_edge": MAX_TOKENS * unit}
    Qwen2VLImageProcessorPil(**grid, size=size).save_pretrained(path)
    video_type = "Qwen3VLVideoProcessor" if variant == "qwen3-vl" else "Qwen2VLVideoProcessor"
    save_processor_parts(path, tokenizer, QWEN_TEMPLATE, processor_class.__name__, {}, {"video_processor_type": video_type, **grid, "size": size})


def build_onevision(path: Path, seed: int) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
        SiglipVisionConfig,
    )  # fmt: skip

    tokenizer = build_tokenizer(path, extra_special_tokens=("<|im_start|>", "<|im_end|>", "<video>"))
    per_tile = (ONEVISION_TILE // 14) ** 2
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=2, num_attention_heads=2,
            image_size=ONEVISION_TILE, patch_size=14,
        ),
        text_config=Qwen2Config(**text_fields(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    # Random weights are fine; a loud image_newline keeps the newline vectors distinguishable.
    model.model.image_newline.data.normal_(0, 1)
    model.save_pretrained(path)
    tile = {"height": ONEVISION_TILE, "width": ONEVISION_TILE}
    LlavaOnevisionImageProcessorPil(size=tile, image_grid_pinpoints=ONEVISION_PINPOINTS).save_pretrained(path)
    save_processor_parts(
        path, tokenizer, ONEVISION_TEMPLATE, "LlavaOnevisionProcessor",
        {"num_image_tokens": per_tile, "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"},
        {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": tile},
    )  # fmt: skip


def save_processor_parts(path: Path, tokenizer, chat_template: str, processor_class: str, processor_fields: dict, video_fields: dict) -> None:
    """The processor's files besides the image processor's: tokenizer with its chat template, JSON configs."""
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(chat_template)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": processor_class, **processor_fields}, indent=2) + "\n")
    (path / "video_preprocessor_config.json").write_text(json.dumps(video_fields, indent=2) + "\n")


def load_processor(path: str | Path):
    """The checkpoint's processor for images, also without torchvision: the family's processor class
    built from the saved tokenizer and image processor, skipping only the video processor's class
    check (the video processor is absent; prompts with videos need ``AutoProcessor`` and torchvision)."""
    from unittest import mock

    import transformers
    from transformers import AutoTokenizer

    path = Path(path)
    fields = json.loads((path / "processor_config.json").read_text())
    # The PIL backend by name: AutoImageProcessor of transformers < 5.23 insists on torchvision's.
    image_type = json.loads((path / "preprocessor_config.json").read_text())["image_processor_type"]
    image_processor = getattr(transformers, image_type.removesuffix("Pil") + "Pil").from_pretrained(path)
    cls = getattr(transformers, fields.pop("processor_class"))
    check = cls.check_argument_for_proper_class

    def check_all_but_video(self, name, argument):
        return None if name == "video_processor" else check(self, name, argument)

    with mock.patch.object(cls, "check_argument_for_proper_class", check_all_but_video):
        return cls(
            image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(path),
            video_processor=None, chat_template=(path / "chat_template.jinja").read_text(), **fields,
        )  # fmt: skip


def build(out_dir: str | Path, variant: str = "qwen2.5-vl", seed: int = 0) -> Path:
    """Build ``variant`` into ``out_dir`` and return the folder."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    if variant == "llava-onevision":
        build_onevision(path, seed)
    else:
        build_qwen(path, variant, seed)
    (path / "otprune_tiny.json").write_text(json.dumps({"variant": variant, "seed": seed}) + "\n")
    return path


def main(argv=None) -> None:
    command_line(__doc__, build, VARIANTS, "qwen2.5-vl", argv)


if __name__ == "__main__":
    main()
