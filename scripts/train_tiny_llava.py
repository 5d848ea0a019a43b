"""Train a tiny original-LLaVA (LLaVA-1.5 geometry: 336 px, patch 14, 576 visual tokens) on the
synthetic benchmark (otprune.synthetic_benchmark), deterministically, on CPU.

    python scripts/train_tiny_llava.py OUT_DIR [--steps N] [--batch N] [--seed 0] [--threads 1]
    python scripts/train_tiny_llava.py --check    # prove the shipped checkpoint is this script's output
    python scripts/train_tiny_llava.py --check --full [--record]   # the full retrain whatever changed
    python scripts/train_tiny_llava.py --inputs   # which of the two --check would run, and why
    python scripts/train_tiny_llava.py --by-template 80   # its held-out answers per question template

The shipped checkpoint (configs/otprune_synth/synth-llava-1.5) is this script's output with the defaults;
its ``training.json`` records the weights' hash, the times, the held-out scores and the
environment the weights depend on (``training_environment``: the packages that compute or round
the training's arithmetic, the CPU kernels torch dispatches to, its BLAS). ``--check`` retrains
and compares: the hash only where that whole environment is the recorded one (the same thread
count, packages and kernels give the same weights bit for bit; other CPU kernels round
differently and the training drifts), and everywhere the held-out scores, which must reproduce
within ``CHECK_TOLERANCE`` questions per kind.

A full retrain takes about half an hour on one core, so ``--check`` runs it only when an input of
the weights changed. ``training.json`` records the inputs (``training_inputs``: a content hash of
the source of every module of this repository the training imports, this script, the tiny
builder, the scene generator and the metrics among them, and the environment above) and the
weights' hash after the first ``PREFIX_STEPS`` steps. Where every input is the recorded one, the
check retrains those steps and compares that hash (deterministic training on unchanged inputs
reproduces its prefix bit for bit, and the shipped files' hashes show they are the ones trained);
where any input differs it names them and runs the full retrain. ``--check --record`` writes the
current inputs and prefix into ``training.json`` after a full retrain that reproduced the shipped
weights bit for bit.

Design **choices**, for learning in minutes on two cores:

- a byte-level BPE trained on the benchmark's own words (each one token after a space, but " red":
  "Ġ" + "red"); a two-layer CLIP tower of width 64 whose last layer feeds the projector (so the
  tower trains too); a four-layer LLaMA of width 64; all trained end to end with AdamW;
- every training image is asked ``DRAWS`` questions of each kind (the caption once), each as the
  single-turn vicuna_v1 prompt that lmms-eval's ``llava`` model sends (``packed_inputs``: the
  prompts share one copy of the image's 576 visual tokens, and a block mask and per-prompt
  positions give each prompt exactly the logits it has alone, so no answer can be read off
  another prompt's text); every answer weighs the same in the loss whatever its length;
- auxiliary losses through linear heads thrown away after training: on the tower's features,
  ``patch_labels`` (each patch's object colour, shape, size, colour-shape pair, box corner, and
  grid cell), which makes the visual tokens informative long before the LLM learns to read them;
  on the projected visual tokens, ``patch_statistics`` (each patch quarter's mean colour and the
  patch's spread), which keeps the background described in what the LLM reads, as a real vision
  tower does, rather than collapsed into one "no object" token that would make every background
  as redundant as a plain one;
- training images on backgrounds of every level of ``bench.LEVELS``, drawn uniformly;
- a background curriculum: the LLM first sees only the visual tokens of patches an object is drawn
  on (in their order, at consecutive positions, as a pruned prompt has them), then each background
  patch with a probability that grows linearly to one over ``BACKGROUND_RAMP``, and all 576 tokens
  after it. Among 576 tokens, about 96 % of them background, matching the question's words against an
  object gets too little gradient for a model from random weights to find; among the object tokens
  alone it is found in a few hundred steps, and the ramp carries it over to the whole image;
- the LLM and projector initialised with std ``INIT_STD`` = 0.1 rather than transformers' 0.02,
  which suits widths in the thousands: at width 64 the small start leaves the LLM on a plateau.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import platform
import random
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from build_tiny_llava import SHIPPED_SYNTH, build_tokenizer, clip_config, clip_processor, original_config

from otprune import synthetic_benchmark as bench
from otprune.benchmark_metrics import exact_match, yes_no_f1, yes_no_prediction

VISION_HIDDEN = 64
VISION_LAYERS = 2
TEXT_HIDDEN = 64
TEXT_LAYERS = 4
STEPS = 3000
BATCH = 8
# Questions of each kind asked of every training image (the caption once).
DRAWS = 2
LEARNING_RATE = 1e-3
WARMUP = 40
# Standard deviation of the LLM's and projector's initial weights (transformers' 0.02 suits widths in
# the thousands; at width 64 it leaves the LLM on a plateau for matching words to content).
INIT_STD = 0.1
# Steps over which the share of background patches the LLM sees grows from none to all.
BACKGROUND_RAMP = (1500, 2700)
SEED = 0
# The auxiliary per-patch loss's weight against the answers' loss.
AUXILIARY_WEIGHT = 1.0
# One thread: on shared cores two OpenMP threads spin-wait on each other (measured: 5x slower per
# step than one thread while other jobs ran); the weights depend on the thread count.
THREADS = 1
CONV_TEMPLATE = "vicuna_v1"
# The packages whose versions can change the trained weights: they compute (torch, llava-torch's and
# transformers' model code) or feed (tokenizers, numpy, Pillow's drawing) the training's arithmetic.
WEIGHT_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "pillow", "safetensors", "llava-torch")
# --check on another environment: the most held-out answers per kind (of 40) a retraining may get
# right or wrong beyond the shipped model's: two standard deviations of the difference between two
# models' counts of 40 at an accuracy of one half (2 * sqrt(2 * 40 * 0.25) = 8.9). Measured: the
# shipped training retrained with torch's AVX2 kernels instead of AVX-512
# (ATEN_CPU_CAPABILITY=avx2) answered yes/no 36 (shipped 38), attribute 33 (35), count 37 (32),
# spatial 15 (22), caption 11 (11): a drift of at most 7.
CHECK_TOLERANCE = 9
# Steps the check retrains where no input changed (about a minute on one core).
PREFIX_STEPS = 150
SCRIPTS = Path(__file__).resolve().parent


def set_determinism(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    # CPU kernels are deterministic at a fixed thread count; filling every new tensor with NaN
    # (the deterministic mode's default) would cost a third of the training time.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.set_num_threads(threads)


def pixel_values(images) -> torch.Tensor:
    """CLIP's normalisation of 336 px images, which its processor leaves at their size."""
    processor = clip_processor()
    array = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    mean = np.asarray(processor.image_mean, dtype=np.float32)
    std = np.asarray(processor.image_std, dtype=np.float32)
    return torch.from_numpy((array - mean) / std).permute(0, 3, 1, 2).contiguous()


def corpus() -> list[str]:
    from llava.conversation import conv_templates

    return [conv_templates[CONV_TEMPLATE].system, "USER: ASSISTANT:", *bench.vocabulary()]


def build_untrained(path: Path, seed: int):
    """The untrained model (tower loaded, float32) and tokenizer; tokenizer and tower config in ``path``."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from transformers import CLIPVisionModel

    path.mkdir(parents=True, exist_ok=True)
    tower = path / "vision"
    torch.manual_seed(seed)
    CLIPVisionModel(clip_config(VISION_HIDDEN, VISION_LAYERS)).save_pretrained(tower)
    clip_processor().save_pretrained(tower)
    tokenizer = build_tokenizer(path, corpus())
    config = original_config(
        tokenizer, tower, anyres=False, vision_hidden=VISION_HIDDEN, select_layer=-1, hidden=TEXT_HIDDEN, layers=TEXT_LAYERS, initializer_range=INIT_STD
    )
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(config)
    model.get_vision_tower().load_model()
    model.get_vision_tower().vision_tower.requires_grad_(True)
    return model.float(), tokenizer


def prompt(turns: list[tuple[str, str | None]]) -> str:
    """The vicuna_v1 conversation of ``turns`` (question, answer or None), the image before the first."""
    from llava.constants import DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    conv = conv_templates[CONV_TEMPLATE].copy()
    for i, (question, answer) in enumerate(turns):
        conv.append_message(conv.roles[0], (DEFAULT_IMAGE_TOKEN + "\n" if i == 0 else "") + question)
        conv.append_message(conv.roles[1], answer)
    return conv.get_prompt()


def tokenize(tokenizer, text: str) -> list[int]:
    from llava.mm_utils import tokenizer_image_token

    return tokenizer_image_token(text, tokenizer)


def turn_tokens(tokenizer, question: str, answer: str) -> tuple[list[int], list[int], list[float]]:
    """The single-turn prompt ``question`` -> ``answer`` as (ids before the image placeholder, ids
    after it, each of those ids' loss weight: 1 / (answer length) on the answer's tokens, its
    ``</s>`` included, 0 elsewhere)."""
    from llava.constants import IMAGE_TOKEN_INDEX

    ids = tokenize(tokenizer, prompt([(question, answer)]))
    asked = tokenize(tokenizer, prompt([(question, None)]))
    if ids[: len(asked)] != asked:
        raise RuntimeError(f"the prompt of {question!r} does not tokenize the same with its answer {answer!r}")
    at = ids.index(IMAGE_TOKEN_INDEX)
    turn = ids[at + 1 :]
    weights = [0.0] * (len(asked) - at - 1) + [1.0 / (len(ids) - len(asked))] * (len(ids) - len(asked))
    return ids[:at], turn, weights


def encode_images(model, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's selected features (with gradients: LLaVA's own tower forward runs under no_grad)."""
    tower = model.get_vision_tower()
    return tower.feature_select(tower.vision_tower(pixels, output_hidden_states=True))


def packed_inputs(model, samples: list[tuple[list[int], list[tuple[list[int], list[float]]]]], visual: torch.Tensor | list[torch.Tensor]):
    """One row per image holding all its single-turn prompts, each seeing only the shared prefix
    (text before the image and the visual tokens) and itself, at the positions it has alone.

    ``samples``: per image, (ids before the image, [(turn ids after the image, their weights)]);
    ``visual``: per image, its (N_b, D) projected visual tokens (a (B, N, D) tensor or a list).
    Returns right-padded ``inputs_embeds`` (B, L, H), ``position_ids`` (B, L), an additive 4-D mask
    (B, 1, L, L), next-token targets and their weights (B, L), the target of position p being the
    token at p + 1 of the same prompt.
    """
    table = model.get_model().embed_tokens
    rows, positions, segments, targets, weights = [], [], [], [], []
    for b, (prefix, turns) in enumerate(samples):
        shared = len(prefix) + len(visual[b])
        parts, pos, seg, tgt, wgt = [table(torch.tensor(prefix)), visual[b]], [torch.arange(shared)], [torch.zeros(shared, dtype=torch.long)], [], []
        tgt.append(torch.zeros(shared, dtype=torch.long))
        wgt.append(torch.zeros(shared))
        for t, (ids, w) in enumerate(turns, start=1):
            parts.append(table(torch.tensor(ids)))
            pos.append(shared + torch.arange(len(ids)))
            seg.append(torch.full((len(ids),), t))
            # Each turn's first token is predicted by the shared prefix's last one, which every
            # turn shares, so it carries no weight (it is never part of an answer).
            tgt.append(torch.tensor(ids[1:] + [0]))
            wgt.append(torch.tensor(w[1:] + [0.0]))
        rows.append(torch.cat(parts))
        positions.append(torch.cat(pos))
        segments.append(torch.cat(seg))
        targets.append(torch.cat(tgt))
        weights.append(torch.cat(wgt))
    pad = torch.nn.utils.rnn.pad_sequence
    segment = pad(segments, batch_first=True, padding_value=-1)
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)
    allowed = causal & same & (segment[:, None, :] >= 0)
    # Padding rows see themselves, so that no softmax row is empty.
    allowed |= torch.eye(length, dtype=torch.bool)
    dtype = visual[0].dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    return (
        pad(rows, batch_first=True),
        pad(positions, batch_first=True),
        mask,
        pad(targets, batch_first=True),
        pad(weights, batch_first=True),
    )


COLOUR_IDS = {c: i + 1 for i, c in enumerate(bench.COLOURS)}
SHAPE_IDS = {s: i + 1 for i, s in enumerate(bench.SHAPES)}
SIZE_IDS = {s: i + 1 for i, s in enumerate(bench.SIZES)}
# Classes per channel of patch_labels (0 included).
LABEL_CLASSES = (len(COLOUR_IDS) + 1, len(SHAPE_IDS) + 1, len(SIZE_IDS) + 1, len(COLOUR_IDS) * len(SHAPE_IDS) + 1, 2, bench.GRID, bench.GRID)
# Regressed per patch from its projected visual token: each quarter's mean per channel and the
# whole patch's standard deviation per channel.
PATCH_STATISTICS = 15


def patch_statistics(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 576, 15): each patch's per-channel mean over each of its four 7 x 7 quarters (12) and
    per-channel standard deviation (3), of ``pixels`` (B, 3, 336, 336)."""
    b, c, _, _ = pixels.shape
    side, half = bench.IMAGE_SIZE // bench.PATCH, bench.PATCH // 2
    quarters = pixels.reshape(b, c, side, 2, half, side, 2, half).permute(0, 2, 5, 1, 3, 6, 4, 7).reshape(b, side * side, c * 4, -1)
    patches = pixels.reshape(b, c, side, bench.PATCH, side, bench.PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, side * side, c, -1)
    return torch.cat([quarters.mean(-1), patches.std(-1)], dim=-1)


def covered_pixels(image) -> np.ndarray:
    """(24, 24) count of each patch's pixels that differ from the background. ``image``: a scene
    drawn on the plain background (``bench.draw(scene)``)."""
    image = np.asarray(image, dtype=np.int16)
    side = bench.IMAGE_SIZE // bench.PATCH
    return (np.abs(image - np.asarray(bench.BACKGROUND)).sum(-1) > 0).reshape(side, bench.PATCH, side, bench.PATCH).sum((1, 3))


def patch_labels(scene, covered: np.ndarray) -> torch.Tensor:
    """(576, 7) labels of each patch for the auxiliary loss: the colour, shape, size and
    (colour, shape) pair index of the object covering at least a sixth of it (0: none), 1 on the
    top-left patch of each object's box, and the column and row of the grid cell holding the patch.
    ``covered``: the scene's ``covered_pixels``."""
    side = bench.IMAGE_SIZE // bench.PATCH
    labels = np.zeros((side, side, len(LABEL_CLASSES)), dtype=np.int64)
    cell = np.arange(side) * bench.PATCH // (bench.IMAGE_SIZE // bench.GRID)
    labels[..., 5], labels[..., 6] = cell[None, :], cell[:, None]
    for o in scene:
        span = bench.SIZES[o.size]
        box = (slice(o.y, o.y + span), slice(o.x, o.x + span))
        mine = covered[box] * 6 >= bench.PATCH**2
        pair = (COLOUR_IDS[o.colour] - 1) * len(SHAPE_IDS) + SHAPE_IDS[o.shape]
        for channel, value in enumerate((COLOUR_IDS[o.colour], SHAPE_IDS[o.shape], SIZE_IDS[o.size], pair)):
            labels[box + (channel,)] = np.where(mine, value, 0)
        labels[o.y, o.x, 4] = 1
    return torch.from_numpy(labels.reshape(side * side, len(LABEL_CLASSES)))


def background_share(step: int, ramp: tuple[int, int]) -> float:
    """Share of the background patches the LLM sees at ``step``: none before ``ramp[0]``, all from
    ``ramp[1]``, linear between."""
    start, end = ramp
    return min(1.0, max(0.0, (step - start) / max(1, end - start)))


def training_batch(rng: random.Random, tokens, size: int, share: float = 1.0):
    """``size`` training scenes, each on a background of a level drawn uniformly from
    ``bench.LEVELS``: pixels, packed samples (``tokens``: question, answer -> turn_tokens), patch
    labels, and (size, 576) which visual tokens the LLM sees: every patch an object touches and
    each background patch with probability ``share``."""
    scenes = [bench.random_scene(rng) for _ in range(size)]
    samples = []
    for scene in scenes:
        asked = dict.fromkeys(qa for _ in range(DRAWS) for qa in bench.questions(scene, rng).values())
        turns = [tokens(q, a) for q, a in asked]
        samples.append((turns[0][0], [(ids, w) for _, ids, w in turns]))
    backgrounds = [bench.random_background(rng, rng.choice(bench.LEVELS)) for _ in scenes]
    images = [bench.draw(s, b) for s, b in zip(scenes, backgrounds)]
    # Which patches an object covers, from the scene drawn on the plain background.
    covered = [covered_pixels(bench.draw(s)) for s in scenes]
    objects = torch.from_numpy(np.stack([c.reshape(-1) > 0 for c in covered]))
    background = torch.tensor([[rng.random() < share for _ in range(objects.shape[1])] for _ in scenes])
    return pixel_values(images), samples, torch.stack([patch_labels(s, c) for s, c in zip(scenes, covered)]), objects | background


def loss_of(model, heads, pixels, samples, labels, seen) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over answers of each answer's mean next-token cross-entropy, the LLM seeing the visual
    tokens marked in ``seen`` (B, 576) in their order; the auxiliary loss: the mean of the per-patch
    labels' cross-entropies (``heads[0]`` on the tower's features) and the patch statistics' squared
    error (``heads[1]`` on the projected visual tokens))."""
    label_head, statistics_head = heads
    features = encode_images(model, pixels)
    logits = label_head(features).split(LABEL_CLASSES, dim=-1)
    visual = model.get_model().mm_projector(features)
    auxiliary = (
        sum(torch.nn.functional.cross_entropy(logit.flatten(0, 1), labels[..., c].flatten()) for c, logit in enumerate(logits))
        + torch.nn.functional.mse_loss(statistics_head(visual), patch_statistics(pixels))
    ) / (len(logits) + 1)
    inputs, positions, mask, targets, weights = packed_inputs(model, samples, [v[s] for v, s in zip(visual, seen)])
    # Logits only where an answer token is predicted: the LM head over every visual token would
    # cost more than the rest of the loss.
    predicting = weights > 0
    hidden = model.get_model()(inputs_embeds=inputs, attention_mask=mask, position_ids=positions).last_hidden_state[predicting]
    losses = torch.nn.functional.cross_entropy(model.lm_head(hidden), targets[predicting], reduction="none")
    return (losses * weights[predicting]).sum() / weights.sum(), auxiliary


def training_environment() -> dict:
    """What the weights depend on besides this script and its arguments."""
    from importlib import metadata

    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return {
        "packages": {name: metadata.version(name) for name in WEIGHT_PACKAGES},
        "python": ".".join(platform.python_version_tuple()[:2]),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas.group(1) if blas else "unknown",
        "mkldnn": torch.backends.mkldnn.is_available(),
    }


def weights_hash(model) -> str:
    """sha256 over the trained tensors' names, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def imported_sources() -> dict[str, str]:
    """``{module: sha256 of its source}`` for every module of this repository imported so far in
    this process: otprune's (wherever it is installed) and the scripts'. In a process that runs
    this script, what the training's code is made of."""
    sources = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        if name == "otprune" or name.startswith("otprune."):
            sources[name] = file_hash(path)
        elif path.parent == SCRIPTS:
            sources[path.stem] = file_hash(path)
    return dict(sorted(sources.items()))


def training_inputs() -> dict:
    """What the weights depend on besides the defaults written in this script: the sources this
    process has imported (``imported_sources``; called where only the script's own imports ran)
    and the environment (``training_environment``: the packages at their installed versions, which
    the lock pins, Python, the CPU kernels, the BLAS)."""
    return {"sources": imported_sources(), "environment": training_environment()}


def input_changes(recorded: dict | None, current: dict) -> list[str]:
    """Each input of ``current`` (``training_inputs``) that differs from ``recorded``, named."""
    if not recorded:
        return ["training.json records no inputs"]
    changes = []
    sources = recorded.get("sources", {})
    for name in sorted(set(sources) | set(current["sources"])):
        if name not in current["sources"]:
            changes.append(f"{name}: no longer imported")
        elif name not in sources:
            changes.append(f"{name}: newly imported")
        elif sources[name] != current["sources"][name]:
            changes.append(f"{name}: source changed")
    there, here = recorded.get("environment", {}), current["environment"]
    for key in sorted(set(there) | set(here)):
        if key == "packages":
            for package in sorted(set(there.get(key, {})) | set(here.get(key, {}))):
                if there.get(key, {}).get(package) != here.get(key, {}).get(package):
                    changes.append(f"{package}: recorded {there.get(key, {}).get(package)}, here {here.get(key, {}).get(package)}")
        elif there.get(key) != here.get(key):
            changes.append(f"{key}: recorded {there.get(key)}, here {here.get(key)}")
    return changes


def shipped_files(folder: Path) -> dict[str, str]:
    """``{path in folder: sha256}`` of a checkpoint's files but its ``training.json``."""
    return {str(path.relative_to(folder)): file_hash(path) for path in sorted(folder.rglob("*")) if path.is_file() and path.name != "training.json"}


def train(path: Path, steps: int = STEPS, batch: int = BATCH, seed: int = SEED, threads: int = THREADS, log_every: int = 50, stop_after: int | None = None):
    """Train into ``path`` (a loadable original-LLaVA folder); return the model, tokenizer and stats,
    with the weights' hash after ``PREFIX_STEPS`` steps. ``stop_after``: end after that many steps
    of the ``steps``-step schedule, saving nothing (the check's prefix)."""
    set_determinism(seed, threads)
    model, tokenizer = build_untrained(path, seed)
    model.train()
    torch.manual_seed(seed)
    heads = torch.nn.ModuleList([torch.nn.Linear(VISION_HIDDEN, sum(LABEL_CLASSES)), torch.nn.Linear(TEXT_HIDDEN, PATCH_STATISTICS)])
    parameters = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    tokens = functools.cache(functools.partial(turn_tokens, tokenizer))
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    recent = []
    prefix = None
    for step in range(steps if stop_after is None else stop_after):
        answers, auxiliary = loss_of(model, heads, *training_batch(rng, tokens, batch, background_share(step, BACKGROUND_RAMP)))
        optimizer.zero_grad()
        (answers + AUXILIARY_WEIGHT * auxiliary).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        recent.append((answers.item(), auxiliary.item()))
        if log_every and (step + 1) % log_every == 0:
            mean = np.mean(recent, axis=0)
            print(f"step {step + 1}/{steps}: answer loss {mean[0]:.4f}, patch loss {mean[1]:.4f} ({time.perf_counter() - wall_start:.0f} s)", flush=True)
            recent = []
        if step + 1 == PREFIX_STEPS:
            prefix = {"steps": PREFIX_STEPS, "weights_sha256": weights_hash(model)}
    stats = {
        "steps": steps,
        "batch": batch,
        "seed": seed,
        "threads": threads,
        "torch": torch.__version__,
        "environment": training_environment(),
        "cpu_s": round(time.process_time() - cpu_start, 1),
        "wall_s": round(time.perf_counter() - wall_start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "prefix": prefix,
    }
    model.eval()
    if stop_after is not None:
        return model, tokenizer, stats
    save(model, path)
    stats["weights_sha256"] = weights_hash(model)
    return model, tokenizer, stats


def save(model, path: Path) -> None:
    """The LLM and projector in ``path``, the tower in ``path/vision``; the config names the tower
    relatively, so the folder can ship: ``build_tiny_llava.install_trained`` makes a loadable copy."""
    tower = model.get_vision_tower().vision_tower
    tower.save_pretrained(path / "vision")
    state = {k: v for k, v in model.state_dict().items() if ".vision_tower." not in k}
    model.save_pretrained(path, state_dict=state)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["mm_vision_tower"] = "vision"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def row_image(row: dict):
    """A held-out row's scene drawn on its background (plain when it names none)."""
    return bench.draw(bench.scene_from_dict(row["scene"]), bench.background_from_dict(row.get("background")))


@torch.no_grad()
def answer(model, tokenizer, image, question: str, visual: bool = True, max_new_tokens: int = 24) -> str:
    """Greedy answer about ``image`` (a drawn scene) through LLaVA's own generate; ``visual=False``
    drops the image's tokens from the same prompt (what VTW does before the LLM)."""
    from llava.constants import IMAGE_TOKEN_INDEX

    # Imported here, not with the script: the patches are no input of the training.
    from otprune.patches.llava import install_cache_keyword

    install_cache_keyword()  # LLaVA's generate on transformers >= 5.24
    ids = tokenize(tokenizer, prompt([(question, None)]))
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if visual:
        pixels = pixel_values([image]).to(model.dtype)
        output = model.generate(torch.tensor([ids]), images=pixels, image_sizes=[(bench.IMAGE_SIZE,) * 2], **kwargs)
    else:
        output = model.generate(torch.tensor([[i for i in ids if i != IMAGE_TOKEN_INDEX]]), **kwargs)
    return tokenizer.batch_decode(output, skip_special_tokens=True)[0].strip()


def answered_right(kind: str, prediction: str, expected: str) -> bool:
    """A yes/no answer read as yes or no (``yes_no_prediction``), any other by exact match."""
    return yes_no_prediction(prediction) == expected if kind == "presence" else bool(exact_match(prediction, expected))


def evaluate(model, tokenizer, rows: dict[str, list[dict]], visual: bool = True) -> dict[str, float]:
    """Scores per kind: yes/no F1 and accuracy, exact match of the short answers and of the caption."""
    scores = {}
    for kind, items in rows.items():
        predictions = [answer(model, tokenizer, row_image(r), r["question"], visual) for r in items]
        if kind == "presence":
            marked = [{"prediction": yes_no_prediction(p), "answer": r["answer"]} for p, r in zip(predictions, items)]
            scores["presence_f1"] = yes_no_f1(marked)
        right = sum(answered_right(kind, p, r["answer"]) for p, r in zip(predictions, items)) / len(items)
        scores["presence_acc" if kind == "presence" else f"{kind}_em"] = right
    return scores


@torch.no_grad()
def projected_tokens(model, images) -> torch.Tensor:
    """(B, 576, D) visual tokens the LLM reads for ``images``: the tower's features, projected."""
    return model.get_model().mm_projector(encode_images(model, pixel_values(images).to(model.dtype)))


def level_redundancy(model, rows: dict[str, list[dict]]) -> float:
    """Mean near-duplicate share (``otprune.measures.near_duplicate_share``) of the visual tokens
    of ``rows``' images."""
    from otprune.measures import near_duplicate_share

    images = [row_image(r) for items in rows.values() for r in items]
    shares = [near_duplicate_share(projected_tokens(model, images[i : i + 16])) for i in range(0, len(images), 16)]
    return float(torch.cat(shares).mean())


def held_out_stats(model, tokenizer, per_kind: int) -> dict:
    """On ``per_kind`` held-out questions per kind, asked at every level: the scores per level,
    the scores without the image (the same at every level), a blind model's best, and each
    level's measured redundancy."""
    rows = bench.question_rows(per_kind)
    stats = {"held_out_per_kind": per_kind, "held_out": {}, "redundancy": {}}
    for level in bench.LEVELS:
        leveled = bench.level_rows(rows, level)
        stats["held_out"][level] = {k: round(v, 4) for k, v in evaluate(model, tokenizer, leveled).items()}
        stats["redundancy"][level] = round(level_redundancy(model, leveled), 4)
    stats["held_out_no_visual"] = {k: round(v, 4) for k, v in evaluate(model, tokenizer, rows, visual=False).items()}
    stats["held_out_chance"] = {k: round(v, 4) for k, v in bench.blind_chance(rows).items()}
    return stats


def correct_by_template(model, tokenizer, rows: dict[str, list[dict]]) -> dict[tuple[str, str, str], tuple[int, int]]:
    """``{(kind, question template, "one object" or "several"): (correct, asked)}``: which questions
    the model answers from the image, and which only where one object makes them global."""
    tally: dict[tuple[str, str, str], list[int]] = {}
    for kind, items in rows.items():
        for r in items:
            scene = bench.scene_from_dict(r["scene"])
            predicted = answer(model, tokenizer, row_image(r), r["question"])
            right = answered_right(kind, predicted, r["answer"])
            template = bench.question_template(r["question"].removesuffix(bench.SHORT_ANSWER_PROMPT))
            counts = tally.setdefault((kind, template, "one object" if len(scene) == 1 else "several"), [0, 0])
            counts[0] += int(right)
            counts[1] += 1
    return {key: (right, asked) for key, (right, asked) in sorted(tally.items())}


def held_out_counts(scores: dict[str, float], per_kind: int) -> dict[str, int]:
    """Right answers per kind (yes/no by accuracy) out of ``per_kind``."""
    return {k.rsplit("_", 1)[0]: round(v * per_kind) for k, v in scores.items() if k.endswith(("_acc", "_em"))}


def retrain_case(recorded: dict, current: dict, full: bool = False) -> tuple[str, str]:
    """Which proof ``check`` runs for ``current`` inputs (``training_inputs``) against ``recorded``
    (a ``training.json``), and why: ``"prefix"`` where every input of the weights is the recorded
    one, else ``"full"``, naming each input that changed."""
    if full:
        return "full", "--full"
    if not recorded.get("prefix"):
        return "full", "training.json records no prefix"
    changes = input_changes(recorded.get("inputs"), current)
    if changes:
        return "full", "inputs changed: " + "; ".join(changes)
    sources = ", ".join(current["sources"])
    return "prefix", f"every input of the weights is the recorded one (sources {sources}; the environment)"


def check(recorded: dict, full: bool = False, record: Path | None = None) -> int:
    """Prove the shipped checkpoint (recorded in ``recorded``, its ``training.json``) is what this
    script trains; 0 if it holds. The shipped files must hash as recorded. Then, where every input
    of the weights is the recorded one and not ``full``, the first ``PREFIX_STEPS`` steps retrained
    must hash as recorded; otherwise the full retrain: the weights' hash where the environment is
    the recorded one, the held-out answers everywhere. ``record``: the ``training.json`` to update
    with the current inputs and prefix after a full retrain that reproduced the weights."""
    ok = True
    shipped_now = shipped_files(SHIPPED_SYNTH)
    if "shipped_files" in recorded and recorded["shipped_files"] != shipped_now:
        apart = sorted(set(recorded["shipped_files"].items()) ^ set(shipped_now.items()))
        print(f"the shipped checkpoint's files differ from the recorded ones: {sorted({name for name, _ in apart})}")
        ok = False
    current = training_inputs()
    case, why = retrain_case(recorded, current, full)
    print(f"{case} check: {why}", flush=True)
    if case == "prefix":
        with tempfile.TemporaryDirectory() as tmp:
            _, _, stats = train(Path(tmp) / "synth-llava", stop_after=PREFIX_STEPS)
        same = stats["prefix"] == recorded["prefix"]
        print(
            f"weights after {PREFIX_STEPS} steps: retrained {stats['prefix']['weights_sha256']} vs recorded "
            f"{recorded['prefix']['weights_sha256']}: {'identical' if same else 'DIFFERENT'}"
        )
        imported = input_changes(current, training_inputs())
        if imported:
            print(f"the training imported modules its inputs do not name: {imported}")
        return 0 if ok and same and not imported else 1
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, stats = train(Path(tmp) / "synth-llava")
        per_kind = recorded["held_out_per_kind"]
        retrained = held_out_stats(model, tokenizer, per_kind)
    recorded_environment = {"sources": current["sources"], "environment": recorded.get("environment", {})}
    environment_apart = input_changes(recorded_environment, current)
    if environment_apart:
        print(
            f"environment differs from the recorded one ({'; '.join(environment_apart)}): weights hash not compared "
            f"(retrained {stats['weights_sha256'][:12]}, shipped {recorded['weights_sha256'][:12]})"
        )
    else:
        same = stats["weights_sha256"] == recorded["weights_sha256"]
        ok &= same
        print(f"environment as recorded: retrained {stats['weights_sha256']} vs shipped {recorded['weights_sha256']}: {'identical' if same else 'DIFFERENT'}")
    print(f"held-out answers right of {per_kind} per kind and level (tolerance {CHECK_TOLERANCE}):")
    for level in bench.LEVELS:
        shipped = held_out_counts(recorded["held_out"][level], per_kind)
        again = held_out_counts(retrained["held_out"][level], per_kind)
        for kind, count in shipped.items():
            within = abs(again[kind] - count) <= CHECK_TOLERANCE
            ok &= within
            print(f"  {level} {kind}: shipped {count}, retrained {again[kind]} ({'ok' if within else 'OUTSIDE the tolerance'})")
        print(f"  {level} near-duplicate share: shipped {recorded['redundancy'][level]:.3f}, retrained {retrained['redundancy'][level]:.3f}")
    if record is not None:
        if ok and not environment_apart:
            recorded.update(inputs=current, prefix=stats["prefix"], shipped_files=shipped_now)
            record.write_text(json.dumps(recorded, indent=1) + "\n")
            print(f"recorded the inputs and the {PREFIX_STEPS}-step prefix in {record}")
        else:
            print(f"not recorded in {record}: only a full retrain that reproduces the shipped weights in their environment is")
            ok = False
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", help="where to write the checkpoint (folder name must contain 'llava')")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--eval-per-kind", type=int, default=40, help="held-out questions per kind scored at the end")
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"prove the shipped checkpoint is this script's output: the first {PREFIX_STEPS} steps where no input of the weights changed, else the full retrain",
    )
    parser.add_argument("--full", action="store_true", help="with --check: the full retrain, whatever changed")
    parser.add_argument("--record", action="store_true", help="with --check: record the current inputs after a full retrain that reproduces the weights")
    parser.add_argument("--inputs", action="store_true", help="print the inputs of the weights and which check --check would run, and why (JSON)")
    parser.add_argument("--by-template", type=int, metavar="N", help="score the shipped checkpoint per question template on N held-out questions per kind")
    args = parser.parse_args(argv)
    if args.by_template is not None:
        from build_tiny_llava import build
        from llava.model.builder import load_pretrained_model

        if args.by_template < 1:
            parser.error(f"--by-template {args.by_template}: it must be a count of questions >= 1")
        rows = {k: v for k, v in bench.question_rows(args.by_template).items() if k != "caption"}
        with tempfile.TemporaryDirectory() as tmp:
            folder = build(Path(tmp) / SHIPPED_SYNTH.name, SHIPPED_SYNTH.name)
            tokenizer, model, _, _ = load_pretrained_model(str(folder), None, folder.name, device_map="cpu", device="cpu")
        print("| kind | question | scenes | right |\n|---|---|---|---|")
        for (kind, template, objects), (right, asked) in correct_by_template(model.eval(), tokenizer, rows).items():
            print(f"| {kind} | {template} | {objects} | {right}/{asked} ({100 * right / asked:.0f} %) |")
        return 0
    record = SHIPPED_SYNTH / "training.json"
    if (args.full or args.record) and not args.check:
        parser.error("--full and --record go with --check")
    if args.inputs:
        current = training_inputs()
        case, why = retrain_case(json.loads(record.read_text()), current)
        print(json.dumps({"inputs": current, "case": case, "why": why}, indent=1))
        return 0
    if args.check:
        return check(json.loads(record.read_text()), full=args.full, record=record if args.record else None)
    if not args.out_dir:
        parser.error("OUT_DIR is required unless --check")
    path = Path(args.out_dir)
    if "llava" not in path.name.lower():
        parser.error(f"the checkpoint folder name must contain 'llava' (LLaVA's loader checks it); got {path.name!r}")
    if path.exists():
        shutil.rmtree(path)
    inputs = training_inputs()  # before the evaluation imports what the weights do not depend on
    model, tokenizer, stats = train(path, args.steps, args.batch, args.seed, args.threads)
    stats.update(held_out_stats(model, tokenizer, args.eval_per_kind), inputs=inputs, shipped_files=shipped_files(path))
    (path / "training.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
