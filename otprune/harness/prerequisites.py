"""What a config needs on this machine (libraries, GPUs, the hub, java, the tiny builder), and which
config runs by default."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from pathlib import Path

from otprune import stack
from otprune.harness import resources
from otprune.harness.catalogue import MODELS, baseline
from otprune.harness.checkpoints import tiny_llm_shape
from otprune.harness.config import Config
from otprune.harness.resources import TINY_BUILDER
from otprune.prune_config import default_layer_index


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_model(model_id: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}").is_dir()


def prerequisites(config: Config, num_processes: int, on_cluster: bool = False) -> tuple[list[str], list[str]]:
    """``(missing, warnings)``: what stops the config from running, and what only degrades it.
    ``on_cluster``: the runs go to Slurm jobs, whose nodes have the GPUs this host may lack."""
    missing = [f"a known break: {b}" for b in stack.known_breaks()]
    warnings = []
    for module, what in (("lmms_eval", "lmms-eval"), ("llava", "llava-torch (pip install --no-deps llava-torch==1.2.2.post1)")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{what} is not installed (bash scripts/install.sh --llava)")
    tiny = [m for m in config.models if MODELS[m].tiny is not None]
    if tiny and (resources.CHECKOUT is None or not (resources.CHECKOUT / TINY_BUILDER).is_file()):
        missing.append(f"{', '.join(tiny)} are built by {TINY_BUILDER}, which only a source checkout has (pip install -e CLONE)")
    elif tiny:
        missing += layer_problems(config, tiny)
    real = [m for m in config.models if MODELS[m].tiny is None]
    if real and on_cluster:
        warnings.append(
            f"{', '.join(real)} need GPUs on the Slurm nodes (about 16 GB for a 7B model, 28 GB for 13B, in fp16), "
            "and the models and datasets in a Hugging Face cache the nodes share"
        )
    elif real:
        gpus = gpu_count()
        if gpus == 0:
            missing.append(f"no CUDA GPU: {', '.join(real)} need one (about 16 GB for a 7B model, 28 GB for 13B, in fp16)")
        elif gpus < num_processes:
            missing.append(f"--num-processes {num_processes} but only {gpus} GPU(s)")
        if not hub_reachable():
            uncached = [m for m in real if not cached_model(m)]
            if uncached:
                missing.append(
                    f"the Hugging Face hub is unreachable and {', '.join(uncached)} is not in the local cache; the datasets (lmms-lab/*) must be cached too"
                )
            else:
                warnings.append("hub unreachable: using cached models; every dataset must be in the local cache too")
    needs = {need for task in config.tasks for need in config.catalogue[task].get("needs", [])}
    if "java" in needs and shutil.which("java") is None:
        missing.append("java is not on PATH: the captioning metrics (pycocoevalcap's PTB tokenizer) need it")
    if "judge" in needs and not os.environ.get("OPENAI_API_KEY"):
        warnings.append("OPENAI_API_KEY is not set: mmbench_en_dev's GPT answer matching falls back to lmms-eval's default")
    if on_cluster and importlib.util.find_spec("submitit") is None:
        missing.append("submitit is not installed, which --executor slurm submits with (bash scripts/install.sh installs it)")
    if on_cluster and shutil.which("sbatch") is None:
        missing.append("sbatch is not on PATH: --executor slurm submits from a host with the Slurm client")
    if num_processes > 1 and shutil.which("accelerate") is None:
        missing.append("--num-processes > 1 needs accelerate on PATH")
    return missing, warnings


def layer_problems(config: Config, tiny: list[str]) -> list[str]:
    """Methods whose K is beyond a tiny checkpoint's LLM (its shape is known before it is built):
    the patch would refuse them at the first sample of every run."""
    problems = []
    for model in tiny:
        layers = tiny_llm_shape(MODELS[model].tiny)["layers"]
        for method, spec in config.methods.items():
            k = config.models[model].get(method, {}).get("layer_index", spec.get("layer_index", default_layer_index(baseline(method))))
            if k >= layers:
                problems.append(
                    f"{method}'s layer_index {k} is beyond {model}'s LLM, which has {layers} layers (0 .. {layers - 1}); "
                    f"give it a smaller layer_index for this model (models: {{{model}: {{{method}: {{layer_index: K}}}}}})"
                )
    return problems


def default_config() -> tuple[str, str]:
    """``paper_table1`` with a GPU and the hub (or a cache), else ``synth`` (the tiny LLaVA trained
    on the synthetic benchmark); and why."""
    gpus = gpu_count()
    if gpus == 0:
        return "synth", "no GPU"
    if not hub_reachable() and not all(cached_model(m) for m in MODELS if MODELS[m].tiny is None):
        return "synth", "no hub access and no local cache of the models"
    return "paper_table1", f"{gpus} GPU(s) and the models available"
