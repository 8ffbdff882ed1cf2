"""YOLOv5Loss against yolov5 7.0.14's own ComputeLoss (the packaged ultralytics/yolov5 v7.0), run
here as the oracle on hyperparameter combinations the stored reference data lacks."""
from __future__ import annotations

import pytest
import torch

from detloss.losses.yolov5 import YOLOv5Loss


class _Detect(torch.nn.Module):
    """What ComputeLoss reads from the model's last module."""

    def __init__(self, anchors_grid, nc, strides):
        super().__init__()
        self.na, self.nc, self.nl = anchors_grid[0].shape[0], nc, len(anchors_grid)
        self.register_buffer("anchors", torch.stack(anchors_grid))
        self.stride = torch.tensor(strides)


class _Model(torch.nn.Module):
    def __init__(self, detect, hyp):
        super().__init__()
        self.model = torch.nn.ModuleList([detect])
        self.hyp = hyp
        self.dummy = torch.nn.Parameter(torch.zeros(1))


def _random_case(bs=2, nc=4, img=64, n=10, seed=3):
    gen = torch.Generator().manual_seed(seed)
    preds = [torch.randn(bs, 3, img // s, img // s, 5 + nc, generator=gen, dtype=torch.float64) for s in (8, 16, 32)]
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.5 + 0.02
    xy = wh / 2 + torch.rand(n, 2, generator=gen, dtype=torch.float64) * (1 - wh)
    img_idx = torch.randint(0, bs, (n, 1), generator=gen).double()
    cls = torch.randint(0, nc, (n, 1), generator=gen).double()
    return preds, torch.cat((img_idx, cls, xy, wh), 1)


@pytest.mark.parametrize(
    "hyp",
    [
        dict(fl_gamma=1.5, obj_pw=1.7, cls_pw=2.5, label_smoothing=0.1),
        dict(fl_gamma=2.0, obj_pw=1.0, cls_pw=0.5, anchor_t=3.0, box=0.1),
    ],
)
def test_matches_computeloss_on_other_hyps(hyp):
    from yolov5.utils.loss import ComputeLoss

    full = dict(box=0.05, obj=1.0, cls=0.5, cls_pw=1.0, obj_pw=1.0, fl_gamma=0.0, anchor_t=4.0, label_smoothing=0.0)
    full.update(hyp)
    preds, targets = _random_case()
    loss_fn = YOLOv5Loss(4, **full)
    ours = [p.clone().requires_grad_(True) for p in preds]
    out = loss_fn(ours, targets)
    out.total.backward()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the reference data ran the original in float64 too
    try:
        peer = ComputeLoss(_Model(_Detect(loss_fn.anchors_grid, 4, loss_fn.strides), full))
        theirs = [p.clone().requires_grad_(True) for p in preds]
        total, parts = peer(theirs, targets)
        total.sum().backward()
    finally:
        torch.set_default_dtype(default)
    assert out.stats["num_pos"] > 0
    torch.testing.assert_close(out.total, total.reshape(()), rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.stack([out.components[k] for k in ("box", "obj", "cls")]), parts, rtol=1e-9, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-12)
