"""The vision-side peers as bundled plugins (PRUMERGE, PRUMERGE_PLUS, DIVPRUNE_ADAPTIVE, VISIONZIP,
FASTERVLM): each fed fixed random queries, keys and features, and compared with an emulation of
its authors' computation written here from reading their code (batch dimensions, gathers, masks,
``topk``, numpy's percentile), not from ours."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import otprune.plugins.divprune_adaptive as divprune_adaptive_module
import otprune.plugins.fastervlm as fastervlm_module
import otprune.plugins.prumerge as prumerge_module
import otprune.plugins.vision_checks as vision_checks_module
import otprune.plugins.visionzip as visionzip_module
from otprune.contract import VisionContext, kept_indices_fault, merge_fault
from otprune.contract_check import run_battery
from otprune.methods import get_method
from otprune.plugins.divprune_adaptive import select_divprune_adaptive
from otprune.plugins.fastervlm import select_fastervlm
from otprune.plugins.prumerge import kept_count, merge_prumerge, merge_prumerge_plus, outlier_count, prumerge_token_count, quartiles
from otprune.plugins.visionzip import merge_visionzip, visionzip_split

NAMES = ("PRUMERGE", "PRUMERGE_PLUS", "DIVPRUNE_ADAPTIVE", "VISIONZIP", "FASTERVLM")


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def make_case(seed, n=576, width=1024, heads=16, sharpness=0.6):
    """Queries and keys ``(1, n + 1, width)`` ([CLS] first) of the block producing the features
    (CLIP layer 22) and of the next (layer 23), the features ``(1, n + 1, width)`` at the feature
    layer with [CLS] first (the code's ``hidden_states[-2]``). ``sharpness`` scales the [CLS]
    query so that its attention has outliers, differently per seed."""
    case = {"heads": heads}
    for i, name in enumerate(("q22", "k22", "q23", "k23")):
        case[name] = randn(1, n + 1, width, seed=1000 * seed + i)
    scale = sharpness * (1 + 0.5 * torch.rand(1, generator=torch.Generator().manual_seed(seed)).item())
    case["q22"][:, 0] *= scale
    case["q23"][:, 0] *= scale
    case["hidden"] = randn(1, n + 1, width, seed=1000 * seed + 7)
    return case


def contract_context(case):
    """The VisionContext as ``otprune.contract`` defines it, one row at a time from q and k."""
    heads = case["heads"]
    q22, k22, q23, k23 = (case[name][0].double() for name in ("q22", "k22", "q23", "k23"))
    width = q23.shape[-1]
    head_dim = width // heads
    cls_attention = torch.softmax(k23 @ q23[0] / width**0.5, dim=0)[1:]
    per_head = []
    for h in range(heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        per_head.append(torch.softmax(k22[:, cols] @ q22[0, cols] / head_dim**0.5, dim=0)[1:])
    head_keys = torch.stack([k22[1:, h * head_dim : (h + 1) * head_dim] for h in range(heads)]).mean(0)
    return VisionContext(
        features=case["hidden"][0, 1:],
        cls_attention=cls_attention.float(),
        keys=k23[1:].float(),
        head_attention=torch.stack(per_head).float(),
        head_keys=head_keys.float(),
        cls_feature=case["hidden"][0, 0],
    )


# ---------------------------------------------------------------------------------------------
# Emulations of the public code


def code_outlier_ratio(cls_attn):
    """``outlier_dectection`` (42Shawn/LLaVA-PruMerge): numpy quartiles, strict > the upper fence."""
    values = cls_attn.to(dtype=torch.float32).cpu().numpy().flatten()
    first, third = np.percentile(values, 25), np.percentile(values, 75)
    upper = third + 1.5 * (third - first)
    return len(np.where(values > upper)[0]) / len(values)


def code_prumerge(case, adaptive=True, reduction_ratio=1 / 8, plus=False):
    """``token_prune_merge_advanced`` / ``..._plus`` (adaptive branch): B = 1, the tensors as the
    code has them. Returns (kept indices in the code's order, merged tokens incl. the extra one)."""
    image_features = case["hidden"][:, 1:]
    batch, n, width = image_features.shape
    attn = torch.softmax((case["q23"] @ case["k23"].transpose(-2, -1)) * width**-0.5, dim=-1)
    cls_attn = attn[:, 0, 1:]
    if adaptive:
        reduction_ratio = code_outlier_ratio(cls_attn)
    _, idx = torch.topk(cls_attn, int(n * reduction_ratio), dim=1, largest=True)
    if plus:
        step_length = int(1 / reduction_ratio)
        sequence = torch.arange(0, n - 1, int(step_length / 3))
        flat = idx.flatten().tolist()
        filtered = torch.tensor([int(s) for s in sequence if int(s) not in flat], dtype=torch.long)
        idx = torch.cat((idx, filtered.unsqueeze(0)), dim=1)
    index = idx.unsqueeze(-1).expand(-1, -1, width)
    keys = case["k23"][:, 1:]
    x_others = torch.gather(image_features, 1, index)
    x_others_attn = torch.gather(cls_attn, 1, idx)
    keys_others = torch.gather(keys, 1, index)
    in_idx = torch.zeros(n, dtype=torch.bool)
    in_idx[idx[0]] = True
    compl = torch.arange(n)[~in_idx].unsqueeze(0)
    non_topk = torch.gather(image_features, 1, compl.unsqueeze(-1).expand(-1, -1, width))
    non_topk_keys = torch.gather(keys, 1, compl.unsqueeze(-1).expand(-1, -1, width))
    non_topk_attn = torch.gather(cls_attn, 1, compl)
    keys_others_norm = torch.nn.functional.normalize(keys_others, p=2, dim=-1)
    non_topk_keys_norm = torch.nn.functional.normalize(non_topk_keys, p=2, dim=-1)
    left = x_others.shape[1]
    updated = torch.zeros_like(x_others)
    for i in range(left):
        me = keys_others_norm[0, i][None, None]
        rest_x = torch.cat([x_others[0, :i][None], x_others[0, i + 1 :][None], non_topk[0][None]], dim=1)
        rest_attn = torch.cat([x_others_attn[0, :i][None], x_others_attn[0, i + 1 :][None], non_topk_attn[0][None]], dim=1)
        rest_keys = torch.cat([keys_others_norm[0, :i][None], keys_others_norm[0, i + 1 :][None], non_topk_keys_norm[0][None]], dim=1)
        cos = torch.bmm(me, rest_keys.transpose(1, 2))
        _, cluster = torch.topk(cos, k=32, dim=2, largest=True)
        tokens = rest_x[:, cluster.squeeze(), :]
        weights = rest_attn[:, cluster.squeeze()].unsqueeze(-1)
        updated[0, i] = torch.sum(tokens * weights, dim=1) + x_others[0, i]
    extra = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
    return idx[0], torch.cat([updated, extra], dim=1)[0], compl[0]


def assert_prumerge_matches(ours, code):
    merged, positions = ours
    idx, code_merged, compl = code
    assert positions.tolist() == sorted([*idx.tolist(), int(compl.max())])
    where = {p: i for i, p in enumerate(positions.tolist())}
    for row, token in enumerate(idx.tolist()):
        torch.testing.assert_close(merged[where[token]], code_merged[row], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged[where[int(compl.max())]], code_merged[-1], rtol=1e-4, atol=1e-4)


def code_visionzip(case, dominant=54, contextual=10):
    """``CLIPVisionTower_VisionZip.forward`` with ``apply_info(dominant_num=dominant - 1)``, B = 1,
    HF's CLIP attention (q scaled by head_dim ** -0.5, per head) and ``metric`` = keys mean over heads."""
    hidden_states = case["hidden"]
    batch, tokens, width = hidden_states.shape
    heads = case["heads"]
    head_dim = width // heads
    q = (case["q22"] * head_dim**-0.5).view(batch, tokens, heads, head_dim).transpose(1, 2)
    k = case["k22"].view(batch, tokens, heads, head_dim).transpose(1, 2)
    attn_weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    metric = k.mean(1)
    dominant_num = dominant - 1
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((batch, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(batch, dominant_num + 1, width)
    metric_filtered = metric[mask].view(batch, tokens - (dominant_num + 1), metric.shape[2])
    hidden_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(batch, tokens - (dominant_num + 1), width)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual]
    target_tokens = metric_normalized[:, target_indices, :]
    not_target = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    similarity = torch.bmm(metric_normalized[:, not_target, :], target_tokens.transpose(1, 2))
    assign = torch.zeros(batch, int(not_target.sum()), contextual, dtype=hidden_filtered.dtype)
    assign.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign.transpose(1, 2), hidden_filtered[:, not_target, :]) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated
    # Patch indices (0-based, [CLS] dropped) of the dominant tokens and of the targets.
    patch_of_filtered = torch.arange(tokens)[mask[0]] - 1
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)[0], all_indices[0, 1:].sort().values - 1, patch_of_filtered[target_indices]


def code_fastervlm(case, visual_token_num):
    """FasterVLM's ``feature_select`` (``attentions[-2][:, :, 0, 1:]``) and ``encode_images``
    (mean over heads, ``topk``, an index mask)."""
    hidden_states = case["hidden"]
    batch, tokens, width = hidden_states.shape
    heads = case["heads"]
    head_dim = width // heads
    q = (case["q22"] * head_dim**-0.5).view(batch, tokens, heads, head_dim).transpose(1, 2)
    k = case["k22"].view(batch, tokens, heads, head_dim).transpose(1, 2)
    image_attentions = torch.softmax(q @ k.transpose(-1, -2), dim=-1)[:, :, 0, 1:].mean(dim=1)
    token_indices = torch.topk(image_attentions, k=visual_token_num, dim=1)[1]
    index_masks = torch.zeros(batch, tokens - 1, dtype=torch.bool)
    index_masks.scatter_(1, token_indices, True)
    return index_masks[0].nonzero().flatten()


def maxmin_divprune(tokens, k):
    """Greedy max-min diversity on 1 - cosine, written as a plain loop."""
    x = tokens.double()
    x = x / x.norm(dim=-1, keepdim=True)
    distance = 1 - x @ x.T
    n = len(x)
    nearest = [min(float(distance[i, j]) for j in range(n) if j != i) if n > 1 else 0.0 for i in range(n)]
    chosen = [max(range(n), key=lambda i: nearest[i])]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(float(distance[i, j]) for j in chosen)))
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------
# Registration


def test_the_five_load_as_bundled_plugins():
    expected = {
        "PRUMERGE": ("merger", ("vision", "adaptive"), True),
        "PRUMERGE_PLUS": ("merger", ("vision", "adaptive"), True),
        "DIVPRUNE_ADAPTIVE": ("selector", ("vision", "adaptive"), False),
        "VISIONZIP": ("merger", ("vision",), True),
        "FASTERVLM": ("selector", ("vision",), False),
    }
    for name, (kind, context, before) in expected.items():
        method = get_method(name)
        assert (method.kind, method.context, method.before_projector, method.options) == (kind, context, before, ())
        assert method.plugin and not method.accepts_batches


@pytest.mark.parametrize("module", [prumerge_module, divprune_adaptive_module, fastervlm_module, visionzip_module, vision_checks_module])
def test_the_plugins_import_only_the_public_api_and_each_other(module):
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("otprune"):
            assert node.module in ("otprune.contract", "otprune.selectors") or node.module.startswith("otprune.plugins."), node.module
            assert not any(alias.name.startswith("_") for alias in node.names)


@pytest.mark.parametrize("name", NAMES)
def test_each_passes_the_contract_battery(name):
    results = run_battery(get_method(name))
    assert not [r for r in results if r.status == "fail"], results
    adaptive = {r.name: r for r in results}["adaptive"]
    assert adaptive.status == ("pass" if "adaptive" in get_method(name).context else "skip")


def test_check_selector_command_passes_each(capsys):
    from otprune import check_selector

    for name in NAMES:
        assert check_selector.main([name]) == 0, capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# PRUMERGE and PRUMERGE_PLUS


def test_quartiles_and_outliers_follow_numpy_percentile():
    for seed in range(5):
        values = randn(577, seed=seed).exp()
        q1, q3 = quartiles(values)
        assert q1 == pytest.approx(float(np.percentile(values.double().numpy(), 25)), rel=1e-12)
        assert q3 == pytest.approx(float(np.percentile(values.double().numpy(), 75)), rel=1e-12)
        assert outlier_count(values) == round(code_outlier_ratio(values[None]) * 577)


def test_the_adaptive_count_is_the_codes_int_of_n_times_the_share():
    # 13 outliers among 2880: the code's int(2880 * (13 / 2880)) is 12.
    values = torch.cat([torch.full((13,), 100.0), torch.linspace(0, 1, 2867)])
    assert outlier_count(values) == 13 and kept_count(values) == 12
    assert kept_count(torch.ones(10)) == 1  # no outlier: at least one


@pytest.mark.parametrize("seed", range(3))
def test_prumerge_adaptive_matches_the_public_code(seed):
    case = make_case(seed, width=1024 if seed == 0 else 256, heads=16 if seed == 0 else 4)
    vision = contract_context(case)
    ours = merge_prumerge(vision.features, 576, vision=vision, adaptive=True)
    code = code_prumerge(case, adaptive=True)
    assert code[0].numel() >= 1
    assert_prumerge_matches(ours, code)


@pytest.mark.parametrize("seed", range(3))
def test_prumerge_plus_adaptive_matches_the_public_code(seed):
    case = make_case(10 + seed, width=256, heads=4)
    vision = contract_context(case)
    ours = merge_prumerge_plus(vision.features, 576, vision=vision, adaptive=True)
    code = code_prumerge(case, adaptive=True, plus=True)
    assert_prumerge_matches(ours, code)


@pytest.mark.parametrize("k", [2, 37, 72])
def test_prumerge_with_a_budget_is_the_codes_fixed_ratio_with_the_extra_token_inside_k(k):
    case = make_case(20, width=256, heads=4)
    vision = contract_context(case)
    merged, positions = merge_prumerge(vision.features, k, vision=vision, adaptive=False)
    assert merged.shape == (k, 256) and positions.shape == (k,)
    # The code keeps int(N r) tokens and adds the extra one: r with int(N r) = k - 1.
    code = code_prumerge(case, adaptive=False, reduction_ratio=(k - 0.5) / 576)
    assert code[0].numel() == k - 1
    assert_prumerge_matches((merged, positions), code)


def test_prumerge_plus_with_a_budget_keeps_half_by_attention_half_spread_and_the_extra():
    case = make_case(21, width=128, heads=4)
    vision = contract_context(case)
    k = 41
    merged, positions = merge_prumerge_plus(vision.features, k, vision=vision, adaptive=False)
    assert merged.shape[0] == k
    top = vision.cls_attention.argsort(descending=True)[:20].tolist()
    rest = sorted(set(range(576)) - set(top))
    spread = [rest[(2 * j + 1) * len(rest) // 40] for j in range(20)]
    kept = sorted(top + spread)
    extra_at = max(set(rest) - set(spread))
    assert positions.tolist() == sorted([*kept, extra_at])


@pytest.mark.parametrize("merge", [merge_prumerge, merge_prumerge_plus])
def test_prumerge_budget_edges_and_dtype(merge):
    case = make_case(22, n=40, width=64, heads=4)
    vision = contract_context(case)
    tokens = vision.features.half()
    for k in (1, 2, 39, 40):
        answer = merge(tokens, k, vision=vision, adaptive=False)
        assert merge_fault(answer, 40, k, tokens) is None
        assert answer[0].shape[0] == k and answer[0].dtype == torch.float16
    one, at = merge(tokens, 1, vision=vision, adaptive=False)
    assert at.tolist() == [int(vision.cls_attention.argmax())]


def test_adaptive_counts_vary_per_image_and_lie_in_one_to_n():
    counts = {name: set() for name in ("PRUMERGE", "PRUMERGE_PLUS", "DIVPRUNE_ADAPTIVE")}
    for seed in range(6):
        case = make_case(30 + seed, n=144, width=64, heads=4, sharpness=0.4 + 0.3 * seed)
        vision = contract_context(case)
        x = vision.features
        for name, function in (("PRUMERGE", merge_prumerge), ("PRUMERGE_PLUS", merge_prumerge_plus)):
            merged, positions = function(x, 144, vision=vision, adaptive=True)
            assert merge_fault((merged, positions), 144, 144, x) is None
            counts[name].add(merged.shape[0])
        picks = select_divprune_adaptive(randn(144, 48, seed=seed), 144, vision=vision, adaptive=True)
        assert kept_indices_fault(picks, 144, picks.numel(), picks.device) is None
        assert picks.numel() == prumerge_token_count(vision.cls_attention)
        counts["DIVPRUNE_ADAPTIVE"].add(picks.numel())
    for name, seen in counts.items():
        assert len(seen) > 1 and all(1 <= m <= 144 for m in seen), (name, seen)


def test_inputs_are_left_as_they_were():
    case = make_case(40, n=64, width=64, heads=4)
    vision = contract_context(case)
    before = {name: getattr(vision, name).clone() for name in ("features", "cls_attention", "keys", "head_attention", "head_keys", "cls_feature")}
    tokens = vision.features
    merge_prumerge(tokens, 64, vision=vision, adaptive=True)
    merge_prumerge_plus(tokens, 10, vision=vision, adaptive=False)
    merge_visionzip(tokens, 20, vision=vision)
    select_fastervlm(tokens, 20, vision=vision)
    select_divprune_adaptive(tokens, 64, vision=vision, adaptive=True)
    for name, value in before.items():
        assert torch.equal(getattr(vision, name), value), name


# ---------------------------------------------------------------------------------------------
# DIVPRUNE_ADAPTIVE


@pytest.mark.parametrize("seed", range(3))
def test_divprune_adaptive_is_maxmin_at_prumerges_token_count(seed):
    case = make_case(50 + seed, n=100, width=64, heads=4)
    vision = contract_context(case)
    tokens = randn(100, 40, seed=seed)
    code = code_prumerge(case, adaptive=True)
    count = code[0].numel() + 1  # PruMerge's merged tokens and its extra one
    assert select_divprune_adaptive(tokens, 100, vision=vision, adaptive=True).tolist() == maxmin_divprune(tokens, count)
    assert select_divprune_adaptive(tokens, 17, vision=vision, adaptive=False).tolist() == maxmin_divprune(tokens, 17)


# ---------------------------------------------------------------------------------------------
# VISIONZIP


def test_visionzip_split_scales_54_to_10():
    assert [visionzip_split(k) for k in (64, 128, 192, 1, 3, 4)] == [(54, 10), (108, 20), (162, 30), (1, 0), (3, 0), (3, 1)]


@pytest.mark.parametrize("k", [64, 128, 192])
@pytest.mark.parametrize("seed", range(2))
def test_visionzip_matches_the_public_code(seed, k):
    case = make_case(60 + seed)
    vision = contract_context(case)
    dominant, contextual = visionzip_split(k)
    code_tokens, code_dominant, code_targets = code_visionzip(case, dominant, contextual)
    merged, positions = merge_visionzip(vision.features, k, vision=vision)
    assert merged.shape == (k, 1024)
    free = min(set(range(576)) - set(code_dominant.tolist()) - set(code_targets.tolist()))
    assert positions.tolist() == sorted([free, *code_dominant.tolist(), *code_targets.tolist()])
    where = {p: i for i, p in enumerate(positions.tolist())}
    code_order = [free, *code_dominant.tolist(), *code_targets.tolist()]  # [CLS], dominant, contextual
    for row, position in enumerate(code_order):
        torch.testing.assert_close(merged[where[position]], code_tokens[row], rtol=1e-5, atol=1e-5)


def test_visionzip_without_cls_gives_the_slot_to_a_dominant_token():
    case = make_case(62, n=64, width=64, heads=4)
    vision = contract_context(case)
    bare = VisionContext(**{**vision.__dict__, "cls_feature": None})
    merged, positions = merge_visionzip(vision.features, 16, vision=bare)
    assert merge_fault((merged, positions), 64, 16, vision.features) is None and merged.shape[0] == 16
    top = set(vision.head_attention.sum(0).argsort(descending=True)[:14].tolist())
    assert top <= set(positions.tolist())


# ---------------------------------------------------------------------------------------------
# FASTERVLM


@pytest.mark.parametrize("k", [1, 64, 144, 576])
@pytest.mark.parametrize("seed", range(2))
def test_fastervlm_matches_the_public_code(seed, k):
    case = make_case(70 + seed)
    vision = contract_context(case)
    projected = randn(576, 96, seed=seed).half()  # after the projector: the picks do not read the tokens
    picks = select_fastervlm(projected, k, vision=vision)
    assert picks.tolist() == code_fastervlm(case, k).tolist()
    assert kept_indices_fault(picks, 576, k, projected.device) is None
