"""Build a random-weight LLaVA-1.5-7B checkpoint offline (original LLaVA or llava-hf layout).

    python scripts/build_llava_7b.py OUT_DIR [--variant llava-1.5|llava-hf] [--size full|reduced] [--device cuda]

The tiny checkpoint of ``build_tiny_llava.py`` gives the tokenizer, the processor and the config
files; this script then gives the model LLaVA-1.5-7B's sizes (LLaMA-7B: hidden 4096, 32 layers,
vocabulary 32,000; CLIP ViT-L/14-336: hidden 1024, 24 layers, 576 patch tokens), taken from
``bench_prefill.FULL_SIZE``, and saves new random float16 weights (about 14 GB) created on
``--device``. ``--size reduced`` takes ``bench_prefill.REDUCED``'s widths instead (float32, for a
CPU): the same vocabulary and token counts, a model small enough for CI. Random weights generate
nonsense; the token counts, shapes and code paths are LLaVA-1.5-7B's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from build_tiny_llava import build as build_tiny

from otprune.bench.prefill import FULL_SIZE, REDUCED, Arch

VARIANTS = ("llava-1.5", "llava-hf")
SIZES = {"full": (FULL_SIZE[0], torch.float16), "reduced": (REDUCED[0], torch.float32)}
MARKER = "otprune_llava_7b.json"


@contextmanager
def creating_on(device: torch.device, dtype: torch.dtype):
    """New parameters are created directly on ``device`` in ``dtype`` (no host copy of 7B weights)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def text_sizes(arch: Arch) -> dict:
    return {
        "hidden_size": arch.hidden,
        "intermediate_size": arch.ffn,
        "num_hidden_layers": arch.layers,
        "num_attention_heads": arch.heads,
        "num_key_value_heads": arch.heads,
        "vocab_size": arch.vocab,
    }


def vision_sizes(arch: Arch) -> dict:
    return {
        "hidden_size": arch.tower_hidden,
        "intermediate_size": arch.tower_ffn,
        "num_hidden_layers": arch.tower_layers,
        "num_attention_heads": arch.tower_heads,
    }


def _drop_weights(folder: Path) -> None:
    """The tiny weights go before the big ones are saved, so no stale shard is left beside them."""
    for path in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")):
        path.unlink()


def _resize_original(path: Path, arch: Arch, device: torch.device, dtype: torch.dtype) -> None:
    from llava.model.language_model.llava_llama import (
        LlavaConfig,
        LlavaLlamaForCausalLM,
    )
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tower = path / "vision"
    vision_config = CLIPVisionConfig.from_pretrained(tower)
    vision_config.update(vision_sizes(arch))
    _drop_weights(tower)
    with creating_on(device, dtype):
        CLIPVisionModel(vision_config).save_pretrained(tower)
    config = LlavaConfig.from_pretrained(path)
    config.update({**text_sizes(arch), "mm_hidden_size": arch.tower_hidden})
    _drop_weights(path)
    with creating_on(device, dtype):
        LlavaLlamaForCausalLM(config).save_pretrained(path)


def _resize_hf(path: Path, arch: Arch, device: torch.device, dtype: torch.dtype) -> None:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig.from_pretrained(path)
    config.text_config.update(text_sizes(arch))
    config.vision_config.update(vision_sizes(arch))
    _drop_weights(path)
    with creating_on(device, dtype):
        LlavaForConditionalGeneration(config).save_pretrained(path)


def build(out_dir: str | Path, variant: str = "llava-1.5", size: str = "full", device: str = "cuda", seed: int = 0) -> Path:
    """Build ``variant`` at ``size`` into ``out_dir`` (its name must contain "llava"); an existing
    complete build of the same variant and size is reused. Returns the folder."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; allowed: {', '.join(SIZES)}")
    path = Path(out_dir)
    marker = path / MARKER
    wanted = {"variant": variant, "size": size, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return path
    arch, dtype = SIZES[size]
    build_tiny(path, variant, seed)
    torch.manual_seed(seed)
    resize = _resize_hf if variant == "llava-hf" else _resize_original
    resize(path, arch, torch.device(device), dtype)
    marker.write_text(json.dumps(wanted) + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--variant", choices=VARIANTS, default="llava-1.5")
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        print(build(args.out_dir, args.variant, args.size, args.device, args.seed))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
