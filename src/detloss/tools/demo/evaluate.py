"""Evaluation of the demo detector: decode the head outputs, non-maximum suppression, COCO mAP.

- :func:`decode` turns each head's raw outputs into boxes (xyxy pixels) and class scores per
  prediction: the loss's own ``decode`` (:meth:`detloss.losses.base.DetectionLoss.decode`), the
  way the original detector decodes at inference.
- :func:`nms` / :func:`batched_nms`: exact greedy NMS (the result of the usual sequential loop),
  computed with one IoU matrix and a fixed-point iteration instead of a Python loop over boxes.
- :func:`coco_map`: mAP@0.5 and mAP@0.5:0.95 computed by pycocotools' COCOeval.
"""
from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Sequence, Tuple

import torch

from ...functional import pairwise_box_iou
from ...losses.registry import LOSSES


def decode(loss: str, outputs, config: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """Raw head outputs -> ``boxes [B, P, 4]`` (xyxy pixels) and ``scores [B, P, C]`` in 0..1:
    ``LOSSES[loss](**config["loss_kwargs"]).decode(...)``, without the background column of a
    loss that has one (``background_classes``: SSD's class 0)."""
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {tuple(LOSSES)}, got {loss!r}")
    args = outputs if isinstance(outputs, tuple) else (outputs,)
    loss_fn = LOSSES[loss](**config["loss_kwargs"])
    boxes, scores = loss_fn.decode(*args)
    background = loss_fn.background_classes  # SSD: column 0 is the background
    return boxes.float(), scores[..., background:].float()


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression; returns the kept indices, highest score first.

    Same result as the sequential loop "take the best remaining box, drop every box whose IoU
    with it exceeds ``iou_threshold``" (ties in score keep the earlier index first). ``keep[j]``
    is true when no kept box ranked above j overlaps it by more than the threshold; that
    recursion has one solution, found by iterating from "keep all" (each pass fixes at least
    one more rank, usually all of them within a few passes).
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes: expected shape [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores: expected shape [{boxes.shape[0]}], got {tuple(scores.shape)}")
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    b = boxes[order]
    over = (pairwise_box_iou(b, b) > iou_threshold).triu(1)  # over[i, j]: i ranks above j and overlaps it
    keep = torch.ones(len(b), dtype=torch.bool, device=b.device)
    for _ in range(len(b)):
        new = ~(over & keep[:, None]).any(0)
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each label (boxes of different labels never suppress each other)."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offset = labels.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes - boxes.min() + offset, scores, iou_threshold)


def postprocess(boxes: torch.Tensor, scores: torch.Tensor, img_size: int, conf_threshold: float = 0.001,
                iou_threshold: float = 0.6, max_candidates: int = 300, max_det: int = 100
                ) -> List[Dict[str, torch.Tensor]]:
    """Per image: every (prediction, class) above ``conf_threshold`` (at most ``max_candidates``),
    boxes clipped to the image, class-wise NMS, the best ``max_det`` kept.
    Returns one ``{"boxes", "scores", "labels"}`` per image."""
    results = []
    for bx, sc in zip(boxes, scores):
        flat = sc.flatten()
        k = min(max_candidates, int((flat > conf_threshold).sum()))
        top, idx = flat.topk(k)
        nc = sc.shape[-1]
        cand_boxes = bx[idx // nc].clamp(0, img_size)
        labels = idx % nc
        keep = batched_nms(cand_boxes, top, labels, iou_threshold)[:max_det]
        results.append({"boxes": cand_boxes[keep], "scores": top[keep], "labels": labels[keep]})
    return results


def coco_map(predictions: Sequence[Dict[str, torch.Tensor]], ground_truth: Sequence[torch.Tensor],
             img_size: int, names: Sequence[str]) -> Dict[str, float]:
    """COCO mAP@0.5 and mAP@0.5:0.95 (pycocotools COCOeval, bbox, all areas, 100 detections).

    ``predictions``: per image ``{"boxes" xyxy pixels, "scores", "labels"}``; ``ground_truth``:
    per image ``[n, 5]`` rows (class, cx, cy, w, h) normalized. Returns ``map50``, ``map50_95``
    and ``ap50_per_class``; 0 when there are no detections.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(ground_truth):
        raise ValueError(f"predictions: expected one entry per ground-truth image ({len(ground_truth)}), "
                         f"got {len(predictions)}")
    images, anns, dets = [], [], []
    for i, (pred, gt) in enumerate(zip(predictions, ground_truth)):
        images.append({"id": i + 1, "width": img_size, "height": img_size})
        for cls, cx, cy, w, h in gt.tolist():
            bw, bh = w * img_size, h * img_size
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(cls) + 1, "iscrowd": 0,
                         "bbox": [(cx * img_size) - bw / 2, (cy * img_size) - bh / 2, bw, bh], "area": bw * bh})
        for (x1, y1, x2, y2), s, c in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
            dets.append({"image_id": i + 1, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": float(s)})
    result = {"map50": 0.0, "map50_95": 0.0, "ap50_per_class": {n: 0.0 for n in names},
              "num_images": len(images), "num_objects": len(anns), "num_detections": len(dets)}
    if not dets or not anns:
        return result
    with contextlib.redirect_stdout(io.StringIO()):
        gt_api = COCO()
        gt_api.dataset = {"images": images, "annotations": anns,
                          "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)]}
        gt_api.createIndex()
        dt_api = gt_api.loadRes(dets)
        ev = COCOeval(gt_api, dt_api, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    result["map50_95"], result["map50"] = float(ev.stats[0]), float(ev.stats[1])
    prec = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recalls, each class, area all, 100 dets
    for k, n in enumerate(names):
        p = prec[:, k]
        p = p[p > -1]
        result["ap50_per_class"][n] = float(p.mean()) if p.size else 0.0
    return result


@torch.no_grad()
def evaluate(model, loss: str, dataset, batch_size: int = 32, conf_threshold: float = 0.001,
             iou_threshold: float = 0.6) -> Tuple[Dict[str, float], List[Dict[str, torch.Tensor]]]:
    """Run ``model`` over ``dataset`` in eval mode; returns (COCO metrics, predictions per image)."""
    from .data import collate

    was_training = model.training
    model.eval()
    preds, gts = [], []
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            images, _ = collate(items)
            boxes, scores = decode(loss, model(images), model.config)
            preds += postprocess(boxes, scores, model.img_size, conf_threshold, iou_threshold)
            gts += [labels for _, labels in items]
    finally:
        model.train(was_training)
    return coco_map(preds, gts, model.img_size, dataset.names), preds
