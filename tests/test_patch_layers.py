"""The layer hooks' tensor surgery (patches/layers.py) on its own, against slow per-row loops."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from otprune.patches.layers import LayerPruner, PrefillState, cut_mask, take, take_positions
from otprune.prune_config import PruneConfig

KEPT = torch.tensor([[0, 2, 3], [1, 3, 4]])


def slow_take(t, index, dim):
    t = t.expand(index.shape[0], *t.shape[1:])
    return torch.stack([t[b].index_select(dim - 1, index[b]) for b in range(index.shape[0])])


def test_masks_of_every_convention_keep_the_kept_rows_and_columns():
    two_d = torch.rand(2, 5) > 0.3
    four_d = torch.rand(2, 1, 5, 5)
    assert torch.equal(cut_mask(two_d, KEPT, 5), slow_take(two_d, KEPT, 1))
    assert torch.equal(cut_mask(four_d, KEPT, 5), slow_take(slow_take(four_d, KEPT, 2), KEPT, 3))
    # A decode step's mask: one query row, kv columns kept + the new one.
    decode = torch.rand(2, 1, 1, 6)
    columns = torch.cat([KEPT, torch.full((2, 1), 5)], 1)
    assert torch.equal(take(decode, columns, dim=3), slow_take(decode, columns, 3))


def test_a_fixed_size_cache_keeps_its_width_and_masks_the_slots_never_written():
    # A static cache of 8 slots after a 5-token prompt: the pruned layers hold the 3 kept tokens
    # in slots 0-2, then the slots of what follows the prompt (positions 5-7), then 2 unused slots.
    prefill = torch.rand(2, 1, 5, 8)
    cut = cut_mask(prefill, KEPT, 5, fixed=True)
    columns = torch.cat([KEPT, torch.tensor([[5, 6, 7]] * 2)], 1)
    expected = slow_take(slow_take(prefill, KEPT, 2), columns, 3)
    assert cut.shape == (2, 1, 3, 8)
    assert torch.equal(cut[..., :6], expected)
    assert bool((cut[..., 6:] == torch.finfo(prefill.dtype).min).all())
    flash = torch.ones(2, 8, dtype=torch.bool)
    assert cut_mask(flash, KEPT, 5, fixed=True)[:, 6:].any().item() is False
    # Without a fixed-size cache the layer's keys are exactly the kept ones and what follows.
    assert cut_mask(prefill, KEPT, 5).shape == (2, 1, 3, 6)


def test_positions_are_gathered_by_kept_index_whatever_their_layout():
    ids = torch.arange(5).expand(2, 5) + torch.tensor([[0], [10]])
    assert torch.equal(take_positions(ids, KEPT, dim=-1), torch.stack([ids[b, KEPT[b]] for b in range(2)]))
    shared = torch.arange(5)[None]  # (1, L): one row for the whole batch
    assert torch.equal(take_positions(shared, KEPT, dim=-1), KEPT)
    axes = torch.stack([ids, ids * 2, ids * 3])  # (3, B, L): multi-axis rotary positions
    assert torch.equal(take_positions(axes, KEPT, dim=-1), torch.stack([take_positions(a, KEPT, -1) for a in axes]))
    cos = torch.rand(1, 5, 4)
    assert torch.equal(take_positions(cos, KEPT, dim=-2), torch.stack([cos[0, KEPT[b]] for b in range(2)]))


class DeviceStrict(TorchFunctionMode):
    """Fails any indexing op whose index sits on another device than the tensor it indexes, as
    CUDA does; meta tensors stand in for a second device, which CPU ops otherwise accept."""

    OPS = {torch.Tensor.gather, torch.gather, torch.Tensor.scatter, torch.scatter, torch.Tensor.index_select}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
            devices = {t.device for t in tensors}
            if len(devices) > 1:
                raise RuntimeError(f"{func.__name__}: tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


class Layer(torch.nn.Module):
    def forward(self, hidden, attention_mask=None, position_embeddings=None, position_ids=None):
        return hidden


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer() for _ in range(3))
        self.norm = torch.nn.Identity()


@pytest.mark.parametrize("mask_dims", [2, 4])
def test_every_index_moves_to_the_device_of_the_tensor_it_indexes(mask_dims):
    stack = Stack()
    pruner = LayerPruner(PruneConfig("OURS", 0.5, 1), stack, stack.layers, stack.norm)
    state = PrefillState(spans=[[(1, 5)]], valid=torch.ones(1, 6, dtype=torch.bool), text_after=[[torch.tensor([5])]])
    state.kept, state.pending = torch.tensor([[0, 2, 3, 5]]), False  # selection made on the first device
    pruner.state = state
    far = "meta"  # a later layer's device
    hidden = torch.zeros(1, 6, 8, device=far)
    mask = torch.ones(1, 6, dtype=torch.bool, device=far) if mask_dims == 2 else torch.zeros(1, 1, 6, 6, device=far)
    kwargs = dict(attention_mask=mask, position_embeddings=(torch.zeros(1, 6, 4, device=far),) * 2, position_ids=torch.arange(6, device=far)[None])
    with DeviceStrict():
        (cut,), new_kwargs = pruner._cut(stack.layers[2], (hidden,), kwargs)
        restored = pruner._restore_length(stack.norm, (cut,), cut)
        state.decoding = True
        decode_mask = torch.ones(1, 7, dtype=torch.bool, device=far) if mask_dims == 2 else torch.zeros(1, 1, 1, 7, device=far)
        _, decode_kwargs = pruner._cut(stack.layers[2], (hidden[:, :1],), {"attention_mask": decode_mask})
    assert cut.shape == (1, 4, 8) and restored.shape == (1, 6, 8)
    assert new_kwargs["attention_mask"].shape[-1] == 4 and new_kwargs["position_ids"].shape == (1, 4)
    assert decode_kwargs["attention_mask"].shape[-1] == 5
    assert {t.device.type for t in (cut, restored, new_kwargs["attention_mask"], decode_kwargs["attention_mask"])} == {"meta"}
