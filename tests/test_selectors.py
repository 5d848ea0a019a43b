import itertools
import math

import pytest
import torch

from otprune.measures import logdet_objective
from otprune.selectors import (
    SELECTORS,
    budget,
    get_selector,
    select_divprune,
    select_dpp,
    select_otprune,
    select_stp,
    select_trim,
)
from otprune.synthetic_tokens import clustered_tokens

D = 16
TEXT = torch.randn(5, D, generator=torch.Generator().manual_seed(7))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def call(name, tokens, k, **options):
    if name == "TRIM":
        text = TEXT.to(tokens.device, torch.float32)
        options.setdefault("text", text if tokens.shape[-1] == D else torch.randn(3, tokens.shape[-1]))
    return SELECTORS[name](tokens, k, **options)


def check_contract(indices, n, k, device):
    assert indices.dtype == torch.long
    assert indices.device.type == torch.device(device).type
    assert indices.shape[-1] == k
    assert bool((indices >= 0).all()) and bool((indices < n).all())
    rows = indices.reshape(-1, k).cpu()
    for row in rows:
        assert row.unique().numel() == k, f"duplicates in {row.tolist()}"
        assert torch.equal(row, row.sort().values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(SELECTORS))
def test_contract_every_selector(name, dtype, device):
    tokens = clustered_tokens(40, D, seed=1, dtype=dtype).to(device)
    for k in (1, 7, 40):
        check_contract(call(name, tokens, k), 40, k, device)


@pytest.mark.parametrize("name", list(SELECTORS))
def test_deterministic(name):
    tokens = clustered_tokens(50, D, seed=2)
    assert torch.equal(call(name, tokens, 9), call(name, tokens.clone(), 9))


@pytest.mark.parametrize("name", list(SELECTORS))
def test_batched_matches_one_by_one(name):
    """Both the public call (image by image on a CPU) and the batched core a GPU runs."""
    tokens = torch.randn(3, 30, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    options = {}
    if name == "TRIM":
        text = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        options = {"text": text}
        alone = [select_trim(tokens[b], 8, text=text[b]) for b in range(3)]
    else:
        alone = [call(name, tokens[b], 8) for b in range(3)]
    assert torch.equal(call(name, tokens, 8, **options), torch.stack(alone))
    batched_core = SELECTORS[name].__wrapped__(tokens, 8, **options).sort(-1).values
    assert torch.equal(batched_core, torch.stack(alone))


def test_gram_by_panels_matches_the_plain_product():
    from otprune.selectors import GRAM_PANEL_MIN_SIZE, GRAM_PANEL_ROWS, _gram

    g = torch.Generator().manual_seed(11)
    # Two full panels and a remainder, wide enough for the CPU to go by panels; batched and single.
    n = 2 * GRAM_PANEL_ROWS + 24
    x = torch.randn(2, n, -(-GRAM_PANEL_MIN_SIZE // n), generator=g, dtype=torch.float64)
    torch.testing.assert_close(_gram(x), x @ x.transpose(-1, -2), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(_gram(x[1]), x[1] @ x[1].T, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("name", list(SELECTORS))
def test_rank_deficient_input_still_gives_k_distinct(name):
    base = torch.randn(3, D, generator=torch.Generator().manual_seed(5))
    tokens = base.repeat(20, 1)  # 60 tokens, only 3 distinct
    check_contract(call(name, tokens, 25), 60, 25, "cpu")
    zeros = torch.zeros(10, D)
    check_contract(call(name, zeros, 4), 10, 4, "cpu")


def test_random_seed_controls_the_draw():
    tokens = torch.randn(100, D)
    a = SELECTORS["RANDOM"](tokens, 10, seed=1)
    assert torch.equal(a, SELECTORS["RANDOM"](tokens, 10, seed=1))
    assert not torch.equal(a, SELECTORS["RANDOM"](tokens, 10, seed=2))


def test_first_last_uniform_exact():
    tokens = torch.randn(10, D)
    assert SELECTORS["FIRST"](tokens, 3).tolist() == [0, 1, 2]
    assert SELECTORS["LAST"](tokens, 3).tolist() == [7, 8, 9]
    assert SELECTORS["UNIFORM"](tokens, 4).tolist() == [0, 3, 6, 9]
    assert SELECTORS["UNIFORM"](tokens, 1).tolist() == [0]
    for k in range(1, 11):
        assert SELECTORS["UNIFORM"](tokens, k).unique().numel() == k


def slow_greedy_otprune(x: torch.Tensor, k: int, gamma: float) -> list[int]:
    """Recomputes log det(L_{S+i}) from scratch for every candidate: obviously right, O(N k^4)."""
    x_hat = x / x.norm(dim=0, keepdim=True)
    a = x_hat @ x_hat.T
    kernel = torch.eye(len(x), dtype=x.dtype) + gamma * a @ a.T
    chosen: list[int] = []
    for _ in range(k):
        gains = {i: torch.linalg.slogdet(kernel[chosen + [i]][:, chosen + [i]]).logabsdet.item() for i in range(len(x)) if i not in chosen}
        chosen.append(max(gains, key=gains.get))
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gamma", [0.01, 1.0])
def test_otprune_matches_slow_greedy(seed, gamma):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(25, 12, generator=g, dtype=torch.float64) + torch.randn(1, 12, generator=g, dtype=torch.float64)
    for k in (1, 5, 12):
        assert select_otprune(x, k, gamma=gamma).tolist() == slow_greedy_otprune(x, k, gamma)


def test_otprune_float32_agrees_with_float64_on_clustered_tokens():
    x = clustered_tokens(120, 64, seed=11, dtype=torch.float64)
    assert torch.equal(select_otprune(x.float(), 20), select_otprune(x, 20))


@pytest.mark.parametrize("n,d,k", [(10, 4, 3), (12, 6, 4), (14, 3, 5)])
def test_otprune_within_1_minus_1_over_e_of_best_subset(n, d, k):
    for seed in range(3):
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 1.0
        best = max(logdet_objective(x, torch.tensor(s)).item() for s in itertools.combinations(range(n), k))
        ours = logdet_objective(x, select_otprune(x, k)).item()
        assert ours >= (1 - 1 / math.e) * best
        assert ours <= best + 1e-9


def test_divprune_obeys_max_min_rule():
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    xn = x / x.norm(dim=1, keepdim=True)
    distance = 1 - xn @ xn.T
    # Replay the rule independently, step by step, and compare sets.
    nearest = (distance + torch.diag(torch.full((30,), math.inf, dtype=torch.float64))).min(1).values
    chosen = [int(nearest.argmax())]
    while len(chosen) < 10:
        rest = [i for i in range(30) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(distance[s, i].item() for s in chosen)))
    assert select_divprune(x, 10).tolist() == sorted(chosen)


def test_dpp_fills_budget_past_kernel_rank():
    # Four orthogonal directions, each repeated: the cosine kernel has rank 4.
    basis = torch.eye(4, D)
    tokens = torch.cat([basis * (1 + 0.1 * r) for r in range(5)])  # 20 tokens
    kept = select_dpp(tokens, 9)
    check_contract(kept, 20, 9, "cpu")
    first_four_directions = {int(i) % 4 for i in kept[:9]}
    assert first_four_directions == {0, 1, 2, 3}


def test_trim_hand_worked_case():
    # Tokens 0-3 sit near the text, 4 is far: stage 1 (keep 4 of 5) drops token 4.
    tokens = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7], [-50.0, -50.0]])
    text = torch.tensor([[0.5, 0.5]])
    # Stage 2 over tokens 0-3: cosine similarities make token 2 the least similar on average
    # (seed); the least covered after it is token 0 (cos 0 with token 2, 0.11 for token 1).
    assert select_trim(tokens, 2, text=text, keep_ratio=0.8).tolist() == [0, 2]
    assert 4 not in select_trim(tokens, 4, text=text, keep_ratio=0.8).tolist()


def test_stp_hand_worked_case():
    # Token 3 is a duplicate of token 0 (diversity 0); token 2 has the largest outlier magnitude.
    tokens = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 9.0], [1.0, 0.0, 0.0]])
    assert select_stp(tokens, 1, alpha=0.0).tolist() == [2]  # importance only
    diversity_only = select_stp(tokens, 2, alpha=1.0).tolist()
    assert diversity_only == [1, 2]  # the two tokens with no near neighbour
    assert 3 not in select_stp(tokens, 3, alpha=0.5).tolist() or 0 not in select_stp(tokens, 3, alpha=0.5).tolist()


def test_gamma_changes_otprune_subset():
    x = clustered_tokens(200, 64, seed=9)
    assert not torch.equal(select_otprune(x, 20, gamma=1e-4), select_otprune(x, 20, gamma=100.0))


@pytest.mark.parametrize(
    "tokens,k,message",
    [
        (torch.randn(10, D), 0, r"k must be in \[1, N\] = \[1, 10\].*k=0"),
        (torch.randn(10, D), 11, r"k=11"),
        (torch.randn(10), 1, r"shape \(N, d\) or \(B, N, d\); got shape \(10,\)"),
        (torch.randn(1, 2, 10, D), 1, r"got shape \(1, 2, 10, 16\)"),
        (torch.tensor([[1.0, math.nan]]), 1, "NaN or Inf"),
        (torch.tensor([[1.0, math.inf]]), 1, "NaN or Inf"),
    ],
)
def test_bad_input_raises_value_error(tokens, k, message):
    with pytest.raises(ValueError, match=message):
        select_otprune(tokens, k)


@pytest.mark.parametrize("name", list(SELECTORS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_tokens_rejected_in_every_dtype(bad, dtype, name):
    tokens = clustered_tokens(12, D, seed=1, batch=3, dtype=dtype)
    tokens[2, 7, 3] = bad  # in the last image only, so a per-image run must reach it
    with pytest.raises(ValueError, match="NaN or Inf"):
        call(name, tokens, 4)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="k must be an int"):
        select_otprune(torch.randn(5, D), 2.5)
    with pytest.raises(TypeError, match="floating-point"):
        select_otprune(torch.ones(5, D, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        select_otprune([[1.0]], 1)


def test_bad_options():
    x = torch.randn(10, D)
    with pytest.raises(ValueError, match=r"gamma must be a number in \[2.94e-39, 8.51e\+37\].*got -1"):
        select_otprune(x, 2, gamma=-1)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]; got 2"):
        select_stp(x, 2, alpha=2)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]; got '0.3'"):
        select_stp(x, 2, alpha="0.3")
    with pytest.raises(ValueError, match="TRIM needs"):
        select_trim(x, 2)
    with pytest.raises(ValueError, match=r"text must have shape \(T, 16\).*got \(3, 5\)"):
        select_trim(x, 2, text=torch.randn(3, 5))
    with pytest.raises(TypeError, match="unexpected keyword"):
        SELECTORS["DIVPRUNE"](x, 2, gamma=0.1)
    with pytest.raises(ValueError, match="greedy path must be one of host, batched, triton.*got 'fast'"):
        select_otprune(x, 2, greedy="fast")


def test_registry_lookup():
    assert get_selector("ours") is select_otprune
    with pytest.raises(ValueError, match="unknown selector 'FOO'; allowed: OURS, DIVPRUNE"):
        get_selector("FOO")
    from otprune.methods import get_method

    assert get_method("OURS").options == ("gamma", "greedy")
    assert get_method("DPP").options == ("greedy",)
    assert get_method("TRIM").options == ("keep_ratio",) and get_method("TRIM").context == ("text",)
    assert get_method("FIRST").options == ()


def test_budget():
    assert budget(0.098, 576) == 56
    assert budget(1.0, 576) == 576
    assert budget(1e-6, 576) == 1
    assert budget(0.5, 3) == 2  # 1.5 rounds half up
    for bad in (0, -0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
            budget(bad, 10)


@pytest.mark.parametrize("kernel_of", ["otprune", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_and_batched_greedy_pick_the_same(kernel_of, dtype):
    from otprune.selectors import DEFAULT_GAMMA, _cosine_similarity, _interaction_gram, greedy_logdet

    x = clustered_tokens(200, 48, seed=4, batch=3, dtype=dtype)
    # OTPrune's greedy: ridge 1 / gamma on A A^T; DPP's: no ridge on the cosine kernel.
    kernel, ridge = (_interaction_gram(x), 1 / DEFAULT_GAMMA) if kernel_of == "otprune" else (_cosine_similarity(x), 0.0)
    for k in (1, 20, 90):  # 90 > rank 48 of both kernels: the fill phase of the cosine one too
        host = greedy_logdet(kernel, k, ridge=ridge, path="host")
        assert torch.equal(host, greedy_logdet(kernel, k, ridge=ridge, path="batched"))
