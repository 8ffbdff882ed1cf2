"""Segmentation task-aligned assigner (YOLO26-seg), on :mod:`detloss.assign.aligned`.

Source: ultralytics 8.4 ``utils/tal.py`` ``SegTaskAlignedAssigner`` (``SegmentLoss26``'s assigner;
YOLOv8-seg uses the plain :class:`~detloss.assign.tal.TaskAlignedAssigner`). Boxes are xyxy pixels.

- **Candidates**: those of the detection assigner (anchor centre strictly inside the box, sides
  shorter than ``min_side`` widened).
- **Overlap**: ``(CIoU + mask IoU) / 2``. The mask IoU is computed only for each box's ``3 * topk``
  candidates of largest box alignment ``score ** alpha * CIoU ** beta`` (0 for the others): the
  predicted mask ``coefficients @ prototypes > 0`` is cropped to the predicted box (scaled to the
  prototype grid, :func:`detloss.functional.crop_mask`) and compared with the target's binary
  mask at the prototype resolution, ``|P & G| / max(|P| + |G| - |P & G|, 1)``.

Each anchor's mask is decoded once (however many boxes it is a candidate of), in chunks of at
most :data:`MASK_CHUNK_PIXELS` mask pixels; nothing of size boxes x anchors x pixels is built.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as fn
from .aligned import BoxTaskAlignedAssigner, CandidatePairs, topk_ties
from .base import rank_in_group

__all__ = ["SegTaskAlignedAssigner", "MASK_CHUNK_PIXELS", "MASK_IOU_CANDIDATES"]

#: Predicted masks are decoded in chunks of at most this many pixels.
MASK_CHUNK_PIXELS = 1 << 24
#: Each box's mask IoU is computed for its ``MASK_IOU_CANDIDATES * topk`` best box-aligned candidates.
MASK_IOU_CANDIDATES = 3


class SegTaskAlignedAssigner(BoxTaskAlignedAssigner):
    """Task-aligned assignment by box and mask quality (module docstring).

    Call :meth:`assign` with, besides the common inputs (``pd_bboxes`` / ``gt_bboxes`` xyxy
    pixels): ``pd_coef [B, A, nm]`` mask coefficients, ``proto [B, nm, h, w]`` prototypes,
    ``gt_masks [B, M, h, w]`` bool target masks at the prototype resolution and ``mask_scale``
    (prototype pixels per image pixel, a float).
    """

    def overlaps(
        self,
        pairs: CandidatePairs,
        *,
        pd_bboxes: Tensor,
        score: Tensor,
        pd_coef: Tensor,
        proto: Tensor,
        gt_masks: Tensor,
        mask_scale: float,
        **extra: Any,
    ) -> Tensor:
        iou = super().overlaps(pairs, pd_bboxes=pd_bboxes)
        box_metric = score.pow(self.alpha) * iou.pow(self.beta) + self.eps
        k3 = MASK_IOU_CANDIDATES * self.topk
        chosen = rank_in_group(pairs.box, box_metric) < k3
        if self.zero_ties:
            # a box with fewer than 3 topk candidates above the eps floor takes the rest among the
            # tied ones in torch.topk's order, as the reference does over the dense row
            n_box = pairs.boxes.shape[0]
            above = torch.bincount(pairs.box[box_metric > self.eps], minlength=n_box)
            needy = (above < k3) & (torch.bincount(pairs.box, minlength=n_box) > k3)
            if bool(needy.any()):
                n_anchor = pd_coef.shape[1]
                tied = topk_ties(pairs.box, pairs.anchor, box_metric, needy, k3, n_anchor)
                chosen = torch.where(needy[pairs.box], tied, chosen)
        sel = chosen.nonzero().squeeze(1)
        miou = torch.zeros_like(iou)
        if sel.numel():
            n_anchor = pd_coef.shape[1]
            key, inv = torch.unique(pairs.img[sel] * n_anchor + pairs.anchor[sel], return_inverse=True)
            u_img, u_anchor = key // n_anchor, key % n_anchor
            # one decoded mask per anchor; each selected pair compares it with its box's mask
            coef = pd_coef[u_img, u_anchor].to(proto.dtype)
            boxes = pd_bboxes[u_img, u_anchor] * mask_scale
            miou[sel] = _mask_iou(coef, proto, boxes, u_img, inv, gt_masks, pairs.img[sel], pairs.row[sel]).to(iou.dtype)
        return (iou + miou) / 2


def _mask_iou(
    coef: Tensor, proto: Tensor, boxes: Tensor, image: Tensor, which: Tensor, gt_masks: Tensor, gt_img: Tensor, gt_row: Tensor
) -> Tensor:
    """IoU ``[n]`` of predicted mask ``which[j]`` with the target mask ``gt_masks[gt_img[j], gt_row[j]]``.

    The predicted masks are those of distinct anchors sorted by image: ``coef [u, nm]`` their
    coefficients, ``boxes [u, 4]`` their boxes in prototype pixels, ``image [u]`` (non-decreasing)
    their image; ``proto [B, nm, h, w]``, ``gt_masks [B, M, h, w]`` bool. Each mask is decoded
    once, in chunks of anchors of one image holding at most :data:`MASK_CHUNK_PIXELS` pixels.
    """
    bsz, _, h, w = proto.shape
    px = h * w
    rows = max(1, MASK_CHUNK_PIXELS // max(px, 1))
    counts = torch.bincount(image, minlength=bsz).tolist()
    chunks, offset = [], 0
    for b, c in enumerate(counts):  # a loop over images and memory chunks, not over boxes
        chunks += [(b, offset + i, offset + min(i + rows, c)) for i in range(0, c, rows)]
        offset += c
    order = torch.argsort(which, stable=True)
    edges = torch.tensor([u for _, u, _ in chunks] + [offset], device=which.device)
    pair_edges = torch.searchsorted(which[order], edges).tolist()
    out = torch.zeros(which.shape[0], dtype=torch.float32, device=coef.device)
    flat = proto.flatten(2)
    for (b, u0, u1), p0, p1 in zip(chunks, pair_edges[:-1], pair_edges[1:]):
        if p0 == p1:
            continue
        pm = fn.crop_mask((coef[u0:u1] @ flat[b] > 0).view(-1, h, w), boxes[u0:u1]).flatten(1)
        idx = order[p0:p1]
        mine = pm[which[idx] - u0]
        gm = gt_masks[gt_img[idx], gt_row[idx]].flatten(1)
        inter = (mine & gm).sum(-1, dtype=torch.float32)
        union = mine.sum(-1, dtype=torch.float32) + gm.sum(-1, dtype=torch.float32) - inter
        out[idx] = inter / union.clamp(min=1)
    return out
