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

Each anchor's mask is decoded once (however many boxes it is a candidate of), and only inside its
predicted box (the crop leaves nothing elsewhere), in chunks of at most :data:`MASK_CHUNK_PIXELS`
prototype values; nothing of size boxes x anchors x pixels is built.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..functional.masks import box_windows, window_groups, window_pixels
from .aligned import BoxTaskAlignedAssigner, CandidatePairs, topk_ties
from .base import rank_in_group

__all__ = ["SegTaskAlignedAssigner", "MASK_CHUNK_PIXELS", "MASK_IOU_CANDIDATES"]

#: Predicted masks are decoded in chunks of at most this many prototype values (anchors x window
#: pixels x prototypes).
MASK_CHUNK_PIXELS = 1 << 23
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

    The predicted masks are those of distinct anchors: ``coef [u, nm]`` their coefficients,
    ``boxes [u, 4]`` their boxes in prototype pixels, ``image [u]`` their image; ``proto [B, nm, h,
    w]``, ``gt_masks [B, M, h, w]`` bool. A predicted mask is cropped to its box, so it is decoded
    there only (:func:`detloss.functional.masks.box_windows`); masks of similar window size are
    decoded together (:func:`~detloss.functional.masks.window_groups`), in chunks of at most
    :data:`MASK_CHUNK_PIXELS` prototype values, and each pair counts its intersection over its
    anchor's window: ``|P & G| / max(|P| + |G| - |P & G|, 1)``.
    """
    bsz, nm, h, w = proto.shape
    m = gt_masks.shape[1]
    dev = coef.device
    out = torch.zeros(which.shape[0], dtype=torch.float32, device=dev)
    win = box_windows(boxes, h, w, boxes.dtype)
    groups = window_groups(win[:, 2:4], h, w, lambda gw, gh: MASK_CHUNK_PIXELS // max(gw * gh * nm, 1))
    if not groups:  # every predicted box is empty: no predicted pixel, IoU 0
        return out
    gt_sum = gt_masks.flatten(2).sum(-1, dtype=torch.float32)[gt_img, gt_row]
    # the pairs, chunk by chunk of their anchor
    chunk_of = torch.full((coef.shape[0],), len(groups), dtype=torch.long, device=dev)
    local = torch.zeros(coef.shape[0], dtype=torch.long, device=dev)
    for c, (items, _, _) in enumerate(groups):
        chunk_of[items] = c
        local[items] = torch.arange(items.shape[0], device=dev)
    pair_chunk = chunk_of[which]
    order = torch.argsort(pair_chunk, stable=True)
    ends = torch.bincount(pair_chunk, minlength=len(groups) + 1).cumsum(0).tolist()
    protos = proto.reshape(-1, h * w)
    chan = torch.arange(nm, device=dev)
    masks = gt_masks.reshape(-1)
    start = 0
    for c, (items, qw, qh) in enumerate(groups):
        idx = order[start : ends[c]]
        start = ends[c]
        if not idx.numel():
            continue
        pix, valid = window_pixels(win[items], qw, qh, h, w)
        wv = protos[(image[items] * nm)[:, None, None] + chan[:, None], pix[:, None, :]]  # [u, nm, P]
        pm = (torch.bmm(coef[items][:, None, :], wv)[:, 0] > 0) & valid  # cropped to the box
        mine = local[which[idx]]
        gm = masks[((gt_img[idx] * m + gt_row[idx]) * (h * w))[:, None] + pix[mine]]
        pmi = pm[mine]
        inter = (pmi & gm).sum(-1, dtype=torch.float32)
        union = pmi.sum(-1, dtype=torch.float32) + gt_sum[idx] - inter
        out[idx] = inter / union.clamp(min=1)
    return out
