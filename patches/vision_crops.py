"""The vision context on any-resolution images (LLaVA-1.6 original, transformers' LLaVA-NeXT and
LLaVA-OneVision): each of an image's tokens traced to the tower crop and patch it came from.

The tower runs on each image's crops (the base image, then each tile; [CLS] + ``side x side``
patches each), all crops of one image before the next image's. The model arranges the crops'
features into the image's tokens: the base crop's patches, then the tiles' patches as one grid,
unpadded to the image's aspect, with a newline vector ending each row. Here the model's own
arrangement is applied to an index map instead of features: each crop patch carries its flat
index ``tower row * P + patch`` and the newline vector carries ``-1``, so what comes out is each
token's source. transformers' ``pack_image_features`` is called as it is; the original LLaVA
arranges inline in ``prepare_inputs_labels_for_multimodal``, so its steps are repeated here around
its own ``unpad_image`` and ``get_anyres_image_grid_shape`` (the tests check the result against
the model's output).

OneVision packs as NeXT does, then, where the unpadded grid of an image exceeds its
``anyres_max`` cap, downsamples it bilinearly: its tokens then blend several patches and no patch
stands for one, so its context cannot be aligned; ``onevision_layout`` says which images that
is (the model packs an index map and its square: a blend of distinct indices has a mean square
above its squared mean).

A token's context row is its crop's row for that patch. **Choices**:

- ``cls_attention`` and ``head_attention``: each crop's own [CLS] softmax, not renormalised across
  an image's crops (nor over the patches that unpadding drops), so a token's score is what its
  crop's [CLS] gives it;
- ``cls_feature``: the base crop's [CLS] feature (the crop that sees the whole image);
- newline tokens: zero rows and ``patches`` False (no patch stands for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from otprune.contract import VisionContext

__all__ = ["CropLayout", "crop_contexts", "llava_next_layout", "onevision_layout", "original_llava_layout"]

NEWLINE = -1


@dataclass(frozen=True)
class CropLayout:
    """Where a batch's images' tokens come from: ``crops[i]`` tower rows of ``patches`` patches each
    belong to image ``i`` (in image order); ``sources[i]`` ``(N_i,)`` long, each token's flat
    tower patch (``row * patches + patch``), or ``NEWLINE``."""

    patches: int
    crops: tuple[int, ...]
    sources: tuple[torch.Tensor, ...]


def _index_maps(crops: list[int], patches: int) -> list[torch.Tensor]:
    """Per image, ``(crops, patches, 1)`` long: each crop patch's flat index over all tower rows,
    shaped like the features the model arranges (one channel)."""
    flat = torch.arange(sum(crops) * patches).view(-1, patches, 1)
    return list(flat.split(crops))


def original_llava_layout(model, images, image_sizes) -> CropLayout | None:
    """The layout of the original LLaVA's images (``prepare_inputs_labels_for_multimodal``'s
    ``images``), or ``None`` for a 4-D batch, one tower row per image (LLaVA-1.5)."""
    if torch.is_tensor(images) and images.dim() != 5:
        return None
    from llava.mm_utils import get_anyres_image_grid_shape
    from llava.model.llava_arch import unpad_image

    crops = [1 if image.dim() == 3 else image.shape[0] for image in images]
    tower = model.get_vision_tower()
    side = tower.num_patches_per_side
    merge = getattr(model.config, "mm_patch_merge_type", "flat")
    unpad = "unpad" in merge
    sources = []
    for i, crop_map in enumerate(_index_maps(crops, side * side)):
        # The same steps, in the same order, as LLaVA 1.2.2's prepare_inputs_labels_for_multimodal.
        if merge == "flat":
            tokens = crop_map.flatten(0, 1)
        elif crop_map.shape[0] == 1:
            tokens = torch.cat((crop_map[0], torch.full((1, 1), NEWLINE))) if unpad else crop_map[0]
        else:
            width, height = get_anyres_image_grid_shape(image_sizes[i], model.config.image_grid_pinpoints, tower.config.image_size)
            tiles = crop_map[1:].view(height, width, side, side, -1)
            if unpad:
                grid = unpad_image(tiles.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3), image_sizes[i])
                grid = torch.cat((grid, torch.full((*grid.shape[:-1], 1), NEWLINE)), dim=-1)
                tiles = grid.flatten(1, 2).transpose(0, 1)
            else:
                tiles = tiles.permute(0, 2, 1, 3, 4).flatten(0, 3)
            tokens = torch.cat((crop_map[0], tiles))
        sources.append(tokens[:, 0])
    return CropLayout(side * side, tuple(crops), tuple(sources))


def llava_next_layout(model, image_sizes, strategy: str) -> CropLayout:
    """The layout of transformers' LLaVA-NeXT images of ``image_sizes`` ((H, W) each), from the
    model's own ``pack_image_features`` applied to the index maps."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    vision = config.vision_config
    crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, vision.image_size) for size in image_sizes]
    side = vision.image_size // vision.patch_size
    packed, _ = model.model.pack_image_features(_index_maps(crops, side * side), image_sizes, strategy, image_newline=torch.tensor([NEWLINE]))
    return CropLayout(side * side, tuple(crops), tuple(tokens[:, 0].cpu() for tokens in packed))


def onevision_layout(model, image_sizes, batch_num_images, aspect_ratio: str) -> tuple[CropLayout, list[int]]:
    """The layout of transformers' LLaVA-OneVision images of ``image_sizes`` ((H, W) each), from the
    model's own ``pack_image_features``, and the indices of the images it downsamples (their
    ``sources`` stand for no patch). ``batch_num_images``: as ``get_image_features`` takes it (a
    prompt of several images gives each one crop, the base image)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    config = model.config
    vision = config.vision_config
    tiled = [True] * len(image_sizes) if batch_num_images is None else [n == 1 for n in batch_num_images for _ in range(n)]
    crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, vision.image_size) if tile else 1 for size, tile in zip(image_sizes, tiled)]
    side = vision.image_size // vision.patch_size
    # float64: the bilinear downsampling takes floats, and holds these indices and squares exactly.
    index = torch.cat(_index_maps(crops, side * side)).double()
    maps = torch.cat((index, index.square()), dim=-1).split(crops)
    newline = torch.tensor([NEWLINE, NEWLINE**2], dtype=torch.float64)
    packed, _ = model.model.pack_image_features(list(maps), image_sizes, image_newline=newline, vision_aspect_ratio=aspect_ratio)
    downsampled = [i for i, tokens in enumerate(packed) if bool((tokens[:, 1] != tokens[:, 0].square()).any())]
    return CropLayout(side * side, tuple(crops), tuple(tokens[:, 0].long().cpu() for tokens in packed)), downsampled


def crop_contexts(contexts: list[VisionContext], layout: CropLayout, images: list[torch.Tensor]) -> list[VisionContext | None]:
    """Each image's context, its rows taken from its tokens' crop patches, on its tokens' device;
    all ``None`` where the tower's rows or the images' token counts do not match the layout."""
    if (
        sum(layout.crops) != len(contexts)
        or any(c.features.shape[0] != layout.patches for c in contexts)
        or len(layout.sources) != len(images)
        or any(s.shape[0] != t.shape[0] for s, t in zip(layout.sources, images))
    ):
        return [None] * len(images)
    table = {
        "features": torch.cat([c.features for c in contexts]),
        "cls_attention": torch.cat([c.cls_attention for c in contexts]),
        "keys": torch.cat([c.keys for c in contexts]),
        "head_attention": torch.cat([c.head_attention for c in contexts], dim=1),
        "head_keys": torch.cat([c.head_keys for c in contexts]),
    }
    aligned, first_row = [], 0
    for crops, source, image in zip(layout.crops, layout.sources, images):
        source = source.to(table["features"].device)
        rows = {name: _rows(value, source, dim=1 if name == "head_attention" else 0) for name, value in table.items()}
        base = contexts[first_row].cls_feature
        aligned.append(
            VisionContext(
                **{name: value.to(image.device) for name, value in rows.items()},
                cls_feature=None if base is None else base.to(image.device),
                patches=(source != NEWLINE).to(image.device),
            )
        )
        first_row += crops
    return aligned


def _rows(table: torch.Tensor, source: torch.Tensor, dim: int) -> torch.Tensor:
    """``table``'s entries along ``dim`` at ``source``, zeros where a token has no patch."""
    picked = table.index_select(dim, source.clamp_min(0))
    shape = [1] * picked.dim()
    shape[dim] = -1
    return torch.where((source != NEWLINE).view(shape), picked, 0)
