"""Selectors on inputs that used to make them answer wrongly in silence (issues 10 and 11):
extreme scales, extreme gamma, one dominant token, tokens that need a gradient, and inputs that
must be refused with a clear error."""

import math

import pytest
import torch

from otprune.measures import column_normalise, logdet_objective
from otprune.prune_config import config_from_env
from otprune.selectors import (
    GAMMA_RANGE,
    SELECTORS,
    _check_finite,
    _unit_norm,
    greedy_logdet,
    select_divprune,
    select_dpp,
    select_otprune,
    select_random,
    select_stp,
    select_trim,
)
from otprune.synthetic_tokens import clustered_tokens

SCALE_INVARIANT = {"OURS": select_otprune, "DPP": select_dpp, "DIVPRUNE": select_divprune}


def slow_greedy_logdet(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy by recomputing ``log det(L_{S+i})`` from scratch for every candidate (float64)."""
    chosen: list[int] = []
    for _ in range(k):
        gains = {i: torch.linalg.slogdet(kernel[chosen + [i]][:, chosen + [i]]).logabsdet.item() for i in range(len(kernel)) if i not in chosen}
        chosen.append(max(gains, key=gains.get))
    return chosen


def interaction_gram64(tokens: torch.Tensor) -> torch.Tensor:
    """``A A^T`` with ``A = X_hat X_hat^T``, from ``measures.column_normalise`` in float64."""
    x_hat = column_normalise(tokens)
    a = x_hat @ x_hat.T
    return a @ a.T


# Powers of two scale a float exactly, so the picks at every scale must equal those at scale 1.
# 2**60 ~ 1.2e18 and 2**-60 ~ 8.7e-19: the float32 sums of squares of N = 576, d = 1024 tokens
# overflowed (underflowed) from 1e18 (1e-18) on, and every selector returned arange(k).
@pytest.mark.parametrize("exponent", [60, 100, -60, -100])
@pytest.mark.parametrize("name", list(SCALE_INVARIANT))
def test_scale_invariant_selectors_pick_the_same_at_any_scale(name, exponent):
    select = SCALE_INVARIANT[name]
    for n, d, k in ((576, 1024, 56), (48, 12, 9)):  # d >= N and d < N build OTPrune's kernel differently
        tokens = clustered_tokens(n, d, seed=21)
        expected = select(tokens, k)
        assert not torch.equal(expected, torch.arange(k))
        assert torch.equal(select(tokens * 2.0**exponent, k), expected)


def test_column_normalisation_matches_float64_at_any_scale_and_for_a_tiny_column():
    """OTPrune's X_hat: the CPU's fast way (one peak for the tensor) and the per-column way agree
    with float64, bit for bit across powers of two; a column tiny next to the others (whose
    squares would underflow at the tensor's scale) is still a unit column."""
    tokens = clustered_tokens(576, 256, seed=3)
    truth = column_normalise(tokens.double())
    at_one = _unit_norm(tokens, dim=-2)
    assert torch.allclose(at_one.double(), truth, atol=1e-6)
    for exponent in (60, 100, 120, -60, -100):
        assert torch.equal(_unit_norm(tokens * 2.0**exponent, dim=-2), at_one), exponent
    tokens[:, 5] *= 1e-30
    exact = tokens.double() / tokens.double().norm(dim=0)  # no floor: the tiny column too is a unit one
    assert torch.allclose(_unit_norm(tokens, dim=-2).double(), exact, atol=1e-6)


@pytest.mark.parametrize("name", list(SCALE_INVARIANT))
def test_issue_example_at_1e20_and_near_the_float32_maximum(name):
    select = SCALE_INVARIANT[name]
    tokens = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    expected = select(tokens.double(), 3)
    largest = torch.finfo(torch.float32).max / 2 / tokens.abs().max()
    for scale in (1e20, 1e-20, largest):
        assert torch.equal(select(tokens * scale, 3), expected), scale


@pytest.mark.parametrize("exponent", [60, 127, -100, -140])
def test_trim_ranks_by_distances_that_scale_with_the_tokens(exponent):
    """Scaling tokens and text by one factor scales every distance by it: same picks."""
    tokens = clustered_tokens(64, 32, seed=1)
    text = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    tokens, text = tokens / tokens.abs().max(), text / text.abs().max()
    expected = select_trim(tokens, 8, text=text)
    assert torch.equal(select_trim(tokens * 2.0**exponent, 8, text=text * 2.0**exponent), expected)


@pytest.mark.parametrize("exponent", [60, 127])
def test_stp_on_large_tokens_picks_as_on_unit_ones(exponent):
    """Up to float32's maximum (2**127 x tokens of magnitude <= 1). Not on tiny tokens: there
    STP's absolute 1e-6 (METHOD.md) outweighs sigma and changes the ranking by design."""
    tokens = clustered_tokens(64, 32, seed=1)
    tokens = tokens / tokens.abs().max()
    assert torch.equal(select_stp(tokens * 2.0**exponent, 8), select_stp(tokens, 8))


def test_float16_tokens_near_65504_pick_as_float64_does():
    tokens = clustered_tokens(200, 256, seed=22)
    near_max = (tokens / tokens.abs().max() * 65000).half()
    assert float(near_max.abs().max()) > 60000
    # Not DPP: its cosine kernel's diagonal is 1 for every token, so its first pick is a tie that
    # rounding decides differently in float32 and float64.
    for select in (select_otprune, select_divprune):
        assert torch.equal(select(near_max, 20), select(near_max.double(), 20))


def test_kernel_finiteness_is_checked_not_only_the_tokens():
    tokens = torch.ones(4, 3)
    kernel = torch.eye(4)
    _check_finite(tokens, kernel)
    kernel[1, 2] = math.inf
    with pytest.raises(ArithmeticError, match="kernel is not finite although the tokens are"):
        _check_finite(tokens, kernel)
    tokens[0, 0] = math.nan
    with pytest.raises(ValueError, match="tokens contain NaN or Inf"):
        _check_finite(tokens, kernel)


# --- gamma -----------------------------------------------------------------------------------


def test_gamma_range_is_where_the_float32_ridge_is_a_normal_number():
    low, high = GAMMA_RANGE
    f32 = torch.finfo(torch.float32)
    assert torch.tensor(1 / low, dtype=torch.float32) == f32.max
    assert torch.tensor(1 / high, dtype=torch.float32) == f32.tiny


@pytest.mark.parametrize("gamma", [1e-9, 1e-6, 0.01, 1.0, 1e3, 1e30, GAMMA_RANGE[1]])
def test_float32_picks_equal_the_slow_float64_greedy_across_gamma(gamma):
    """Before, gamma <= 1e-9 made I + gamma A A^T the identity in float32 (first k tokens) and
    gamma >= 1e38 overflowed it (first k tokens too)."""
    tokens = clustered_tokens(40, 16, seed=3, dtype=torch.float64)
    kernel = torch.eye(40, dtype=torch.float64) + gamma * interaction_gram64(tokens)
    expected = sorted(slow_greedy_logdet(kernel, 6))
    assert expected != list(range(6))
    assert select_otprune(tokens.float(), 6, gamma=gamma).tolist() == expected


@pytest.mark.parametrize("gamma", [1e-9, 0.01, 1.0])
def test_float32_picks_equal_float64_on_well_spread_tokens_up_to_gamma_1(gamma):
    tokens = clustered_tokens(576, 1024, spread=0.5, seed=0)
    assert torch.equal(select_otprune(tokens, 56, gamma=gamma), select_otprune(tokens.double(), 56, gamma=gamma))


@pytest.mark.parametrize("spread", [0.5, 0.05, 0.0005])
@pytest.mark.parametrize("gamma", [0.01, 1.0, 100.0])
def test_float32_picks_on_near_duplicates_are_near_ties_of_float64_up_to_gamma_100(spread, gamma):
    """Near-duplicate tokens (small spread) or a large gamma leave residual variances float32 cannot
    tell apart, and some picks differ from float64's (28 of 56 at spread 0.05, gamma 100); they
    reach float64's objective within 2e-4 (relative). README states both."""
    tokens = clustered_tokens(576, 1024, spread=spread, seed=0)
    picks32, picks64 = select_otprune(tokens, 56, gamma=gamma), select_otprune(tokens.double(), 56, gamma=gamma)
    reached, best = (float(logdet_objective(tokens, p, gamma=gamma)) for p in (picks32, picks64))
    assert reached >= best * (1 - 2e-4)


@pytest.mark.parametrize("gamma", [GAMMA_RANGE[0], 1e-30])
def test_tiny_gamma_picks_the_largest_diagonal(gamma):
    """As gamma -> 0, log det(I + gamma M_S) = gamma tr(M_S) + O(gamma^2): the greedy keeps the k
    largest diag(M), M = A A^T. float64's I + gamma M cannot resolve this either; OTPrune's
    ridge form can, in float32."""
    tokens = clustered_tokens(40, 16, seed=3, dtype=torch.float64)
    expected = sorted(interaction_gram64(tokens).diagonal().topk(6).indices.tolist())
    assert select_otprune(tokens.float(), 6, gamma=gamma).tolist() == expected


@pytest.mark.parametrize("gamma", [0, -1.0, GAMMA_RANGE[0] * 0.99, GAMMA_RANGE[1] * 1.01, 1e38, math.inf, math.nan, "0.1", True])
def test_gamma_outside_its_range_is_refused_with_the_range(gamma):
    with pytest.raises(ValueError, match=r"gamma must be a number in \[2.94e-39, 8.51e\+37\].*got"):
        select_otprune(torch.randn(10, 4), 2, gamma=gamma)


def test_otprune_gamma_variable_is_checked_against_the_range():
    env = {"BASELINE": "OURS", "SUBSET_RATIO": "0.1"}
    assert config_from_env({**env, "OTPRUNE_GAMMA": "8e37"}).options == {"gamma": 8e37}
    for bad in ("1e38", "1e-40"):
        with pytest.raises(ValueError, match=r"OTPRUNE_GAMMA \(gamma\) must be a number in \[2.94e-39, 8.51e\+37\]"):
            config_from_env({**env, "OTPRUNE_GAMMA": bad})


# --- one dominant token and other adversarial scales (issue 10) ------------------------------


def dominant_token(tokens: torch.Tensor) -> torch.Tensor:
    tokens = tokens.clone()
    tokens[123] *= 200
    return tokens


@pytest.mark.parametrize(
    "make",
    [dominant_token, lambda t: t / t.norm(dim=-1, keepdim=True) * 1e4],
    ids=["one token x200", "norm 1e4"],
)
def test_otprune_float32_picks_what_float64_picks_on_adversarial_tokens(make):
    """With one token x200, the DPP's rank floor (100 eps max diag L) made every other candidate
    look rank-less, and the float32 greedy filled by index: 12 of 56 picks shared with float64,
    log det 17.0 against 22.7."""
    tokens = make(clustered_tokens(576, 4096, seed=0))
    picks32 = select_otprune(tokens, 56)
    picks64 = select_otprune(tokens.double(), 56)
    assert torch.equal(picks32, picks64)
    assert logdet_objective(tokens, picks32) == logdet_objective(tokens, picks64)


def test_otprune_greedy_never_fills_while_a_candidate_adds_volume():
    """Kernel: token 0 dominant (1e8), tokens 1 and 2 identical, token 3 independent but a little
    smaller. After 0 and 1, token 2 adds no volume and 3 does: the greedy must take 3 before 2;
    a fill by largest diagonal would take 2 first."""
    v = torch.tensor([[1e4, 0, 0], [0, 3.0, 0], [0, 3.0, 0], [0, 0, 2.9]])
    kernel = (v @ v.T)[None]
    for path in ("host", "batched"):
        assert greedy_logdet(kernel, 4, ridge=100.0, path=path).tolist() == [[0, 1, 3, 2]]


# --- DPP fill ------------------------------------------------------------------------------------


def test_dpp_keeps_every_distinct_direction_before_filling():
    """Seven tokens of their own direction and 93 copies of an eighth: the cosine kernel has rank 8,
    so the first 8 picks span all 8 directions and the 2 fill picks are copies. A random 10 of the
    100 holds the 7 singletons with probability ~1e-8."""
    g = torch.Generator().manual_seed(23)
    directions = torch.linalg.qr(torch.randn(32, 8, generator=g, dtype=torch.float64)).Q.T  # 8 orthonormal rows
    copies = directions[7] * (1 + torch.rand(93, 1, generator=g, dtype=torch.float64))
    tokens = torch.cat([copies[:50], directions[:7], copies[50:]])  # singletons at 50..56
    singletons = set(range(50, 57))
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    for dtype in (torch.float32, torch.float64):
        assert set(select_dpp(tokens.to(dtype), 10).tolist()) >= singletons
        order = greedy_logdet((unit @ unit.T).to(dtype)[None], 10)[0].tolist()
        # In the order chosen: the 8 directions (7 singletons and one copy), then 2 fill copies.
        assert singletons <= set(order[:8]) and len(set(order)) == 10


# --- autograd and refused inputs ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(SELECTORS))
def test_tokens_that_require_grad_pick_as_detached_ones(name):
    tokens = clustered_tokens(30, 16, seed=24).requires_grad_()
    options = {"text": torch.randn(4, 16)} if name == "TRIM" else {}
    picks = SELECTORS[name](tokens, 7, **options)
    assert torch.equal(picks, SELECTORS[name](tokens.detach(), 7, **options))
    assert tokens.grad is None


@pytest.mark.parametrize(
    "tokens,error,message",
    [
        (torch.zeros(0, 10, 4), ValueError, r"at least one image; got shape \(0, 10, 4\)"),
        (torch.empty(10, 4, device="meta"), ValueError, "meta device"),
        (torch.zeros(10, 4, dtype=torch.float8_e4m3fn), TypeError, "float16, bfloat16, float32, float64; got torch.float8_e4m3fn"),
        (torch.zeros(10, 4, dtype=torch.float8_e5m2), TypeError, "got torch.float8_e5m2"),
        (torch.zeros(10, 4, dtype=torch.complex64), TypeError, "got torch.complex64"),
    ],
)
@pytest.mark.parametrize("name", list(SELECTORS))
def test_unusable_tokens_are_refused(name, tokens, error, message):
    options = {"text": torch.randn(4, 4)} if name == "TRIM" else {}
    with pytest.raises(error, match=message):
        SELECTORS[name](tokens, 2, **options)


def test_seed_outside_what_a_generator_takes_is_refused():
    tokens = torch.randn(10, 4)
    assert select_random(tokens, 3, seed=2**64 - 1).shape == (3,)
    for bad in (2**64, -1):
        with pytest.raises(ValueError, match=rf"seed must be an int in \[0, 2\*\*64 - 1\]; got {bad}"):
            select_random(tokens, 3, seed=bad)
