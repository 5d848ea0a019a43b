"""End-to-end benchmark (issue 6): what pruning saves in LLaVA's time to first token and decode.

    otprune bench prefill                 # full-size LLaVA-1.5-7B / 1.6-7B, float16, on the GPU
    otprune bench prefill --device cpu    # reduced-size models on the CPU (not LLaVA's speed)
    otprune bench prefill --quick         # batch 1, ratio 0.098 only, one repeat (CI)
    otprune bench prefill --greedy triton # OTPrune with the fused Triton greedy

The models are built from their configurations with random weights (speed does not depend on the
weights): a CLIP ViT-L/14-336 tower (its penultimate layer's 576 patch features, as LLaVA uses),
the ``mlp2x_gelu`` projector, and a LLaMA-7B ``LlamaForCausalLM``. LLaVA-1.6 is modelled as five
tower passes per image (the base image and a 2 x 2 grid of tiles): 2,880 visual tokens, the size of
its largest anyres layout, without the row-newline vectors. The prompt is 35 text tokens, the
image, then 20 text tokens. Per configuration (no pruning; OTPrune and DivPrune at 0.098 and 0.25):

- time to first token (TTFT) = vision (tower + projector) + selection + prefill (the LLM on the
  text and kept visual embeddings via ``inputs_embeds``, last-token logits, argmax), each stage
  timed with a device synchronisation at its end, medians over ``--repeats`` runs after a warm-up;
- greedy decode with the KV cache: median ms per step, and tokens/s summed over the batch;
- peak GPU memory (not available on the CPU);
- beside each time, in brackets, its roofline: max(FLOPs / matmul throughput, weight bytes read /
  memory bandwidth), with both rates measured at the start of the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from otprune.measures import ModelShape, prefill_flops
from otprune.selectors import GREEDY_PATHS, budget, select_divprune, select_otprune

TEXT_BEFORE_IMAGE = 35
TEXT_AFTER_IMAGE = 20
PATCHES = 576  # (336 / 14)^2 patch features per tower pass; the CLS token is dropped
IMAGE_SIZE = 336
METHODS = [("none", None), ("otprune", 0.098), ("otprune", 0.25), ("divprune", 0.098), ("divprune", 0.25)]
SELECTOR_FUNCTIONS = {"otprune": select_otprune, "divprune": select_divprune}


@dataclass(frozen=True)
class Arch:
    """Sizes of one LLaVA variant: LLaMA LLM, CLIP tower, and tower passes per image."""

    name: str
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    tower_hidden: int
    tower_layers: int
    tower_heads: int
    tower_ffn: int
    crops: int

    @property
    def visual_tokens(self) -> int:
        return self.crops * PATCHES

    @property
    def shape(self) -> ModelShape:
        return ModelShape(hidden=self.hidden, ffn=self.ffn, layers=self.layers)


_LLAMA_7B = {"hidden": 4096, "layers": 32, "heads": 32, "ffn": 11008, "vocab": 32000}
_CLIP_L14 = {"tower_hidden": 1024, "tower_layers": 24, "tower_heads": 16, "tower_ffn": 4096}
FULL_SIZE = [
    Arch("llava-1.5-7b", **_LLAMA_7B, **_CLIP_L14, crops=1),
    Arch("llava-1.6-7b", **_LLAMA_7B, **_CLIP_L14, crops=5),
]
# Small enough for two CPU cores; token counts stay LLaVA's, so the selector sees real N.
_LLAMA_SMALL = {"hidden": 512, "layers": 4, "heads": 8, "ffn": 1376, "vocab": 32000}
_CLIP_SMALL = {"tower_hidden": 256, "tower_layers": 4, "tower_heads": 4, "tower_ffn": 1024}
REDUCED = [
    Arch("llava-1.5 (reduced)", **_LLAMA_SMALL, **_CLIP_SMALL, crops=1),
    Arch("llava-1.6 (reduced)", **_LLAMA_SMALL, **_CLIP_SMALL, crops=5),
]

# --models values, in the order of FULL_SIZE and REDUCED.
MODEL_VERSIONS = ("1.5", "1.6")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="otprune bench prefill", description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"cpu or cuda (default {default_device})")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8 on GPU, 1,2 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed TTFT runs per configuration (default 5; 1 with --quick)")
    parser.add_argument("--decode-steps", type=int, default=None, help="greedy decode steps timed (default 32 on GPU, 4 on CPU; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="batch 1, no pruning and ratio 0.098 only; for CI")
    parser.add_argument("--models", default="1.5,1.6", help="comma-separated LLaVA versions to run, of 1.5 and 1.6 (default both)")
    parser.add_argument("--greedy", choices=GREEDY_PATHS, default=None, help="OTPrune's greedy path (default: the device's; triton: the fused kernel)")
    args = parser.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r} is not allowed; use cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    gpu = args.device == "cuda"
    batches = args.batches or ("1" if args.quick else ("1,8" if gpu else "1,2"))
    try:
        args.batches = [int(b) for b in batches.split(",")]
    except ValueError:
        parser.error(f"--batches {batches!r} must be comma-separated integers >= 1, e.g. 1,8")
    if any(b < 1 for b in args.batches):
        parser.error(f"--batches {batches!r} must be comma-separated integers >= 1, e.g. 1,8")
    args.models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in args.models if m not in MODEL_VERSIONS]
    if unknown or not args.models:
        parser.error(f"--models {','.join(args.models)!r}: allowed are {', '.join(MODEL_VERSIONS)}, comma-separated")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.decode_steps is None:
        args.decode_steps = 3 if args.quick else (32 if gpu else 4)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    if args.decode_steps < 1:
        parser.error(f"--decode-steps must be >= 1; got {args.decode_steps}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(run, device: torch.device, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(frozen=True)
class Hardware:
    """Rates measured in this run: dense matmul FLOP/s and copy bandwidth in bytes/s."""

    flops: float
    bandwidth: float

    def roofline_ms(self, flops: float, bytes_read: float) -> float:
        return 1e3 * max(flops / self.flops, bytes_read / self.bandwidth)


def measure_hardware(device: torch.device, dtype: torch.dtype) -> Hardware:
    """A square matmul in the model's dtype and a large tensor copy (read + write counted)."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    matmul = _median_seconds(lambda: a @ a, device, 5)
    elements = (1 << 29) if device.type == "cuda" else (1 << 25)
    src = torch.empty(elements, device=device, dtype=torch.float16).normal_()
    dst = torch.empty_like(src)
    copy = _median_seconds(lambda: dst.copy_(src), device, 5)
    return Hardware(flops=2 * size**3 / matmul, bandwidth=2 * src.numel() * src.element_size() / copy)


@dataclass
class Model:
    arch: Arch
    tower: nn.Module
    projector: nn.Module
    llm: nn.Module


def build(arch: Arch, device: torch.device, dtype: torch.dtype) -> Model:
    """Random-weight tower, projector and LLM, created directly on ``device`` in ``dtype``."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tower_config = CLIPVisionConfig(
        hidden_size=arch.tower_hidden,
        intermediate_size=arch.tower_ffn,
        num_hidden_layers=arch.tower_layers,
        num_attention_heads=arch.tower_heads,
        image_size=IMAGE_SIZE,
        patch_size=14,
    )
    llm_config = LlamaConfig(
        hidden_size=arch.hidden,
        intermediate_size=arch.ffn,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.heads,
        vocab_size=arch.vocab,
        max_position_embeddings=4096,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            tower = CLIPVisionModel(tower_config)
            projector = nn.Sequential(nn.Linear(arch.tower_hidden, arch.hidden), nn.GELU(), nn.Linear(arch.hidden, arch.hidden))
            llm = LlamaForCausalLM(llm_config)
    finally:
        torch.set_default_dtype(previous)
    return Model(arch, tower.eval(), projector.eval(), llm.eval())


def _bytes(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> int:
    skipped = {id(p) for m in skip for p in m.parameters()}
    return sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in skipped)


@dataclass(frozen=True)
class Config:
    method: str
    ratio: float | None
    batch: int
    greedy: str | None = None  # OTPrune's greedy path (None: the device's default)


@dataclass
class Result:
    config: Config
    kept: int
    llm_tokens: int
    stages: dict[str, float]  # measured ms per stage, and "ttft"
    roofline: dict[str, float]  # roofline ms per stage, "ttft" and "decode"
    decode_ms: float
    peak_mib: float | None


def _first_token(model: Model, pixels: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor], config: Config):
    """One TTFT run: returns per-stage seconds, the KV cache and the first generated token."""
    device = pixels.device
    arch = model.arch
    times = {}
    _sync(device)
    start = time.perf_counter()
    features = model.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    visual = model.projector(features).reshape(config.batch, arch.visual_tokens, arch.hidden)
    _sync(device)
    times["vision"] = time.perf_counter() - start
    start = time.perf_counter()
    if config.ratio is not None:
        options = {"greedy": config.greedy} if config.method == "otprune" and config.greedy else {}
        kept = SELECTOR_FUNCTIONS[config.method](visual, budget(config.ratio, arch.visual_tokens), **options)
        visual = visual.gather(1, kept[..., None].expand(-1, -1, arch.hidden))
    _sync(device)
    times["select"] = time.perf_counter() - start
    start = time.perf_counter()
    embed = model.llm.get_input_embeddings()
    inputs = torch.cat([embed(text[0]), visual, embed(text[1])], dim=1)
    out = model.llm(inputs_embeds=inputs, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1)
    _sync(device)
    times["prefill"] = time.perf_counter() - start
    return times, out.past_key_values, token, inputs.shape[1]


def _decode_ms(model: Model, cache, token: torch.Tensor, steps: int) -> float:
    """Median ms of one greedy decode step with the KV cache."""
    device = token.device
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        logits = model.llm(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _roofline(model: Model, config: Config, llm_tokens: int, steps: int, hw: Hardware) -> dict[str, float]:
    arch, b = model.arch, config.batch
    element = next(model.llm.parameters()).element_size()
    tower_tokens = PATCHES + 1
    tower_macs = arch.tower_layers * (
        4 * tower_tokens * arch.tower_hidden**2 + 2 * tower_tokens**2 * arch.tower_hidden + 2 * tower_tokens * arch.tower_hidden * arch.tower_ffn
    )
    projector_macs = arch.visual_tokens * (arch.tower_hidden * arch.hidden + arch.hidden**2)
    vision_flops = 2 * b * (arch.crops * tower_macs + projector_macs)
    vision_bytes = _bytes(model.tower) + _bytes(model.projector)
    n = arch.visual_tokens
    if config.ratio is None:
        select_flops = select_bytes = 0.0
    else:
        # OTPrune builds A = X X^T and A A; DivPrune only the cosine matrix. Kernels are float32.
        # Each is a symmetric Gram product, whose upper triangle (half the multiply-adds) suffices.
        macs = (n * n * arch.hidden + (n**3 if config.method == "otprune" else 0)) / 2
        select_flops = 2 * b * macs
        select_bytes = b * (n * arch.hidden * element + 2 * n * n * 4)
    # FastV's formula counts multiply-adds and two FFN matrices; LLaMA's SwiGLU FFN has three, and
    # a roofline needs FLOPs (2 per multiply-add): add the third matrix, then double.
    llm_macs = prefill_flops(llm_tokens, arch.shape) + arch.layers * llm_tokens * arch.hidden * arch.ffn
    lm_head_macs = arch.hidden * arch.vocab
    prefill_flops_total = 2 * b * (llm_macs + lm_head_macs)
    llm_weight_bytes = _bytes(model.llm, skip=(model.llm.get_input_embeddings(),))
    context = llm_tokens + steps / 2
    kv_bytes = 2 * arch.layers * b * context * arch.hidden * element
    decode_flops = 2 * b * (llm_weight_bytes / element + 2 * arch.layers * context * arch.hidden)
    roof = {
        "vision": hw.roofline_ms(vision_flops, vision_bytes),
        "select": hw.roofline_ms(select_flops, select_bytes),
        "prefill": hw.roofline_ms(prefill_flops_total, llm_weight_bytes),
        "decode": hw.roofline_ms(decode_flops, llm_weight_bytes + kv_bytes),
    }
    roof["ttft"] = roof["vision"] + roof["select"] + roof["prefill"]
    return roof


@torch.inference_mode()
def run_config(model: Model, config: Config, repeats: int, steps: int, hw: Hardware, dtype: torch.dtype) -> Result:
    arch = model.arch
    device = next(model.llm.parameters()).device
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(config.batch * arch.crops, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device, dtype)
    text = tuple(torch.randint(arch.vocab, (config.batch, length), generator=generator).to(device) for length in (TEXT_BEFORE_IMAGE, TEXT_AFTER_IMAGE))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _first_token(model, pixels, text, config)
    runs = []
    for _ in range(repeats):
        times, cache, token, llm_tokens = _first_token(model, pixels, text, config)
        runs.append(times)
    decode_ms = _decode_ms(model, cache, token, steps)
    stages = {name: 1e3 * statistics.median(r[name] for r in runs) for name in ("vision", "select", "prefill")}
    stages["ttft"] = 1e3 * statistics.median(sum(r.values()) for r in runs)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    kept = arch.visual_tokens if config.ratio is None else budget(config.ratio, arch.visual_tokens)
    roof = _roofline(model, config, llm_tokens, steps, hw)
    return Result(config, kept, llm_tokens, stages, roof, decode_ms, peak)


def _label(config: Config) -> str:
    return "none" if config.ratio is None else f"{config.method} {config.ratio}"


def format_tables(arch: Arch, results: list[Result]) -> str:
    """The TTFT table (measured [roofline] ms per stage, gains) and the decode/memory table."""
    base = {r.config.batch: r for r in results if r.config.ratio is None}
    head = (
        f"{'batch':>5} {'method':<14} {'kept':>5} {'LLM n':>6} {'FastV TFLOP':>11} | {'vision ms [roof]':>18} "
        f"{'select ms [roof]':>18} {'prefill ms [roof]':>19} {'TTFT ms [roof]':>19} | {'gain':>6} {'roof gain':>9} "
        f"{'% of roof':>9} {'select %':>8}"
    )
    lines = [f"== {arch.name}: time to first token ==", head, "-" * len(head)]

    def pair(measured: float, roof: float) -> str:
        return f"{measured:.2f} [{roof:.2f}]"

    for r in results:
        ref = base.get(r.config.batch)
        s, f = r.stages, r.roofline
        if r.config.ratio is None or ref is None:
            gains = f"{'':>6} {'':>9} {'':>9}"
        else:
            gain = ref.stages["ttft"] / s["ttft"]
            roof_gain = ref.roofline["ttft"] / f["ttft"]
            gains = f"{gain:>5.2f}x {roof_gain:>8.2f}x {100 * gain / roof_gain:>8.1f}%"
        lines.append(
            f"{r.config.batch:>5} {_label(r.config):<14} {r.kept:>5} {r.llm_tokens:>6} "
            f"{prefill_flops(r.llm_tokens, arch.shape) / 1e12:>11.3f} | {pair(s['vision'], f['vision']):>18} "
            f"{pair(s['select'], f['select']):>18} {pair(s['prefill'], f['prefill']):>19} {pair(s['ttft'], f['ttft']):>19} | "
            f"{gains} {100 * s['select'] / s['ttft']:>7.1f}%"
        )
    head = f"{'batch':>5} {'method':<14} | {'decode ms/step [roof]':>22} {'decode tok/s':>12} | {'peak MiB':>9}"
    lines += ["", f"== {arch.name}: decode and memory ==", head, "-" * len(head)]
    for r in results:
        peak = "n/a (CPU)" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append(
            f"{r.config.batch:>5} {_label(r.config):<14} | {pair(r.decode_ms, r.roofline['decode']):>22} "
            f"{1e3 * r.config.batch / r.decode_ms:>12.1f} | {peak:>9}"
        )
    return "\n".join(lines)


def target_lines(by_arch: dict[str, list[Result]], gpu: bool) -> list[str]:
    """Issue 6's targets beside the figures they are judged on (OTPrune / DivPrune vs no pruning)."""
    status = "" if gpu else " [reduced CPU model: target NOT MEASURED]"

    def verdict(ok: bool) -> str:
        return ("MET" if ok else "NOT MET") if gpu else "n/a"

    def gain(results: list[Result], batch: int, method: str) -> float | None:
        base = next((r for r in results if r.config == Config("none", None, batch)), None)
        pruned = next((r for r in results if r.config == Config(method, 0.098, batch)), None)
        return None if base is None or pruned is None else base.stages["ttft"] / pruned.stages["ttft"]

    lines = []
    # LLaVA-1.5 is judged at batch 8, LLaVA-1.6 (five times the visual tokens) at batch 1.
    for name, results in by_arch.items():
        batch = 8 if "1.5" in name else 1
        g = gain(results, batch, "otprune")
        figure = "batch not run" if g is None else f"{g:.2f}x"
        lines.append(f"{name} batch {batch}: TTFT >= 3x lower at ratio 0.098 (OTPrune): {figure} -> {verdict(g is not None and g >= 3)}{status}")
    fractions, shares = [], []
    for results in by_arch.values():
        base = {r.config.batch: r for r in results if r.config.ratio is None}
        for r in results:
            if r.config.ratio is not None and r.config.batch in base:
                ref = base[r.config.batch]
                measured = ref.stages["ttft"] / r.stages["ttft"]
                fractions.append(measured / (ref.roofline["ttft"] / r.roofline["ttft"]))
                shares.append(r.stages["select"] / r.stages["ttft"])
    if fractions:
        worst = min(fractions)
        lines.append(f"every pruned configuration within 85% of its roofline gain: worst {100 * worst:.1f}% -> {verdict(worst >= 0.85)}{status}")
        lines.append(f"selector share of TTFT < 3%: largest {100 * max(shares):.1f}% -> {verdict(max(shares) < 0.03)}{status}")
    return lines


def main(argv=None) -> dict[str, list[Result]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    # float16 is LLaVA's inference dtype; CPUs have no fast float16 matmul, so the CPU run uses float32.
    dtype = torch.float16 if gpu else torch.float32
    archs = [arch for arch, version in zip(FULL_SIZE if gpu else REDUCED, MODEL_VERSIONS) if version in args.models]
    methods = [m for m in METHODS if not args.quick or m[1] in (None, 0.098)]
    if gpu:
        print(f"End-to-end benchmark on {torch.cuda.get_device_name(device)}: full-size models, float16, random weights")
    else:
        print(
            "End-to-end benchmark on the CPU at REDUCED SIZE (no GPU): LLM hidden 512, 4 layers; tower hidden 256, "
            "4 layers; float32.\nToken counts are LLaVA's, model widths are not: these figures are not LLaVA-7B's "
            "and the selector's share is far larger than at full size."
        )
    hw = measure_hardware(device, dtype)
    print(f"Measured this run: matmul {hw.flops / 1e12:.2f} TFLOP/s, copy bandwidth {hw.bandwidth / 1e9:.1f} GB/s")
    print(f"OTPrune's greedy path: {args.greedy or 'the default for the device'}")
    print(f"Medians of {args.repeats} TTFT runs (+1 warm-up) and of {args.decode_steps} decode steps; [roofline] in brackets\n")
    by_arch = {}
    for arch in archs:
        model = build(arch, device, dtype)
        results = []
        for batch in args.batches:
            for method, ratio in methods:
                config = Config(method, ratio, batch, args.greedy)
                results.append(run_config(model, config, args.repeats, args.decode_steps, hw, dtype))
        by_arch[arch.name] = results
        print(format_tables(arch, results))
        print(flush=True)
        del model
        if gpu:
            torch.cuda.empty_cache()
    print("Targets (issue 6; gains are against no pruning at the same batch):")
    for line in target_lines(by_arch, gpu):
        print("  " + line)
    return by_arch


if __name__ == "__main__":
    main()
