"""Shared by the OBB, pose and segmentation losses: the checks of their extra per-level head
outputs, the expected box-side distances, and their end-to-end form (:func:`end_to_end`)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .._checks import check_choice, check_floating, upcast
from ..anchors import Level
from .e2e import LEGACY_ONE2ONE_TOPK, ONE2MANY_TOPK, ONE2ONE_TOPK, WEIGHTINGS, EndToEndLoss

__all__ = ["flatten_level_maps", "expected_distances", "PackedOutputs", "end_to_end", "aligned_assignment", "box_assigner", "CandidateScores"]


def flatten_level_maps(
    name: str, maps: Sequence[Tensor], levels: Sequence[Level], channels: int, like: Tensor, dtype: torch.dtype,
    what: str = "",
) -> Tensor:
    """Per-level head outputs ``[B, channels, H_l, W_l]`` (the sizes of ``levels``, the batch,
    dtype and device of ``like``, finite) -> ``[B, A, channels]`` in ``dtype`` (anchors level by
    level, row-major, as the box outputs). ``what`` explains ``channels`` in the error."""
    if isinstance(maps, Tensor) or not isinstance(maps, (list, tuple)):
        raise TypeError(f"{name}: expected a list of {len(levels)} tensors (one per level), got {type(maps).__name__}")
    if len(maps) != len(levels):
        raise ValueError(f"{name}: expected {len(levels)} levels (like feats), got {len(maps)}")
    bsz = like.shape[0]
    flat: List[Tensor] = []
    for i, (m, (h, w, _)) in enumerate(zip(maps, levels)):
        check_floating(f"{name}[{i}]", m)
        if tuple(m.shape) != (bsz, channels, h, w):
            raise ValueError(f"{name}[{i}]: expected shape {(bsz, channels, h, w)}{what}, got {tuple(m.shape)}")
        if m.dtype != like.dtype or m.device != like.device:
            raise TypeError(f"{name}[{i}]: expected dtype {like.dtype} on {like.device} like feats[0], got {m.dtype} on {m.device}")
        bad = ~torch.isfinite(m.detach())
        if bool(bad.any()):
            raise ValueError(f"{name}[{i}]: expected finite values, got NaN or inf at {tuple(int(j) for j in bad.nonzero()[0])}")
        flat.append(upcast(m, dtype).reshape(bsz, channels, h * w))
    return torch.cat(flat, 2).permute(0, 2, 1)


def expected_distances(pred_dist: Tensor, reg_max: int) -> Tensor:
    """ltrb distances ``[..., 4]`` of the head's box channels ``[..., 4 * reg_max]``: each side's
    expectation ``sum_j j * softmax(logits)_j`` (ultralytics ``bbox_decode``), or the channels
    themselves when ``reg_max`` is 1."""
    if reg_max == 1:
        return pred_dist
    proj = torch.arange(reg_max, dtype=pred_dist.dtype, device=pred_dist.device)
    return pred_dist.view(*pred_dist.shape[:-1], 4, reg_max).softmax(-1).matmul(proj)


class PackedOutputs(torch.nn.Module):
    """A loss whose head outputs span several arguments (``loss(feats, angles, targets)``), called
    with them packed in one tuple (``packed((feats, angles), targets)``): the form
    :class:`~detloss.losses.e2e.EndToEndLoss` calls its branches in. ``assign`` and ``decode``
    unpack the same way; ``loss`` is the wrapped loss."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    @staticmethod
    def _unpack(outputs: Any) -> tuple:
        if not isinstance(outputs, tuple):
            raise TypeError(f"outputs: expected the head's outputs as a tuple (e.g. (feats, angles)), got {type(outputs).__name__}")
        return outputs

    def forward(self, outputs: Any, *args: Any, **kwargs: Any) -> Any:
        return self.loss(*self._unpack(outputs), *args, **kwargs)

    def assign(self, outputs: Any, *args: Any, **kwargs: Any) -> Any:
        return self.loss.assign(*self._unpack(outputs), *args, **kwargs)

    def decode(self, outputs: Any, **kwargs: Any) -> Any:
        return self.loss.decode(*self._unpack(outputs), **kwargs)


def end_to_end(loss_cls: Callable[..., torch.nn.Module], *args: Any, epochs: Optional[int] = None,
               weighting: str = "schedule", **kwargs: Any) -> EndToEndLoss:
    """The end-to-end form (ultralytics ``E2ELoss``) of a task loss: an
    :class:`~detloss.losses.e2e.EndToEndLoss` of two ``loss_cls(*args, tal_topk=..., tal_topk2=...,
    **kwargs)`` branches with ultralytics' top-k settings, each taking its head's outputs as one
    tuple (:class:`PackedOutputs`): ``loss((feats_o2m, angles_o2m), (feats_o2o, angles_o2o), targets)``.
    Module arguments in ``kwargs`` (a pose head's flow model) are shared by the two branches."""
    check_choice("weighting", weighting, WEIGHTINGS)
    o2o = ONE2ONE_TOPK if weighting == "schedule" else LEGACY_ONE2ONE_TOPK
    branches = [PackedOutputs(loss_cls(*args, tal_topk=k, tal_topk2=k2, **kwargs)) for k, k2 in (ONE2MANY_TOPK, o2o)]
    return EndToEndLoss(*branches, epochs=epochs, weighting=weighting)


class CandidateScores:
    """The class probabilities ``sigmoid(logits)`` of ``logits [B, A, nc]`` (any strided view) read
    only where the assigner asks (``gather_scores(image, anchor, cls)``), never all ``B * A * nc``;
    ``scores()`` gives them all. ``shape``, ``dtype`` and ``device`` are the logits'."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits.detach()
        self.shape, self.dtype, self.device = tuple(logits.shape), logits.dtype, logits.device

    def scores(self) -> Tensor:
        return self.logits.sigmoid()

    def gather_scores(self, image: Tensor, anchor: Tensor, cls: Tensor) -> Tensor:
        from ..assign.tal import _gather

        return _gather(self.logits, image, anchor, cls).sigmoid_()


def aligned_assignment(loss: Any, inputs: Any, pd_bboxes: Tensor, **extra: Any) -> Any:
    """Run a task loss's :class:`~detloss.assign.aligned.AlignedAssigner` (``loss.assigner``) on
    its checked inputs (``pred_logits``, ``gt_*``, ``levels``) and the predicted boxes in pixels,
    without gradient; ``target_index`` becomes the row of ``targets``."""
    with torch.no_grad():
        head = getattr(inputs, "head", None)
        scores = head if head is not None else CandidateScores(inputs.pred_logits)
        asg = loss.assigner.assign(scores, pd_bboxes.detach(), inputs.gt_labels, inputs.gt_bboxes, inputs.mask_gt,
                                   inputs.levels, **extra)
        return replace(asg, target_index=inputs.gt_rows[asg.batch_index, asg.target_index])


def box_assigner(base: Any, num_classes: int, strides: Sequence[float], zero_ties: bool, cls: Any = None, **kwargs: Any) -> Any:
    """An :class:`~detloss.assign.aligned.AlignedAssigner` (``cls``, default the detection rule)
    with the settings of YOLOv8Loss's own assigner ``base``."""
    from ..assign.aligned import BoxTaskAlignedAssigner

    cls = BoxTaskAlignedAssigner if cls is None else cls
    return cls(base.topk, num_classes, alpha=base.alpha, beta=base.beta, topk2=base.topk2, strides=strides,
               min_side=base.min_side, zero_ties=zero_ties, **kwargs)
