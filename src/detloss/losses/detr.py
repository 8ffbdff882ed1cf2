"""DETR's set-prediction loss (:class:`DETRLoss`) and the skeleton the DETR family shares
(:class:`SetCriterion`): the decoder layers of an ``outputs`` dict, their Hungarian matchings,
the number-of-boxes normalizer, and the original's loss-dict keys.

DETR (Carion et al. 2020, arXiv:2005.12872; facebookresearch/detr ``models/detr.py``
``SetCriterion``, ``models/matcher.py``), per decoder layer, with the matching of
:class:`~detloss.assign.hungarian.HungarianMatcher` (matched pairs ``(q, t)``, ``N_b`` = the
number of target boxes in the batch, at least 1)::

    loss_ce   = sum_{b, q} w_{y_bq} CE(logits_bq, y_bq) / sum_{b, q} w_{y_bq}
                y_bq = class of the target matched to q, else the no-object class C;
                w = 1 for the C classes, eos_coef for no-object
    loss_bbox = sum_{(q, t)} |box_q - box_t|_1 / N_b                  (normalized cxcywh)
    loss_giou = sum_{(q, t)} (1 - GIoU(box_q, box_t)) / N_b
    class_error       = 100 - top-1 accuracy (%) of the matched queries (last layer only)
    cardinality_error = mean over images of |#queries not predicting no-object - #targets|
    total = sum_k weight_dict[k] * loss_dict[k]     (DETR's engine.py; keys not in weight_dict
                                                      are reported, not trained)

The earlier decoder layers (``aux_outputs``) are matched afresh and give the same terms with the
suffix ``_i`` (no ``class_error``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import functional as F
from ..functional import detr_terms as T
from .._checks import check_floating, compute_dtype, upcast
from ..assign.base import Assignment
from ..assign.hungarian import HungarianMatcher, SetTargets, check_set_targets
from ..boxes import cxcywh_to_xyxy
from ..output import LossOutput
from .base import Decoded, DetectionLoss

__all__ = ["DETRLoss", "SetCriterion", "Layer", "SetInputs", "box_terms", "matched_boxes", "class_targets"]


@dataclass
class Layer:
    """One prediction layer of an ``outputs`` dict: ``tag`` ("main", "aux_0", "enc_0", "pre",
    "dn_0", "dn_pre", ...), ``suffix`` of its keys in the original's loss dict, ``tensors`` its
    entries in the compute dtype (``pred_logits``, ``pred_boxes``, and a family's extras)."""

    tag: str
    suffix: str
    tensors: Dict[str, Tensor]

    @property
    def logits(self) -> Tensor:
        return self.tensors["pred_logits"]

    @property
    def boxes(self) -> Tensor:
        return self.tensors["pred_boxes"]

    @property
    def num_queries(self) -> int:
        return int(self.logits.shape[1])


@dataclass
class SetInputs:
    """What :meth:`SetCriterion.check` hands to the other steps."""

    outputs: Mapping[str, Any]
    layers: Dict[str, Layer]
    targets: SetTargets
    batch_size: int
    dtype: torch.dtype
    device: torch.device
    dn_meta: Optional[Mapping[str, Any]] = None
    extras: Dict[str, Any] = field(default_factory=dict)
    #: The batch-wide divisors of this call (Python floats), set with the matching.
    normalizers: Dict[str, float] = field(default_factory=dict)


def matched_boxes(layer: Layer, asg: Assignment) -> Tuple[Tensor, Tensor]:
    """Predicted and target boxes ``[P, 4]`` (normalized cxcywh) of an assignment's pairs."""
    return layer.boxes[asg.batch_index, asg.pred_index], asg.boxes.to(layer.boxes.dtype)


def to_xyxy(boxes: Tensor, clamp_sizes: bool = False) -> Tensor:
    """cxcywh -> xyxy; ``clamp_sizes`` clamps w, h at 0 first (D-FINE's / DEIM's box_ops)."""
    if clamp_sizes:
        boxes = torch.cat((boxes[..., :2], boxes[..., 2:].clamp(min=0)), -1)
    return cxcywh_to_xyxy(boxes)


def box_terms(
    src: Tensor, tgt: Tensor, num_boxes: float, *, clamp_sizes: bool = False, giou_weight: Optional[Tensor] = None
) -> Dict[str, Tensor]:
    """``loss_bbox`` (L1 sum / num_boxes) and ``loss_giou`` (sum of 1 - GIoU, optionally times
    ``giou_weight``, / num_boxes) of matched cxcywh pairs: every DETR-family ``loss_boxes``."""
    l1 = F.l1_loss(src, tgt, reduction="sum") / num_boxes
    giou = 1 - T.paired_box_iou(to_xyxy(src, clamp_sizes), to_xyxy(tgt, clamp_sizes), kind="giou", validate=False)
    if giou_weight is not None:
        giou = giou * giou_weight
    return {"loss_bbox": l1, "loss_giou": giou.sum() / num_boxes}


def layer_sums(per_pair: Tensor, counts: Sequence[int]) -> Tensor:
    """``[L, ...]``: the sums of ``per_pair [P, ...]`` over consecutive runs of ``counts[l]`` pairs
    (the layers' matched pairs concatenated), in one ``index_add``."""
    which = torch.repeat_interleave(torch.arange(len(counts), device=per_pair.device),
                                    torch.tensor(counts, device=per_pair.device), output_size=per_pair.shape[0])
    return per_pair.new_zeros((len(counts),) + per_pair.shape[1:]).index_add_(0, which, per_pair)


def layers_box_terms(pairs: Sequence[Tuple[Tensor, Tensor]], num_boxes: float) -> List[Dict[str, Tensor]]:
    """:func:`box_terms` (no clamp, no weight) of several layers' matched pairs, computed in one
    call of each formula over their concatenation instead of one per layer."""
    counts = [int(src.shape[0]) for src, _ in pairs]
    src, tgt = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    l1 = F.l1_loss(src, tgt, reduction="none").sum(-1)
    giou = 1 - T.paired_box_iou(to_xyxy(src), to_xyxy(tgt), kind="giou", validate=False)
    sums = layer_sums(torch.stack((l1, giou), -1), counts) / num_boxes
    return [{"loss_bbox": row[0], "loss_giou": row[1]} for row in sums.unbind(0)]


def matched_iou(src: Tensor, tgt: Tensor, *, kind: str = "iou", clamp_sizes: bool = False) -> Tensor:
    """Detached IoU (or GIoU) of matched cxcywh pairs, torchvision's pairwise numbers."""
    with torch.no_grad():
        return T.paired_box_iou(to_xyxy(src.detach(), clamp_sizes), to_xyxy(tgt, clamp_sizes), kind=kind, validate=False)


def class_targets(logits: Tensor, asg: Assignment, score: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One-hot ``label [B, Q, C]`` of the matched queries' target classes (0 elsewhere; the
    originals' ``one_hot(..., C + 1)[..., :-1]``) and the target score ``[B, Q, C]``: ``score``
    (``[P]``, e.g. the matched IoU) at the target class, 0 elsewhere."""
    bsz, nq, nc = logits.shape
    label = torch.zeros((bsz, nq, nc), dtype=logits.dtype, device=logits.device)
    label[asg.batch_index, asg.pred_index, asg.labels] = 1
    target = torch.zeros_like(label)
    if score is not None:
        target[asg.batch_index, asg.pred_index, asg.labels] = score.to(logits.dtype)
    return label, target


def _check_weight_dict(weight_dict: Mapping[str, float], base_keys: Sequence[str], per_layer: bool) -> Dict[str, float]:
    """Finite non-negative weights whose key is a term (``per_layer``: with a layer suffix)."""
    if not isinstance(weight_dict, Mapping):
        raise TypeError(f"weight_dict: expected a dict term -> weight, got {type(weight_dict).__name__}")
    out = {}
    for k, v in weight_dict.items():
        base = re.sub(r"(_aux)?(_\d+|_pre|_enc_\d+|_dn_\d+|_dn_pre)?$", "", str(k)) if per_layer else k
        if base not in base_keys:
            raise ValueError(f"weight_dict: expected keys among {list(base_keys)}"
                             + (" (with layer suffixes)" if per_layer else "") + f", got {k!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"weight_dict[{k!r}]: expected a finite non-negative number, got {v!r}")
        out[str(k)] = float(v)
    return out


class SetCriterion(DetectionLoss):
    """The skeleton of the DETR-family losses (DETR, RT-DETR, D-FINE, DEIM).

    ``check`` reads the ``outputs`` dict into :class:`Layer` s (the last decoder layer "main",
    then each group of :attr:`layer_groups`), ``assignment`` matches them (one matcher call for
    all layers that need one; the per-layer :class:`~detloss.assign.base.Assignment` s are in the
    main assignment's ``extras["layers"]`` and in ``out.stats["assignments"]``), a subclass's
    ``compute_terms`` loops over the layers and the original's ``losses`` groups, and
    :meth:`output` weights them by the original's rule. The term table maps each base key to its
    group's method; the per-layer keys carry the original's suffixes.
    """

    #: (outputs key, tag prefix, is a list of layers) of the layer groups a family reads.
    layer_groups: ClassVar[Tuple[Tuple[str, str, bool], ...]] = ()
    #: Per-layer tensor entries a family reads besides pred_logits / pred_boxes (optional ones).
    layer_extras: ClassVar[Tuple[str, ...]] = ()
    #: Check predicted boxes for w, h >= 0 (the originals' generalized_box_iou asserts it).
    check_box_sizes: ClassVar[bool] = True
    #: The originals' loss-group names, each a method of the class.
    loss_groups: ClassVar[Dict[str, str]] = {}
    #: RT-DETRv2's / D-FINE's ``boxes_weight_format``: None, "iou" or "giou" (see :meth:`box_weight`).
    boxes_weight_format: Optional[str] = None

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float],
        losses: Sequence[str],
        *,
        per_layer_weights: bool,
        reduce_across_ranks: bool = False,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
        if not isinstance(matcher, HungarianMatcher):
            raise TypeError(f"matcher: expected a detloss.HungarianMatcher, got {type(matcher).__name__}")
        if isinstance(losses, str) or not all(l in self.loss_groups for l in losses) or not losses:
            raise ValueError(f"losses: expected a non-empty list among {list(self.loss_groups)}, got {losses!r}")
        wd = _check_weight_dict(weight_dict, tuple(self.term_methods), per_layer_weights)
        super().__init__({k: wd.get(k, 0.0) for k in self.term_methods}, reduce_across_ranks=reduce_across_ranks)
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = wd
        self.losses = list(losses)
        self.per_layer_weights = per_layer_weights

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, losses={self.losses}, weight_dict={self.weight_dict}"

    # ------------------------------------------------------------------ check
    @property
    def num_logits(self) -> int:
        """Logits per query: ``num_classes`` (sigmoid families) or ``num_classes + 1`` (DETR)."""
        return self.num_classes

    def check(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> SetInputs:
        if not isinstance(outputs, Mapping):
            raise TypeError(f"outputs: expected the model's dict of outputs, got {type(outputs).__name__}")
        main = self._layer_dict("outputs", outputs)
        logits0 = check_floating("outputs['pred_logits']", main["pred_logits"])
        if logits0.ndim != 3:
            raise ValueError(f"outputs['pred_logits']: expected [B, Q, {self.num_logits}], got {tuple(logits0.shape)}")
        bsz, dev = int(logits0.shape[0]), logits0.device
        raw = {"main": ("outputs", main, "")}
        for key, prefix, is_list in self.layer_groups:
            if key not in outputs or outputs[key] is None:
                continue
            value = outputs[key]
            if is_list:
                if isinstance(value, Mapping) or not isinstance(value, (list, tuple)):
                    raise TypeError(f"outputs['{key}']: expected a list of layer dicts, got {type(value).__name__}")
                for i, d in enumerate(value):
                    raw[f"{prefix}_{i}"] = (f"outputs['{key}'][{i}]", self._layer_dict(f"outputs['{key}'][{i}]", d), i)
            else:
                raw[prefix] = (f"outputs['{key}']", self._layer_dict(f"outputs['{key}']", value), None)
        tensors = [t for _, d, _ in raw.values() for t in d.values() if isinstance(t, Tensor)]
        dt = compute_dtype(*[t for t in tensors if t.is_floating_point()])
        layers: Dict[str, Layer] = {}
        queries: Dict[str, int] = {}
        for tag, (name, d, i) in raw.items():
            layer = Layer(tag, self.suffix(tag), {k: upcast(v, dt) for k, v in d.items() if isinstance(v, Tensor)})
            self._check_shapes(name, layer, bsz, dev)
            group = tag.rsplit("_", 1)[0] if tag[-1].isdigit() else tag
            if group in ("aux", "pre"):
                group = "main"
            if queries.setdefault(group, layer.num_queries) != layer.num_queries:
                raise ValueError(f"{name}['pred_logits']: expected {queries[group]} queries like the other "
                                 f"layers of its group, got {layer.num_queries}")
            layers[tag] = layer
        self._check_finite(raw, layers)
        meta = outputs.get("enc_meta")
        if isinstance(meta, Mapping) and meta.get("class_agnostic"):
            raise ValueError("outputs['enc_meta']['class_agnostic']: a class-agnostic encoder head (one logit, "
                             "labels all 0) is not supported, got True")
        tg = check_set_targets(targets, bsz, num_classes=self.num_classes, dtype=dt, device=dev)
        extras = {k: upcast(outputs[k], dt) for k in ("up", "reg_scale") if isinstance(outputs.get(k), Tensor)}
        return SetInputs(outputs, layers, tg, bsz, dt, dev, outputs.get("dn_meta"), extras)

    def suffix(self, tag: str) -> str:
        """Key suffix of a layer tag in the original's loss dict (default: ``_<tag>``)."""
        return "" if tag == "main" else f"_{tag}"

    def _layer_dict(self, name: str, d: object) -> Mapping[str, Any]:
        if not isinstance(d, Mapping) or "pred_logits" not in d or "pred_boxes" not in d:
            got = f"keys {sorted(map(str, d))}" if isinstance(d, Mapping) else type(d).__name__
            raise TypeError(f"{name}: expected a dict with 'pred_logits' and 'pred_boxes', got {got}")
        keys = ("pred_logits", "pred_boxes") + self.layer_extras
        return {k: d[k] for k in keys if k in d and d[k] is not None}

    def _check_shapes(self, name: str, layer: Layer, bsz: int, dev: torch.device) -> None:
        lg = check_floating(f"{name}['pred_logits']", layer.logits)
        bx = check_floating(f"{name}['pred_boxes']", layer.boxes)
        if lg.ndim != 3 or lg.shape[0] != bsz or lg.shape[2] != self.num_logits:
            raise ValueError(f"{name}['pred_logits']: expected [{bsz}, Q, {self.num_logits}], got {tuple(lg.shape)}")
        if bx.shape != lg.shape[:2] + (4,):
            raise ValueError(f"{name}['pred_boxes']: expected {tuple(lg.shape[:2]) + (4,)} like its pred_logits, got {tuple(bx.shape)}")
        for k, t in layer.tensors.items():
            if t.device != dev:
                raise ValueError(f"{name}['{k}']: expected device {dev} as outputs['pred_logits'], got {t.device}")

    def _check_finite(self, raw, layers: Dict[str, Layer]) -> None:
        """Every floating entry finite and (where the family asserts it) predicted sizes >= 0,
        with one device synchronization."""
        items, seen = [], set()
        for tag, layer in layers.items():
            for k, t in layer.tensors.items():
                if t.is_floating_point() and id(t) not in seen:  # the teachers are other layers' tensors
                    seen.add(id(t))
                    items.append((f"{raw[tag][0]}['{k}']", t))
        # one sum per tensor (see _checks.check_finite); a finite tensor whose sum overflows is
        # told apart below by the exact test
        flags = [torch.isfinite(t.detach().sum(dtype=compute_dtype(t))) for _, t in items]
        sizes = [(f"{raw[tag][0]}['pred_boxes']", l.boxes) for tag, l in layers.items()] if self.check_box_sizes else []
        flags += [(b.detach()[..., 2:] >= 0).all() for _, b in sizes]
        if not flags:
            return
        ok = torch.stack(flags).tolist()
        for (name, t), good in zip(items, ok):
            bad = None if good else (~torch.isfinite(t.detach())).nonzero()
            if bad is not None and len(bad):
                pos = tuple(int(i) for i in bad[0])
                raise ValueError(f"{name}: expected finite values, got {float(t.detach()[pos])} at {pos}")
        for (name, b), good in zip(sizes, ok[len(items):]):
            if not good:
                pos = tuple(int(i) for i in (b.detach()[..., 2:] < 0).nonzero()[0][:-1])
                raise ValueError(f"{name}: expected cxcywh boxes with w >= 0 and h >= 0, got {b.detach()[pos].tolist()} at {pos}")

    # ------------------------------------------------------------------ matching and normalizers
    def match(self, inputs: SetInputs, tags: Sequence[str]) -> Dict[str, Assignment]:
        """Hungarian matchings of the layers ``tags`` (one matcher call, one host copy)."""
        layers = [inputs.layers[t] for t in tags]
        found = self.matcher.match_layers([(l.logits, l.boxes) for l in layers], inputs.targets)
        return dict(zip(tags, found))

    def box_weight(self, layer: Layer, asg: Assignment) -> Optional[Tensor]:
        """RT-DETRv2's ``get_loss_meta_info``: with ``boxes_weight_format`` "iou" / "giou", the
        IoU / GIoU of the detached matched boxes (the VFL score and the GIoU loss's weight)."""
        if self.boxes_weight_format is None:
            return None
        src, tgt = matched_boxes(layer, asg)
        return matched_iou(src, tgt, kind=self.boxes_weight_format, clamp_sizes=not self.check_box_sizes)

    def reduce_counts(self, counts: Sequence[float], device: torch.device) -> List[float]:
        """Batch-wide counts as Python floats, averaged over ranks (one collective, in float64:
        exact for the originals' integer counts, which they reduce in float32) when
        ``reduce_across_ranks`` and distributed."""
        if not self.reduce_across_ranks:
            return [float(c) for c in counts]
        return self.global_mean(torch.tensor([float(c) for c in counts], dtype=torch.float64, device=device)).tolist()

    def assignment(self, inputs: SetInputs, prepared: Any) -> Assignment:
        layers = self.layer_assignments(inputs)
        main = layers["main"]
        return Assignment(
            main.batch_index, main.pred_index, main.target_index, main.boxes, main.labels, main.weights,
            main.batch_size, main.num_preds, extras={**main.extras, "layers": layers},
        )

    def layer_assignments(self, inputs: SetInputs) -> Dict[str, Assignment]:
        """The assignment of every layer that has one, by tag (subclasses)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ output
    def weigh(self, raw: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """(components under the original's keys with the original's values, the weighted
        graph-connected terms that sum to the total). Default (RT-DETR, D-FINE, DEIM): each
        term times ``weight_dict`` of its base key, terms without a weight dropped."""
        terms = {}
        for k, v in raw.items():
            base = self.base_key(k)
            if base in self.weight_dict:
                terms[k] = v * self.weight_dict[base]
        return dict(terms), terms

    def base_key(self, key: str) -> str:
        for base in sorted(self.term_methods, key=len, reverse=True):
            if key == base or key.startswith(base + "_"):
                return base
        return key

    def output(self, inputs: SetInputs, prepared: Any, assignment: Assignment, raw: Dict[str, Tensor]) -> LossOutput:
        components, terms = self.weigh(raw)
        total = torch.stack(list(terms.values())).sum() if terms else inputs.layers["main"].logits.sum() * 0
        with torch.no_grad():
            stats = self.finalize_stats(self.stats(inputs, prepared, assignment, raw))
        return LossOutput(
            total=total,
            components={k: v.detach() for k, v in components.items()},
            stats=stats,
            terms=terms,
        )

    def stats(self, inputs: SetInputs, prepared: Any, assignment: Assignment, raw: Dict[str, Tensor]) -> Dict[str, Any]:
        main = inputs.layers["main"]
        src, tgt = matched_boxes(main, assignment)
        iou = matched_iou(src, tgt, clamp_sizes=not self.check_box_sizes)
        return {
            "num_pos": assignment.num_pos,
            "num_targets": inputs.targets.total,
            "iou_mean": iou.mean() if iou.numel() else 0.0,
            "normalizer": inputs.normalizers["num_boxes"],
            "assignments": assignment.extras["layers"],
        }

    # ------------------------------------------------------------------ decode
    def decode(self, outputs: Mapping[str, Any], image_size: Tuple[float, float] = (1.0, 1.0)) -> Decoded:
        """Last-layer boxes as xyxy in pixels of ``image_size`` (h, w) and class scores in 0..1
        (sigmoid; DETR: softmax without the no-object class)."""
        main = self._layer_dict("outputs", outputs)
        logits = check_floating("outputs['pred_logits']", main["pred_logits"])
        boxes = check_floating("outputs['pred_boxes']", main["pred_boxes"])
        h, w = (float(v) for v in image_size)
        dt = compute_dtype(logits, boxes)
        xyxy = cxcywh_to_xyxy(upcast(boxes, dt)) * torch.tensor([w, h, w, h], dtype=dt, device=boxes.device)
        return Decoded(xyxy, self.scores(upcast(logits, dt)))

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


#: DETR's loss groups and the keys they return.
DETR_GROUPS = {"labels": "loss_labels", "boxes": "loss_boxes", "cardinality": "loss_cardinality"}


class DETRLoss(SetCriterion):
    """DETR's set criterion, equal to facebookresearch/detr ``SetCriterion`` (formula and source
    in the module docstring).

    Args (defaults: DETR's ``main.py`` / ``build``):
        num_classes: object classes; ``pred_logits`` has ``num_classes + 1`` logits (the last is
            no-object; DETR's COCO model uses 91 + 1).
        matcher: a :class:`~detloss.HungarianMatcher` (DETR's ``set_cost_class=1,
            set_cost_bbox=5, set_cost_giou=2``).
        weight_dict: weight of each returned key, aux keys included (``loss_ce_0`` ...); a key
            without a weight is reported in ``components`` but not trained, as in DETR's
            engine. None: ``loss_ce`` 1, ``loss_bbox`` 5, ``loss_giou`` 2 for every layer (DETR's
            ``build`` with ``aux_loss``).
        eos_coef: class weight of no-object (0.1).
        losses: groups among "labels" (``loss_ce``, ``class_error``), "boxes" (``loss_bbox``,
            ``loss_giou``), "cardinality" (``cardinality_error``); DETR's
            ``["labels", "boxes", "cardinality"]``.
        reduce_across_ranks: average the number of boxes over ranks (DETR does when
            distributed) and also the cross-entropy's weight sum (DETR divides ``loss_ce`` by
            its rank's own), so that DDP's averaged gradient equals the whole batch's. Off: no
            collective (each rank its own normalizers).

    Call ``loss_fn(outputs, targets)``: ``outputs`` DETR's dict (``pred_logits [B, Q, C + 1]``,
    ``pred_boxes [B, Q, 4]`` normalized cxcywh, optional ``aux_outputs``: a list of such dicts,
    earlier layers first), ``targets`` a list of ``{"labels": int64 [n], "boxes": [n, 4]}``
    (normalized cxcywh; ``n`` may be 0). Returns a :class:`~detloss.LossOutput`: ``components``
    DETR's loss dict (unweighted, as DETR returns it), ``terms`` the weighted trained ones,
    ``total`` their sum; ``stats`` num_pos, num_targets, iou_mean, normalizer (the number of
    boxes), ``assignments`` (tag -> Assignment).

    Differences: float16 / bfloat16 inputs are computed in float32; a zero-union pair has GIoU 0
    (DETR: NaN); more targets than queries match ``Q`` of them (as DETR) and all count in the
    normalizer.
    """

    name = "detr"
    term_methods = {"loss_ce": "loss_labels", "loss_bbox": "loss_boxes", "loss_giou": "loss_boxes"}
    layer_groups = (("aux_outputs", "aux", True),)
    loss_groups = DETR_GROUPS

    def __init__(
        self,
        num_classes: int,
        matcher: Optional[HungarianMatcher] = None,
        weight_dict: Optional[Mapping[str, float]] = None,
        eos_coef: float = 0.1,
        losses: Sequence[str] = ("labels", "boxes", "cardinality"),
        *,
        reduce_across_ranks: bool = False,
    ) -> None:
        self._default_weights = weight_dict is None
        if weight_dict is None:
            weight_dict = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
        if matcher is None:
            matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
        super().__init__(num_classes, matcher, weight_dict, losses, per_layer_weights=True,
                         reduce_across_ranks=reduce_across_ranks)
        eos = float(eos_coef)
        if not 0 <= eos <= 1e6 or not math.isfinite(eos):
            raise ValueError(f"eos_coef: expected a finite number >= 0, got {eos_coef!r}")
        self.eos_coef = eos
        weight = torch.ones(num_classes + 1)
        weight[-1] = eos
        self.register_buffer("empty_weight", weight)

    @property
    def num_logits(self) -> int:
        return self.num_classes + 1

    def suffix(self, tag: str) -> str:
        return "" if tag == "main" else "_" + tag.split("_")[1]

    def scores(self, logits: Tensor) -> Tensor:
        return logits.softmax(-1)[..., :-1]

    def weigh(self, raw: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        terms = {}
        for k, v in raw.items():
            if k.startswith(("class_error", "cardinality_error")):
                continue
            w = self.weight_dict.get(self.base_key(k) if self._default_weights else k)
            if w is not None:
                terms[k] = v * w
        return dict(raw), terms

    def layer_assignments(self, inputs: SetInputs) -> Dict[str, Assignment]:
        asg = self.match(inputs, list(inputs.layers))
        q = inputs.layers["main"].num_queries
        matched = sum(min(n, q) for n in inputs.targets.counts)
        # the cross-entropy's weight sum (every layer matches the same number of pairs), with the
        # buffer's value of eos_coef (float32, as DETR's empty_weight)
        eos = float(self.empty_weight[-1])
        ce_sum = (inputs.batch_size * q - matched) * eos + matched
        num_boxes, ce_sum = self.reduce_counts([inputs.targets.total, ce_sum], inputs.device)
        inputs.normalizers.update(num_boxes=max(num_boxes, 1.0), ce_weight_sum=ce_sum)
        return asg

    def compute_terms(self, inputs: SetInputs, prepared: Any, assignment: Assignment) -> Dict[str, Tensor]:
        raw: Dict[str, Tensor] = {}
        layers = assignment.extras["layers"]
        boxes: Dict[str, Dict[str, Tensor]] = {}
        if ("boxes" in self.losses and len(inputs.layers) > 1  # every layer's pairs at once, unless
                and type(self).loss_boxes is DETRLoss.loss_boxes):  # a subclass redefines the term
            tags = list(inputs.layers)
            pairs = [matched_boxes(inputs.layers[t], layers[t]) for t in tags]
            boxes = dict(zip(tags, layers_box_terms(pairs, inputs.normalizers["num_boxes"])))
        for tag, layer in inputs.layers.items():
            for group in self.losses:
                if group == "boxes" and tag in boxes:
                    out = boxes[tag]
                else:
                    out = getattr(self, self.loss_groups[group])(layer, layers[tag], inputs, log=tag == "main")
                raw.update({k + layer.suffix: v for k, v in out.items()})
        return raw

    def loss_labels(self, layer: Layer, asg: Assignment, inputs: SetInputs, log: bool = True) -> Dict[str, Tensor]:
        logits = layer.logits
        bsz, nq, nl = logits.shape
        target = torch.full((bsz, nq), self.num_classes, dtype=torch.int64, device=logits.device)
        target[asg.batch_index, asg.pred_index] = asg.labels
        weight = self.empty_weight.to(device=logits.device, dtype=logits.dtype)
        ce = F.cross_entropy(logits.reshape(-1, nl), target.reshape(-1), weight=weight, reduction="sum")
        ce_sum = inputs.normalizers["ce_weight_sum"]
        out = {"loss_ce": ce / ce_sum if ce_sum > 0 else ce * 0}
        if log:
            with torch.no_grad():
                if asg.num_pos:
                    top1 = logits[asg.batch_index, asg.pred_index].argmax(-1)
                    acc = (top1 == asg.labels).to(logits.dtype).mean() * 100
                else:
                    acc = torch.zeros((), dtype=logits.dtype, device=logits.device)
                out["class_error"] = 100 - acc
        return out

    def loss_boxes(self, layer: Layer, asg: Assignment, inputs: SetInputs, log: bool = True) -> Dict[str, Tensor]:
        src, tgt = matched_boxes(layer, asg)
        return box_terms(src, tgt, inputs.normalizers["num_boxes"])

    @torch.no_grad()
    def loss_cardinality(self, layer: Layer, asg: Assignment, inputs: SetInputs, log: bool = True) -> Dict[str, Tensor]:
        logits = layer.logits
        card = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).to(torch.float32)
        lengths = torch.tensor(inputs.targets.counts, dtype=torch.float32, device=logits.device)
        return {"cardinality_error": (card - lengths).abs().mean()}
