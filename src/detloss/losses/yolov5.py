"""YOLOv5's loss (ultralytics/yolov5 v7.0, ``utils/loss.py`` ``ComputeLoss``), exact and readable.

The terms, per pyramid level ``i`` with ``n_i`` positives (assignment: :mod:`detloss.assign.yolov5`)::

    pxy  = 2 * sigmoid(t_xy) - 0.5                 pwh = (2 * sigmoid(t_wh))^2 * anchor
    lbox = sum_i mean_pos(1 - CIoU(pbox, tbox))     (bbox_iou of yolov5, CIoU's alpha without grad)
    tobj = clamp(CIoU.detach(), 0)  (times gr, plus 1 - gr)  at each positive's (image, anchor, cell)
    lobj = sum_i balance_i * mean_all BCE(t_obj, tobj; pos_weight=obj_pw)
    lcls = sum_i mean_pos BCE(t_cls, onehot(cp, cn); pos_weight=cls_pw)   (skipped when nc == 1)
    total = (box * lbox + obj * lobj + cls * lcls) * bs

(``mean_pos`` over the level's positives, ``mean_all`` over its ``bs * na * ny * nx`` cells.)

``(cp, cn) = smooth_bce(label_smoothing)``; with ``fl_gamma > 0`` each BCE becomes the focal loss
``BCE * alpha_t * (1 - p_t)^fl_gamma`` with alpha = 0.25 (yolov5's ``FocalLoss``). Level balance
``[4.0, 1.0, 0.4]`` for 3 levels, ``[4.0, 1.0, 0.25, 0.06, 0.02]`` for 5 (P3-P7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import functional as F
from .. import kernels
from .._checks import check_finite, check_floating, check_like_first, compute_dtype, upcast
from ..anchors import GridLevel, grid_points
from ..assign.yolov5 import OFFSET_NAMES, YOLOv5Assignment, YOLOv5LevelAssignment, assign_yolov5, grid_anchors
from ..boxes import check_yolo_targets, cxcywh_to_xyxy
from ._grid_cells import flat_cells, gather_cells
from .base import Decoded, DetectionLoss

__all__ = ["YOLOv5Loss", "DEFAULT_ANCHORS", "DEFAULT_STRIDES", "default_balance"]

#: yolov5s.yaml anchors (P3/8, P4/16, P5/32), pixels, flat (w, h) pairs per level.
DEFAULT_ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
DEFAULT_STRIDES = (8, 16, 32)

#: Smallest predicted width/height (grid units). Reached only for size logits below about -19,
#: where the original's float32 CIoU gradient overflows to inf/NaN (its aspect term differentiates
#: through w / h); above it nothing changes.
PWH_FLOOR = 1e-16

#: alpha of yolov5's ``FocalLoss`` (used when ``fl_gamma > 0``).
FOCAL_ALPHA = 0.25

_BALANCE_3 = (4.0, 1.0, 0.4)
_BALANCE_5 = (4.0, 1.0, 0.25, 0.06, 0.02)  # P3-P7

#: hyp.*.yaml keys ``from_hyp`` needs; ``label_smoothing`` is optional as in the original.
HYP_KEYS = ("box", "obj", "cls", "cls_pw", "obj_pw", "fl_gamma", "anchor_t")


def default_balance(num_levels: int) -> List[float]:
    """yolov5's objectness weight per level: ``{3: [4.0, 1.0, 0.4]}.get(nl, [4.0, 1.0, 0.25, 0.06, 0.02])``
    (for other level counts up to 5 the original takes the first ``nl`` of the 5-level list)."""
    if num_levels == 3:
        return list(_BALANCE_3)
    if 1 <= num_levels <= 5:
        return list(_BALANCE_5[:num_levels])
    raise ValueError(
        f"balance: yolov5 defines level weights for up to 5 levels, got {num_levels} levels; pass balance= explicitly"
    )


def _gather_heads(
    preds: Sequence[Tensor], levels: Sequence[YOLOv5LevelAssignment]
) -> Tuple[List[Tensor], Tensor, List[Tensor]]:
    """The objectness logits ``[bs, na, ny, nx]`` of every level, the positives' box logits
    ``[P, 4]`` of all levels (level after level) and their class logits ``[n_i, nc]`` per level;
    backward writes one gradient tensor per level (:func:`~detloss.losses._grid_cells.gather_cells`)."""
    return gather_cells(preds, [flat_cells(pi.shape, a.image, a.anchor, a.gy, a.gx) for pi, a in zip(preds, levels)])


@dataclass
class YOLOv5Inputs:
    """Checked inputs of :class:`YOLOv5Loss`: the head outputs (one per level), the target rows,
    the batch size and the compute dtype."""

    preds: List[Tensor]
    targets: Tensor
    batch_size: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class YOLOv5Positives:
    """What :meth:`YOLOv5Loss.gather` takes from the head outputs: per level ``i`` the
    objectness logits ``pobj[i] [bs, na, ny, nx]`` and its positives' class logits
    ``cls_logits[i] [n_i, nc]``; for the positives of all levels, level after level
    (``counts[i]`` of level ``i``), their decoded boxes
    ``pbox [P, 4]`` (cx, cy, w, h, grid units, cell-relative) and ``ciou [P]`` with their targets
    (with its graph); the level weights of this call; the divisors of each level's means
    (``None``: the local means, as the original) and the batch size ``total`` is multiplied by."""

    pobj: List[Tensor]
    cls_logits: List[Tensor]
    pbox: Tensor
    ciou: Tensor
    counts: List[int]
    balance: List[float]
    pos_divisor: Optional[List[Tensor]] = None
    cell_divisor: Optional[List[Tensor]] = None
    batch_factor: Union[int, Tensor] = 1

    def per_level(self, t: Tensor) -> Sequence[Tensor]:
        """``t`` (one entry per positive) split into the levels' parts."""
        return t.split(self.counts)


class YOLOv5Loss(DetectionLoss):
    """YOLOv5 detection loss, equal to ultralytics/yolov5 v7.0 ``ComputeLoss`` (see module docstring).

    Args:
        num_classes: number of classes ``nc``; the head outputs ``5 + nc`` channels per anchor.
        anchors: per level, flat ``(w, h)`` pairs in pixels as in the yolov5 model yaml.
        strides: per level, the stride in pixels (anchors are divided by it).
        box, obj, cls: gains of the three terms (hyp ``box``, ``obj``, ``cls``).
        cls_pw, obj_pw: ``pos_weight`` of the class and objectness BCE (hyp ``cls_pw``, ``obj_pw``).
        fl_gamma: focal loss gamma; 0 = plain BCE (hyp ``fl_gamma``).
        anchor_t: anchor width/height ratio threshold (hyp ``anchor_t``).
        label_smoothing: class targets become ``1 - eps/2`` and ``eps/2`` (hyp ``label_smoothing``).
        autobalance: update the level balance after every call (see below).
        balance: objectness weight per level; default :func:`default_balance`.
        gr: objectness target = ``(1 - gr) + gr * IoU``; yolov5 uses 1.0.
        reduce_across_ranks: off (default), as the original: every mean is over this rank's
            positives and cells and ``total`` is multiplied by this rank's batch size, so under
            DistributedDataParallel the averaged gradient differs from the whole batch's (by tens
            of percent with few positives per rank; the original behaves the same). On: each
            level's means divide by the mean over ranks of its positive and cell counts, and
            ``total`` is multiplied by the global batch size, so DDP's averaged gradient equals
            the gradient of the whole global batch on one process and the mean of the ranks'
            ``total`` its loss; with ``autobalance`` every rank updates the balance with the
            whole batch's objectness losses, so the ranks keep the same weights. One all-reduce
            per call (two with autobalance); a no-op without ``torch.distributed`` initialized.

    Call ``loss_fn(preds, targets)`` with ``preds`` a list of raw head outputs
    ``[bs, na, ny, nx, 5 + nc]`` (``tx, ty, tw, th, obj, cls...``) and ``targets`` ``[N, 6]`` rows
    ``(image_index, class, cx, cy, w, h)`` normalized to 0..1. Returns a :class:`LossOutput`:
    ``total`` = ComputeLoss's first value ``(lbox + lobj + lcls) * bs``; ``components`` "box",
    "obj", "cls" = its second value (after the gains, before ``* bs``); ``terms`` the same times
    ``bs`` with their graph (they sum to ``total``); ``stats``: ``num_pos``, ``num_pos_per_level``,
    ``num_targets`` (target rows), ``iou_mean`` (mean IoU of the positives' decoded boxes with
    their targets, a float, 0.0 without positives), ``ciou_mean``, ``normalizer`` (the positives
    the box and class means divide by, summed over levels), ``balance`` (the level weights used
    in this call). :meth:`assign` gives the :class:`~detloss.assign.yolov5.YOLOv5Assignment`;
    :meth:`decode` the inference boxes and scores.

    Rules kept from the original:

    - Several positives on the same (image, anchor, cell): the objectness target there is the IoU
      of the one written last in ``build_targets``' order (offset-major, then anchor, then target
      row), the CPU behaviour of ``tobj[b, a, gj, gi] = iou``; here it holds on every device.
    - No class loss when ``num_classes == 1``.
    - State (``autobalance=True``): the level weights change after each call. For each level,
      after its objectness BCE ``obj_i`` is added with the current weight,
      ``balance[i] = 0.9999 * balance[i] + 0.0001 / obj_i``; after the last level every weight is
      divided by the weight of the stride-16 level. The next call uses the new weights. They are
      a buffer (``level_balance``), so ``state_dict`` / ``load_state_dict`` carry them and a
      resumed run continues with them; :attr:`balance` reads them as a list and
      :meth:`reset_balance` restores the initial ones.

    Differences: none for float32/float64 inputs. float16/bfloat16 head outputs are computed in
    float32 (the original computes the objectness target and BCE in the input dtype), so results
    stay finite where the original overflows; gradients come back in the input dtype. Predicted
    widths and heights are floored at :data:`PWH_FLOOR` (1e-16 grid units, size logits below
    about -19), where the original's CIoU gradient overflows in float32. Where the
    original would divide by an objectness loss of exactly 0 in autobalance (giving inf), that
    level's weight is left unchanged. NaN or inf in ``preds`` is a ValueError naming ``preds[i]``
    (the original returns a NaN loss).
    """

    name = "yolov5"
    term_methods = {"box": "box_term", "obj": "obj_term", "cls": "cls_term"}

    def __init__(
        self,
        num_classes: int,
        anchors: Sequence[Sequence[float]] = DEFAULT_ANCHORS,
        strides: Sequence[float] = DEFAULT_STRIDES,
        box: float = 0.05,
        obj: float = 1.0,
        cls: float = 0.5,
        cls_pw: float = 1.0,
        obj_pw: float = 1.0,
        fl_gamma: float = 0.0,
        anchor_t: float = 4.0,
        label_smoothing: float = 0.0,
        autobalance: bool = False,
        balance: Optional[Sequence[float]] = None,
        gr: float = 1.0,
        *,
        reduce_across_ranks: bool = False,
    ) -> None:
        super().__init__({"box": box, "obj": obj, "cls": cls}, reduce_across_ranks=reduce_across_ranks)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.strides = [float(s) for s in strides]
        self.anchors_grid = grid_anchors(anchors, self.strides)  # per level [na, 2], grid units
        self.num_levels = len(self.anchors_grid)
        self.num_anchors = int(self.anchors_grid[0].shape[0])
        if not float(fl_gamma) >= 0:
            raise ValueError(f"fl_gamma: expected a non-negative number, got {fl_gamma!r}")
        for name, v in (("cls_pw", cls_pw), ("obj_pw", obj_pw), ("anchor_t", anchor_t)):
            if not float(v) > 0:
                raise ValueError(f"{name}: expected a positive number, got {v!r}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing!r}")
        if not 0.0 <= float(gr) <= 1.0:
            raise ValueError(f"gr: expected a value in [0, 1], got {gr!r}")
        self.cls_pw, self.obj_pw, self.fl_gamma = float(cls_pw), float(obj_pw), float(fl_gamma)
        self.anchor_t, self.label_smoothing, self.gr = float(anchor_t), float(label_smoothing), float(gr)
        self.cp, self.cn = F.smooth_bce(eps=self.label_smoothing)  # positive, negative class targets
        if balance is None:
            balance = default_balance(self.num_levels)
        balance = [float(b) for b in balance]
        if len(balance) != self.num_levels:
            raise ValueError(f"balance: expected {self.num_levels} level weights, got {len(balance)}")
        self.initial_balance = list(balance)
        self.register_buffer("level_balance", torch.tensor(balance, dtype=torch.float64))
        self.autobalance = bool(autobalance)
        self.ssi = 0  # the level every weight is divided by (stride 16) when autobalancing
        if self.autobalance:
            if 16.0 not in self.strides:
                raise ValueError(f"strides: autobalance normalizes by the stride-16 level, got strides {self.strides}")
            self.ssi = self.strides.index(16.0)
        self._anchor_cache: Dict[Any, List[Tensor]] = {}

    @classmethod
    def from_hyp(cls, hyp: Mapping[str, Any], num_classes: int, **kwargs: Any) -> "YOLOv5Loss":
        """Build from a yolov5 ``hyp.*.yaml`` dict as loaded (unknown keys are ignored).

        Uses ``box, obj, cls, cls_pw, obj_pw, fl_gamma, anchor_t`` (required) and
        ``label_smoothing`` (optional, default 0). ``kwargs`` go to the constructor (anchors,
        strides, autobalance, balance, gr, reduce_across_ranks). Note yolov5's train.py rescales
        ``box``, ``cls`` and ``obj`` by the number of levels, classes and image size before
        building its loss; pass the values it ends up with if you want its training numbers.
        """
        if not isinstance(hyp, Mapping):
            raise TypeError(f"hyp: expected a mapping (a loaded hyp.*.yaml), got {type(hyp).__name__}")
        missing = [k for k in HYP_KEYS if k not in hyp]
        if missing:
            raise ValueError(f"hyp: missing required key(s) {missing}; expected all of {list(HYP_KEYS)}")
        params = {k: float(hyp[k]) for k in HYP_KEYS}
        params["label_smoothing"] = float(hyp.get("label_smoothing", 0.0))
        clash = sorted(set(params) & set(kwargs))
        if clash:
            raise ValueError(f"kwargs: {clash} come from hyp; change them in hyp instead")
        return cls(num_classes, **params, **kwargs)

    @property
    def balance(self) -> List[float]:
        """The objectness weight of each level, as the next call will use them."""
        return self.level_balance.tolist()

    def reset_balance(self) -> None:
        """Restore the level weights given at construction (undo autobalance's updates)."""
        with torch.no_grad():
            self.level_balance.copy_(torch.tensor(self.initial_balance, dtype=torch.float64))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, strides={self.strides}, gains={self.gains}, "
            f"cls_pw={self.cls_pw}, obj_pw={self.obj_pw}, fl_gamma={self.fl_gamma}, anchor_t={self.anchor_t}, "
            f"label_smoothing={self.label_smoothing}, autobalance={self.autobalance}, "
            f"reduce_across_ranks={self.reduce_across_ranks}"
        )

    # ------------------------------------------------------------------ checks
    def _check_preds(self, preds: object) -> List[Tensor]:
        if isinstance(preds, Tensor) or not isinstance(preds, (list, tuple)):
            raise TypeError(f"preds: expected a list of {self.num_levels} tensors (one per level), got {type(preds).__name__}")
        if len(preds) != self.num_levels:
            raise ValueError(
                f"preds: expected {self.num_levels} levels (one per anchors/strides entry), got {len(preds)}"
            )
        no = 5 + self.num_classes
        for i, p in enumerate(preds):
            name = f"preds[{i}]"
            check_floating(name, p)
            if p.ndim != 5 or p.shape[1] != self.num_anchors:
                raise ValueError(
                    f"{name}: expected shape [bs, {self.num_anchors}, ny, nx, {no}], got {tuple(p.shape)}"
                )
            if p.shape[4] != no:
                raise ValueError(
                    f"{name}: expected last dimension 5 + num_classes = {no}, got {p.shape[4]} (shape {tuple(p.shape)})"
                )
            check_like_first(name, p, "preds[0]", preds[0])
        check_finite([f"preds[{i}]" for i in range(len(preds))], preds)
        return list(preds)

    def _anchors_on(self, device: torch.device) -> List[Tensor]:
        key = str(device)
        if key not in self._anchor_cache:
            self._anchor_cache[key] = [a.to(device) for a in self.anchors_grid]
        return self._anchor_cache[key]

    def check(self, preds: Sequence[Tensor], targets: Tensor) -> YOLOv5Inputs:
        preds = self._check_preds(preds)
        bs = preds[0].shape[0]
        targets = check_yolo_targets(targets, self.num_classes, bs)
        if targets.device != preds[0].device:
            raise ValueError(f"targets: expected device {preds[0].device} as preds, got {targets.device}")
        return YOLOv5Inputs(preds, targets, bs, compute_dtype(*preds), preds[0].device)

    # ------------------------------------------------------------------ the steps
    def assignment(self, inputs: YOLOv5Inputs, prepared: None) -> YOLOv5Assignment:
        """``build_targets`` (:func:`detloss.assign.yolov5.assign_yolov5`) on the head outputs' shapes."""
        return assign_yolov5(
            inputs.targets,
            [tuple(p.shape[2:4]) for p in inputs.preds],
            self._anchors_on(inputs.device),
            self.anchor_t,
            batch_size=inputs.batch_size,
            validate=False,
        )

    def gather(self, inputs: YOLOv5Inputs, prepared: None, assignment: YOLOv5Assignment) -> YOLOv5Positives:
        """The positives of all levels at once: one gather, one decoding, one CIoU."""
        cd = inputs.dtype
        pobj, tbox, pcls = _gather_heads(inputs.preds, assignment)  # [bs, na, ny, nx]; [P, 4]; [n_i, nc]
        pobj = [upcast(p, cd) for p in pobj]
        pcls = [upcast(p, cd) for p in pcls]
        tbox = upcast(tbox, cd)
        pxy = tbox[:, 0:2].sigmoid() * 2 - 0.5
        pwh = ((tbox[:, 2:4].sigmoid() * 2) ** 2 * assignment.extras["anchors"].to(cd)).clamp(min=PWH_FLOOR)
        pbox = torch.cat((pxy, pwh), 1)
        ciou = F.aligned_box_iou(pbox, assignment.boxes.to(cd), kind="ciou", box_format="cxcywh", convention="yolov5")
        counts = [a.num_pos for a in assignment]
        out = YOLOv5Positives(pobj, pcls, pbox, ciou, counts, self.balance, batch_factor=inputs.batch_size)
        if self.reduce_across_ranks:
            # one all-reduce: every level's positive count and the batch size
            local = torch.tensor([float(a.num_pos) for a in assignment] + [float(inputs.batch_size)], dtype=cd, device=inputs.device)
            mean = self.global_mean(local)
            cells = [p[0].numel() for p in pobj]  # na * ny * nx per image
            out.pos_divisor = list(mean[:-1].unbind(0))
            out.cell_divisor = [mean[-1] * c for c in cells]
            out.batch_factor = mean[-1] * self.world_size()
        return out

    def _bce(self, logits: Tensor, target: Tensor, pos_weight: float, divisor: Optional[Tensor] = None) -> Tensor:
        """``BCEWithLogitsLoss(pos_weight)``, wrapped in yolov5's ``FocalLoss`` when ``fl_gamma > 0``:
        the mean (``divisor`` None) or the sum over ``divisor``."""
        reduction = "mean" if divisor is None else "sum"
        pw = None if pos_weight == 1.0 else logits.new_tensor(pos_weight)
        if self.fl_gamma > 0:
            value = F.sigmoid_focal_loss(
                logits, target, alpha=FOCAL_ALPHA, gamma=self.fl_gamma, reduction=reduction,
                **({} if pw is None else {"pos_weight": pw}),
            )
        else:
            value = F.bce_with_logits(logits, target, pos_weight=pw, reduction=reduction)
        return value if divisor is None else value / divisor

    # ------------------------------------------------------------------ the terms
    def box_term(self, inputs: YOLOv5Inputs, pos: YOLOv5Positives, assignment: YOLOv5Assignment) -> Tensor:
        """``sum_i mean_pos (1 - CIoU)``."""
        lbox = torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        for i, (asg, ciou) in enumerate(zip(assignment, pos.per_level(pos.ciou))):
            if asg.num_pos:
                loss = 1.0 - ciou
                lbox = lbox + (loss.mean() if pos.pos_divisor is None else loss.sum() / pos.pos_divisor[i])
        return lbox

    def obj_term(self, inputs: YOLOv5Inputs, pos: YOLOv5Positives, assignment: YOLOv5Assignment) -> Tensor:
        """``sum_i balance_i mean_all BCE(t_obj, tobj)``; with ``autobalance`` the level weights
        are then updated (module docstring)."""
        cd = inputs.dtype
        obj = []
        # the detached CIoU; the last writer of each cell wins
        scores = pos.ciou.detach().clamp(0)
        if self.gr < 1:
            scores = (1.0 - self.gr) + self.gr * scores
        for i, (asg, pobj, score) in enumerate(zip(assignment, pos.pobj, pos.per_level(scores))):
            tobj = torch.zeros(pobj.shape, dtype=cd, device=inputs.device)
            if asg.num_pos:
                own = asg.obj_owner
                tobj[asg.image[own], asg.anchor[own], asg.gy[own], asg.gx[own]] = score[own]
            obj.append(self._bce(pobj, tobj, self.obj_pw, None if pos.cell_divisor is None else pos.cell_divisor[i]))
        lobj = torch.zeros((), dtype=cd, device=inputs.device)
        for obji, b in zip(obj, pos.balance):
            lobj = lobj + obji * b
        if self.autobalance:
            self._update_balance(torch.stack(obj).detach())
        return lobj

    def _update_balance(self, obj: Tensor) -> None:
        """``balance_i <- 0.9999 balance_i + 0.0001 / obj_i`` (unchanged where ``obj_i`` is 0),
        then every weight divided by the stride-16 level's; ``obj`` is the whole batch's with
        ``reduce_across_ranks``."""
        v = self.global_mean(obj).to(device=self.level_balance.device, dtype=torch.float64)
        with torch.no_grad():
            b = self.level_balance
            b.copy_(torch.where(v > 0, b * 0.9999 + 0.0001 / v, b))
            b.div_(b[self.ssi].clone())

    def cls_term(self, inputs: YOLOv5Inputs, pos: YOLOv5Positives, assignment: YOLOv5Assignment) -> Tensor:
        """``sum_i mean_pos BCE(t_cls, onehot(cp, cn))`` (0 when ``num_classes == 1``).

        With plain BCE (``fl_gamma == 0``, ``cls_pw == 1``) and no negative smoothing (``cn == 0``)
        the one-hot target is never built: each logit compares its class with its positive's
        label (:func:`detloss.kernels.fused_onehot_bce_with_logits`, the same BCE to rounding)."""
        lcls = torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        if self.num_classes == 1:
            return lcls
        onehot = self.cn == 0.0 and self.cls_pw == 1.0 and self.fl_gamma == 0.0
        chan = weight = score = None
        for i, (asg, pcls) in enumerate(zip(assignment, pos.cls_logits)):
            if not asg.num_pos:
                continue
            if pos.pos_divisor is None:
                divisor: Union[int, Tensor] = asg.num_pos * self.num_classes
            else:
                divisor = pos.pos_divisor[i] * self.num_classes
            if onehot:
                if chan is None:
                    chan = torch.arange(self.num_classes, device=inputs.device, dtype=pcls.dtype)[None]
                    weight = torch.ones_like(chan)
                    score = torch.full((1, 1), self.cp, dtype=pcls.dtype, device=inputs.device)
                label = asg.classes.to(pcls.dtype)[:, None]
                compiled = kernels.use_fused(pcls)
                lcls = lcls + kernels.fused_onehot_bce_with_logits(pcls, label, score, chan, weight, compiled=compiled) / divisor
                continue
            t = torch.full_like(pcls, self.cn)
            t[torch.arange(asg.num_pos, device=inputs.device), asg.classes] = self.cp
            lcls = lcls + self._bce(pcls, t, self.cls_pw, None if pos.pos_divisor is None else divisor)
        return lcls

    def batch_factor(self, inputs: YOLOv5Inputs, pos: YOLOv5Positives) -> Union[int, Tensor]:
        """``total = (lbox + lobj + lcls) * bs`` (ComputeLoss's return value)."""
        return pos.batch_factor

    def stats(self, inputs: YOLOv5Inputs, pos: YOLOv5Positives, assignment: YOLOv5Assignment, raw: Dict[str, Tensor]) -> Dict[str, Any]:
        num_pos = [asg.num_pos for asg in assignment]
        iou_mean: Union[float, Tensor] = 0.0
        ciou_mean: Union[float, Tensor] = 0.0
        if assignment.num_pos:
            pbox = pos.pbox.detach()
            tbox = assignment.boxes.to(pbox.dtype)
            iou_mean = F.aligned_box_iou(pbox, tbox, box_format="cxcywh", convention="yolov5", validate=False).mean()
            ciou_mean = pos.ciou.detach().mean()
        normalizer = float(sum(num_pos)) if pos.pos_divisor is None else torch.stack(pos.pos_divisor).sum()
        return {
            "num_pos": sum(num_pos),
            "num_pos_per_level": num_pos,
            "num_targets": int(inputs.targets.shape[0]),
            "iou_mean": iou_mean,
            "ciou_mean": ciou_mean,
            "normalizer": normalizer,
            "balance": pos.balance,
        }

    # ------------------------------------------------------------------ inference
    def decode(self, preds: Sequence[Tensor]) -> Decoded:
        """yolov5's inference decoding (``Detect``): per level ``xy = (2 sigmoid(t_xy) - 0.5 +
        cell) * stride``, ``wh = (2 sigmoid(t_wh))^2 * anchor`` (pixels), boxes ``[B, A, 4]``
        xyxy in the order of the flattened ``[bs, na, ny, nx]`` levels; scores ``[B, A, nc]``
        ``sigmoid(obj) * sigmoid(cls)`` (the objectness alone when ``num_classes == 1``)."""
        preds = self._check_preds(preds)
        cd = compute_dtype(*preds)
        boxes, scores = [], []
        for p, anchors, stride in zip(preds, self._anchors_on(preds[0].device), self.strides):
            bs, na, ny, nx, _ = p.shape
            s = upcast(p, cd).sigmoid()
            cell = grid_points([(ny, nx)], [(1.0, 1.0)], offset=0.0, dtype=cd, device=p.device).view(1, 1, ny, nx, 2)
            xy = (s[..., 0:2] * 2 - 0.5 + cell) * stride
            wh = (s[..., 2:4] * 2) ** 2 * (anchors.to(cd) * stride).view(1, na, 1, 1, 2)
            boxes.append(cxcywh_to_xyxy(torch.cat((xy, wh), -1)).reshape(bs, na * ny * nx, 4))
            score = s[..., 5:] * s[..., 4:5] if self.num_classes > 1 else s[..., 4:5]
            scores.append(score.reshape(bs, na * ny * nx, self.num_classes))
        return Decoded(torch.cat(boxes, 1), torch.cat(scores, 1))

    def prior_outputs(self, image_size: Tuple[int, int], batch_size: int = 1) -> Tuple[List[Tensor]]:
        h, w = image_size
        no = 5 + self.num_classes
        return ([torch.zeros(batch_size, self.num_anchors, math.ceil(h / s), math.ceil(w / s), no, dtype=torch.float64)
                 for s in self.strides],)

    def prediction_levels(self, preds: Sequence[Tensor]) -> List[GridLevel]:
        """``num_anchors`` anchors per cell (pixels), drawn at the cell centre."""
        return [
            GridLevel(s, (int(p.shape[2]), int(p.shape[3])), (s, s), anchors=[(aw * s, ah * s) for aw, ah in a.tolist()])
            for p, s, a in zip(preds, self.strides, self.anchors_grid)
        ]

    def assignment_notes(self, assignment: YOLOv5Assignment) -> List[str]:
        """Which cell of the target's the positive is: its own or a neighbour."""
        return [f"{OFFSET_NAMES[o]} cell" for o in assignment.extras["offset"].tolist()]
