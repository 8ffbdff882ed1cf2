"""Benchmark: :class:`detloss.YOLOv3Loss` (``flavor="darknet"``) against a TRANSCRIPTION of darknet's
``forward_yolo_layer`` (pjreddie/darknet ``src/yolo_layer.c``), in the same process on the same inputs.

darknet is C code with no Python package, so no runnable peer exists; the baseline here is a
transcription written for this benchmark, in the structure of the C code: per image, a loop over
the truths for the ignore pass (each truth against every prediction of the layer, a running
best IoU, the prediction loop vectorized) and a loop over the truths for the positives
(``delta_yolo_box``, the objectness delta, ``delta_yolo_class`` with its ``if (delta[index])``
rule). darknet computes ``l.delta`` -- minus the gradient w.r.t. the layer input -- in its
forward pass, so the transcription's fwd and fwd+bwd are the same computation; darknet defines
no loss value (its ``cost`` is ``sum(delta^2)``), so the check compares gradients: detloss's
autograd gradient must equal minus the transcription's delta. The transcription itself is
checked against the darknet reference data in tests/benchmarks.

Inputs: synthetic raw layer inputs ``[B, 3 * (5 + C), H, W]`` for strides 32, 16, 8 (yolov3.cfg's
anchors and masks) and truths of random size (2% to 52% of the image side).

Run: ``python benchmarks/run.py yolov3`` (``--quick`` for tiny sizes).
"""
from __future__ import annotations

import argparse
import math
from typing import List, Optional, Sequence, Tuple

import torch

from ._common import Side, add_detector_arguments, apply_quick, run_suite

PEER = "darknet transcription"
MAX_BOXES = 90  # darknet's max_boxes: the truth list length per image


# ----------------------------------------------------------------------------- the transcription
def truths_from_rows(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """YOLO rows ``[N, 6]`` (image, class, cx, cy, w, h) -> darknet's truth array ``[B, T, 5]``
    (x, y, w, h, class) in row order per image, padded with zeros (x == 0 ends a list)."""
    img = rows[:, 0].long()
    per = [rows[img == b] for b in range(batch)]
    t = max([MAX_BOXES] + [len(p) for p in per])
    out = torch.zeros(batch, t, 5, dtype=torch.float32)
    for b, p in enumerate(per):
        out[b, : len(p), :4] = p[:, 2:6].float()
        out[b, : len(p), 4] = p[:, 1].float()
    return out


def _box_iou(ax, ay, aw, ah, bx, by, bw, bh):
    """darknet box.c ``box_iou`` on centre boxes (broadcasting)."""
    def overlap(x1, w1, x2, w2):
        return torch.minimum(x1 + w1 / 2, x2 + w2 / 2) - torch.maximum(x1 - w1 / 2, x2 - w2 / 2)

    w, h = overlap(ax, aw, bx, bw), overlap(ay, ah, by, bh)
    inter = torch.where((w < 0) | (h < 0), torch.zeros_like(w), w * h)
    return inter / (aw * ah + bw * bh - inter)


def _delta_box(delta, out, truth, anchor, b, n, j, i, lw, lh, net_w, net_h, scale) -> None:
    """``delta_yolo_box``: x, y toward the offset in the cell (on the logistic output), w, h
    toward log(truth size / anchor) (on the raw output), times ``scale``."""
    tx, ty, tw, th = truth[0] * lw - i, truth[1] * lh - j, truth[2], truth[3]
    target = out.new_tensor([tx, ty, math.log(tw * net_w / anchor[0]), math.log(th * net_h / anchor[1])])
    delta[b, n, 0:4, j, i] = scale * (target - out[b, n, 0:4, j, i])


def _delta_class(delta, out, cls: int, b, n, j, i) -> None:
    """``delta_yolo_class``: a second truth in the same cell and anchor (class-0 delta already
    non-zero) only sets its own class; otherwise the whole one-hot vector is written."""
    if bool(delta[b, n, 5, j, i] != 0):
        delta[b, n, 5 + cls, j, i] = 1 - out[b, n, 5 + cls, j, i]
    else:
        onehot = torch.zeros_like(out[b, n, 5:, j, i])
        onehot[cls] = 1
        delta[b, n, 5:, j, i] = onehot - out[b, n, 5:, j, i]


def darknet_layer_delta(x: torch.Tensor, truth: torch.Tensor, anchors: Sequence[Tuple[float, float]],
                        mask: Sequence[int], net_w: int, net_h: int, classes: int,
                        ignore_thresh: float = 0.7, truth_thresh: float = 1.0) -> torch.Tensor:
    """darknet's ``l.delta`` for one YOLO layer, in the layout of its raw input ``x``
    ``[B, len(mask) * (5 + classes), H, W]``; ``truth`` ``[B, T, 5]`` as :func:`truths_from_rows`."""
    bsz, _, lh, lw = x.shape
    na = len(mask)
    x = x.detach().float().reshape(bsz, na, 5 + classes, lh, lw)
    out = x.clone()
    out[:, :, 0:2] = torch.sigmoid(x[:, :, 0:2])
    out[:, :, 4:] = torch.sigmoid(x[:, :, 4:])
    delta = torch.zeros_like(out)
    aw = torch.tensor([anchors[m][0] for m in mask]).view(na, 1, 1)
    ah = torch.tensor([anchors[m][1] for m in mask]).view(na, 1, 1)
    gx = torch.arange(lw, dtype=torch.float32).view(1, 1, lw)
    gy = torch.arange(lh, dtype=torch.float32).view(1, lh, 1)
    all_w = torch.tensor([a[0] / net_w for a in anchors])
    all_h = torch.tensor([a[1] / net_h for a in anchors])
    for b in range(bsz):
        px, py = (gx + out[b, :, 0]) / lw, (gy + out[b, :, 1]) / lh  # get_yolo_box, every prediction
        pw, ph = torch.exp(out[b, :, 2]) * aw / net_w, torch.exp(out[b, :, 3]) * ah / net_h
        best_iou = torch.zeros(na, lh, lw)
        best_t = torch.zeros(na, lh, lw, dtype=torch.long)
        rows = truth[b].tolist()
        for t, tr in enumerate(rows):  # the ignore pass: a running best over the truths
            if tr[0] == 0:
                break
            iou = _box_iou(px, py, pw, ph, *(torch.tensor(v) for v in tr[:4]))
            better = iou > best_iou
            best_iou = torch.where(better, iou, best_iou)
            best_t = torch.where(better, torch.full_like(best_t, t), best_t)
        delta[b, :, 4] = -out[b, :, 4]
        delta[b, :, 4][best_iou > ignore_thresh] = 0
        for n, j, i in (best_iou > truth_thresh).nonzero().tolist():  # never with the default 1.0
            tr = rows[int(best_t[n, j, i])]
            delta[b, n, 4, j, i] = 1 - out[b, n, 4, j, i]
            _delta_class(delta, out, int(tr[4]), b, n, j, i)
            _delta_box(delta, out, tr, anchors[mask[n]], b, n, j, i, lw, lh, net_w, net_h, 2 - tr[2] * tr[3])
        for tr in rows:  # the positives: the best of all anchors by shape IoU, if this layer has it
            if tr[0] == 0:
                break
            i, j = int(tr[0] * lw), int(tr[1] * lh)
            tw, th = torch.tensor(tr[2]), torch.tensor(tr[3])
            shape_iou = _box_iou(torch.zeros(()), torch.zeros(()), all_w, all_h, torch.zeros(()), torch.zeros(()), tw, th)
            best_n = int(torch.argmax(shape_iou))  # the first of equal maxima, as darknet's strict '>'
            if best_n not in mask:
                continue
            n = list(mask).index(best_n)
            _delta_box(delta, out, tr, anchors[best_n], b, n, j, i, lw, lh, net_w, net_h, 2 - tr[2] * tr[3])
            delta[b, n, 4, j, i] = 1 - out[b, n, 4, j, i]
            _delta_class(delta, out, int(tr[4]), b, n, j, i)
    return delta.reshape(bsz, na * (5 + classes), lh, lw)


# ----------------------------------------------------------------------------- the suite
def make_inputs(bs: int, img: int, nc: int, per_image: int, strides=(32, 16, 8), seed: int = 0):
    """Random raw layer inputs and ``per_image`` random truths per image (YOLO rows)."""
    g = torch.Generator().manual_seed(seed)
    inputs = [0.5 * torch.randn(bs, 3 * (5 + nc), img // s, img // s, generator=g) for s in strides]
    n = bs * per_image
    wh = 0.02 + 0.5 * torch.rand(n, 2, generator=g)
    cxcy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
    img_idx = torch.arange(bs).repeat_interleave(per_image).float()
    cls = torch.randint(0, nc, (n,), generator=g).float()
    return inputs, torch.cat((img_idx[:, None], cls[:, None], cxcy, wh), 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_detector_arguments(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detloss import YOLOv3Loss
    from detloss.losses.yolov3 import YOLOV3_ANCHORS, YOLOV3_MASKS

    ap = argparse.ArgumentParser(prog="benchmarks/run.py yolov3", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    apply_quick(args)
    strides = (32, 16, 8)
    ours_loss = YOLOv3Loss(args.classes, img_size=args.size, strides=strides)

    def case(nb: int, peer) -> Tuple[Side, Optional[Side]]:
        inputs, targets = make_inputs(args.batch, args.size, args.classes, nb, strides)
        leaves = [x.requires_grad_() for x in inputs]
        ours = Side("detloss", lambda: ours_loss(leaves, targets).total, leaves)
        truth = truths_from_rows(targets, args.batch)

        def deltas() -> List[torch.Tensor]:
            return [darknet_layer_delta(x, truth, YOLOV3_ANCHORS, m, args.size, args.size, args.classes)
                    for x, m in zip(leaves, YOLOV3_MASKS)]

        theirs = Side(PEER, None, leaves, gradients=deltas, common_grads=lambda d: [-t for t in d])
        return ours, theirs

    title = (f"YOLOv3 loss (darknet): batch {args.batch}, {args.size}x{args.size}, {args.classes} classes, "
             f"masks {YOLOV3_MASKS}, float32, CPU, {torch.get_num_threads()} threads, median of {args.repeats}")
    return run_suite("yolov3", args, title, PEER, lambda: None, case, transcription=True)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
