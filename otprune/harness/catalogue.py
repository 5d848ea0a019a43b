"""The methods and models a config may name, and their labels in folder names and tables."""

from __future__ import annotations

from dataclasses import dataclass

from otprune.methods import method_names

# Display name (the paper's) -> BASELINE value of the patch. A config may also name any other
# installed method (an outside plugin) by its BASELINE name: see ``baseline``.
METHODS = {
    "Original": "ORIG",
    "OTPrune": "OURS",
    "DivPrune": "DIVPRUNE",
    "FastV": "FASTV",
    "VTW": "VTW",
    "DPP": "DPP",
    "Random": "RANDOM",
    "Uniform": "UNIFORM",
    "TrimTokenator": "TRIM",
    "STP": "STP",
    "CDPruner": "CDPRUNER",
    "POOL": "POOL",
    # The paper's adaptive rows and the vision-side peers (METHOD.md): each image's count chosen by
    # the method where it asks for ``adaptive`` and the config's ratio is ``adaptive``.
    "PruMerge": "PRUMERGE",
    "PruMerge+": "PRUMERGE_PLUS",
    "DivPrune*": "DIVPRUNE_ADAPTIVE",
    "VisionZip": "VISIONZIP",
    "FasterVLM": "FASTERVLM",
    # M3 (Matryoshka Multimodal Models) is POOL on the M3-finetuned checkpoint at one of its trained
    # scales: a row of its own, beside POOL on the checkpoints it was not trained for.
    "M3": "POOL",
}
# Methods that keep no ratio: the full model, and VTW (drops every visual token at layer K; at K = 0
# the LLM reads the text alone, the no-image control).
RATIO_FREE = {"Original": 1.0, "VTW": 0.0}
# A config's ratio for a method that chooses each image's count itself (it asks for the
# ``adaptive`` context): the run leaves SUBSET_RATIO unset.
ADAPTIVE = "adaptive"


@dataclass(frozen=True)
class ModelSpec:
    """``flops_model``: the real LLM shape (otprune.measures.MODELS) of the TFLOP column;
    ``tiny``: the build_tiny_llava.py variant when the checkpoint is built here; ``trained``: its
    weights were trained (on the synthetic benchmark), so its scores mean something;
    ``a100_hours``: a rough estimate (not measured) of one full benchmark's run on one A100 at
    batch 1, for ``--dry-run``'s plan size (None: the tiny models run on a CPU in minutes);
    ``finetuned_from``: the checkpoint a finetuned one was made from, whose Table 1 block its rows
    join (the paper sets M3 among LLaVA-1.5-7B's rows)."""

    flops_model: str
    tiny: str | None = None
    trained: bool = False
    a100_hours: float | None = None
    finetuned_from: str | None = None


# a100_hours: the README's rough needs (about 10 h per model and method for the 11 benchmarks on
# LLaVA-1.5-7B, 13B twice that, 1.6-7B and the any-resolution families about 3x), per benchmark.
MODELS = {
    "liuhaotian/llava-v1.5-7b": ModelSpec("llava-1.5-7b", a100_hours=0.9),
    "liuhaotian/llava-v1.5-13b": ModelSpec("llava-1.5-13b", a100_hours=1.8),
    # M3's finetune of LLaVA-1.5-7B: the same LLM, so the same shape for the TFLOP column.
    "mu-cai/llava-v1.5-7b-m3": ModelSpec("llava-1.5-7b", a100_hours=0.9, finetuned_from="liuhaotian/llava-v1.5-7b"),
    "liuhaotian/llava-v1.6-vicuna-7b": ModelSpec("llava-1.6-7b", a100_hours=2.7),
    "Qwen/Qwen2.5-VL-7B-Instruct": ModelSpec("qwen2.5-vl-7b", a100_hours=2.7),
    "Qwen/Qwen3-VL-8B-Instruct": ModelSpec("qwen3-vl-8b", a100_hours=2.7),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": ModelSpec("llava-onevision-7b", a100_hours=2.7),
    "tiny-llava-1.5": ModelSpec("llava-1.5-7b", tiny="llava-1.5"),
    "tiny-llava-1.6": ModelSpec("llava-1.6-7b", tiny="llava-1.6"),
    "synth-llava-1.5": ModelSpec("llava-1.5-7b", tiny="synth-llava-1.5", trained=True),
}


def baseline(label: str) -> str | None:
    """The ``BASELINE`` value of a config's method ``label``: a display name's, else the label's own
    when it names (in any case) an installed method that has no display name; ``None`` otherwise,
    so that no method runs under two labels."""
    if label in METHODS:
        return METHODS[label]
    name = label.strip().upper() if isinstance(label, str) else None
    return name if name in method_names() and name not in METHODS.values() else None


def method_labels() -> list[str]:
    """What a config may name: the display names, then the installed methods that have none."""
    named = set(METHODS.values())
    return [*METHODS, *(name for name in method_names() if name not in named)]


def ratio_label(ratio: float | str) -> str:
    return ADAPTIVE if ratio == ADAPTIVE else f"{ratio:g}"


def ratio_order(ratio: float | str) -> tuple[int, float]:
    """A sort key of ratios: the numbers in order, then ``adaptive`` (no fixed count)."""
    return (1, 0.0) if ratio == ADAPTIVE else (0, float(ratio))


def folder_label(label: str) -> str:
    """A method label as a folder name a shell takes unquoted: ``DivPrune*`` is ``DivPrune-star``
    (a ``*`` would glob), any other character but letters, digits and ``._+-`` a ``-``."""
    return "".join("-star" if c == "*" else c if c.isalnum() or c in "._+-" else "-" for c in label)


def model_label(model: str) -> str:
    return model.split("/")[-1]
