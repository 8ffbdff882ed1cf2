"""D-FINE's criterion (:class:`DFINELoss`) and DEIM's (:class:`DEIMLoss`).

D-FINE (Peng et al. 2024, arXiv:2410.13842; Peterande/D-FINE ``src/zoo/dfine/dfine_criterion.py``)
is RT-DETRv2's loss plus two "local" terms on the decoder's per-side bin distributions
``pred_corners [B, Q, 4 (reg_max + 1)]``, and a union matching for the box terms:

- GO set: per image, the union of the matchings of the last decoder layer, the earlier ones, the
  first layer's pre-head (``pre_outputs``) and the encoder output; each query keeps the target
  it was matched to most often (ties: the smallest target index); ``N_go`` = its pairs (averaged
  over ranks when ``reduce_across_ranks``; at least 1). ``loss_bbox`` / ``loss_giou`` / ``loss_fgl``
  / ``loss_ddf`` of every non-denoising layer use the GO set and ``N_go``; ``loss_vfl`` each
  layer's own matching and ``N_b`` (the number of boxes), as in RT-DETRv2.
- FGL (``loss_fgl``, layers with ``pred_corners``): the bin targets of the matched pairs
  (:func:`~detloss.functional.detr_terms.fgl_targets` of the reference points ``ref_points``;
  computed once per call from the first layer that needs them: the last decoder layer, or the
  first denoising layer, and reused by the others, as the original caches them), loss
  :func:`~detloss.functional.detr_terms.fine_grained_localization_loss` weighted by each pair's
  IoU, summed, / ``N_go``.
- DDF (``loss_ddf``, layers with ``teacher_corners``, i.e. every earlier decoder layer, taught by
  the last one, and every denoising layer, taught by the last denoising one): the KL term of
  :func:`~detloss.functional.detr_terms.decoupled_distillation_loss` (T = 5) on every query side,
  weighted by the teacher's top class score (the pair's IoU for matched queries), averaged
  separately over the matched sides (mean ``m+``) and the others (``m-``) and mixed as
  ``(m+ sqrt(c+) + m- sqrt(c-)) / (sqrt(c+) + sqrt(c-))`` with ``c+-`` = their counts in the main
  branch times ``8 / B``. A layer that is its own teacher (the last denoising layer) gives
  ``loss_ddf = 0``.
- Denoising layers (``dn_outputs``, ``dn_pre_outputs``: suffix ``_dn_i``, ``_dn_pre``) use their
  fixed pairs and ``N_b * dn_num_group`` for every term; with no denoising queries their terms
  are 0 (D-FINE: NaN turned to 0 by its final ``nan_to_num``).

Keys: ``loss_vfl``, ``loss_bbox``, ``loss_giou``, ``loss_fgl`` (+ ``loss_ddf``) with the suffixes
``""`` (last layer), ``_aux_i``, ``_pre``, ``_enc_i``, ``_dn_i``, ``_dn_pre``; each returned
times ``weight_dict`` of its base key; total = the sum.

DEIM (Huang et al. 2025, arXiv:2412.04234; ShihuaHuang95/DEIM ``engine/deim/deim_criterion.py``)
is D-FINE's criterion with the matchability-aware loss ``loss_mal``
(:func:`~detloss.functional.detr_terms.matchability_aware_loss`, ``Q / N_b * sum mean_c``) in
place of ``loss_vfl``, an option ``use_uni_set=False`` (each layer's own matching and ``N_b`` for
the box and local terms too), and no ``loss_ddf`` key where a layer is its own teacher.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import check_choice
from ..assign.base import Assignment
from ..assign.hungarian import HungarianMatcher, pairs_to_assignment
from ..functional import detr_terms as T
from .detr import Layer, SetCriterion, SetInputs, box_terms, class_targets, matched_boxes, matched_iou, to_xyxy
from .rtdetr import denoising_pairs

__all__ = ["DFINELoss", "DEIMLoss", "go_indices"]

#: D-FINE's ``batch_scale = 8 / B`` in the DDF mixing weights.
DDF_BATCH_SCALE = 8.0


def go_indices(assignments: Sequence[Assignment], batch_size: int, num_queries: int) -> List[Tuple[Tensor, Tensor]]:
    """D-FINE's ``_get_go_indices``: per image, the union of several layers' pairs where each
    query keeps the target it was matched to most often (ties: the smallest target index, as the
    original's stable descending sort over ``torch.unique``'s lexicographic order gives).
    Returns per-image ``(query_idx, target_idx)`` sorted by query, CPU int64."""
    b = torch.cat([a.batch_index for a in assignments]).cpu()
    q = torch.cat([a.pred_index for a in assignments]).cpu()
    t = torch.cat([a.target_index for a in assignments]).cpu()
    n = int(t.max()) + 1 if t.numel() else 1
    uniq, counts = torch.unique((b * num_queries + q) * n + t, return_counts=True)
    bq, tt = uniq // n, uniq % n
    score = counts * n + (n - 1 - tt)  # most matches first, then the smallest target
    best = torch.full((batch_size * num_queries,), -1, dtype=torch.int64).scatter_reduce(0, bq, score, "amax")
    keep = (best >= 0).nonzero().flatten()
    tgt = n - 1 - best[keep] % n
    img, qry = keep // num_queries, keep % num_queries
    return [(qry[img == i], tgt[img == i]) for i in range(batch_size)]


class DFINELoss(SetCriterion):
    """D-FINE's criterion, equal to Peterande/D-FINE ``DFINECriterion`` (formulas and sources in
    the module docstring).

    Args (defaults: the criterion's own where it has one, D-FINE's configs otherwise):
        num_classes: object classes (sigmoid logits).
        matcher: a :class:`~detloss.HungarianMatcher`; default D-FINE's (``cost_class=2,
            cost_bbox=5, cost_giou=2, use_focal=True, alpha=0.25, gamma=2``, sizes clamped at 0).
        weight_dict: weight per base key (configs: ``loss_vfl`` 1, ``loss_bbox`` 5, ``loss_giou`` 2,
            ``loss_fgl`` 0.15, ``loss_ddf`` 1.5); terms without a weight are not returned.
        losses: groups among "vfl", "boxes", "local" (configs: all three).
        alpha, gamma: of the VFL (0.2, 2.0; configs 0.75, 2.0).
        reg_max: bins - 1 per side (32): ``pred_corners`` has ``4 * (reg_max + 1)`` channels.
        boxes_weight_format: None, "iou" or "giou" (as RT-DETRv2).
        reduce_across_ranks: average ``N_b``, ``N_go`` and the DDF counts over ranks so that DDP's
            averaged gradient equals the whole batch's (D-FINE reduces ``N_b`` and ``N_go`` when
            distributed, and keeps the DDF means per rank). Off: no collective.

    Call ``loss_fn(outputs, targets)`` with D-FINE's dict: ``pred_logits``, ``pred_boxes``
    (normalized cxcywh), ``pred_corners``, ``ref_points`` (detached cxcywh), ``up``,
    ``reg_scale``, ``aux_outputs`` (earlier layers, each with ``teacher_corners`` /
    ``teacher_logits``), ``pre_outputs``, ``enc_aux_outputs``, ``dn_outputs`` and
    ``dn_pre_outputs`` with ``dn_meta`` (``dn_positive_idx``, ``dn_num_group``); ``targets`` a
    list of ``{"labels", "boxes"}``. Returns a :class:`~detloss.LossOutput`: ``components`` the
    original's loss dict (weighted), ``total`` its sum, ``stats["assignments"]`` every layer's
    matching (``"go"``: the GO set).

    Differences: float16 / bfloat16 inputs are computed in float32 and float64 stays float64
    (D-FINE cannot run in float64; it keeps its FGL targets and IoU weights in float32).
    """

    name = "dfine"
    term_methods = {"loss_vfl": "loss_labels_vfl", "loss_bbox": "loss_boxes", "loss_giou": "loss_boxes",
                    "loss_fgl": "loss_local", "loss_ddf": "loss_local"}
    loss_groups = {"vfl": "loss_labels_vfl", "boxes": "loss_boxes", "local": "loss_local"}
    layer_groups = (("aux_outputs", "aux", True), ("pre_outputs", "pre", False), ("enc_aux_outputs", "enc", True),
                    ("dn_outputs", "dn", True), ("dn_pre_outputs", "dn_pre", False))
    layer_extras = ("pred_corners", "ref_points", "teacher_corners", "teacher_logits")
    check_box_sizes = False
    #: The class loss group and its key.
    class_group = "vfl"
    #: A layer that is its own teacher returns loss_ddf = 0 (D-FINE) or nothing (DEIM).
    self_taught_ddf_zero = True
    use_uni_set = True

    def __init__(
        self,
        num_classes: int,
        matcher: Optional[HungarianMatcher] = None,
        weight_dict: Optional[Mapping[str, float]] = None,
        losses: Optional[Sequence[str]] = None,
        alpha: float = 0.2,
        gamma: float = 2.0,
        reg_max: int = 32,
        *,
        boxes_weight_format: Optional[str] = None,
        reduce_across_ranks: bool = False,
    ) -> None:
        if matcher is None:
            matcher = HungarianMatcher(2, 5, 2, use_focal=True, alpha=0.25, gamma=2.0, clamp_sizes=True)
        if weight_dict is None:
            weight_dict = {f"loss_{self.class_group}": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0,
                           "loss_fgl": 0.15, "loss_ddf": 1.5}
        losses = [self.class_group, "boxes", "local"] if losses is None else losses
        super().__init__(num_classes, matcher, weight_dict, losses, per_layer_weights=False,
                         reduce_across_ranks=reduce_across_ranks)
        if isinstance(reg_max, bool) or not isinstance(reg_max, int) or reg_max < 4 or reg_max % 2:
            raise ValueError(f"reg_max: expected an even int >= 4, got {reg_max!r}")
        self.alpha, self.gamma, self.reg_max = float(alpha), float(gamma), reg_max
        if boxes_weight_format is not None:
            check_choice("boxes_weight_format", boxes_weight_format, ("iou", "giou"))
        self.boxes_weight_format = boxes_weight_format

    # ------------------------------------------------------------------ check
    def check(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> SetInputs:
        inputs = super().check(outputs, targets)
        bins = 4 * (self.reg_max + 1)
        has_corners = False
        for tag, layer in inputs.layers.items():
            for k in ("pred_corners", "teacher_corners"):
                c = layer.tensors.get(k)
                if c is not None and c.shape != layer.logits.shape[:2] + (bins,):
                    raise ValueError(f"{tag} {k}: expected {tuple(layer.logits.shape[:2]) + (bins,)} "
                                     f"(4 * (reg_max {self.reg_max} + 1)), got {tuple(c.shape)}")
            if "pred_corners" in layer.tensors:
                has_corners = True
                if "ref_points" not in layer.tensors or layer.tensors["ref_points"].shape != layer.boxes.shape:
                    raise ValueError(f"{tag} ref_points: expected {tuple(layer.boxes.shape)} with pred_corners")
            tl = layer.tensors.get("teacher_logits")
            if ("teacher_corners" in layer.tensors) != (tl is not None) or (tl is not None and tl.shape[:2] != layer.logits.shape[:2]):
                raise ValueError(f"{tag}: expected teacher_corners and teacher_logits [B, Q, .] together")
        if has_corners and "local" in self.losses and not {"up", "reg_scale"} <= set(inputs.extras):
            raise ValueError("outputs: expected tensors 'up' and 'reg_scale' (D-FINE's weighting function) with pred_corners")
        return inputs

    # ------------------------------------------------------------------ matching
    def layer_assignments(self, inputs: SetInputs) -> Dict[str, Assignment]:
        matched = [t for t in inputs.layers if not t.startswith("dn")]
        layers = self.match(inputs, matched)
        main = inputs.layers["main"]
        go = go_indices([layers[t] for t in matched], inputs.batch_size, main.num_queries)
        layers["go"] = pairs_to_assignment(go, inputs.targets, main.num_queries, extras={"indices": go})
        dn_tags = [t for t in inputs.layers if t.startswith("dn")]
        if dn_tags:
            if inputs.dn_meta is None:
                raise ValueError("outputs['dn_meta']: expected the denoising meta data with dn_outputs, got None")
            dn = denoising_pairs(inputs.dn_meta, inputs.targets, inputs.layers[dn_tags[0]].num_queries)
            for t in dn_tags:
                layers[t] = dn
        # DDF counts of matched / other query sides: main branch (its pairs) and denoising branch
        local = layers["go"] if self.use_uni_set else layers["main"]
        sides = 4 * inputs.batch_size
        dn_q = inputs.layers[dn_tags[0]].num_queries if dn_tags else 0
        dn_pos = layers[dn_tags[0]].num_pos if dn_tags else 0
        counts = self.reduce_counts(
            [inputs.targets.total, local.num_pos, 4 * local.num_pos, sides * main.num_queries - 4 * local.num_pos,
             4 * dn_pos, sides * dn_q - 4 * dn_pos],
            inputs.device,
        )
        inputs.normalizers.update(
            num_boxes=max(counts[0], 1.0), num_boxes_go=max(counts[1], 1.0),
            ddf_pos=counts[2], ddf_neg=counts[3], ddf_dn_pos=counts[4], ddf_dn_neg=counts[5],
        )
        return layers

    # ------------------------------------------------------------------ terms
    def compute_terms(self, inputs: SetInputs, prepared: Any, assignment: Assignment) -> Dict[str, Tensor]:
        layers = assignment.extras["layers"]
        nz = inputs.normalizers
        cache: Dict[str, Tuple[Tensor, Tensor, Tensor]] = {}
        raw: Dict[str, Tensor] = {}
        for tag, layer in inputs.layers.items():
            dn = tag.startswith("dn")
            for group in self.losses:
                if dn:
                    asg = layers[tag]
                    norm = nz["num_boxes"] * asg.extras["dn_num_group"]
                else:
                    uni = self.use_uni_set and (group == "boxes" or (group == "local" and not tag.startswith("enc")))
                    asg = layers["go"] if uni else layers[tag]
                    norm = nz["num_boxes_go"] if uni else nz["num_boxes"]
                if group == "local":
                    out = self.loss_local(layer, asg, norm, inputs, cache, dn)
                else:
                    out = getattr(self, self.loss_groups[group])(layer, asg, norm, self.box_weight(layer, asg))
                raw.update({k + layer.suffix: v for k, v in out.items()})
        return raw

    @staticmethod
    def _per_box(value: Tensor, norm: float, like: Tensor) -> Tensor:
        """``value / norm``; 0 (connected to ``like``'s graph) where the original divides by 0."""
        return value / norm if norm > 0 and like.numel() else like.sum() * 0

    def class_scores(self, layer: Layer, asg: Assignment, values: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if values is None:
            values = matched_iou(*matched_boxes(layer, asg), clamp_sizes=True)
        return class_targets(layer.logits, asg, values)

    def loss_labels_vfl(self, layer: Layer, asg: Assignment, num_boxes: float, values: Optional[Tensor]) -> Dict[str, Tensor]:
        label, score = self.class_scores(layer, asg, values)
        vfl = T.set_varifocal_loss(layer.logits, score, label, alpha=self.alpha, gamma=self.gamma)
        return {"loss_vfl": self._per_box(vfl.mean(1).sum() * layer.num_queries, num_boxes, layer.logits)}

    def loss_boxes(self, layer: Layer, asg: Assignment, num_boxes: float, weight: Optional[Tensor]) -> Dict[str, Tensor]:
        src, tgt = matched_boxes(layer, asg)
        if num_boxes == 0:
            zero = layer.boxes.sum() * 0
            return {"loss_bbox": zero, "loss_giou": zero}
        return box_terms(src, tgt, num_boxes, clamp_sizes=True, giou_weight=weight)

    def loss_local(self, layer: Layer, asg: Assignment, num_boxes: float, inputs: SetInputs,
                   cache: Dict[str, Tuple[Tensor, Tensor, Tensor]], dn: bool) -> Dict[str, Tensor]:
        corners = layer.tensors.get("pred_corners")
        if corners is None:
            return {}
        r = self.reg_max + 1
        src, tgt = matched_boxes(layer, asg)
        idx = (asg.batch_index, asg.pred_index)
        branch = "dn" if dn else "main"
        if branch not in cache:  # the first layer of its branch fixes the targets (D-FINE's cache)
            ref = layer.tensors["ref_points"][idx].detach()
            cache[branch] = T.fgl_targets(ref, to_xyxy(tgt), self.reg_max, inputs.extras["reg_scale"], inputs.extras["up"])
        bins, w_right, w_left = cache[branch]
        iou = matched_iou(src, tgt, clamp_sizes=True)
        pred = corners[idx].reshape(-1, r)
        if bins.shape[0] != pred.shape[0]:
            raise ValueError(f"{layer.tag}: expected {bins.shape[0] // 4} matched boxes like the first layer of its "
                             f"branch (D-FINE reuses those FGL targets), got {pred.shape[0] // 4}")
        fgl = T.fine_grained_localization_loss(pred, bins, w_right, w_left, weight=iou.repeat_interleave(4))
        out = {"loss_fgl": self._per_box(fgl, num_boxes, corners)}
        teacher = layer.tensors.get("teacher_corners")
        if teacher is None:
            return out
        if teacher is corners or torch.equal(teacher, corners):
            if self.self_taught_ddf_zero:
                out["loss_ddf"] = corners.sum() * 0
            return out
        out["loss_ddf"] = self._ddf(layer, corners, teacher, idx, iou, inputs, dn)
        return out

    def _ddf(self, layer: Layer, corners: Tensor, teacher: Tensor, idx, iou: Tensor, inputs: SetInputs, dn: bool) -> Tensor:
        r = self.reg_max + 1
        with torch.no_grad():
            weight = layer.tensors["teacher_logits"].sigmoid().amax(-1)
            mask = torch.zeros_like(weight, dtype=torch.bool)
            mask[idx] = True
            weight[idx] = iou.to(weight.dtype)
            weight = weight.unsqueeze(-1).expand(-1, -1, 4).reshape(-1)
            mask = mask.unsqueeze(-1).expand(-1, -1, 4).reshape(-1)
        kl = T.decoupled_distillation_loss(corners.reshape(-1, r), teacher.reshape(-1, r), weight=weight)
        nz = inputs.normalizers
        c_pos, c_neg = (nz["ddf_dn_pos"], nz["ddf_dn_neg"]) if dn else (nz["ddf_pos"], nz["ddf_neg"])
        scale = DDF_BATCH_SCALE / inputs.batch_size
        w_pos, w_neg = (nz["ddf_pos"] * scale) ** 0.5, (nz["ddf_neg"] * scale) ** 0.5
        pos = kl[mask].sum() / c_pos if c_pos > 0 else kl.sum() * 0
        neg = kl[~mask].sum() / c_neg if c_neg > 0 else kl.sum() * 0
        return (pos * w_pos + neg * w_neg) / (w_pos + w_neg)


class DEIMLoss(DFINELoss):
    """DEIM's criterion, equal to ShihuaHuang95/DEIM ``DEIMCriterion`` (formulas and source in the
    module docstring): D-FINE's with ``loss_mal``.

    Args as :class:`DFINELoss`, and (defaults: the criterion's own; DEIM's configs set
    ``gamma=1.5``, ``losses=["mal", "boxes", "local"]``, ``weight_dict`` with ``loss_mal`` 1):
        losses: groups among "mal", "vfl", "boxes", "local".
        gamma: exponent of MAL's target ``IoU^gamma`` and of its negative weight (2.0), also the
            VFL's.
        mal_alpha: factor of MAL's negative weight (None: 1).
        use_uni_set: the box and local terms use the GO set and ``N_go`` (True) or each layer's
            own matching and ``N_b`` (False; the FGL targets still come from the first layer of
            each branch, as the original caches them).
    """

    name = "deim"
    term_methods = {"loss_mal": "loss_labels_mal", "loss_vfl": "loss_labels_vfl", "loss_bbox": "loss_boxes",
                    "loss_giou": "loss_boxes", "loss_fgl": "loss_local", "loss_ddf": "loss_local"}
    loss_groups = {"mal": "loss_labels_mal", "vfl": "loss_labels_vfl", "boxes": "loss_boxes", "local": "loss_local"}
    class_group = "mal"
    self_taught_ddf_zero = False

    def __init__(
        self,
        num_classes: int,
        matcher: Optional[HungarianMatcher] = None,
        weight_dict: Optional[Mapping[str, float]] = None,
        losses: Optional[Sequence[str]] = None,
        alpha: float = 0.2,
        gamma: float = 2.0,
        reg_max: int = 32,
        *,
        mal_alpha: Optional[float] = None,
        use_uni_set: bool = True,
        boxes_weight_format: Optional[str] = None,
        reduce_across_ranks: bool = False,
    ) -> None:
        super().__init__(num_classes, matcher, weight_dict, losses, alpha, gamma, reg_max,
                         boxes_weight_format=boxes_weight_format, reduce_across_ranks=reduce_across_ranks)
        self.mal_alpha = None if mal_alpha is None else float(mal_alpha)
        self.use_uni_set = bool(use_uni_set)

    def loss_labels_mal(self, layer: Layer, asg: Assignment, num_boxes: float, values: Optional[Tensor]) -> Dict[str, Tensor]:
        label, score = self.class_scores(layer, asg, values)
        mal = T.matchability_aware_loss(layer.logits, score, label, gamma=self.gamma, alpha=self.mal_alpha)
        return {"loss_mal": self._per_box(mal.mean(1).sum() * layer.num_queries, num_boxes, layer.logits)}
