"""YOLOv5's loss (ultralytics/yolov5 v7.0, ``utils/loss.py`` ``ComputeLoss``), exact and readable.

The terms, per pyramid level ``i`` with ``n_i`` positives (assignment: :mod:`detloss.assign.yolov5`)::

    pxy  = 2 * sigmoid(t_xy) - 0.5                 pwh = (2 * sigmoid(t_wh))^2 * anchor
    lbox = sum_i mean_pos(1 - CIoU(pbox, tbox))     (bbox_iou of yolov5, CIoU's alpha without grad)
    tobj = clamp(CIoU.detach(), 0)  (times gr, plus 1 - gr)  at each positive's (image, anchor, cell)
    lobj = sum_i balance_i * mean_all BCE(t_obj, tobj; pos_weight=obj_pw)
    lcls = sum_i mean_pos BCE(t_cls, onehot(cp, cn); pos_weight=cls_pw)   (skipped when nc == 1)
    total = (box * lbox + obj * lobj + cls * lcls) * bs

``(cp, cn) = smooth_bce(label_smoothing)``; with ``fl_gamma > 0`` each BCE becomes the focal loss
``BCE * alpha_t * (1 - p_t)^fl_gamma`` with alpha = 0.25 (yolov5's ``FocalLoss``). Level balance
``[4.0, 1.0, 0.4]`` for 3 levels, ``[4.0, 1.0, 0.25, 0.06, 0.02]`` for 5 (P3-P7).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from .. import functional as F
from .._checks import check_floating, check_like_first, compute_dtype, upcast
from ..assign.yolov5 import YOLOv5LevelAssignment, assign_yolov5, grid_anchors
from ..boxes import check_yolo_targets
from ..output import LossOutput

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


class _GatherHead(torch.autograd.Function):
    """``(pi[..., 4], pi[b, a, gj, gi])`` in one op whose backward writes one gradient tensor.

    Autograd through the two plain indexing ops builds two zero-filled gradients of the full
    head output and adds them; here the objectness gradient and the positives' rows are written
    into a single zero-filled tensor (duplicated positives accumulate, as ``index_put`` with
    ``accumulate=True`` does).
    """

    @staticmethod
    def forward(ctx, pi: torch.Tensor, flat_index: torch.Tensor):  # type: ignore[override]
        no = pi.shape[-1]
        ctx.shape, ctx.dtype = pi.shape, pi.dtype
        ctx.save_for_backward(flat_index)
        obj = pi[..., 4].contiguous()
        rows = pi.reshape(-1, no).index_select(0, flat_index)
        return obj, rows

    @staticmethod
    def backward(ctx, g_obj, g_rows):  # type: ignore[override]
        (flat_index,) = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=flat_index.device)
        if g_obj is not None:
            grad[..., 4] = g_obj
        if g_rows is not None and flat_index.numel():
            grad.view(-1, ctx.shape[-1]).index_add_(0, flat_index, g_rows.to(ctx.dtype))
        return grad, None


def _gather_head(pi: torch.Tensor, asg: YOLOv5LevelAssignment):
    """The objectness logits ``[bs, na, ny, nx]`` and the positives' rows ``[n, 5 + nc]`` of ``pi``."""
    _, na, ny, nx, _ = pi.shape
    flat = ((asg.image * na + asg.anchor) * ny + asg.gy) * nx + asg.gx
    if pi.requires_grad:
        return _GatherHead.apply(pi, flat)
    return pi[..., 4], pi.reshape(-1, pi.shape[-1]).index_select(0, flat)


class YOLOv5Loss(torch.nn.Module):
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

    Call ``loss_fn(preds, targets)`` with ``preds`` a list of raw head outputs
    ``[bs, na, ny, nx, 5 + nc]`` (``tx, ty, tw, th, obj, cls...``) and ``targets`` ``[N, 6]`` rows
    ``(image_index, class, cx, cy, w, h)`` normalized to 0..1. Returns a :class:`LossOutput`:
    ``total`` = ComputeLoss's first value ``(lbox + lobj + lcls) * bs``; ``components`` "box",
    "obj", "cls" = its second value (after the gains, before ``* bs``); ``stats``: ``num_pos``,
    ``num_pos_per_level``, ``iou_mean`` (mean IoU of the positives' decoded boxes with their
    targets, a 0-dim tensor, NaN-free: 0 without positives), ``ciou_mean``, ``balance`` (the level
    weights used in this call).

    Rules kept from the original:

    - Several positives on the same (image, anchor, cell): the objectness target there is the IoU
      of the one written last in ``build_targets``' order (offset-major, then anchor, then target
      row), the CPU behaviour of ``tobj[b, a, gj, gi] = iou``; here it holds on every device.
    - No class loss when ``num_classes == 1``.
    - State (``autobalance=True``): ``self.balance`` changes after each call. For each level,
      after its objectness BCE ``obj_i`` is added with the current weight,
      ``balance[i] = 0.9999 * balance[i] + 0.0001 / obj_i``; after the last level every weight is
      divided by the weight of the stride-16 level. The next call uses the new weights.
      :meth:`reset_balance` restores the initial ones.

    Differences: none for float32/float64 inputs. float16/bfloat16 head outputs are computed in
    float32 (the original computes the objectness target and BCE in the input dtype), so results
    stay finite where the original overflows; gradients come back in the input dtype. Predicted
    widths and heights are floored at :data:`PWH_FLOOR` (1e-16 grid units, size logits below
    about -19), where the original's CIoU gradient overflows in float32. Where the
    original would divide by an objectness loss of exactly 0 in autobalance (giving inf), that
    level's weight is left unchanged.
    """

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
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.strides = [float(s) for s in strides]
        self.anchors_grid = grid_anchors(anchors, self.strides)  # per level [na, 2], grid units
        self.num_levels = len(self.anchors_grid)
        self.num_anchors = int(self.anchors_grid[0].shape[0])
        for name, v in (("box", box), ("obj", obj), ("cls", cls), ("fl_gamma", fl_gamma)):
            if not float(v) >= 0:
                raise ValueError(f"{name}: expected a non-negative number, got {v!r}")
        for name, v in (("cls_pw", cls_pw), ("obj_pw", obj_pw), ("anchor_t", anchor_t)):
            if not float(v) > 0:
                raise ValueError(f"{name}: expected a positive number, got {v!r}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing!r}")
        if not 0.0 <= float(gr) <= 1.0:
            raise ValueError(f"gr: expected a value in [0, 1], got {gr!r}")
        self.box, self.obj, self.cls = float(box), float(obj), float(cls)
        self.cls_pw, self.obj_pw, self.fl_gamma = float(cls_pw), float(obj_pw), float(fl_gamma)
        self.anchor_t, self.label_smoothing, self.gr = float(anchor_t), float(label_smoothing), float(gr)
        self.cp, self.cn = F.smooth_bce(eps=self.label_smoothing)  # positive, negative class targets
        if balance is None:
            balance = default_balance(self.num_levels)
        balance = [float(b) for b in balance]
        if len(balance) != self.num_levels:
            raise ValueError(f"balance: expected {self.num_levels} level weights, got {len(balance)}")
        self.initial_balance = list(balance)
        self.balance = list(balance)
        self.autobalance = bool(autobalance)
        self.ssi = 0  # the level every weight is divided by (stride 16) when autobalancing
        if self.autobalance:
            if 16.0 not in self.strides:
                raise ValueError(f"strides: autobalance normalizes by the stride-16 level, got strides {self.strides}")
            self.ssi = self.strides.index(16.0)
        self._anchor_cache: Dict[Any, List[torch.Tensor]] = {}

    @classmethod
    def from_hyp(cls, hyp: Mapping[str, Any], num_classes: int, **kwargs: Any) -> "YOLOv5Loss":
        """Build from a yolov5 ``hyp.*.yaml`` dict as loaded (unknown keys are ignored).

        Uses ``box, obj, cls, cls_pw, obj_pw, fl_gamma, anchor_t`` (required) and
        ``label_smoothing`` (optional, default 0). ``kwargs`` go to the constructor (anchors,
        strides, autobalance, balance, gr). Note yolov5's train.py rescales ``box``, ``cls`` and
        ``obj`` by the number of levels, classes and image size before building its loss; pass
        the values it ends up with if you want its training numbers.
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

    def reset_balance(self) -> None:
        """Restore the level weights given at construction (undo autobalance's updates)."""
        self.balance = list(self.initial_balance)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, strides={self.strides}, box={self.box}, obj={self.obj}, "
            f"cls={self.cls}, cls_pw={self.cls_pw}, obj_pw={self.obj_pw}, fl_gamma={self.fl_gamma}, "
            f"anchor_t={self.anchor_t}, label_smoothing={self.label_smoothing}, autobalance={self.autobalance}"
        )

    # ----------------------------------------------------------------------------------------
    def _check_preds(self, preds: object) -> List[torch.Tensor]:
        if isinstance(preds, torch.Tensor) or not isinstance(preds, (list, tuple)):
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
        return list(preds)

    def _anchors_on(self, device: torch.device) -> List[torch.Tensor]:
        key = str(device)
        if key not in self._anchor_cache:
            self._anchor_cache[key] = [a.to(device) for a in self.anchors_grid]
        return self._anchor_cache[key]

    def assign(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> List[YOLOv5LevelAssignment]:
        """The assignment this loss uses for ``preds`` (their shapes only) and ``targets``."""
        preds = self._check_preds(preds)
        targets = check_yolo_targets(targets, self.num_classes, preds[0].shape[0])
        if targets.device != preds[0].device:
            raise ValueError(f"targets: expected device {preds[0].device} as preds, got {targets.device}")
        return assign_yolov5(
            targets,
            [tuple(p.shape[2:4]) for p in preds],
            self._anchors_on(targets.device),
            self.anchor_t,
            validate=False,
        )

    def _bce(self, logits: torch.Tensor, target: torch.Tensor, pos_weight: float) -> torch.Tensor:
        """``BCEWithLogitsLoss(pos_weight)``, wrapped in yolov5's ``FocalLoss`` when ``fl_gamma > 0``; mean."""
        if self.fl_gamma > 0:
            return F.sigmoid_focal_loss(
                logits, target, alpha=FOCAL_ALPHA, gamma=self.fl_gamma, reduction="mean",
                **({} if pos_weight == 1.0 else {"pos_weight": logits.new_tensor(pos_weight)}),
            )
        pw = None if pos_weight == 1.0 else logits.new_tensor(pos_weight)
        return F.bce_with_logits(logits, target, pos_weight=pw, reduction="mean")

    def forward(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> LossOutput:
        assignment = self.assign(preds, targets)  # checks preds and targets
        cd = compute_dtype(*preds)
        dev = preds[0].device
        zero = torch.zeros((), dtype=cd, device=dev)
        lbox, lobj, lcls = zero, zero, zero
        balance_used = list(self.balance)
        ious, cious = [], []

        for i, (pi, asg) in enumerate(zip(preds, assignment)):
            b, a, gj, gi = asg.indices()
            pobj, ps = _gather_head(pi, asg)  # objectness logits, the positives' rows [n, 5 + nc]
            pobj, ps = upcast(pobj, cd), upcast(ps, cd)
            tobj = torch.zeros(pobj.shape, dtype=cd, device=dev)
            n = asg.num_pos
            if n:
                pxy = ps[:, 0:2].sigmoid() * 2 - 0.5
                pwh = ((ps[:, 2:4].sigmoid() * 2) ** 2 * asg.anchors.to(cd)).clamp(min=PWH_FLOOR)
                pbox = torch.cat((pxy, pwh), 1)
                tbox = asg.boxes.to(cd)
                ciou = F.aligned_box_iou(pbox, tbox, kind="ciou", box_format="cxcywh", convention="yolov5")
                lbox = lbox + (1.0 - ciou).mean()

                # Objectness target: detached CIoU, the last writer of each cell wins.
                score = ciou.detach().clamp(0)
                if self.gr < 1:
                    score = (1.0 - self.gr) + self.gr * score
                own = asg.obj_owner
                tobj[b[own], a[own], gj[own], gi[own]] = score[own]

                if self.num_classes > 1:
                    pcls = ps[:, 5:]
                    t = torch.full_like(pcls, self.cn)
                    t[torch.arange(n, device=dev), asg.classes] = self.cp
                    lcls = lcls + self._bce(pcls, t, self.cls_pw)
                cious.append(ciou.detach())
                with torch.no_grad():
                    ious.append(F.aligned_box_iou(pbox, tbox, kind="iou", box_format="cxcywh", convention="yolov5"))

            obji = self._bce(pobj, tobj, self.obj_pw)
            lobj = lobj + obji * self.balance[i]
            if self.autobalance:
                v = obji.detach().item()
                if v > 0:
                    self.balance[i] = self.balance[i] * 0.9999 + 0.0001 / v

        if self.autobalance:
            ref = self.balance[self.ssi]
            self.balance = [x / ref for x in self.balance]
        lbox = lbox * self.box
        lobj = lobj * self.obj
        lcls = lcls * self.cls
        bs = preds[-1].shape[0]
        total = (lbox + lobj + lcls) * bs

        num_pos = [asg.num_pos for asg in assignment]
        stats: Dict[str, Any] = {
            "num_pos": sum(num_pos),
            "num_pos_per_level": num_pos,
            "iou_mean": torch.cat(ious).mean() if ious else zero.detach().clone(),
            "ciou_mean": torch.cat(cious).mean() if cious else zero.detach().clone(),
            "balance": balance_used,
        }
        components = {"box": lbox.detach(), "obj": lobj.detach(), "cls": lcls.detach()}
        return LossOutput(total=total, components=components, stats=stats)
