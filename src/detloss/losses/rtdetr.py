"""RT-DETR's loss in its two released forms: lyuwenyu's RT-DETRv2 criterion and ultralytics'.

``convention="rtdetrv2"`` (Lv et al. 2024, arXiv:2407.17140; lyuwenyu/RT-DETR
``rtdetrv2_pytorch/src/zoo/rtdetr/rtdetrv2_criterion.py`` ``RTDETRCriterionv2``), per layer
with its matched pairs ``(q, t)``, ``N_b`` = target boxes in the batch (averaged over ranks when
``reduce_across_ranks``; at least 1), ``IoU_q`` the detached IoU of the pair::

    loss_vfl  = Q / N_b * sum_{b, q} mean_c VFL(logit_bqc, IoU_q [c = y_t], [c = y_t])
                VFL = BCE(x, s) * (alpha * sg(sigmoid(x))^gamma * (1 - l) + s)
    loss_bbox = sum |box_q - box_t|_1 / N_b
    loss_giou = sum (1 - GIoU(box_q, box_t)) / N_b
    each returned times weight_dict[key]; total = the sum of the returned values

over the last decoder layer (no suffix), the earlier ones (``_aux_i``; matched afresh unless
``share_matched_indices``), the denoising layers (``_dn_i``: query ``dn_positive_idx[b]`` learns
target ``k mod n_b``; normalizer ``N_b * dn_num_group``) and the encoder output (``_enc_i``,
matched afresh). ``boxes_weight_format="iou"`` / ``"giou"`` replaces the VFL score by the IoU /
GIoU of the detached boxes and multiplies each GIoU loss by it.

``convention="ultralytics"`` (ultralytics 8.4 ``ultralytics/models/utils/loss.py``
``RTDETRDetectionLoss`` / ``DETRLoss``): the same matching (class cost weight 2, ``1 - GIoU``),
with ``M`` = the number of matched pairs of the layer on this rank::

    loss_class = gain_class * Q / max(M, 1) * sum_{b, q} mean_c VFL_u(logit, IoU_q [c = y_t], [c = y_t])
                 VFL_u = BCE(x, s) * (alpha * sigmoid(x)^gamma * (1 - l) + s * l)  (weight not detached;
                 sigmoid focal loss instead when M = 0 or use_vfl=False; BCE with the IoU
                 targets, not normalized, when use_fl=False)
    loss_bbox  = gain_bbox * sum |box_q - box_t|_1 / M         (0 when M = 0)
    loss_giou  = gain_giou * sum (1 - GIoU_u) / M               (ultralytics' bbox_iou, eps 1e-7)

for the last decoder layer; ``_aux`` keys are the SUMS over the other layers (the encoder output
first); ``_dn`` / ``_aux_dn`` the same over the denoising layers (all six 0 without ``dn_meta``).
Ultralytics never reduces across ranks.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import functional as F
from .._checks import check_choice
from ..assign.base import Assignment
from ..assign.hungarian import HungarianMatcher, SetTargets, pairs_to_assignment
from ..functional import detr_terms as T
from .detr import Layer, SetCriterion, SetInputs, box_terms, class_targets, layer_sums, matched_boxes, matched_iou

__all__ = ["RTDETRLoss", "RTDETR_CONVENTIONS", "denoising_pairs"]

RTDETR_CONVENTIONS = ("rtdetrv2", "ultralytics")
#: Per convention: alpha, gamma of the classification loss (RT-DETRv2 criterion's own defaults,
#: its configs use 0.75 / 2.0; ultralytics' DETRLoss).
DEFAULT_ALPHA_GAMMA = {"rtdetrv2": (0.2, 2.0), "ultralytics": (0.25, 1.5)}


def denoising_pairs(dn_meta: Mapping[str, Any], targets: SetTargets, num_queries: int, *,
                    positive_key: str = "dn_positive_idx", gt_key: Optional[str] = None) -> Assignment:
    """The denoising queries' fixed pairs as an Assignment: image ``b``'s queries
    ``dn_meta[positive_key][b]`` learn its targets in the order ``arange(n_b)`` tiled
    ``dn_num_group`` times (RT-DETRv2, D-FINE, DEIM ``get_cdn_matched_indices``), or
    ``dn_meta[gt_key][b]`` (indices into the batch's concatenated targets, ultralytics'
    ``dn_gt_idx``) repeated so."""
    if not isinstance(dn_meta, Mapping) or "dn_num_group" not in dn_meta:
        raise TypeError("outputs['dn_meta']: expected a dict with 'dn_num_group' and the denoising indices, got "
                        + (f"keys {sorted(dn_meta)}" if isinstance(dn_meta, Mapping) else type(dn_meta).__name__))
    groups = dn_meta["dn_num_group"]
    if isinstance(groups, Tensor):
        groups = int(groups)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 0:
        raise ValueError(f"outputs['dn_meta']['dn_num_group']: expected an int >= 0, got {groups!r}")
    positives = dn_meta.get(positive_key)
    pairs: List[Tuple[Tensor, Tensor]] = []
    for b, n in enumerate(targets.counts):
        empty = torch.zeros(0, dtype=torch.int64)
        if gt_key is None and n == 0:
            pairs.append((empty, empty))
            continue
        if positives is None or len(positives) != len(targets.counts):
            raise ValueError(f"outputs['dn_meta']['{positive_key}']: expected one index tensor per image "
                             f"({len(targets.counts)}), got {None if positives is None else len(positives)}")
        q = torch.as_tensor(positives[b]).reshape(-1).long().cpu()
        if gt_key is None:
            t = torch.arange(n, dtype=torch.int64).repeat(groups)
        else:
            t = torch.as_tensor(dn_meta[gt_key][b]).reshape(-1).long().cpu().repeat(groups) - targets.offsets[b]
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
                raise ValueError(f"outputs['dn_meta']['{gt_key}'][{b}]: expected indices of image {b}'s targets "
                                 f"(rows {targets.offsets[b]}..{targets.offsets[b] + n - 1} of the batch), got "
                                 f"{(t + targets.offsets[b]).unique().tolist()}")
        if q.numel() != t.numel():
            raise ValueError(f"outputs['dn_meta']['{positive_key}'][{b}]: expected {t.numel()} denoising queries "
                             f"({n} targets x {groups} groups), got {q.numel()}")
        if q.numel() and (int(q.min()) < 0 or int(q.max()) >= num_queries):
            raise ValueError(f"outputs['dn_meta']['{positive_key}'][{b}]: expected query indices in "
                             f"[0, {num_queries}), got {q.min().item()}..{q.max().item()}")
        pairs.append((q, t))
    return pairs_to_assignment(pairs, targets, num_queries, extras={"indices": pairs, "dn_num_group": groups})


class RTDETRLoss(SetCriterion):
    """RT-DETR's loss: lyuwenyu's RT-DETRv2 criterion or ultralytics' ``RTDETRDetectionLoss``
    (formulas and sources in the module docstring).

    Args:
        num_classes: object classes (``pred_logits [..., num_classes]``, sigmoid).
        convention: ``"rtdetrv2"`` or ``"ultralytics"``.
        matcher: a :class:`~detloss.HungarianMatcher`; default the convention's
            (``cost_class=2, cost_bbox=5, cost_giou=2, use_focal=True, alpha=0.25, gamma=2``;
            ultralytics: ``convention="ultralytics"``).
        weight_dict: (rtdetrv2) weight per base key, applied to every layer; terms without a
            weight are not returned. Default RT-DETRv2's configs: ``loss_vfl`` 1, ``loss_bbox`` 5,
            ``loss_giou`` 2.
        losses: (rtdetrv2) groups among "vfl", "boxes"; default ``["vfl", "boxes"]``.
        alpha, gamma: of the VFL (rtdetrv2: the criterion's defaults 0.2, 2.0 - its configs set
            0.75, 2.0; ultralytics: 0.25, 1.5).
        boxes_weight_format: (rtdetrv2) None, "iou" or "giou" (see the module docstring).
        share_matched_indices: (rtdetrv2) aux layers reuse the last layer's matching (False).
        loss_gain: (ultralytics) ``{"class": 1, "bbox": 5, "giou": 2}``.
        use_fl, use_vfl: (ultralytics) focal / varifocal classification (True, True as
            ``RTDETRDetectionModel`` builds it; ``DETRLoss``'s own default is use_vfl=False).
        reduce_across_ranks: average the normalizers over ranks (number of boxes; ultralytics:
            number of matched pairs) so that DDP's averaged gradient equals the whole batch's.
            RT-DETRv2 does it whenever distributed; ultralytics never. Off: no collective.

    Call ``loss_fn(outputs, targets)``: ``outputs`` RT-DETRv2's dict: ``pred_logits [B, Q, C]``,
    ``pred_boxes [B, Q, 4]`` (normalized cxcywh) of the last decoder layer, ``aux_outputs`` the
    earlier layers, ``dn_aux_outputs`` the denoising layers (``[B, Q_dn, .]``) with ``dn_meta``
    (``dn_positive_idx``: per image the positive denoising queries, ``dn_num_group``),
    ``enc_aux_outputs`` the encoder output(s). With ``convention="ultralytics"`` the same layout
    holds ultralytics' stacked layers: ``pred_*`` = the last decoder layer, ``aux_outputs`` =
    [encoder output, decoder layers 0 .. L-2], ``dn_aux_outputs`` = every denoising layer, and
    ``dn_meta`` has ultralytics' keys ``dn_pos_idx`` and ``dn_gt_idx`` (per image, indices into
    the batch's concatenated targets) and ``dn_num_group``. ``targets``: a list of
    ``{"labels": int64 [n], "boxes": [n, 4] cxcywh}``. Returns a :class:`~detloss.LossOutput`
    whose ``components`` are the original's loss dict (already weighted, as both originals
    return it) and ``total`` its sum.

    Differences: float16 / bfloat16 inputs are computed in float32, float64 stays float64
    (ultralytics rounds its class loss to float32); a pair with zero union has IoU 0 (the
    originals: NaN).
    """

    name = "rtdetr"
    loss_groups = {"vfl": "loss_labels_vfl", "boxes": "loss_boxes"}

    def __init__(
        self,
        num_classes: int,
        convention: str = "rtdetrv2",
        matcher: Optional[HungarianMatcher] = None,
        weight_dict: Optional[Mapping[str, float]] = None,
        losses: Optional[Sequence[str]] = None,
        alpha: Optional[float] = None,
        gamma: Optional[float] = None,
        *,
        boxes_weight_format: Optional[str] = None,
        share_matched_indices: bool = False,
        loss_gain: Optional[Mapping[str, float]] = None,
        use_fl: bool = True,
        use_vfl: bool = True,
        reduce_across_ranks: bool = False,
    ) -> None:
        convention = check_choice("convention", convention, RTDETR_CONVENTIONS)
        ultra = convention == "ultralytics"
        if ultra:
            for name, value, default in (("weight_dict", weight_dict, None), ("losses", losses, None),
                                         ("boxes_weight_format", boxes_weight_format, None),
                                         ("share_matched_indices", share_matched_indices, False)):
                if value != default:
                    raise ValueError(f"{name}: an option of convention='rtdetrv2' (ultralytics has loss_gain, "
                                     f"use_fl, use_vfl), got {value!r}")
            gain = {"class": 1.0, "bbox": 5.0, "giou": 2.0} if loss_gain is None else dict(loss_gain)
            if set(gain) != {"class", "bbox", "giou"}:
                raise ValueError(f"loss_gain: expected the keys 'class', 'bbox', 'giou', got {sorted(gain)}")
            weight_dict = {f"loss_{k}": v for k, v in gain.items()}
            losses = ["labels"]
            self.term_methods = {"loss_class": "loss_layer", "loss_bbox": "loss_layer", "loss_giou": "loss_layer"}
            self.loss_groups = {"labels": "loss_layer"}
            self.layer_groups = (("aux_outputs", "aux", True), ("dn_aux_outputs", "dn", True))
            self.check_box_sizes = False
        else:
            if loss_gain is not None:
                raise ValueError(f"loss_gain: an option of convention='ultralytics' (use weight_dict), got {loss_gain!r}")
            weight_dict = {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0} if weight_dict is None else weight_dict
            losses = ["vfl", "boxes"] if losses is None else losses
            self.term_methods = {"loss_vfl": "loss_labels_vfl", "loss_bbox": "loss_boxes", "loss_giou": "loss_boxes"}
            self.layer_groups = (("aux_outputs", "aux", True), ("dn_aux_outputs", "dn", True),
                                 ("enc_aux_outputs", "enc", True))
        if matcher is None:
            matcher = HungarianMatcher(2, 5, 2, use_focal=True, alpha=0.25, gamma=2.0,
                                       convention="ultralytics" if ultra else "detr")
        super().__init__(num_classes, matcher, weight_dict, losses, per_layer_weights=False,
                         reduce_across_ranks=reduce_across_ranks)
        a0, g0 = DEFAULT_ALPHA_GAMMA[convention]
        self.convention = convention
        self.alpha = float(a0 if alpha is None else alpha)
        self.gamma = float(g0 if gamma is None else gamma)
        if boxes_weight_format is not None:
            check_choice("boxes_weight_format", boxes_weight_format, ("iou", "giou"))
        self.boxes_weight_format = boxes_weight_format
        self.share_matched_indices = bool(share_matched_indices)
        self.use_fl, self.use_vfl = bool(use_fl), bool(use_vfl)

    @staticmethod
    def ultralytics_outputs(
        dec_bboxes: Tensor,
        dec_scores: Tensor,
        dn_bboxes: Optional[Tensor] = None,
        dn_scores: Optional[Tensor] = None,
        dn_meta: Optional[Mapping[str, Any]] = None,
    ) -> Dict[str, Any]:
        """The ``outputs`` dict of ``convention="ultralytics"`` from ultralytics' stacked tensors,
        as ``RTDETRDetectionLoss`` takes them: ``dec_bboxes [L, B, Q, 4]`` / ``dec_scores [L, B, Q,
        C]`` (the encoder output first, the last decoder layer last) and the denoising layers
        ``dn_bboxes`` / ``dn_scores [L_dn, B, Q_dn, .]`` with their ``dn_meta``.

        The layers are taken with ``unbind``, whose backward writes the stack's gradient once;
        indexing ``dec_scores[i]`` per layer instead makes backward zero-fill a gradient of the
        whole stack for every layer (7 layers of ``[8, 300, 80]``: about 12 ms of the loss's
        backward on 2 CPU threads)."""
        for name, t in (("dec_bboxes", dec_bboxes), ("dec_scores", dec_scores)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a stacked tensor [L, B, Q, .], got {got}")
        if dec_bboxes.shape[0] != dec_scores.shape[0] or dec_bboxes.shape[0] < 1:
            raise ValueError(f"dec_bboxes, dec_scores: expected the same number (at least 1) of layers, "
                             f"got {dec_bboxes.shape[0]} and {dec_scores.shape[0]}")
        if (dn_bboxes is None) != (dn_scores is None):
            raise ValueError("dn_bboxes, dn_scores: expected both or neither")
        boxes, scores = dec_bboxes.unbind(0), dec_scores.unbind(0)
        out: Dict[str, Any] = {
            "pred_logits": scores[-1], "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": s, "pred_boxes": b} for s, b in zip(scores[:-1], boxes[:-1])],
        }
        if dn_bboxes is not None:
            out["dn_aux_outputs"] = [{"pred_logits": s, "pred_boxes": b}
                                     for s, b in zip(dn_scores.unbind(0), dn_bboxes.unbind(0))]  # type: ignore[union-attr]
            out["dn_meta"] = dn_meta
        return out

    def extra_repr(self) -> str:
        return f"convention={self.convention!r}, " + super().extra_repr() + f", alpha={self.alpha}, gamma={self.gamma}"

    # ------------------------------------------------------------------ matching
    def layer_assignments(self, inputs: SetInputs) -> Dict[str, Assignment]:
        tags = [t for t in inputs.layers if not t.startswith("dn")]
        if self.share_matched_indices:
            tags = [t for t in tags if not t.startswith("aux")]
        layers = self.match(inputs, tags)
        for t in inputs.layers:
            if t.startswith("aux") and t not in layers:
                layers[t] = layers["main"]
        dn_tags = [t for t in inputs.layers if t.startswith("dn")]
        if self.convention == "ultralytics" and inputs.dn_meta is None:
            for t in dn_tags:  # its denoising terms are 0 without dn_meta
                del inputs.layers[t]
            dn_tags = []
        if dn_tags:
            if inputs.dn_meta is None:
                raise ValueError("outputs['dn_meta']: expected the denoising meta data with dn_aux_outputs, got None")
            nq = inputs.layers[dn_tags[0]].num_queries
            dn = denoising_pairs(inputs.dn_meta, inputs.targets, nq,
                                 **({"positive_key": "dn_pos_idx", "gt_key": "dn_gt_idx"} if self.convention == "ultralytics" else {}))
            for t in dn_tags:
                layers[t] = dn
        if self.convention == "ultralytics":
            matched = [layers["main"].num_pos] + ([layers[dn_tags[0]].num_pos] if dn_tags else [])
            counts = self.reduce_counts([inputs.targets.total] + matched, inputs.device)
            inputs.normalizers.update(num_boxes=max(counts[0], 1.0), matched=counts[1],
                                      dn_matched=counts[2] if dn_tags else 0.0)
        else:
            (num_boxes,) = self.reduce_counts([inputs.targets.total], inputs.device)
            inputs.normalizers["num_boxes"] = max(num_boxes, 1.0)
        return layers

    # ------------------------------------------------------------------ terms
    def compute_terms(self, inputs: SetInputs, prepared: Any, assignment: Assignment) -> Dict[str, Tensor]:
        layers = assignment.extras["layers"]
        if self.convention == "ultralytics":
            return self._ultralytics_terms(inputs, layers)
        raw: Dict[str, Tensor] = {}
        nb = inputs.normalizers["num_boxes"]
        for tag, layer in inputs.layers.items():
            asg = layers[tag]
            norm = nb * asg.extras["dn_num_group"] if tag.startswith("dn") else nb
            for group in self.losses:
                out = getattr(self, self.loss_groups[group])(layer, asg, norm, self.box_weight(layer, asg))
                raw.update({k + layer.suffix: v for k, v in out.items()})
        return raw

    def loss_labels_vfl(self, layer: Layer, asg: Assignment, num_boxes: float, values: Optional[Tensor]) -> Dict[str, Tensor]:
        if values is None:
            values = matched_iou(*matched_boxes(layer, asg))
        label, score = class_targets(layer.logits, asg, values)
        vfl = T.set_varifocal_loss(layer.logits, score, label, alpha=self.alpha, gamma=self.gamma)
        return {"loss_vfl": vfl.mean(1).sum() * layer.num_queries / num_boxes}

    def loss_boxes(self, layer: Layer, asg: Assignment, num_boxes: float, weight: Optional[Tensor]) -> Dict[str, Tensor]:
        src, tgt = matched_boxes(layer, asg)
        return box_terms(src, tgt, num_boxes, giou_weight=weight)

    # ------------------------------------------------------------------ ultralytics
    def weigh(self, raw: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        if self.convention == "ultralytics":  # its terms carry their gains already
            return dict(raw), dict(raw)
        return super().weigh(raw)

    def _ultralytics_terms(self, inputs: SetInputs, layers: Dict[str, Assignment]) -> Dict[str, Tensor]:
        raw: Dict[str, Tensor] = {}
        zero = inputs.layers["main"].logits.new_zeros(())
        for branch, prefix, matched in (("", None, "matched"), ("_dn", "dn", "dn_matched")):
            tags = [t for t in inputs.layers if (t.startswith("dn") if prefix else not t.startswith("dn"))]
            names = [f"loss_{k}{branch}" for k in ("class", "bbox", "giou")]
            aux_names = [f"loss_{k}_aux{branch}" for k in ("class", "bbox", "giou")]
            if not tags:
                raw.update({k: zero for k in names + aux_names})
                continue
            norm = inputs.normalizers[matched]
            if prefix is None:  # the last decoder layer is "main", listed first
                tags = tags[1:] + tags[:1]
            fused = T.fused_for_layers(inputs.layers[t].logits for t in tags)
            group = [(inputs.layers[t], layers[t]) for t in tags]
            terms = [self.loss_layer(layer, asg, norm, fused, boxes)
                     for (layer, asg), boxes in zip(group, self._box_terms(group, norm))]
            *earlier, last = terms
            raw.update(dict(zip(names, last)))
            sums = [zero, zero, zero]
            for t in earlier:
                sums = [s + v for s, v in zip(sums, t)]
            raw.update(dict(zip(aux_names, sums)))
        return raw

    def _box_terms(self, group: Sequence[Tuple[Layer, Assignment]], num_matched: float) -> List[Tuple[Tensor, Tensor, Tensor]]:
        """Per layer of ``group``: the detached IoU of its matched pairs (the VFL's score) and its
        L1 and GIoU sums over ``max(num_matched, 1)``, gains applied (ultralytics ``DETRLoss``
        ``_get_loss_bbox``). The pairs of every layer are computed in one call of each formula
        (their sums per layer by one ``index_add``), not one call per layer."""
        g = self.weight_dict
        pairs = [matched_boxes(layer, asg) for layer, asg in group]
        counts = [int(src.shape[0]) for src, _ in pairs]
        src = torch.cat([p[0] for p in pairs]) if len(pairs) > 1 else pairs[0][0]
        tgt = torch.cat([p[1] for p in pairs]) if len(pairs) > 1 else pairs[0][1]
        with torch.no_grad():
            iou = F.aligned_box_iou(src.detach(), tgt, kind="iou", box_format="cxcywh", convention="yolov5",
                                    validate=False)
        n = max(num_matched, 1.0)
        per_pair = torch.stack((F.l1_loss(src, tgt, reduction="none").sum(-1),
                                1.0 - F.aligned_box_iou(src, tgt, kind="giou", box_format="cxcywh",
                                                        convention="yolov5", validate=False)), -1)
        sums = layer_sums(per_pair, counts) / n
        l1, giou = (g["loss_bbox"] * sums[:, 0]).unbind(0), (g["loss_giou"] * sums[:, 1]).unbind(0)
        return list(zip(iou.split(counts), l1, giou))

    def loss_layer(self, layer: Layer, asg: Assignment, num_matched: float, fused: Optional[bool] = None,
                   boxes: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """ultralytics ``DETRLoss._get_loss``: (class, bbox, giou) of one layer, gains applied
        (``fused``: the class loss's dense pass compiled, see ``detr_terms.fused_for_layers``;
        ``boxes``: the layer's entry of :meth:`_box_terms`, computed here when None)."""
        g = self.weight_dict
        iou, l1, giou = self._box_terms([(layer, asg)], num_matched)[0] if boxes is None else boxes
        logits, nq = layer.logits, layer.num_queries
        # the one-hot targets [B, Q, C] are never built (detr_terms.onehot_class_loss)
        if self.use_fl:
            kind = "varifocal" if asg.num_pos and self.use_vfl else "focal"
            cls = T.onehot_class_loss(logits, asg.batch_index, asg.pred_index, asg.labels, iou, kind=kind,
                                      alpha=self.alpha, gamma=self.gamma, compiled=fused)
            cls = cls / nq / (max(num_matched, 1.0) / nq)
        else:
            cls = T.onehot_class_loss(logits, asg.batch_index, asg.pred_index, asg.labels, iou, kind="bce",
                                      compiled=fused) / nq
        if not asg.num_pos:
            empty = layer.boxes[..., :0].sum()
            return cls * g["loss_class"], empty, empty
        return cls * g["loss_class"], l1, giou
