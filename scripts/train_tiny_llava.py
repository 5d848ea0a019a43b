"""Train a tiny original-LLaVA (LLaVA-1.5 geometry: 336 px, patch 14, 576 visual tokens) on the
synthetic benchmark (otprune.synthetic_benchmark), deterministically, on CPU.

    python scripts/train_tiny_llava.py OUT_DIR [--steps N] [--batch N] [--seed 0] [--threads 1]
    python scripts/train_tiny_llava.py --check    # retrain the shipped checkpoint, compare its hash

The shipped checkpoint (configs/otprune_synth/synth-llava-1.5) is this script's output with the defaults;
its ``training.json`` records the weights' hash, the times and the held-out scores. The same
thread count and torch build give the same weights bit for bit.

Design **choices**, for learning in minutes on two cores: a byte-level BPE trained on the
benchmark's own words (every word one token); a one-layer CLIP tower of width 64 whose last
layer feeds the projector (so the tower trains too); a two-layer LLaMA of width 64; all
trained end to end with AdamW. Each training image carries all its questions as one multi-turn
vicuna_v1 conversation (the template lmms-eval's ``llava`` model uses), in random order, so the
576 visual tokens are paid for once per image; every answer weighs the same in the loss
whatever its length.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from build_tiny_llava import SHIPPED_SYNTH, build_tokenizer, clip_config, clip_processor, original_config
from otprune import synthetic_benchmark as bench
from otprune.benchmark_metrics import exact_match, normalise, yes_no_f1, yes_no_prediction

VISION_HIDDEN = 64
VISION_LAYERS = 1
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
STEPS = 1500
BATCH = 12
LEARNING_RATE = 3e-3
WARMUP = 40
SEED = 0
# One thread: on shared cores two OpenMP threads spin-wait on each other (measured: 5x slower per
# step than one thread while other jobs ran); the weights depend on the thread count.
THREADS = 1
CONV_TEMPLATE = "vicuna_v1"


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
        tokenizer, tower, anyres=False, vision_hidden=VISION_HIDDEN, select_layer=-1, hidden=TEXT_HIDDEN, layers=TEXT_LAYERS
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


def conversation(tokenizer, turns: list[tuple[str, str]]) -> tuple[list[int], list[float]]:
    """Token ids of the whole conversation (the image as IMAGE_TOKEN_INDEX) and each token's loss
    weight: 1 / (answer length) on answer tokens (their ``</s>`` included), 0 elsewhere."""
    ids = tokenize(tokenizer, prompt(turns))
    weights = [0.0] * len(ids)
    for i in range(len(turns)):
        start = len(tokenize(tokenizer, prompt(turns[:i] + [(turns[i][0], None)])))
        end = len(tokenize(tokenizer, prompt(turns[: i + 1])))
        # The prompt must tokenize the same alone as inside the longer conversation.
        if tokenize(tokenizer, prompt(turns[: i + 1])) != ids[:end]:
            raise RuntimeError(f"conversation tokens are not prefix-stable at turn {i}: {turns[i]!r}")
        for position in range(start, end):
            weights[position] = 1.0 / (end - start)
    return ids, weights


def encode_images(model, pixels: torch.Tensor) -> torch.Tensor:
    """Projected visual tokens with gradients (LLaVA's own tower forward runs under no_grad)."""
    tower = model.get_vision_tower()
    features = tower.feature_select(tower.vision_tower(pixels, output_hidden_states=True))
    return model.get_model().mm_projector(features)


def embed(model, sequences: list[list[int]], visual: torch.Tensor | None) -> torch.Tensor:
    """Right-padded input embeddings: each sequence's IMAGE_TOKEN_INDEX replaced by its visual
    tokens (or removed when ``visual`` is None), as LLaVA's prepare_inputs_labels_for_multimodal does."""
    from llava.constants import IMAGE_TOKEN_INDEX

    table = model.get_model().embed_tokens
    rows = []
    for b, ids in enumerate(sequences):
        at = ids.index(IMAGE_TOKEN_INDEX)
        parts = [table(torch.tensor(ids[:at])), table(torch.tensor(ids[at + 1 :]))]
        if visual is not None:
            parts.insert(1, visual[b])
        rows.append(torch.cat(parts))
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def training_batch(rng: random.Random, tokenizer, size: int):
    scenes = [bench.random_scene(rng) for _ in range(size)]
    sequences, weights = [], []
    for scene in scenes:
        turns = list(bench.questions(scene, rng).values())
        rng.shuffle(turns)
        ids, w = conversation(tokenizer, turns)
        sequences.append(ids)
        weights.append(w)
    return pixel_values([bench.draw(s) for s in scenes]), sequences, weights


def loss_of(model, pixels, sequences, weights) -> torch.Tensor:
    """Mean over answers of each answer's mean next-token cross-entropy."""
    from llava.constants import IMAGE_TOKEN_INDEX

    visual = encode_images(model, pixels)
    inputs = embed(model, sequences, visual)
    n_visual = visual.shape[1]
    targets = torch.zeros(inputs.shape[:2], dtype=torch.long)
    token_weights = torch.zeros(inputs.shape[:2])
    for b, (ids, w) in enumerate(zip(sequences, weights)):
        # Positions after the image shift by the visual tokens minus the placeholder.
        at = ids.index(IMAGE_TOKEN_INDEX)
        shifted = [p if p < at else p + n_visual - 1 for p in range(len(ids))]
        for p, (token, weight) in zip(shifted, zip(ids, w)):
            if weight:
                targets[b, p] = token
                token_weights[b, p] = weight
    # Logits only where an answer token is predicted (the position before it): the LM head over
    # every visual token would cost more than the rest of the loss.
    predicting = token_weights[:, 1:] > 0
    hidden = model.get_model()(inputs_embeds=inputs).last_hidden_state[:, :-1][predicting]
    losses = torch.nn.functional.cross_entropy(model.lm_head(hidden), targets[:, 1:][predicting], reduction="none")
    return (losses * token_weights[:, 1:][predicting]).sum() / token_weights.sum()


def weights_hash(model) -> str:
    """sha256 over the trained tensors' names, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train(path: Path, steps: int = STEPS, batch: int = BATCH, seed: int = SEED, threads: int = THREADS, log_every: int = 50):
    """Train into ``path`` (a loadable original-LLaVA folder); return the model, tokenizer and stats."""
    set_determinism(seed, threads)
    model, tokenizer = build_untrained(path, seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = random.Random(seed)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    recent = []
    for step in range(steps):
        loss = loss_of(model, *training_batch(rng, tokenizer, batch))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}: loss {sum(recent) / len(recent):.4f} ({time.perf_counter() - wall_start:.0f} s)", flush=True)
            recent = []
    stats = {
        "steps": steps,
        "batch": batch,
        "seed": seed,
        "threads": threads,
        "torch": torch.__version__,
        "cpu_s": round(time.process_time() - cpu_start, 1),
        "wall_s": round(time.perf_counter() - wall_start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    model.eval()
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


@torch.no_grad()
def answer(model, tokenizer, scene, question: str, visual: bool = True, max_new_tokens: int = 24) -> str:
    """Greedy answer through LLaVA's own generate; ``visual=False`` drops the image's tokens from
    the same prompt (what VTW does before the LLM)."""
    from llava.constants import IMAGE_TOKEN_INDEX

    ids = tokenize(tokenizer, prompt([(question, None)]))
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if visual:
        pixels = pixel_values([bench.draw(scene)]).to(model.dtype)
        output = model.generate(torch.tensor([ids]), images=pixels, image_sizes=[(bench.IMAGE_SIZE,) * 2], **kwargs)
    else:
        output = model.generate(torch.tensor([[i for i in ids if i != IMAGE_TOKEN_INDEX]]), **kwargs)
    return tokenizer.batch_decode(output, skip_special_tokens=True)[0].strip()


def evaluate(model, tokenizer, rows: dict[str, list[dict]], visual: bool = True) -> dict[str, float]:
    """Scores per kind: yes/no F1 and accuracy, exact match of the short answers and of the caption."""
    scores = {}
    for kind, items in rows.items():
        predictions = [answer(model, tokenizer, bench.scene_from_dict(r["scene"]), r["question"], visual) for r in items]
        if kind == "presence":
            marked = [{"prediction": yes_no_prediction(p), "answer": r["answer"]} for p, r in zip(predictions, items)]
            scores["presence_f1"] = yes_no_f1(marked)
            scores["presence_acc"] = sum(m["prediction"] == m["answer"] for m in marked) / len(marked)
        else:
            scores[f"{kind}_em"] = sum(exact_match(p, r["answer"]) for p, r in zip(predictions, items)) / len(items)
    return scores


def chance(rows: dict[str, list[dict]]) -> dict[str, float]:
    """What always giving each kind's most frequent answer scores (F1 of always "yes" for yes/no)."""
    scores = {}
    for kind, items in rows.items():
        answers = [normalise(r["answer"]) for r in items]
        top = max(answers.count(a) for a in set(answers)) / len(answers)
        if kind == "presence":
            scores["presence_f1"] = yes_no_f1([{"prediction": "yes", "answer": a} for a in answers])
            scores["presence_acc"] = top
        else:
            scores[f"{kind}_em"] = top
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", help="where to write the checkpoint (folder name must contain 'llava')")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--eval-per-kind", type=int, default=40, help="held-out questions per kind scored at the end")
    parser.add_argument("--check", action="store_true", help="retrain with the defaults; compare to the shipped hash")
    args = parser.parse_args(argv)
    if args.check:
        recorded = json.loads((SHIPPED_SYNTH / "training.json").read_text())["weights_sha256"]
        with tempfile.TemporaryDirectory() as tmp:
            _, _, stats = train(Path(tmp) / "synth-llava")
        same = stats["weights_sha256"] == recorded
        print(f"retrained {stats['weights_sha256']} vs shipped {recorded}: {'identical' if same else 'DIFFERENT'}")
        return 0 if same else 1
    if not args.out_dir:
        parser.error("OUT_DIR is required unless --check")
    path = Path(args.out_dir)
    if "llava" not in path.name.lower():
        parser.error(f"the checkpoint folder name must contain 'llava' (LLaVA's loader checks it); got {path.name!r}")
    if path.exists():
        shutil.rmtree(path)
    model, tokenizer, stats = train(path, args.steps, args.batch, args.seed, args.threads)
    rows = bench.question_rows(args.eval_per_kind)
    stats["held_out_per_kind"] = args.eval_per_kind
    stats["held_out"] = {k: round(v, 4) for k, v in evaluate(model, tokenizer, rows).items()}
    stats["held_out_no_visual"] = {k: round(v, 4) for k, v in evaluate(model, tokenizer, rows, visual=False).items()}
    stats["held_out_chance"] = {k: round(v, 4) for k, v in chance(rows).items()}
    (path / "training.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
