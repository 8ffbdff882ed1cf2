"""One-to-one (Hungarian) matching of the set-prediction detectors: DETR, RT-DETR, D-FINE, DEIM.

Each image's ``Q`` queries are matched to its ``n`` target boxes by the assignment of least total
cost (Kuhn 1955; Carion et al. 2020, "End-to-End Object Detection with Transformers",
arXiv:2005.12872), ``min(Q, n)`` pairs. With ``p_{q,t}`` the predicted probability of target
``t``'s class at query ``q`` and boxes in normalized cxcywh::

    C[q, t] = cost_bbox * |b_q - b_t|_1 + cost_class * c_cls(p_{q,t}) + cost_giou * c_giou(b_q, b_t)

    c_cls = -p                                   (softmax p; DETR)
    c_cls = alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8))
                                                 (sigmoid p, use_focal; RT-DETR, D-FINE, DEIM)
    c_giou = -GIoU (torchvision's generalized_box_iou)                convention="detr"
    c_giou = 1 - GIoU (ultralytics' bbox_iou, eps 1e-7)               convention="ultralytics"

Sources: facebookresearch/detr ``models/matcher.py``; lyuwenyu/RT-DETR
``rtdetrv2_pytorch/src/zoo/rtdetr/matcher.py`` (and its copies in D-FINE and DEIM); ultralytics
8.4 ``ultralytics/models/utils/ops.py`` ``HungarianMatcher`` (``C = class + bbox + giou``,
NaN / inf entries set to 0 before solving).

How it differs from the originals (same assignments):

- costs are computed per image (``[B, Q, n_max]``, targets padded; the L1 by ``torch.cdist``, which
  ultralytics writes as a broadcast sum) instead of over every
  query-target pair of the batch (``[B * Q, sum n]``, of which only the diagonal blocks are used),
  and for several decoder layers with one device-to-host copy;
- costs are computed in float32 for float16 / bfloat16 inputs (float64 stays float64; the
  ultralytics original computes in float32 always);
- a non-finite cost (only possible from non-finite inputs) raises ValueError naming the image,
  query and target (scipy would fail with "matrix contains invalid numeric entries");
  ``convention="ultralytics"`` keeps its original's repair instead: such entries become 0.

The solver is ``scipy.optimize.linear_sum_assignment`` (the originals' own, so ties are broken
the same way on identical costs), one call per image and layer; scipy is the optional extra
``detloss[detr]``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import math

import numpy as np
import torch
from torch import Tensor

from .._checks import check_choice, check_floating, check_tensor, compute_dtype, upcast
from ..boxes import cxcywh_to_xyxy
from .base import Assignment

__all__ = [
    "HungarianMatcher",
    "SetTargets",
    "check_set_targets",
    "pairs_to_assignment",
    "MATCHER_CONVENTIONS",
]

MATCHER_CONVENTIONS = ("detr", "ultralytics")
#: Added inside the logs of the focal class cost (every original's constant).
FOCAL_COST_EPS = 1e-8
#: eps of ultralytics' ``bbox_iou`` in its GIoU cost.
ULTRALYTICS_IOU_EPS = 1e-7

Pairs = List[Tuple[Tensor, Tensor]]


class SetTargets(NamedTuple):
    """Checked per-image targets and their padded / concatenated forms (one build per call).

    ``labels[b]`` int64 ``[n_b]``, ``boxes[b]`` ``[n_b, 4]`` normalized cxcywh in the compute
    dtype; ``counts[b] = n_b``; ``labels_pad [B, N]`` / ``boxes_pad [B, N, 4]`` zero-padded to
    ``N = max n_b``; ``labels_cat [T]`` / ``boxes_cat [T, 4]`` concatenated; ``offsets[b]`` the
    first row of image ``b`` in them.
    """

    labels: List[Tensor]
    boxes: List[Tensor]
    counts: List[int]
    labels_pad: Tensor
    boxes_pad: Tensor
    labels_cat: Tensor
    boxes_cat: Tensor
    offsets: List[int]

    @property
    def total(self) -> int:
        return sum(self.counts)


def check_set_targets(
    targets: object,
    batch_size: int,
    *,
    num_classes: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
    name: str = "targets",
) -> SetTargets:
    """Validate a list of ``batch_size`` dicts ``{"labels": int64 [n], "boxes": [n, 4] cxcywh}``
    (normalized; ``n`` may be 0): finite boxes with ``w, h >= 0``, labels in
    ``[0, num_classes)``. Returns :class:`SetTargets` in ``dtype`` on ``device``."""
    if isinstance(targets, Mapping) or not isinstance(targets, (list, tuple)):
        raise TypeError(f"{name}: expected a list of {batch_size} dicts with 'labels' and 'boxes', got {type(targets).__name__}")
    if len(targets) != batch_size:
        raise ValueError(f"{name}: expected one dict per image ({batch_size}), got {len(targets)}")
    labels, boxes, counts = [], [], []
    for b, t in enumerate(targets):
        if not isinstance(t, Mapping) or "labels" not in t or "boxes" not in t:
            raise TypeError(f"{name}[{b}]: expected a dict with 'labels' and 'boxes', got {type(t).__name__}"
                            + (f" with keys {sorted(t)}" if isinstance(t, Mapping) else ""))
        lab = check_tensor(f"{name}[{b}]['labels']", t["labels"])
        box = check_floating(f"{name}[{b}]['boxes']", t["boxes"])
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool or lab.ndim != 1:
            raise TypeError(f"{name}[{b}]['labels']: expected an integer tensor [n], got {lab.dtype} {tuple(lab.shape)}")
        if box.ndim != 2 or box.shape[1] != 4 or box.shape[0] != lab.shape[0]:
            raise ValueError(
                f"{name}[{b}]['boxes']: expected [{lab.shape[0]}, 4] (cxcywh, one row per label), got {tuple(box.shape)}"
            )
        labels.append(lab.to(device=device, dtype=torch.int64))
        boxes.append(upcast(box, dtype).to(device))
        counts.append(int(lab.shape[0]))
    dev = device if device is not None else (boxes[0].device if boxes else torch.device("cpu"))
    labels_cat = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=dev)
    boxes_cat = torch.cat(boxes) if boxes else torch.zeros((0, 4), dtype=dtype, device=dev)
    if boxes_cat.numel():
        d = boxes_cat.detach()
        bad_box = ~torch.isfinite(d).all(1) | (d[:, 2] < 0) | (d[:, 3] < 0)
        bad_lab = labels_cat < 0
        if num_classes is not None:
            bad_lab = bad_lab | (labels_cat >= num_classes)
        flags = torch.stack((bad_box.any(), bad_lab.any())).tolist()
        if any(flags):
            row = int((bad_box if flags[0] else bad_lab).nonzero()[0])
            b = int(np.searchsorted(np.cumsum(counts), row, side="right"))
            i = row - sum(counts[:b])
            if flags[0]:
                raise ValueError(
                    f"{name}[{b}]['boxes']: expected finite cxcywh boxes with w >= 0 and h >= 0, got "
                    f"{boxes_cat[row].tolist()} at row {i}"
                )
            raise ValueError(
                f"{name}[{b}]['labels']: expected class indices in [0, {num_classes}), got {int(labels_cat[row])} at {i}"
            )
    n = max(counts, default=0)
    labels_pad = torch.zeros((batch_size, n), dtype=torch.int64, device=dev)
    boxes_pad = torch.zeros((batch_size, n, 4), dtype=dtype, device=dev)
    if n:
        labels_pad = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True)
        boxes_pad = torch.nn.utils.rnn.pad_sequence(boxes, batch_first=True)
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(int).tolist() if counts else []
    return SetTargets(labels, boxes, counts, labels_pad, boxes_pad, labels_cat, boxes_cat, offsets)


def pairs_to_assignment(
    pairs: Sequence[Tuple[Any, Any]],
    targets: SetTargets,
    num_queries: int,
    *,
    extras: Optional[Dict[str, Any]] = None,
) -> Assignment:
    """Per-image ``(query_idx, target_idx)`` pairs (tensors or arrays, target indices within the
    image) as one :class:`~detloss.assign.base.Assignment` on the targets' device: positives in
    image order, their target boxes (normalized cxcywh) and labels, weights 1."""
    dev = targets.boxes_cat.device
    batch_size = len(targets.counts)
    if len(pairs) != batch_size:
        raise ValueError(f"pairs: expected one (query, target) pair per image ({batch_size}), got {len(pairs)}")
    q = [np.asarray(torch.as_tensor(p[0]).cpu(), dtype=np.int64).reshape(-1) for p in pairs]
    t = [np.asarray(torch.as_tensor(p[1]).cpu(), dtype=np.int64).reshape(-1) for p in pairs]
    sizes = [len(x) for x in q]
    flat = np.concatenate(
        [np.repeat(np.arange(batch_size), sizes), np.concatenate(q) if q else [], np.concatenate(t) if t else []]
    ).astype(np.int64)
    flat = torch.from_numpy(flat).to(dev).view(3, -1)
    batch_index, pred_index, target_index = flat.unbind(0)
    rows = target_index + torch.as_tensor(targets.offsets, dtype=torch.int64, device=dev)[batch_index] \
        if batch_size else target_index
    return Assignment(
        batch_index=batch_index,
        pred_index=pred_index,
        target_index=target_index,
        boxes=targets.boxes_cat[rows],
        labels=targets.labels_cat[rows],
        weights=torch.ones(rows.shape[0], dtype=targets.boxes_cat.dtype, device=dev),
        batch_size=batch_size,
        num_preds=num_queries,
        extras={} if extras is None else extras,
    )


def _linear_sum_assignment():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - exercised only without scipy
        raise ImportError(
            "HungarianMatcher needs scipy (scipy.optimize.linear_sum_assignment): pip install 'detloss[detr]'"
        ) from e
    return linear_sum_assignment


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)



def _focal_cost(p: Tensor, alpha: float, gamma: float) -> Tensor:
    """The focal class cost of probabilities ``p`` (every original's expression, term by term):
    ``alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8))``."""
    q = torch.rsub(p, 1)
    neg = p.pow(gamma).mul_(1 - alpha).mul_(torch.add(q, FOCAL_COST_EPS).log_().neg_())
    pos = q.pow_(gamma).mul_(alpha).mul_(p.add_(FOCAL_COST_EPS).log_().neg_())
    return pos.sub_(neg)


def _planes(boxes: Tensor, dim: int) -> Tuple[Tensor, ...]:
    """The coordinates of ``boxes [..., K, 4]`` as ``[..., K, 1]`` (``dim=-1``) or ``[..., 1, K]``
    (``dim=-2``) planes, to broadcast into ``[..., Q, N]`` matrices."""
    return tuple(c.unsqueeze(dim) for c in boxes.unbind(-1))


def _pairwise_giou_xyxy(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """torchvision's ``generalized_box_iou`` of xyxy ``[..., Q, 4]`` x ``[..., N, 4]`` -> ``[..., Q, N]``
    (the numbers of :func:`detloss.functional.pairwise_box_iou` with kind "giou": no eps, a zero
    union or enclosing area giving 0), written on coordinate planes with in-place steps."""
    x1, y1, x2, y2 = _planes(boxes1, -1)
    u1, v1, u2, v2 = _planes(boxes2, -2)
    area = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1)
    inter = torch.minimum(x2, u2).sub_(torch.maximum(x1, u1)).clamp_(min=0)
    inter.mul_(torch.minimum(y2, v2).sub_(torch.maximum(y1, v1)).clamp_(min=0))
    union = area.sub_(inter)
    iou = inter.div_(union).masked_fill_(union <= 0, 0)
    enclose = torch.maximum(x2, u2).sub_(torch.minimum(x1, u1))
    enclose.mul_(torch.maximum(y2, v2).sub_(torch.minimum(y1, v1)))
    penalty = torch.sub(enclose, union).div_(enclose).masked_fill_(enclose <= 0, 0)
    return iou.sub_(penalty)


def _pairwise_giou_cxcywh(boxes1: Tensor, boxes2: Tensor, eps: float) -> Tensor:
    """ultralytics' ``bbox_iou(..., xywh=True, GIoU=True)`` of every pair of cxcywh
    ``[..., Q, 4]`` x ``[..., N, 4]`` -> ``[..., Q, N]``, as :func:`detloss.functional.pairwise_box_iou`
    computes it (``convention="yolov5"``: ``IoU = inter / (union + eps)``, ``GIoU = IoU - (C -
    union) / (C + eps)``), written on coordinate planes with in-place steps."""
    def corners(b: Tensor, dim: int):
        cx, cy, w, h = _planes(b, dim)
        w_, h_ = w / 2, h / 2
        return cx - w_, cy - h_, cx + w_, cy + h_, w * h

    x1, y1, x2, y2, a1 = corners(boxes1, -1)
    u1, v1, u2, v2, a2 = corners(boxes2, -2)
    inter = torch.minimum(x2, u2).sub_(torch.maximum(x1, u1)).clamp_(min=0)
    inter.mul_(torch.minimum(y2, v2).sub_(torch.maximum(y1, v1)).clamp_(min=0))
    union = (a1 + a2).sub_(inter)
    iou = inter.div_(union + eps)
    enclose = torch.maximum(x2, u2).sub_(torch.minimum(x1, u1))
    enclose.mul_(torch.maximum(y2, v2).sub_(torch.minimum(y1, v1)))
    penalty = torch.sub(enclose, union).div_(enclose.add_(eps))
    return iou.sub_(penalty)


class HungarianMatcher(torch.nn.Module):
    """One-to-one matching of queries to target boxes by least total cost (formula and sources
    in the module docstring).

    Args (defaults: DETR's ``HungarianMatcher``; DETR trains with ``cost_class=1, cost_bbox=5,
    cost_giou=2``, RT-DETR / D-FINE / DEIM with ``2, 5, 2, use_focal=True``):
        cost_class, cost_bbox, cost_giou: weights of the class, L1 and GIoU costs (1, 1, 1; not
            all 0).
        use_focal: sigmoid focal class cost instead of DETR's ``-softmax`` probability (False).
        alpha, gamma: of the focal class cost (0.25, 2.0).
        convention: ``"detr"`` (DETR, RT-DETRv2, D-FINE, DEIM: ``-GIoU``, ``C = bbox + class + giou``) or ``"ultralytics"`` (``1 - GIoU`` of ultralytics'
            ``bbox_iou``, ``C = class + bbox + giou``, non-finite entries set to 0).
        clamp_sizes: clamp predicted widths and heights at 0 before the GIoU (D-FINE's and DEIM's
            ``box_cxcywh_to_xyxy``); otherwise a negative size is a ValueError (DETR asserts).

    ``indices = matcher(outputs, targets)``: ``outputs`` a dict with ``pred_logits [B, Q, C]`` and
    ``pred_boxes [B, Q, 4]`` (normalized cxcywh), ``targets`` a list of ``B`` dicts
    ``{"labels": int64 [n], "boxes": [n, 4] cxcywh}``. Returns, per image, DETR's
    ``(query_idx, target_idx)``: two int64 CPU tensors of length ``min(Q, n)`` (scipy's order:
    sorted by query when ``Q >= n``). More targets than queries: ``Q`` pairs, the other targets
    stay unmatched (as in every original). :meth:`assign` gives the same matching as an
    :class:`~detloss.assign.base.Assignment` (extras ``"cost"``: the per-image ``[Q, n]`` cost
    matrices handed to the solver, ``"indices"``: the pairs); :meth:`cost_terms` the unweighted
    cost matrices, for explanations.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 1.0,
        cost_giou: float = 1.0,
        use_focal: bool = False,
        alpha: float = 0.25,
        gamma: float = 2.0,
        *,
        convention: str = "detr",
        clamp_sizes: bool = False,
    ) -> None:
        super().__init__()
        self.cost_class = _check_weight("cost_class", cost_class)
        self.cost_bbox = _check_weight("cost_bbox", cost_bbox)
        self.cost_giou = _check_weight("cost_giou", cost_giou)
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ValueError("cost_class, cost_bbox, cost_giou: expected at least one non-zero cost, got all 0")
        self.use_focal = bool(use_focal)
        self.alpha = _check_weight("alpha", alpha)
        self.gamma = _check_weight("gamma", gamma)
        if self.gamma < 0:
            raise ValueError(f"gamma: expected a number >= 0, got {gamma!r}")
        self.convention = check_choice("convention", convention, MATCHER_CONVENTIONS)
        self.clamp_sizes = bool(clamp_sizes)

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"use_focal={self.use_focal}, alpha={self.alpha}, gamma={self.gamma}, convention={self.convention!r}"
        )

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Pairs:
        logits, boxes = self._check_outputs(outputs)
        tg = check_set_targets(targets, logits.shape[0], dtype=compute_dtype(logits, boxes), device=logits.device)
        self._check_labels(tg, logits.shape[-1])
        return self.match_layers([(logits, boxes)], tg)[0].extras["indices"]

    @torch.no_grad()
    def assign(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Assignment:
        """The matching of :meth:`forward` as an :class:`~detloss.assign.base.Assignment`."""
        logits, boxes = self._check_outputs(outputs)
        tg = check_set_targets(targets, logits.shape[0], dtype=compute_dtype(logits, boxes), device=logits.device)
        self._check_labels(tg, logits.shape[-1])
        return self.match_layers([(logits, boxes)], tg)[0]

    @torch.no_grad()
    def cost_terms(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> List[Dict[str, Tensor]]:
        """Per image, the unweighted cost matrices ``{"class", "bbox", "giou", "total"}`` ``[Q, n]``
        (``total`` = the weighted sum the solver sees)."""
        logits, boxes = self._check_outputs(outputs)
        tg = check_set_targets(targets, logits.shape[0], dtype=compute_dtype(logits, boxes), device=logits.device)
        self._check_labels(tg, logits.shape[-1])
        dt = compute_dtype(logits, boxes)
        terms = self._terms(upcast(logits.detach(), dt), upcast(boxes.detach(), dt), tg)
        total = self._combine(terms)
        terms["total"] = total
        return [{k: v[b, :, :n].cpu() for k, v in terms.items()} for b, n in enumerate(tg.counts)]

    @torch.no_grad()
    def match_layers(self, layers: Sequence[Tuple[Tensor, Tensor]], targets: SetTargets) -> List[Assignment]:
        """Match several layers' ``(logits [B, Q, C], boxes [B, Q, 4])`` to the same checked
        targets with one device-to-host copy; one :class:`Assignment` per layer."""
        linear_sum_assignment = _linear_sum_assignment()
        counts = targets.counts
        if not layers:
            return []
        if targets.total == 0:
            empty = [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)) for _ in counts]
            return [
                pairs_to_assignment(empty, targets, lg.shape[1], extras={
                    "indices": empty, "cost": [torch.zeros((lg.shape[1], 0)) for _ in counts]})
                for lg, _ in layers
            ]
        # every layer's [B, Q, N] cost into one buffer (a layer at a time, so that the
        # temporaries stay in cache), one device-to-host copy, then one solver call per image
        dts = [compute_dtype(lg, bx) for lg, bx in layers]
        wide = torch.float64 if torch.float64 in dts else torch.float32
        bsz, n_max = len(counts), targets.boxes_pad.shape[1]
        shapes = [(bsz, lg.shape[1], n_max) for lg, _ in layers]
        buf = torch.empty(sum(math.prod(sh) for sh in shapes), dtype=wide, device=layers[0][0].device)
        views, start = [], 0
        for (logits, boxes), dt, sh in zip(layers, dts, shapes):
            view = buf[start:start + math.prod(sh)].view(sh)
            start += view.numel()
            self._combine(self._terms(upcast(logits.detach(), dt), upcast(boxes.detach(), dt), targets), out=view)
            views.append(view)
        if self.convention == "ultralytics":  # its original's repair of non-finite costs
            torch.nan_to_num_(buf, nan=0.0, posinf=0.0, neginf=0.0)
        flat = buf.cpu()  # the one device-to-host copy (a view on CPU)
        finite = self.convention == "ultralytics" or bool(torch.isfinite(flat).all())
        out, start = [], 0
        for (logits, _), view in zip(layers, views):
            host = flat[start:start + view.numel()].view(view.shape)
            start += view.numel()
            pairs, mats = [], []
            for b, n in enumerate(counts):
                m = host[b, :, :n]
                arr = m.numpy()
                if not finite and not np.isfinite(arr).all():
                    self._non_finite(arr, b)
                i, j = linear_sum_assignment(arr)
                pairs.append((torch.from_numpy(np.asarray(i, dtype=np.int64)), torch.from_numpy(np.asarray(j, dtype=np.int64))))
                mats.append(m)
            out.append(pairs_to_assignment(pairs, targets, logits.shape[1], extras={"indices": pairs, "cost": mats}))
        return out

    # ------------------------------------------------------------------ the costs
    def _terms(self, logits: Tensor, boxes: Tensor, targets: SetTargets) -> Dict[str, Tensor]:
        """Unweighted costs ``[B, Q, N]`` (padded targets) in the compute dtype.

        The focal class cost is elementwise in the probability, so it is computed on the
        ``[B, Q, N]`` target-class columns of the logits (gathered first) or, when there are more
        targets than classes, on the ``[B, Q, C]`` logits and gathered after; the same numbers."""
        bsz, nq, nc = logits.shape
        tb = targets.boxes_pad.to(boxes.dtype)
        idx = targets.labels_pad[:, None, :].expand(bsz, nq, -1)
        if self.use_focal:
            first = idx.shape[-1] < nc
            cls = _focal_cost(torch.sigmoid(logits.gather(2, idx) if first else logits), self.alpha, self.gamma)
            if not first:
                cls = cls.gather(2, idx)
        else:
            cls = logits.softmax(-1).gather(2, idx).neg_()
        l1 = torch.cdist(boxes, tb, p=1)
        if self.convention == "ultralytics":
            giou = _pairwise_giou_cxcywh(boxes, tb, ULTRALYTICS_IOU_EPS).neg_().add_(1.0)
        else:
            pb = torch.cat((boxes[..., :2], boxes[..., 2:].clamp(min=0)), -1) if self.clamp_sizes else boxes
            giou = _pairwise_giou_xyxy(cxcywh_to_xyxy(pb), cxcywh_to_xyxy(tb)).neg_()
        return {"class": cls, "bbox": l1, "giou": giou}

    def _combine(self, t: Dict[str, Tensor], out: Optional[Tensor] = None) -> Tensor:
        """The weighted sum of the terms (the originals' order); with ``out``, written there and
        the terms overwritten."""
        if out is None:
            if self.convention == "ultralytics":
                return self.cost_class * t["class"] + self.cost_bbox * t["bbox"] + self.cost_giou * t["giou"]
            return self.cost_bbox * t["bbox"] + self.cost_class * t["class"] + self.cost_giou * t["giou"]
        first, second = ("class", "bbox") if self.convention == "ultralytics" else ("bbox", "class")
        w = {"class": self.cost_class, "bbox": self.cost_bbox, "giou": self.cost_giou}
        head = t[first].mul_(w[first]).add_(t[second].mul_(w[second]))
        return torch.add(head, t["giou"].mul_(w["giou"]), out=out)

    @staticmethod
    def _non_finite(arr: np.ndarray, image: int) -> None:
        q, t = (int(v[0]) for v in np.nonzero(~np.isfinite(arr)))
        raise ValueError(
            f"matching costs: expected finite costs, got {arr[q, t]} for image {image}, query {q}, target {t} "
            f"({int((~np.isfinite(arr)).sum())} non-finite entries); the predictions or target boxes of that "
            f"image contain NaN or inf"
        )

    # ------------------------------------------------------------------ checks
    def _check_outputs(self, outputs: object) -> Tuple[Tensor, Tensor]:
        if not isinstance(outputs, Mapping) or "pred_logits" not in outputs or "pred_boxes" not in outputs:
            raise TypeError("outputs: expected a dict with 'pred_logits' [B, Q, C] and 'pred_boxes' [B, Q, 4], got "
                            + (f"keys {sorted(outputs)}" if isinstance(outputs, Mapping) else type(outputs).__name__))
        logits = check_floating("outputs['pred_logits']", outputs["pred_logits"])
        boxes = check_floating("outputs['pred_boxes']", outputs["pred_boxes"])
        if logits.ndim != 3:
            raise ValueError(f"outputs['pred_logits']: expected [B, Q, C], got {tuple(logits.shape)}")
        if boxes.shape != logits.shape[:2] + (4,):
            raise ValueError(
                f"outputs['pred_boxes']: expected {tuple(logits.shape[:2]) + (4,)} like pred_logits, got {tuple(boxes.shape)}"
            )
        if boxes.device != logits.device:
            raise ValueError(f"outputs['pred_boxes']: expected device {logits.device} as pred_logits, got {boxes.device}")
        if not self.clamp_sizes and boxes.numel():
            d = boxes.detach()
            bad = (d[..., 2] < 0) | (d[..., 3] < 0)
            if bool(bad.any()):
                pos = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"outputs['pred_boxes']: expected cxcywh boxes with w >= 0 and h >= 0, got {d[pos].tolist()} at {pos}"
                )
        return logits, boxes

    @staticmethod
    def _check_labels(targets: SetTargets, num_logits: int) -> None:
        if targets.labels_cat.numel() and int(targets.labels_cat.max()) >= num_logits:
            raise ValueError(
                f"targets: expected labels below the number of logits {num_logits}, got {int(targets.labels_cat.max())}"
            )
