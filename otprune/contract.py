"""The two public method contracts, what a method may ask for, and the checks of what it returns.

**Selector** ``select(tokens, k, *, <context>, <options>) -> kept_indices``:

- ``tokens``: ``(N, d)``, one image's visual tokens (float16, bfloat16, float32 or float64, finite,
  on the model's device). A selector that also takes ``(B, N, d)`` batches sharing one ``k`` says
  so with ``select.accepts_batches = True``; the patches then batch images of equal ``N`` that ask
  for no per-image context. Others are called one image at a time.
- ``k``: an int in ``[1, N]``, ``budget(ratio, N)``.
- returns ``(k,)`` (or ``(B, k)``) ``torch.long`` indices into the token axis: distinct, sorted
  ascending, on ``tokens.device``, carrying no gradient.

**Merger** ``merge(tokens, k, *, <context>, <options>) -> (merged_tokens, positions)``: new tokens
instead of a subset (pooling, merging, VisionZip's contextual tokens).

- ``merged_tokens``: ``(m, d)`` with ``1 <= m <= k``, ``tokens``' dtype and device, finite.
- ``positions``: ``(m,)`` ``torch.long``, distinct, sorted, in ``[0, N)``: merged token ``i``
  takes the place of token ``positions[i]``, which it stands for (a window's centre token, say).
  Where the model keeps each token's unpruned position (Qwen-VL and OneVision at K = 0, every
  family at K > 0), the merged token gets that token's position, its rotary position on rotary
  models (Qwen's 3-D ``(t, h, w)`` included): it is read where the tokens it summarises sit, not
  where the shortened sequence happens to put it. The LLaVA families at K = 0 renumber the kept
  sequence as LLaVA numbers any sequence (and as the reference code does); there ``positions``
  decide the merged tokens' order among the kept ones.

**Context**, given only to a function that names it as a keyword-only parameter (``CONTEXT``):
``text`` the prompt's question ``(T, d)`` in the tokens' own space (embedded at K = 0, their
hidden states entering layer K at K > 0): its text after its last image, the same for every image of
the prompt (a prompt ending with an image: its text before the first), never the separators between
images or the tokens that frame an image (Qwen's vision start and end);
``attention`` ``(N,)`` the last prompt token's attention over the image's tokens at layer K - 1,
mean over heads (only where ``LAYER_INDEX = K > 0``); ``grid`` the image's patch grids, a tuple of
:class:`PatchGrid` in token order (``check_grids``: LLaVA-1.5 one 24 x 24 grid; LLaVA-NeXT/1.6 and
OneVision the base grid, then the tiles' grid with a newline token ending each row, a single tile's
lone newline in no grid; Qwen ``(h/2) x (w/2)`` from ``image_grid_thw``, one per video frame);
``layer_index`` the K it prunes before.
``text_attention`` ``(T, N)`` and ``visual_attention`` ``(N, N)``: the attention of the question's
tokens, and of the image's own tokens, over the image's tokens at layer K - 1, mean over heads
(rows as the causal softmax over the whole sequence gives them; K >= 1 only).
A method that asks for ``text`` (or ``text_attention``) may carry ``select.text_leaves_out``, a
tuple of strings with words in them (a benchmark's answer-format instruction, say): its question
then leaves out every occurrence of each phrase's tokens as the model's own tokenizer (loaded
once per checkpoint, from ``config._name_or_path``; where it cannot be, the run stops) writes
the phrase alone, after a space or after a newline, and, for a phrase that starts with
whitespace a tokenizer may fuse with the token before, also without it. A phrase not in the
prompt leaves the question whole, as does one that is all of it (``T >= 1``).
``vision`` the image's view from its vision tower, a :class:`VisionContext` aligned with its N
tokens (K = 0 only): the tower's features before the projector, its [CLS] attention over the
patches and its keys, at the feature layer.
``adaptive`` ``True`` when the run leaves the count to the method (``SUBSET_RATIO`` unset, a config
ratio ``adaptive``): ``k`` is then ``N``, and the method keeps any count in ``[1, N]`` it chooses;
``False`` when the run sets the budget ``k``. A method that does not ask for it needs a ratio.

**Before the projector**: a method with ``select.before_projector = True`` runs where its authors'
code does, on the vision tower's output: ``tokens`` are the image's tower features ``(N, C_v)``
(one per token the LLM would see), and a merger's tokens are tower features, which the patch
projects into the LLM's space. Only at K = 0.

**Schedule**: a selector may carry ``select.stages``, a function ``stages(*, <options>)`` returning
``((K_1, f_1), (K_2, f_2), ...)``: it prunes before each layer ``K_1 < K_2 < ...`` (``>= 1``), each
image of ``N`` tokens keeping ``budget(f_i, N)`` from ``K_i`` on (``otprune.schedule``); at each
stage the selector gets the tokens still alive, as hidden states entering ``K_i``, the context
measured at that stage, ``layer_index = K_i`` and ``k`` the stage's count. ``stages`` gets the
options it names (``ratio``: ``SUBSET_RATIO``).
Every other keyword-only parameter is an **option**, set with ``OTPRUNE_OPTIONS`` (a JSON object)
or a harness config method's ``options:``; one without a default must be set.

A method reads ``tokens`` and its context and never writes them: the model reads them next, so a
plugin that writes one in place (its version counter moves) stops the run, as does an answer that
breaks the contract (:func:`kept_indices_fault`, :func:`merge_fault`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from otprune.selectors import TOKEN_DTYPES

__all__ = [
    "ATTENTION_CONTEXT",
    "CONTEXT",
    "PER_IMAGE_CONTEXT",
    "PatchGrid",
    "VisionContext",
    "check_grids",
    "check_image_tokens",
    "kept_indices_fault",
    "merge_fault",
]

CONTEXT = {
    "text": "the prompt's question, its text after its last image, (T, d): its embedded tokens at K = 0, their hidden states entering layer K at K > 0",
    "attention": "(N,) the last prompt token's attention over the image's tokens at layer K - 1 (LAYER_INDEX >= 1 only)",
    "grid": "the image's patch grids: a tuple of otprune.contract.PatchGrid in token order (see check_grids)",
    "layer_index": "the decoder layer K pruned before (0: before the LLM)",
    "text_attention": "(T, N) the question's tokens' attention over the image's tokens at layer K - 1 (LAYER_INDEX >= 1 only)",
    "visual_attention": "(N, N) the image's tokens' attention over themselves at layer K - 1 (LAYER_INDEX >= 1 only)",
    "vision": "the image's vision-tower view, an otprune.contract.VisionContext aligned with its N tokens (LAYER_INDEX = 0 only)",
    "adaptive": "True when the run leaves the count to the method (SUBSET_RATIO unset): k is N and any count in [1, N] may be kept",
}
# Context that differs from image to image: a function asking for any of it is called image by image.
PER_IMAGE_CONTEXT = ("text", "attention", "grid", "text_attention", "visual_attention", "vision")
# Context measured from the LLM's attention: only inside it (K >= 1).
ATTENTION_CONTEXT = frozenset({"attention", "text_attention", "visual_attention"})


@dataclass(frozen=True)
class PatchGrid:
    """One row-major grid of patch tokens inside an image's N tokens.

    ``start``: the index of its first token; ``rows`` x ``cols`` patch tokens; ``newlines``: a
    newline token (a learned vector, not a patch) ends each row, as in LLaVA-NeXT's and
    OneVision's any-resolution grids, so a row spans ``cols + 1`` tokens.
    """

    start: int
    rows: int
    cols: int
    newlines: bool = False

    @property
    def size(self) -> int:
        """Tokens the grid spans, newline tokens included."""
        return self.rows * (self.cols + int(self.newlines))

    def cell_positions(self, device=None) -> torch.Tensor:
        """``(rows, cols)`` long: the token index of each patch."""
        stride = self.cols + int(self.newlines)
        rows = torch.arange(self.rows, device=device)[:, None] * stride
        return self.start + rows + torch.arange(self.cols, device=device)

    def newline_positions(self, device=None) -> torch.Tensor:
        """``(rows,)`` long: the token index of each row's newline token (empty without them)."""
        if not self.newlines:
            return torch.empty(0, dtype=torch.long, device=device)
        return self.start + torch.arange(1, self.rows + 1, device=device) * (self.cols + 1) - 1


@dataclass(frozen=True)
class VisionContext:
    """One image's view from its vision tower, row ``i`` for the image's token ``i`` (float32, on
    the tokens' device). Measured from the tower's queries and keys, whatever attention backend
    the tower runs.

    - ``features`` ``(N, C_v)``: the tower's features at the feature layer, before the projector.
    - ``cls_attention`` ``(N,)``: the [CLS] query's attention over the patches at the block that
      reads the features (CLIP at LLaVA's layer -2: encoder layer 23 of 24), as one head over the
      full width ``C``: ``softmax(q_cls . k / sqrt(C))`` over [CLS] and patches, the [CLS] column
      dropped (PruMerge's form).
    - ``keys`` ``(N, C)``: that block's keys, full width (PruMerge's neighbour metric).
    - ``head_attention`` ``(H, N)``: per head, the [CLS] query's attention over the patches at
      the block that produces the features (encoder layer 22 of 24: ``attentions[-2]``), softmax
      over [CLS] and patches, the [CLS] column dropped (VisionZip sums it over heads).
    - ``head_keys`` ``(N, C / H)``: that block's keys, mean over heads (VisionZip's metric).
    - ``cls_feature`` ``(C_v,)``: the [CLS] token's feature at the feature layer (``None`` for a
      tower without [CLS]).
    - ``patches`` ``(N,)`` bool: which of the image's tokens a tower patch stands for (``None``:
      all). The others (LLaVA-NeXT's and OneVision's newline vectors) have zero rows here; a
      method asking for ``vision`` is given the patch tokens only, and every other token is kept
      (``otprune.selection``).

    Towers without a [CLS] (OneVision's SigLIP, Qwen's ViT) and the tokens no patch stands for
    follow the choices the adapters name (``patches.vision_tower``, ``patches.vision_crops``,
    ``patches.vision_without_cls``).
    """

    features: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor
    head_attention: torch.Tensor
    head_keys: torch.Tensor
    cls_feature: torch.Tensor | None = None
    patches: torch.Tensor | None = None


def check_grids(grids: tuple[PatchGrid, ...], n: int) -> None:
    """Raise ``ValueError`` unless ``grids`` lie in token order, without overlap, inside
    ``range(n)``. Tokens in no grid are no patches (the lone newline token after a single-tile
    LLaVA-NeXT or OneVision image)."""
    at = 0
    for grid in grids:
        if grid.rows < 1 or grid.cols < 1:
            raise ValueError(f"patch grid {grid} has no patches; rows and cols must be >= 1")
        if grid.start < at:
            raise ValueError(f"patch grids {grids} overlap or are out of token order")
        at = grid.start + grid.size
    if at > n:
        raise ValueError(f"patch grids {grids} span past the image's {n} tokens")


def check_image_tokens(tokens, k) -> int:
    """``k`` as an int after checking one image's ``(N, d)`` tokens and ``1 <= k <= N``: the input
    half of the contract, for a method to call first; raises ``ValueError`` naming what is wrong."""
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"tokens must be a torch.Tensor of shape (N, d); got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (N, d), one image; got shape {tuple(tokens.shape)}")
    if tokens.dtype not in TOKEN_DTYPES:
        allowed = ", ".join(str(dtype).removeprefix("torch.") for dtype in TOKEN_DTYPES)
        raise ValueError(f"tokens must be a floating-point tensor of dtype {allowed}; got {tokens.dtype}")
    if tokens.device.type == "meta":
        raise ValueError("tokens are on the meta device, which holds no values; pass a CPU or GPU tensor")
    n, d = tokens.shape
    if n < 1 or d < 1:
        raise ValueError(f"tokens must hold at least one token of at least one feature; got shape {tuple(tokens.shape)}")
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be an int in [1, N] = [1, {n}]; got {k!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, N] = [1, {n}]; got {k}")
    return k


def _index_fault(indices, n: int, device: torch.device) -> str | None:
    if not isinstance(indices, torch.Tensor):
        return f"returned {type(indices).__name__}, not a torch.Tensor"
    if indices.dtype != torch.long:
        return f"returned indices of dtype {indices.dtype}, not torch.long"
    if indices.device != device:
        return f"returned indices on {indices.device}, not on the tokens' device {device}"
    if indices.requires_grad:
        return "returned indices that require a gradient"
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        return f"returned indices outside [0, {n}): min {int(indices.min())}, max {int(indices.max())}"
    if indices.numel() > 1:
        steps = indices[..., 1:] - indices[..., :-1]
        if bool((steps == 0).any()):
            return "returned an index twice"
        if bool((steps < 0).any()):
            return "returned indices that are not sorted ascending"
    return None


def kept_indices_fault(indices, n: int, k: int, device: torch.device, batch: int | None = None, at_most: bool = False) -> str | None:
    """What is wrong with a selector's answer for ``N = n`` tokens and budget ``k`` (``None``: nothing).

    ``batch``: the ``B`` of a ``(B, N, d)`` call, whose answer must be ``(B, k)``; ``at_most``: an
    adaptive run's answer, ``(m,)`` with ``1 <= m <= k``.
    """
    if at_most and isinstance(indices, torch.Tensor):
        if indices.dim() != 1 or not 1 <= indices.shape[0] <= k:
            return f"returned shape {tuple(indices.shape)}, not (m,) with 1 <= m <= k = {k} (the method chooses its count)"
        return _index_fault(indices, n, device)
    shape = (k,) if batch is None else (batch, k)
    if isinstance(indices, torch.Tensor) and tuple(indices.shape) != shape:
        return f"returned shape {tuple(indices.shape)}, not {shape}"
    return _index_fault(indices, n, device)


def merge_fault(answer, n: int, k: int, tokens: torch.Tensor) -> str | None:
    """What is wrong with a merger's answer for ``tokens`` ``(N, d)`` and budget ``k`` (``None``: nothing)."""
    if not isinstance(answer, tuple) or len(answer) != 2:
        return f"returned {type(answer).__name__}, not a (merged_tokens, positions) pair"
    merged, positions = answer
    d = tokens.shape[-1]
    if not isinstance(merged, torch.Tensor):
        return f"returned merged tokens of type {type(merged).__name__}, not a torch.Tensor"
    if merged.dim() != 2 or merged.shape[1] != d or not 1 <= merged.shape[0] <= k:
        return f"returned merged tokens of shape {tuple(merged.shape)}, not (m, {d}) with 1 <= m <= k = {k}"
    if merged.dtype != tokens.dtype:
        return f"returned merged tokens of dtype {merged.dtype}, not the tokens' {tokens.dtype}"
    if merged.device != tokens.device:
        return f"returned merged tokens on {merged.device}, not on the tokens' device {tokens.device}"
    if merged.requires_grad:
        return "returned merged tokens that require a gradient"
    if not bool(torch.isfinite(merged).all()):
        return "returned merged tokens that are not all finite"
    if isinstance(positions, torch.Tensor) and tuple(positions.shape) != (merged.shape[0],):
        return f"returned positions of shape {tuple(positions.shape)}, not ({merged.shape[0]},), one per merged token"
    if not isinstance(positions, torch.Tensor):
        return f"returned positions of type {type(positions).__name__}, not a torch.Tensor"
    fault = _index_fault(positions, n, tokens.device)
    return None if fault is None else fault.replace("indices", "positions").replace("an index", "a position")
