"""Shared by the OBB, pose and segmentation losses: the checks of their extra per-level head
outputs and the expected box-side distances."""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from .._checks import check_floating, upcast
from ..anchors import Level

__all__ = ["flatten_level_maps", "expected_distances"]


def flatten_level_maps(
    name: str, maps: Sequence[Tensor], levels: Sequence[Level], channels: int, like: Tensor, dtype: torch.dtype,
    what: str = "",
) -> Tensor:
    """Per-level head outputs ``[B, channels, H_l, W_l]`` (the sizes of ``levels``, the batch,
    dtype and device of ``like``, finite) -> ``[B, A, channels]`` in ``dtype`` (anchors level by
    level, row-major, as the box outputs). ``what`` explains ``channels`` in the error."""
    if isinstance(maps, Tensor) or not isinstance(maps, (list, tuple)):
        raise TypeError(f"{name}: expected a list of {len(levels)} tensors (one per level), got {type(maps).__name__}")
    if len(maps) != len(levels):
        raise ValueError(f"{name}: expected {len(levels)} levels (like feats), got {len(maps)}")
    bsz = like.shape[0]
    flat: List[Tensor] = []
    for i, (m, (h, w, _)) in enumerate(zip(maps, levels)):
        check_floating(f"{name}[{i}]", m)
        if tuple(m.shape) != (bsz, channels, h, w):
            raise ValueError(f"{name}[{i}]: expected shape {(bsz, channels, h, w)}{what}, got {tuple(m.shape)}")
        if m.dtype != like.dtype or m.device != like.device:
            raise TypeError(f"{name}[{i}]: expected dtype {like.dtype} on {like.device} like feats[0], got {m.dtype} on {m.device}")
        bad = ~torch.isfinite(m.detach())
        if bool(bad.any()):
            raise ValueError(f"{name}[{i}]: expected finite values, got NaN or inf at {tuple(int(j) for j in bad.nonzero()[0])}")
        flat.append(upcast(m, dtype).reshape(bsz, channels, h * w))
    return torch.cat(flat, 2).permute(0, 2, 1)


def expected_distances(pred_dist: Tensor, reg_max: int) -> Tensor:
    """ltrb distances ``[..., 4]`` of the head's box channels ``[..., 4 * reg_max]``: each side's
    expectation ``sum_j j * softmax(logits)_j`` (ultralytics ``bbox_decode``), or the channels
    themselves when ``reg_max`` is 1."""
    if reg_max == 1:
        return pred_dist
    proj = torch.arange(reg_max, dtype=pred_dist.dtype, device=pred_dist.device)
    return pred_dist.view(*pred_dist.shape[:-1], 4, reg_max).softmax(-1).matmul(proj)
