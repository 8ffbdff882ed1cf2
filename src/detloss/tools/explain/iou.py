"""The IoU losses (IoU, GIoU, DIoU, CIoU, EIoU, SIoU) in the torchvision and YOLOv5 conventions."""
from __future__ import annotations

import math
from typing import Dict

import torch

from .family import Spec, functional_loss, reduction_variants
from .steps import Step

__all__ = ["SPECS", "ALIASES"]


def _work_iou(x, y, o, fmt):
    kind, conv = o["kind"], o["convention"]
    eps = float(o.get("eps") or 1e-7)
    if o["box_format"] == "cxcywh":
        from detloss.boxes import cxcywh_to_xyxy

        a, b = cxcywh_to_xyxy(x), cxcywh_to_xyxy(y)
    else:
        a, b = x, y
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    yolo = conv == "yolov5"
    h_eps = eps if yolo and o["box_format"] == "xyxy" else 0  # bbox_iou adds eps to heights of xyxy boxes only
    w1, h1 = ax2 - ax1, ay2 - ay1 + h_eps
    w2, h2 = bx2 - bx1, by2 - by1 + h_eps
    inter = (torch.min(ax2, bx2) - torch.max(ax1, bx1)).clamp(min=0) * (torch.min(ay2, by2) - torch.max(ay1, by1)).clamp(min=0)
    if yolo:
        union = w1 * h1 + w2 * h2 - inter + eps
        iou = inter / union
    else:
        union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
        iou = inter / (union + eps)
    steps = [
        Step("inter", "intersection area", inter),
        Step("union", "area(a) + area(b) - inter" + (" + eps" if yolo else ""), union),
        Step("IoU", "inter / union" + ("" if yolo else " (+ eps in the denominator)"), iou),
    ]
    metric = iou
    cw = torch.max(ax2, bx2) - torch.min(ax1, bx1)
    ch = torch.max(ay2, by2) - torch.min(ay1, by1)
    if kind == "giou":
        c_area = cw * ch + (eps if yolo else 0)
        metric = iou - (c_area - union) / (c_area + (0 if yolo else eps))
        steps += [Step("C", "area of the smallest enclosing box" + (" + eps" if yolo else ""), c_area),
                  Step("GIoU", "IoU - (C - union) / C" + ("" if yolo else " (+ eps in the denominator)"), metric)]
    elif kind in ("diou", "ciou"):
        c2 = cw ** 2 + ch ** 2 + eps
        rho2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4
        steps += [Step("c^2", "squared diagonal of the enclosing box + eps", c2),
                  Step("rho^2", "squared distance between the box centres", rho2),
                  Step("rho^2 / c^2", "distance term", rho2 / c2)]
        metric = iou - rho2 / c2
        if kind == "diou":
            steps.append(Step("DIoU", "IoU - rho^2 / c^2", metric))
        else:
            if yolo:
                v = (4 / math.pi ** 2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
                alpha = v / (v - iou + (1 + eps))
            else:
                v = (4 / math.pi ** 2) * (torch.atan((bx2 - bx1) / (by2 - by1)) - torch.atan((ax2 - ax1) / (ay2 - ay1))) ** 2
                alpha = v / (1 - iou + v + eps)
            metric = iou - rho2 / c2 - alpha * v
            steps += [Step("v", "(4 / pi^2) * (atan(w_b / h_b) - atan(w_a / h_a))^2  (aspect term)", v),
                      Step("alpha", "v / (1 - IoU + v + eps)  (aspect weight" + (", no gradient)" if yolo else ")"), alpha),
                      Step("CIoU", "IoU - rho^2 / c^2 - alpha * v", metric)]
    elif kind == "eiou":
        c2 = cw ** 2 + ch ** 2 + eps
        rho2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4
        dist, wterm, hterm = rho2 / c2, (w1 - w2) ** 2 / (cw ** 2 + eps), (h1 - h2) ** 2 / (ch ** 2 + eps)
        metric = iou - (dist + wterm + hterm)
        steps += [Step("rho^2 / c^2", "centre distance over the enclosing diagonal (+ eps)", dist),
                  Step("(w_a - w_b)^2 / C_w^2", "width term (enclosing width, + eps)", wterm),
                  Step("(h_a - h_b)^2 / C_h^2", "height term (enclosing height, + eps)", hterm),
                  Step("EIoU", "IoU - rho^2 / c^2 - width term - height term  (Zhang et al. 2021)", metric)]
    elif kind == "siou":
        from detloss.functional.iou import SIOU_THETA

        dx = (bx1 + bx2 - ax1 - ax2) / 2
        dy = (by1 + by2 - ay1 - ay2) / 2
        angle = 2 * (dx * dy).abs() / (dx ** 2 + dy ** 2 + eps)
        gamma = 2 - angle
        rho_x, rho_y = dx ** 2 / (cw ** 2 + eps), dy ** 2 / (ch ** 2 + eps)
        distance = (1 - torch.exp(-gamma * rho_x)) + (1 - torch.exp(-gamma * rho_y))
        omega_w = (w1 - w2).abs() / (torch.maximum(w1, w2) + eps)
        omega_h = (h1 - h2).abs() / (torch.maximum(h1, h2) + eps)
        shape = (1 - torch.exp(-omega_w)) ** SIOU_THETA + (1 - torch.exp(-omega_h)) ** SIOU_THETA
        metric = iou - 0.5 * (distance + shape)
        steps += [Step("Lambda", "angle cost 1 - 2 sin^2(arcsin(|dy| / sigma) - pi/4) = 2 |dx dy| / sigma^2", angle),
                  Step("Delta", "distance cost sum over x, y of 1 - exp(-(2 - Lambda) (d / C)^2)", distance),
                  Step("Omega", f"shape cost sum over w, h of (1 - exp(-|a - b| / max(a, b)))^{SIOU_THETA:g}", shape),
                  Step("SIoU", "IoU - (Delta + Omega) / 2  (Gevorgyan 2022)", metric)]
    elem = 1 - metric
    names = {"iou": "IoU", "giou": "GIoU", "diou": "DIoU", "ciou": "CIoU", "eiou": "EIoU", "siou": "SIoU"}
    steps.append(Step("l", "1 - " + names[kind], elem))
    return {"steps": steps, "elementwise": elem, "gradient": None}


def _call_iou(x, y, o):
    kw = {} if o.get("eps") is None else {"eps": float(o["eps"])}
    return functional_loss("iou_loss")(x, y, kind=o["kind"], box_format=o["box_format"], convention=o["convention"],
                           reduction=o["reduction"], **kw)


def _v_iou(call, x, y, o):
    v = reduction_variants(call, x, y, o)
    for k in ("iou", "giou", "diou", "ciou", "eiou", "siou"):
        if k != o["kind"]:
            v.append((f"the {k} loss (kind='{k}')", call(x, y, {**o, "kind": k})))
    v.append((f"the {o['kind']} value itself (1 - loss)", 1 - call(x, y, {**o, "reduction": "none"})))
    other = "xyxy" if o["box_format"] == "cxcywh" else "cxcywh"
    try:
        v.append((f"the boxes read as {other}", call(x, y, {**o, "box_format": other})))
    except Exception:
        pass
    c2 = "yolov5" if o["convention"] == "torchvision" else "torchvision"
    v.append((f"convention='{c2}'", call(x, y, {**o, "convention": c2})))
    return v


SPECS: Dict[str, Spec] = {
    "iou-loss": Spec(
        "detloss.functional.iou_loss", "l = 1 - IoU_kind(a, b)",
        "GIoU: Rezatofighi et al. 2019; DIoU/CIoU: Zheng et al. 2020; EIoU: Zhang et al. 2021; SIoU: Gevorgyan 2022; "
        "torchvision.ops / YOLOv5 bbox_iou",
        {"kind": "giou", "box_format": "xyxy", "convention": "torchvision", "eps": None, "reduction": "none"},
        _work_iou, _call_iou, target_kind="box", variants=_v_iou,
        input_names=("boxes a", "boxes b")),
}
# Short names for the IoU kinds: `detloss explain ciou ...` == `detloss explain iou-loss --kind ciou ...`.
ALIASES = {kind: ("iou-loss", {"kind": kind}) for kind in ("iou", "giou", "diou", "ciou", "eiou", "siou")}
