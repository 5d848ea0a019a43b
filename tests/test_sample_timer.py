"""Per-call latency records (otprune.sample_timer, patches/generate_timing.py) and their aggregation in the report.

No assertion on how long anything took: the records are checked against what is known
independently (new tokens in the output, the arithmetic of their definitions, numpy's percentiles).
"""

import logging

import numpy as np
import pytest
import torch

import otprune.patches as patches
from otprune import report
from otprune import sample_timer as timing
from otprune.harness import run_check as harness_run_check

RATIO = 0.098
TOKENS = 5


def test_spread_is_numpys_quartiles():
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 40):
        values = rng.exponential(3.0, size).tolist()
        assert timing.spread(values + [None]) == pytest.approx(tuple(np.percentile(values, [25, 50, 75])))
    assert timing.spread([None]) is None


def test_timer_on_a_scripted_clock(monkeypatch):
    # Marks: start 0, vision 1 -> 4, selection 4 -> 6, first forward ends 10, two more forwards, end 18.
    clock = iter([0.0, 1.0, 4.0, 4.0, 6.0, 10.0, 18.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    timer = timing.SampleTimer(torch.device("cpu"))
    timer.begin("vision")
    timer.end("vision")
    with timing.active_timer(timer), timing.phase("selection"):
        pass
    for _ in range(3):
        timer.forward_done()
    assert timer.finish() == {
        "generated_tokens": 3,
        "prefill_ms": 10_000.0,
        "vision_ms": 3_000.0,
        "selection_ms": 2_000.0,
        "llm_prefill_ms": 5_000.0,
        "decode_ms": 8_000.0,
        "decode_ms_per_token": 4_000.0,
    }


def test_phase_without_a_timer_does_nothing():
    with timing.phase("selection"):
        assert not timing.running()


def made_up_run(method, ratio, calls):
    return {
        "model": "m",
        "method": method,
        "ratio": ratio,
        "limit": None,
        "samples": len(calls),
        "peak_rss_mb": 1.0,
        "wall_s": 1.0,
        "failed_invocations": 0,
        "latency": report.latency_summary(calls),
    }


def test_report_latency_is_median_and_quartiles_per_row_in_table_order():
    rng = np.random.default_rng(1)
    calls = [
        {
            "prefill_ms": float(p),
            "vision_ms": 1.0,
            "selection_ms": 0.5,
            "llm_prefill_ms": float(p) - 1.5,
            "generated_tokens": int(n),
            "decode_ms_per_token": float(d),
            "gpu_peak_mb": float(g),
        }
        for p, n, d, g in zip(rng.uniform(5, 50, 9), rng.integers(1, 30, 9), rng.uniform(1, 3, 9), rng.uniform(100, 200, 9))
    ]
    calls[0]["decode_ms_per_token"] = None  # one token only: no decode step
    summary = report.latency_summary(calls)
    for name in ("prefill_ms", "decode_ms_per_token", "generated_tokens"):
        values = [c[name] for c in calls if c[name] is not None]
        assert summary[name] == pytest.approx(tuple(np.percentile(values, [25, 50, 75])))
    assert summary["gpu_peak_mb"] == max(c["gpu_peak_mb"] for c in calls)
    runs = [made_up_run("Random", 0.098, calls), made_up_run("OTPrune", 0.098, calls), made_up_run("Original", 1.0, [])]
    lines = report.efficiency_lines(runs)
    rows = [line for line in lines if line.startswith("| m |")]
    assert [row.split(" | ")[1] for row in rows] == ["Original", "OTPrune 0.098", "Random 0.098"]
    p25, median, p75 = np.percentile([c["prefill_ms"] for c in calls], [25, 50, 75])
    assert f"| {median:.1f} [{p25:.1f}–{p75:.1f}] |" in rows[1]
    assert rows[0].split(" | ")[3] == "–"


# -- on the tiny transformers LLaVA ---------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model(tiny_hf_checkpoints):
    pytest.importorskip("transformers")
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_hf_checkpoints["llava-hf"]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    pixels = (torch.rand(300, 500, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    content = [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[Image.fromarray(pixels)], text=[prompt], return_tensors="pt")
    yield model, inputs
    model._otprune_config = None


def timed_generate(model, inputs, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="otprune"), torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
    return output, harness_run_check.parse_prune_log(caplog.text)["timing"]


@pytest.mark.parametrize("method", [None, "OURS"])
def test_hf_records_one_call_with_its_new_tokens(hf_model, caplog, method):
    model, inputs = hf_model
    patches.prune(model, method, RATIO, log=True)
    output, records = timed_generate(model, inputs, caplog)
    assert len(records) == 1
    record = records[0]
    assert record["generated_tokens"] == output.shape[1] - inputs["input_ids"].shape[1] == TOKENS
    assert record["decode_ms_per_token"] == pytest.approx(record["decode_ms"] / (TOKENS - 1))
    assert record["llm_prefill_ms"] == pytest.approx(record["prefill_ms"] - record["vision_ms"] - record["selection_ms"])
    assert record["vision_ms"] > 0
    assert (record["selection_ms"] > 0) == (method is not None)
    assert "gpu_peak_mb" not in record


def test_hf_unpruned_output_is_the_same_with_timing_on(hf_model, caplog):
    model, inputs = hf_model
    patches.prune(model, None, log=True)
    timed, records = timed_generate(model, inputs, caplog)
    assert records
    patches.prune(model, None)
    untimed, records = timed_generate(model, inputs, caplog)
    assert not records
    assert torch.equal(timed, untimed)


def test_a_class_wrapped_again_after_timing_still_logs_once(hf_model, caplog, monkeypatch):
    model, inputs = hf_model
    cls = type(model)
    patches.prune(model, None, log=True)
    monkeypatch.setattr(cls, "generate", patches.hf._wrap(cls.generate, generating=True))
    patches.generate_timing.install()
    _, records = timed_generate(model, inputs, caplog)
    assert len(records) == 1


# -- on the tiny original LLaVA -------------------------------------------------------------


def test_original_llava_records_its_new_tokens(tiny_checkpoints, caplog):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    from PIL import Image

    path = tiny_checkpoints["llava-1.5"]
    tokenizer, model, processor, _ = load_pretrained_model(str(path), None, path.name, device="cpu", device_map="cpu")
    model.float().eval()
    image = Image.fromarray((torch.rand(200, 300, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy())
    ids = tokenizer_image_token("<image>\nWhat is this?", tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    pixel = process_images([image], processor, model.config).float()
    patches.prune(model, "DIVPRUNE", RATIO, log=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="otprune"), torch.no_grad():
        output = model.generate(
            ids, images=pixel, image_sizes=[image.size], attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False
        )
    (record,) = harness_run_check.parse_prune_log(caplog.text)["timing"]
    # llava-torch generates from inputs_embeds: its output holds the new tokens only.
    assert record["generated_tokens"] == output.shape[1] == TOKENS
    assert record["vision_ms"] > 0 and record["selection_ms"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_records_events_and_peak_memory(tiny_hf_checkpoints, caplog):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_hf_checkpoints["llava-hf"]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float16).cuda().eval()
    from PIL import Image

    image = Image.fromarray((torch.rand(300, 500, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy())
    content = [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt").to("cuda")
    patches.prune(model, "OURS", RATIO, log=True)
    output, (record,) = timed_generate(model, inputs, caplog)
    assert record["generated_tokens"] == output.shape[1] - inputs["input_ids"].shape[1] == TOKENS
    assert record["gpu_peak_mb"] * 2**20 >= sum(p.numel() * p.element_size() for p in model.parameters())
    assert record["selection_ms"] > 0 and record["vision_ms"] > 0
