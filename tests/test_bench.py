"""The benchmarks (otprune.bench): the per-step reference greedy is exact, and both --quick modes run.

No assertion here is on speed: timings on shared CI machines mean nothing.
"""

import pytest
import torch

from otprune.bench import prefill as bench_prefill
from otprune.bench import selectors as bench_selectors
from otprune.bench.per_step_reference import per_step_otprune
from otprune.selectors import select_otprune
from otprune.synthetic_tokens import clustered_tokens


@pytest.mark.parametrize("seed", range(4))
def test_per_step_reference_picks_what_select_otprune_picks(seed):
    generator = torch.Generator().manual_seed(seed)
    one = torch.randn(120, 48, generator=generator)
    assert torch.equal(per_step_otprune(one, 17), select_otprune(one, 17))
    tokens = clustered_tokens(96, 64, seed=seed, dtype=torch.float16)
    assert torch.equal(per_step_otprune(tokens, 12), select_otprune(tokens, 12))


def test_per_step_reference_matches_batched_select_otprune_in_float64():
    tokens = clustered_tokens(200, 96, seed=5, batch=4).double()
    assert torch.equal(per_step_otprune(tokens, 40), select_otprune(tokens, 40))


def test_per_step_reference_batch_and_gamma():
    tokens = torch.randn(3, 80, 32, generator=torch.Generator().manual_seed(9))
    assert torch.equal(per_step_otprune(tokens, 10, gamma=0.5), torch.stack([select_otprune(x, 10, gamma=0.5) for x in tokens]))


def test_bench_selectors_quick(capsys):
    rows = bench_selectors.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "otprune ms" in out and "per-step ms" in out and "divprune ms" in out and "floor ms" in out
    assert "NOT MEASURED" in out
    assert {(r.n, r.k, r.batch) for r in rows} == {(576, 64, 1), (576, 64, 16), (2880, 320, 1)}
    assert all(r.otprune > 0 and r.per_step > 0 and r.floor > 0 for r in rows)


def test_bench_selectors_gpu_verdicts_judge_the_faster_path():
    """The GPU branch of the table and targets, on made-up figures (CI has no GPU to run it)."""
    row = bench_selectors.Row
    rows = [
        row(576, 64, 1, otprune=5.0, per_step=9.0, divprune=1.0, floor=0.05, divergent=0, fused=0.25),
        row(576, 64, 16, otprune=9.0, per_step=150.0, divprune=2.0, floor=0.4, divergent=1, fused=0.6),
        row(2880, 320, 1, otprune=30.0, per_step=90.0, divprune=3.0, floor=0.5, divergent=0, fused=None),
    ]
    lines = bench_selectors.target_lines(rows, torch.device("cuda"))
    assert "GPU  N=576 k=64 b=1 OTPrune <= 0.3 ms: 0.250 ms (fused) -> MET" in lines
    assert "GPU  N=576 k=64 b=1 >= 10x faster than per-step: 36.0x (fused) -> MET" in lines
    assert "GPU  N=2880 k=320 b=1 <= 2 ms: 30.000 ms (default) -> NOT MET" in lines
    assert "GPU  N=576 k=64 batch 16 <= 2x batch 1: 2.40x (fused / fused) -> NOT MET" in lines
    table = bench_selectors.format_table(rows)
    assert "fused ms" in table and "   0.250" in table and "36.0x" in table


def test_bench_selectors_rejects_bad_device():
    with pytest.raises(SystemExit):
        bench_selectors.parse_args(["--device", "tpu"])


def test_bench_prefill_quick(capsys):
    pytest.importorskip("transformers")
    by_arch = bench_prefill.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "REDUCED SIZE" in out
    assert "time to first token" in out and "decode and memory" in out and "NOT MEASURED" in out
    for results in by_arch.values():
        labels = {(r.config.method, r.config.ratio) for r in results}
        assert labels == {("none", None), ("otprune", 0.098), ("divprune", 0.098)}
        assert all(r.stages["ttft"] > 0 and r.decode_ms > 0 for r in results)


@pytest.mark.parametrize("bad", [["--batches", "1,x"], ["--batches", "0"], ["--repeats", "0"], ["--device", "tpu"]])
def test_bench_prefill_rejects_bad_values(bad):
    with pytest.raises(SystemExit):
        bench_prefill.parse_args(bad)
