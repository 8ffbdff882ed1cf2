"""Loading the torchvision RetinaNet / SSD reference cases (tests/data/torchvision_anchor/).

The folder's manifest SOURCE line reads: "torchvision 0.29.1+cu130 with torch 2.14.1+cu130
(numpy 2.4.6, Python 3.11.7), run unmodified on CPU in float64: torchvision/models/detection/
retinanet.py RetinaNet.compute_loss (box_iou -> _utils.Matcher with allow_low_quality_matches) ->
RetinaNetHead.compute_loss (...), anchors from anchor_utils.AnchorGenerator (...); ssd.py SSD.forward
in training mode with a stub backbone and head (its matching loop: box_iou -> _utils.SSDMatcher) ->
SSD.compute_loss (smooth L1 with BoxCoder weights 10, 10, 5, 5; cross-entropy with hard negative
mining), default boxes from anchor_utils.DefaultBoxGenerator (...)."
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

import detloss
from reference_cases import case_names, load_case

FOLDER = "torchvision_anchor"
RETINA_CASES = case_names(FOLDER, "retina_*.npz")
SSD_CASES = case_names(FOLDER, "ssd_*.npz")


def load(name: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    return load_case(FOLDER, name)


def targets_of(d: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """The per-image target dicts (padding rows dropped)."""
    return [
        {"boxes": d["gt_boxes"][i, :n], "labels": d["gt_labels"][i, :n]}
        for i, n in enumerate(d["gt_counts"].tolist())
    ]


def anchors_of(d: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    """The anchors as torchvision passes them: one tensor per image (equal copies)."""
    return [d["anchors"].clone() for _ in range(d["gt_counts"].shape[0])]


def loss_of(cfg: dict):
    """The detloss loss configured as the case's torchvision model."""
    if cfg["kind"] == "retinanet":
        return detloss.RetinaNetLoss(
            cfg["num_classes"],
            fg_iou_thresh=cfg["fg_iou_thresh"],
            bg_iou_thresh=cfg["bg_iou_thresh"],
            allow_low_quality_matches=cfg["allow_low_quality_matches"],
            box_loss=cfg["box_loss"],
            bbox_reg_weights=cfg["bbox_reg_weights"],
            focal_alpha=cfg["focal_alpha"],
            focal_gamma=cfg["focal_gamma"],
        )
    return detloss.SSDLoss(
        cfg["num_classes"],
        iou_thresh=cfg["iou_thresh"],
        neg_to_pos_ratio=cfg["neg_to_pos_ratio"],
        bbox_reg_weights=cfg["bbox_reg_weights"],
    )


RTOL, ATOL = 1e-6, 1e-9


def close(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    """Equal to the reference at 1e-6 relative (1e-9 absolute for values near 0)."""
    torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), rtol=RTOL, atol=ATOL, msg=msg)


def run_case(name: str):
    """The case's loss on its inputs, backpropagated: ``(arrays, config, output, grad_cls, grad_box)``,
    the components and total already compared with torchvision's."""
    d, cfg = load(name)
    cls_logits = d["cls_logits"].clone().requires_grad_()
    bbox_regression = d["bbox_regression"].clone().requires_grad_()
    out = loss_of(cfg)(cls_logits, bbox_regression, anchors_of(d), targets_of(d))
    close(out.components["cls"], d["loss_classification"], "classification")
    close(out.components["box"], d["loss_bbox_regression"], "bbox_regression")
    close(out.total.detach(), d["loss_total"], "total")
    close(sum(out.terms.values()).detach(), d["loss_total"], "terms")
    out.total.backward()
    assert torch.equal(torch.stack(out.stats["matched_idxs"]), d["matched_idxs"])
    return d, cfg, out, cls_logits.grad, bbox_regression.grad
