"""Build tiny, randomly initialised LLaVA checkpoints offline, loadable through the real code paths.

    python scripts/build_tiny_llava.py OUT_DIR [--variant llava-1.5|llava-1.6|llava-hf|llava-next-hf|synth-llava-1.5] [--seed 0]

- ``llava-1.5``: original-LLaVA layout for ``llava.model.builder.load_pretrained_model``: a CLIP
  tower (336 px, patch 14 -> 576 tokens, hidden 32) saved beside the model, ``mlp2x_gelu``
  projector, a 4-layer LLaMA of hidden size 64.
- ``llava-1.6``: the same with ``anyres`` + ``spatial_unpad`` (LLaVA-NeXT): tiles, unpadding and
  an ``image_newline`` vector, so an image yields a variable number of tokens.
- ``synth-llava-1.5``: not built but copied: the checkpoint scripts/train_tiny_llava.py trained on
  the synthetic benchmark (configs/otprune_synth/synth-llava-1.5), its tower path made absolute.
- ``llava-hf`` / ``llava-next-hf``: ``LlavaForConditionalGeneration`` (or
  ``LlavaNextForConditionalGeneration``) with its processor, for transformers' own classes.

The tokenizer is a byte-level BPE trained here on a few sentences (no sentencepiece model, no hub).
The folder name of an original-LLaVA checkpoint must contain "llava": its loader checks the name.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

VARIANTS = ("llava-1.5", "llava-1.6", "llava-hf", "llava-next-hf", "synth-llava-1.5")
# The checkpoint scripts/train_tiny_llava.py trained on the synthetic benchmark (variant synth-llava-1.5).
SHIPPED_SYNTH = Path(__file__).resolve().parent.parent / "configs" / "otprune_synth" / "synth-llava-1.5"
# Variants copied from a trained folder rather than built: variant -> that folder.
TRAINED = {"synth-llava-1.5": SHIPPED_SYNTH}
IMAGE_SIZE = 336
PATCH = 14
VISION_HIDDEN = 32
TEXT_HIDDEN = 64
TEXT_FFN = 2 * TEXT_HIDDEN
TEXT_LAYERS = 4
CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: What is in the image? Answer the question using a single word or phrase.",
    "Is there a red car in the picture? Yes No. How many people are there? one two three four",
    "Describe the image briefly. A photo of a cat sitting on a table next to a blue cup.",
    "Please answer yes or no. Which option is correct? A B C D. The sky is blue and green grass.",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(path: Path, corpus: list[str] = CORPUS, extra_special_tokens: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on ``corpus`` that adds ``<s>`` like LLaMA's, saved as a
    fast tokenizer.

    ``extra_special_tokens``: further unsplittable tokens (another family's placeholders)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS + list(extra_special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(corpus, trainer=trainer)
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=4096)
    tokenizer.save_pretrained(path)
    return tokenizer


def clip_config(hidden: int = VISION_HIDDEN, layers: int = 2):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=hidden,
    )


def clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_clip_tower(path: Path, seed: int) -> None:
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    CLIPVisionModel(clip_config()).save_pretrained(path)
    clip_processor().save_pretrained(path)


def llama_config_fields(vocab_size: int, tokenizer, hidden: int = TEXT_HIDDEN, layers: int = TEXT_LAYERS, initializer_range: float = 0.02) -> dict:
    return dict(
        initializer_range=initializer_range,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def original_config(tokenizer, tower: Path, anyres: bool, vision_hidden: int = VISION_HIDDEN, select_layer: int = -2, **llm):
    """``LlavaConfig`` of an original-LLaVA model whose CLIP tower is saved in ``tower``; ``llm``:
    ``hidden``, ``layers`` and ``initializer_range`` of the LLaMA (``llama_config_fields``)."""
    from llava.model.language_model.llava_llama import LlavaConfig

    config = LlavaConfig(
        **llama_config_fields(len(tokenizer), tokenizer, **llm),
        mm_vision_tower=str(tower.resolve()),
        mm_hidden_size=vision_hidden,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=select_layer,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="anyres" if anyres else "pad",
        mm_patch_merge_type="spatial_unpad" if anyres else "flat",
        tokenizer_padding_side="right",
    )
    if anyres:
        config.image_grid_pinpoints = GRID_PINPOINTS
    return config


def build_original(path: Path, anyres: bool, seed: int) -> Path:
    """Original-LLaVA checkpoint: ``LlavaLlamaForCausalLM`` with the CLIP tower in ``path/vision``."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tower = path / "vision"
    build_clip_tower(tower, seed)
    config = original_config(build_tokenizer(path), tower, anyres)
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(config)
    # Random weights are fine; a loud image_newline keeps the newline vectors distinguishable.
    if anyres:
        model.get_model().image_newline.data.normal_(0, 1)
    model.save_pretrained(path)
    return path


def build_hf(path: Path, next_style: bool, seed: int) -> Path:
    """transformers-native ``LlavaForConditionalGeneration`` (or ``LlavaNext...``) with its processor."""
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    fields = dict(
        vision_config=clip_config(),
        text_config=LlamaConfig(**llama_config_fields(len(tokenizer), tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    # num_additional_image_tokens=1: the CLS token, which the "default" strategy then drops.
    processor_fields = dict(
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    if next_style:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

        LlavaNextForConditionalGeneration(LlavaNextConfig(**fields, image_grid_pinpoints=GRID_PINPOINTS)).save_pretrained(path)
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_grid_pinpoints=GRID_PINPOINTS,
        )
        LlavaNextProcessor(image_processor=image_processor, **processor_fields).save_pretrained(path)
    else:
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

        LlavaForConditionalGeneration(LlavaConfig(**fields)).save_pretrained(path)
        LlavaProcessor(image_processor=clip_processor(), **processor_fields).save_pretrained(path)
    return path


def install_trained(source: Path, path: Path) -> Path:
    """Copy a trained original-LLaVA folder to ``path``, pointing its config at the copied tower
    (LLaVA's loader reads ``mm_vision_tower`` as a path, so a shipped folder keeps it relative)."""
    shutil.copytree(source, path, dirs_exist_ok=True)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["mm_vision_tower"] = str((path / "vision").resolve())
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return path


def build(out_dir: str | Path, variant: str = "llava-1.5", seed: int = 0) -> Path:
    """Build ``variant`` into ``out_dir`` and return the folder; the name must contain "llava".
    ``synth-llava-1.5`` ignores ``seed``: it is the shipped trained checkpoint."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    path = Path(out_dir)
    if "llava" not in path.name.lower():
        raise ValueError(f"the checkpoint folder name must contain 'llava' (LLaVA's loader checks it); got {path.name!r}")
    if variant in TRAINED:
        install_trained(TRAINED[variant], path)
    elif variant.endswith("-hf"):
        build_hf(path, next_style=variant == "llava-next-hf", seed=seed)
    else:
        build_original(path, anyres=variant == "llava-1.6", seed=seed)
    (path / "otprune_tiny.json").write_text(json.dumps({"variant": variant, "seed": seed}) + "\n")
    return path


def command_line(doc: str, build_variant, variants, default: str, argv=None) -> None:
    """``OUT_DIR [--variant V] [--seed S]``: build one tiny checkpoint with ``build_variant`` and print its folder."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--variant", choices=variants, default=default)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        print(build_variant(args.out_dir, args.variant, args.seed))
    except ValueError as error:
        parser.error(str(error))


def main(argv=None) -> None:
    command_line(__doc__, build, VARIANTS, "llava-1.5", argv)


if __name__ == "__main__":
    main()
