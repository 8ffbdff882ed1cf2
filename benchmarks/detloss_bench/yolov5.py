"""Benchmark: :class:`detloss.YOLOv5Loss` against the original ``ComputeLoss`` structure.

The baseline below (:class:`OriginalComputeLoss`) is the structure of ultralytics/yolov5 v7.0
``utils/loss.py`` ``ComputeLoss`` and ``utils/metrics.py`` ``bbox_iou`` written the same way
(one ``__call__`` with ``build_targets`` inside, ``nn.BCEWithLogitsLoss``, in-place index writes).
It is only a baseline for timings and memory, run in the same process; the library never uses it.

Run: ``python benchmarks/bench_yolov5.py`` or ``detloss bench yolov5`` (``--quick`` for tiny sizes).
"""
from __future__ import annotations

import argparse
import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from ._common import fmt_mb, fmt_ms, median_time, peak_memory, print_table

# --------------------------------------------------------------------------------------------
# Baseline: the original's structure (ultralytics/yolov5 v7.0), used only for comparison.
# --------------------------------------------------------------------------------------------


def _original_bbox_iou(box1, box2, eps=1e-7):
    """yolov5 v7.0 ``bbox_iou(box1, box2, xywh=True, CIoU=True)``, as written there."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.chunk(4, -1), box2.chunk(4, -1)
    w1_, h1_, w2_, h2_ = w1 / 2, h1 / 2, w2 / 2, h2 / 2
    b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1_, x1 + w1_, y1 - h1_, y1 + h1_
    b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2_, x2 + w2_, y2 - h2_, y2 + h2_
    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * (
        torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)
    ch = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    c2 = cw**2 + ch**2 + eps
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    v = (4 / math.pi**2) * torch.pow(torch.atan(w2 / h2) - torch.atan(w1 / h1), 2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


class _OriginalFocalLoss(nn.Module):
    """yolov5 v7.0 ``FocalLoss``: wraps ``BCEWithLogitsLoss``, alpha 0.25, mean."""

    def __init__(self, loss_fcn, gamma=1.5, alpha=0.25):
        super().__init__()
        self.loss_fcn, self.gamma, self.alpha = loss_fcn, gamma, alpha
        self.reduction = loss_fcn.reduction
        self.loss_fcn.reduction = "none"

    def forward(self, pred, true):
        loss = self.loss_fcn(pred, true)
        pred_prob = torch.sigmoid(pred)
        p_t = true * pred_prob + (1 - true) * (1 - pred_prob)
        alpha_factor = true * self.alpha + (1 - true) * (1 - self.alpha)
        modulating_factor = (1.0 - p_t) ** self.gamma
        loss *= alpha_factor * modulating_factor
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss


class OriginalComputeLoss:
    """The original ``ComputeLoss`` structure (yolov5 v7.0, gr = 1), baseline only.

    ``anchors`` is ``[nl, na, 2]`` in grid units, ``hyp`` a dict with box/obj/cls/cls_pw/obj_pw/
    anchor_t (fl_gamma and label_smoothing optional). ``build_targets`` is the original's, line for line.
    """

    def __init__(self, anchors: torch.Tensor, nc: int, hyp: dict, device="cpu", autobalance=False, strides=(8, 16, 32)):
        self.BCEcls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([hyp["cls_pw"]], device=device))
        self.BCEobj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([hyp["obj_pw"]], device=device))
        eps = hyp.get("label_smoothing", 0.0)
        self.cp, self.cn = 1.0 - 0.5 * eps, 0.5 * eps
        g = hyp.get("fl_gamma", 0.0)
        if g > 0:
            self.BCEcls, self.BCEobj = _OriginalFocalLoss(self.BCEcls, g), _OriginalFocalLoss(self.BCEobj, g)
        self.nl, self.na = anchors.shape[0], anchors.shape[1]
        self.balance = {3: [4.0, 1.0, 0.4]}.get(self.nl, [4.0, 1.0, 0.25, 0.06, 0.02])
        self.ssi = list(strides).index(16) if autobalance else 0
        self.gr, self.hyp, self.autobalance = 1.0, hyp, autobalance
        self.nc, self.anchors, self.device = nc, anchors.to(device), device

    def __call__(self, p, targets):
        lcls = torch.zeros(1, device=self.device)
        lbox = torch.zeros(1, device=self.device)
        lobj = torch.zeros(1, device=self.device)
        tcls, tbox, indices, anchors = self.build_targets(p, targets)
        for i, pi in enumerate(p):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=self.device)
            n = b.shape[0]
            if n:
                pxy, pwh, _, pcls = pi[b, a, gj, gi].split((2, 2, 1, self.nc), 1)
                pxy = pxy.sigmoid() * 2 - 0.5
                pwh = (pwh.sigmoid() * 2) ** 2 * anchors[i]
                pbox = torch.cat((pxy, pwh), 1)
                iou = _original_bbox_iou(pbox, tbox[i]).squeeze()
                lbox += (1.0 - iou).mean()
                iou = iou.detach().clamp(0).type(tobj.dtype)
                if self.gr < 1:
                    iou = (1.0 - self.gr) + self.gr * iou
                tobj[b, a, gj, gi] = iou
                if self.nc > 1:
                    t = torch.full_like(pcls, self.cn, device=self.device)
                    t[range(n), tcls[i]] = self.cp
                    lcls += self.BCEcls(pcls, t)
            obji = self.BCEobj(pi[..., 4], tobj)
            lobj += obji * self.balance[i]
            if self.autobalance:
                self.balance[i] = self.balance[i] * 0.9999 + 0.0001 / obji.detach().item()
        if self.autobalance:
            self.balance = [x / self.balance[self.ssi] for x in self.balance]
        lbox *= self.hyp["box"]
        lobj *= self.hyp["obj"]
        lcls *= self.hyp["cls"]
        bs = tobj.shape[0]
        return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()

    def build_targets(self, p, targets):
        na, nt = self.na, targets.shape[0]
        tcls, tbox, indices, anch = [], [], [], []
        gain = torch.ones(7, device=self.device, dtype=targets.dtype)
        ai = torch.arange(na, device=self.device).to(targets.dtype).view(na, 1).repeat(1, nt)
        targets = torch.cat((targets.repeat(na, 1, 1), ai[..., None]), 2)
        g = 0.5
        off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=self.device).to(targets.dtype) * g
        for i in range(self.nl):
            anchors, shape = self.anchors[i].to(targets.dtype), p[i].shape
            gain[2:6] = torch.tensor(shape)[[3, 2, 3, 2]]
            t = targets * gain
            if nt:
                r = t[..., 4:6] / anchors[:, None]
                j = torch.max(r, 1 / r).max(2)[0] < self.hyp["anchor_t"]
                t = t[j]
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy
                j, k = ((gxy % 1 < g) & (gxy > 1)).T
                l, m = ((gxi % 1 < g) & (gxi > 1)).T
                j = torch.stack((torch.ones_like(j), j, k, l, m))
                t = t.repeat((5, 1, 1))[j]
                offsets = (torch.zeros_like(gxy)[None] + off[:, None])[j]
            else:
                t = targets[0]
                offsets = 0
            bc, gxy, gwh, a = t.chunk(4, 1)
            a, (b, c) = a.long().view(-1), bc.long().T
            gij = (gxy - offsets).long()
            gi, gj = gij.T
            indices.append((b, a, gj.clamp_(0, shape[2] - 1), gi.clamp_(0, shape[3] - 1)))
            tbox.append(torch.cat((gxy - gij, gwh), 1))
            anch.append(anchors[a])
            tcls.append(c)
        return tcls, tbox, indices, anch


# --------------------------------------------------------------------------------------------


def make_inputs(bs: int, img: int, nc: int, per_image: int, dtype=torch.float32, seed: int = 0):
    """Random head outputs for strides 8/16/32 and ``per_image`` random targets per image."""
    gen = torch.Generator().manual_seed(seed)
    preds = [torch.randn(bs, 3, img // s, img // s, 5 + nc, generator=gen, dtype=dtype) for s in (8, 16, 32)]
    n = bs * per_image
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * 0.3 + 0.01
    xy = wh / 2 + torch.rand(n, 2, generator=gen, dtype=dtype) * (1 - wh)
    img_idx = torch.arange(bs, dtype=dtype).repeat_interleave(per_image)
    cls = torch.randint(0, nc, (n,), generator=gen).to(dtype)
    targets = torch.cat((img_idx[:, None], cls[:, None], xy, wh), 1)
    return preds, targets


def _runner(loss_fn, preds, targets, backward: bool, original: bool):
    leaves = [p.detach().requires_grad_(backward) for p in preds]

    def run():
        if original:
            total, _ = loss_fn(leaves, targets)
        else:
            total = loss_fn(leaves, targets).total
        if backward:
            total.sum().backward()
            for p in leaves:
                p.grad = None
        return total

    return run


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detloss.losses.yolov5 import YOLOv5Loss

    ap = argparse.ArgumentParser(prog="detloss bench yolov5", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--img", type=int, default=640)
    ap.add_argument("--nc", type=int, default=80)
    ap.add_argument("--targets", type=int, nargs="+", default=[8, 100], help="targets per image")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args(argv)
    if args.quick:
        args.bs, args.img, args.nc, args.targets, args.repeats = 2, 64, 4, [2], 2
    if args.threads:
        torch.set_num_threads(args.threads)

    ours = YOLOv5Loss(args.nc)
    anchors = torch.stack(ours.anchors_grid).float()
    hyp = dict(box=0.05, obj=1.0, cls=0.5, cls_pw=1.0, obj_pw=1.0, anchor_t=4.0)
    base = OriginalComputeLoss(anchors, args.nc, hyp)
    print(
        f"YOLOv5 loss, bs {args.bs}, {args.img}x{args.img}, nc {args.nc}, float32, CPU, "
        f"{torch.get_num_threads()} threads; baseline = the original ComputeLoss structure"
    )
    rows: List[List[object]] = []
    for per_image in args.targets:
        preds, targets = make_inputs(args.bs, args.img, args.nc, per_image)
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            r_base = _runner(base, preds, targets, backward, original=True)
            r_ours = _runner(ours, preds, targets, backward, original=False)
            warm = 1 if args.quick else 2
            t_base = median_time(r_base, args.repeats, warm)
            t_ours = median_time(r_ours, args.repeats, warm)
            m_base = peak_memory(r_base)
            m_ours = peak_memory(r_ours)
            rows.append([
                per_image, mode, fmt_ms(t_base), fmt_ms(t_ours), f"{t_base / t_ours:5.2f}x",
                fmt_mb(m_base), fmt_mb(m_ours), f"{m_base / max(m_ours, 1):5.2f}x",
            ])
    print_table(
        ["targets/img", "pass", "original", "detloss", "speedup", "orig peak", "detloss peak", "mem ratio"], rows
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
