"""Primitive losses: pure functions on tensors with torch.nn.functional's conventions.

Every function validates its inputs (ValueError / TypeError naming the argument), computes in
float32 or wider (half-precision inputs are upcast; gradients come back in the input dtype) and
reduces with ``reduction`` = "none" | "mean" | "sum".
"""
from __future__ import annotations

from .bce import bce_blur, bce_with_logits, binary_cross_entropy, smooth_bce
from .cross_entropy import cross_entropy
from .dfl import distribution_focal_loss
from .focal import quality_focal_loss, sigmoid_focal_loss, softmax_focal_loss, varifocal_loss
from .iou import aligned_box_iou, box_iou, iou_loss, pairwise_box_iou
from .keypoints import keypoint_loss, keypoint_similarity, object_keypoint_similarity, realnvp_log_prob, rle_loss
from .masks import bce_dice_loss, crop_mask, cropped_mask_bce, dice_loss, prototype_mask_bce
from .regression import l1_loss, mse_loss, smooth_l1_loss
from .rotated import dist_to_rbox, probiou, probiou_loss, rbox_covariance, rbox_to_dist, rotated_angle_loss, xywhr_to_corners

__all__ = [
    "binary_cross_entropy",
    "bce_with_logits",
    "bce_blur",
    "smooth_bce",
    "cross_entropy",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "quality_focal_loss",
    "varifocal_loss",
    "smooth_l1_loss",
    "l1_loss",
    "mse_loss",
    "aligned_box_iou",
    "box_iou",
    "pairwise_box_iou",
    "iou_loss",
    "distribution_focal_loss",
    "keypoint_loss", "keypoint_similarity", "object_keypoint_similarity", "realnvp_log_prob", "rle_loss",
    "bce_dice_loss", "crop_mask", "cropped_mask_bce", "dice_loss", "prototype_mask_bce",
    "dist_to_rbox", "probiou", "probiou_loss", "rbox_covariance", "rbox_to_dist", "rotated_angle_loss", "xywhr_to_corners",
]
