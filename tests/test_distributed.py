"""detloss.distributed helpers, and every detector loss under DistributedDataParallel (2 gloo
processes x 2 images against 1 process x 4 images).

DDP averages gradients over ranks. With ``reduce_across_ranks=True`` the normalizers are reduced
across ranks, so two ranks holding half a batch each must produce the parameter gradient of one
process holding the whole batch, and the mean of their totals its loss. With the default
(False) no collective is issued: each rank's gradient is that of its own half alone, which a
single process reproduces half by half, and the loss computed on rank 0 only finishes.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from detloss import distributed as ddist
from detloss.losses.fcos import FCOSLoss
from detloss.losses.retinanet import RetinaNetLoss
from detloss.losses.ssd import SSDLoss
from detloss.losses.yolov3 import YOLOv3Loss
from detloss.losses.yolov5 import YOLOv5Loss
from detloss.losses.yolov8 import YOLOv8Loss

WORLD = 2
BATCH = 4
FEATURES = 4


def test_helpers_are_no_ops_without_a_process_group():
    assert not ddist.is_initialized()
    assert ddist.world_size() == 1 and ddist.rank() == 0
    t = torch.tensor([3.0, 4.0])
    assert ddist.reduce_sum(t) is t
    assert ddist.reduce_mean(t) is t
    m = ddist.reduce_mean(torch.tensor(5))
    assert m.is_floating_point() and m.item() == 5.0
    with pytest.raises(TypeError, match="tensor: expected a torch.Tensor"):
        ddist.reduce_mean(5.0)


# ------------------------------------------------------------------------------------------ cases
# Each case: a small "model" (a per-position linear map of fixed random features, so every image's
# loss reaches the same parameters), the whole batch, how to take one rank's images, and the loss.


def _yolo_rows(per_image):
    """YOLO rows [N, 6] from per-image lists of (class, cx, cy, w, h)."""
    rows = [[float(i), *r] for i, boxes in enumerate(per_image) for r in boxes]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 6)


def _rows_of(rows, images):
    """The rows of ``images`` (a range), renumbered from 0."""
    keep = (rows[:, 0] >= images.start) & (rows[:, 0] < images.stop)
    out = rows[keep].clone()
    out[:, 0] -= images.start
    return out


YOLO_BOXES = [
    [(0, 0.30, 0.40, 0.35, 0.30), (1, 0.70, 0.60, 0.40, 0.50), (2, 0.5, 0.5, 0.9, 0.9)],
    [(1, 0.40, 0.45, 0.20, 0.25)],
    [],  # an empty image on the second rank
    [(2, 0.25, 0.70, 0.30, 0.40), (0, 0.72, 0.20, 0.45, 0.30)],
]


class _ConvHead(torch.nn.Module):
    """One 1x1 convolution shared by all levels: features [B, F, H, W] -> [B, C, H, W]."""

    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(FEATURES, channels, 1)

    def forward(self, xs):
        return [self.conv(x) for x in xs]


class _YOLOv5Head(torch.nn.Module):
    """A linear map per anchor and cell: features [B, na, H, W, F] -> [B, na, H, W, 5 + nc]."""

    def __init__(self, no):
        super().__init__()
        self.lin = torch.nn.Linear(FEATURES, no)

    def forward(self, xs):
        return [self.lin(x) for x in xs]


class YOLOCase:
    """Head outputs from per-level features, YOLO rows as targets."""

    nc, rtol = 3, 1e-9

    def features(self, shapes):
        g = torch.Generator().manual_seed(1)
        return [torch.randn(BATCH, *shape, generator=g, dtype=torch.float64) for shape in shapes]

    def batch(self):
        return self.features(self.shapes), _yolo_rows(YOLO_BOXES)

    def split(self, batch, images):
        xs, rows = batch
        return [x[images] for x in xs], _rows_of(rows, images)

    def call(self, loss_fn, model, part):
        xs, rows = part
        return loss_fn(model(xs), rows)


class YOLOv8Case(YOLOCase):
    reg_max = 4
    shapes = [(FEATURES, 64 // s, 64 // s) for s in (8, 16, 32)]

    def model(self):
        return _ConvHead(4 * self.reg_max + self.nc)

    def loss(self, reduce):
        return YOLOv8Loss(self.nc, reg_max=self.reg_max, reduce_across_ranks=reduce)


class YOLOv5Case(YOLOCase):
    shapes = [(3, 64 // s, 64 // s, FEATURES) for s in (8, 16, 32)]

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def model(self):
        return _YOLOv5Head(5 + self.nc)

    def loss(self, reduce):
        return YOLOv5Loss(self.nc, reduce_across_ranks=reduce, **self.kwargs)


class YOLOv3Case(YOLOCase):
    shapes = [(FEATURES, 64 // s, 64 // s) for s in (32, 16, 8)]

    def __init__(self, flavor):
        self.flavor = flavor

    def model(self):
        return _ConvHead(3 * (5 + self.nc))

    def loss(self, reduce):
        return YOLOv3Loss(self.nc, img_size=64, flavor=self.flavor, reduce_across_ranks=reduce)


class _FCOSHead(torch.nn.Module):
    """Per-point linear head: features [B, P, F] -> (cls [B, P, C], reg [B, P, 4], ctr [B, P, 1])."""

    def __init__(self, nc):
        super().__init__()
        self.nc = nc
        self.lin = torch.nn.Linear(FEATURES, nc + 5)

    def forward(self, x):
        y = self.lin(x)
        return y[..., : self.nc], y[..., self.nc : self.nc + 4].exp(), y[..., self.nc + 4 :]


class FCOSCase:
    """Per-image box dicts as targets, 64 x 64 images."""

    nc = 3
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]

    def __init__(self, rtol=1e-9, **kwargs):
        self.rtol, self.kwargs = rtol, kwargs

    def model(self):
        return _FCOSHead(self.nc)

    def batch(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, sum(h * w for h, w in self.sizes), FEATURES, generator=g, dtype=torch.float64)
        boxes = [
            [[4.0, 6.0, 40.0, 30.0], [10.0, 10.0, 60.0, 62.0], [0.0, 0.0, 64.0, 64.0]],
            [[20.0, 20.0, 30.0, 34.0]],
            [],  # an empty image on the second rank
            [[2.0, 30.0, 50.0, 60.0], [30.0, 2.0, 62.0, 20.0]],
        ]
        labels = [[0, 1, 2], [1], [], [2, 0]]
        targets = [
            {"boxes": torch.tensor(b, dtype=torch.float64).reshape(-1, 4), "labels": torch.tensor(lb, dtype=torch.int64)}
            for b, lb in zip(boxes, labels)
        ]
        return x, targets

    def split(self, batch, images):
        x, targets = batch
        return x[images.start : images.stop], targets[images.start : images.stop]

    def loss(self, reduce):
        return FCOSLoss(self.nc, reduce_across_ranks=reduce, **self.kwargs)

    def call(self, loss_fn, model, part):
        x, targets = part
        return loss_fn(*model(x), self.sizes, targets)


class _AnchorHead(torch.nn.Module):
    """Per-anchor linear head: features [B, A, F] -> (cls [B, A, C], box codes [B, A, 4])."""

    def __init__(self, nc):
        super().__init__()
        self.nc = nc
        self.lin = torch.nn.Linear(FEATURES, nc + 4)

    def forward(self, x):
        y = self.lin(x)
        return y[..., : self.nc], y[..., self.nc :]


class AnchorCase(FCOSCase):
    """RetinaNet / SSD on 64 x 64 images: anchors of two sizes centred on an 8 x 8 grid, the
    targets of :class:`FCOSCase` (SSD's labels shifted by one: its class 0 is the background).

    RetinaNet normalizes each image by its own positives, so the default already gives the whole
    batch's gradient (``default_is_whole_batch``); SSD's default divides by each rank's positives."""

    def __init__(self, loss_cls, default_is_whole_batch, **kwargs):
        super().__init__(1e-9, **kwargs)
        self.loss_cls, self.default_is_whole_batch = loss_cls, default_is_whole_batch
        self.nc = 4 if loss_cls is SSDLoss else 3
        c = (torch.arange(8, dtype=torch.float64) + 0.5) * 8
        cy, cx = torch.meshgrid(c, c, indexing="ij")
        centres = torch.stack((cx.reshape(-1), cy.reshape(-1)), -1)
        self.anchors = torch.cat([torch.cat((centres - s / 2, centres + s / 2), -1) for s in (12.0, 28.0)])

    def model(self):
        return _AnchorHead(self.nc)

    def batch(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, self.anchors.shape[0], FEATURES, generator=g, dtype=torch.float64)
        _, targets = super().batch()
        if self.loss_cls is SSDLoss:
            targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        return x, targets

    def loss(self, reduce):
        return self.loss_cls(self.nc, reduce_across_ranks=reduce, **self.kwargs)

    def call(self, loss_fn, model, part):
        x, targets = part
        return loss_fn(*model(x), self.anchors, targets)


CASES = {
    "yolov8": YOLOv8Case(),
    "yolov5": YOLOv5Case(),
    "yolov5_autobalance": YOLOv5Case(autobalance=True),
    "yolov3_darknet": YOLOv3Case("darknet"),
    "yolov3_pytorch": YOLOv3Case("pytorch-yolov3"),
    "fcos_torchvision": FCOSCase(),
    # mmdet's normalizers equal the whole batch's up to its eps (module docstring of FCOSLoss)
    "fcos_mmdet": FCOSCase(1e-6, convention="mmdet", center_sampling=True, box_loss="giou"),
    "fcos_mmdet_defaults": FCOSCase(1e-6, convention="mmdet"),
    "retinanet": AnchorCase(RetinaNetLoss, True),
    "retinanet_giou": AnchorCase(RetinaNetLoss, True, box_loss="giou"),
    "ssd": AnchorCase(SSDLoss, False),
}
SETTINGS = (False, True)


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def _step(case, state, part, reduce, ddp=False):
    model = case.model().double()
    model.load_state_dict(state)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    loss_fn = case.loss(reduce)
    out = case.call(loss_fn, net, part)
    out.total.backward()
    out.stats["balance_after"] = getattr(loss_fn, "balance", None)
    return _grads(model), out


def _worker(rank, tmp, states):
    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        half = BATCH // WORLD
        images = range(rank * half, (rank + 1) * half)
        results = {}
        for name, case in CASES.items():
            part = case.split(case.batch(), images)
            for reduce in SETTINGS:
                grads, out = _step(case, states[name], part, reduce, ddp=True)
                results[(name, reduce)] = {"grads": grads, "total": out.total.detach().clone(), "stats": out.stats}
        # the default issues no collective: the loss computed on rank 0 alone finishes (rank 1
        # waits on a file, in no collective; a collective on rank 0 would fail after the timeout)
        flag = os.path.join(tmp, "alone_done")
        if rank == 0:
            for name, case in CASES.items():
                _, out = _step(case, states[name], case.split(case.batch(), range(0, BATCH)), False)
                results[(name, "alone")] = float(out.total.detach())
            open(flag, "w").close()
        else:
            deadline = time.monotonic() + 120
            while not os.path.exists(flag) and time.monotonic() < deadline:
                time.sleep(0.05)
        torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    states = {name: case.model().double().state_dict() for name, case in CASES.items()}
    mp.spawn(_worker, args=(str(tmp), states), nprocs=WORLD, join=True)
    return states, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _assert_grads_close(actual, expected, rtol, what):
    for k, g in expected.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(actual[k], g, rtol=rtol, atol=rtol * scale, msg=f"{what} {k}")


@pytest.fixture(params=sorted(CASES))
def each(request, ranks):
    """(name, case, initial model state, the ranks' results) of each case."""
    states, results = ranks
    return request.param, CASES[request.param], states[request.param], results


@pytest.mark.distributed
def test_reduce_across_ranks_gives_the_whole_batch(each):
    name, case, state, results = each
    grads, out = _step(case, state, case.batch(), True)
    for res in results:
        _assert_grads_close(res[(name, True)]["grads"], grads, case.rtol, f"{name} reduce_across_ranks=True")
    mean_total = sum(res[(name, True)]["total"] for res in results) / WORLD
    torch.testing.assert_close(mean_total, out.total.detach(), rtol=case.rtol, atol=0)


@pytest.mark.distributed
def test_default_normalizes_each_rank_by_its_own_half(each):
    name, case, state, results = each
    half = BATCH // WORLD
    per_half = [_step(case, state, case.split(case.batch(), range(r * half, (r + 1) * half)), False)
                for r in range(WORLD)]
    mean = {k: sum(g[k] for g, _ in per_half) / WORLD for k in per_half[0][0]}
    for r, res in enumerate(results):
        _assert_grads_close(res[(name, False)]["grads"], mean, 1e-9, f"{name} default")
        torch.testing.assert_close(res[(name, False)]["total"], per_half[r][1].total.detach(), rtol=1e-12, atol=0)
    whole, _ = _step(case, state, case.batch(), False)
    if getattr(case, "default_is_whole_batch", False):
        # a loss normalized image by image (RetinaNet): the average of the halves is the whole batch
        _assert_grads_close(mean, whole, 1e-9, f"{name} default, per-image normalization")
        return
    # ... which is not the whole batch's gradient (the option above is what makes it so)
    assert max(float((mean[k] - g).abs().max() / g.abs().max()) for k, g in whole.items()) > 1e-3


@pytest.mark.distributed
def test_default_computed_on_one_rank_only_finishes(each):
    name, case, state, results = each
    _, out = _step(case, state, case.batch(), False)
    assert results[0][(name, "alone")] == pytest.approx(float(out.total.detach()), rel=1e-12)


@pytest.mark.distributed
def test_yolov8_normalizer_is_the_mean_of_the_ranks_sums(ranks):
    _, results = ranks
    local = [res[("yolov8", False)]["stats"]["target_scores_sum"] for res in results]
    for res in results:
        assert res[("yolov8", True)]["stats"]["normalizer"] == pytest.approx(sum(local) / WORLD, rel=1e-12)
        assert res[("yolov8", True)]["stats"]["target_scores_sum"] == res[("yolov8", True)]["stats"]["normalizer"]


@pytest.mark.distributed
def test_fcos_counts_the_positives_of_all_ranks(ranks):
    states, results = ranks
    case = CASES["fcos_torchvision"]
    _, out = _step(case, states["fcos_torchvision"], case.batch(), True)
    for res in results:
        assert res[("fcos_torchvision", True)]["stats"]["num_pos_total"] == out.stats["num_pos"]


@pytest.mark.distributed
def test_yolov5_autobalance_keeps_the_ranks_balance_equal_to_the_whole_batch(ranks):
    states, results = ranks
    case = CASES["yolov5_autobalance"]
    _, out = _step(case, states["yolov5_autobalance"], case.batch(), True)
    for res in results:
        got = res[("yolov5_autobalance", True)]["stats"]["balance_after"]
        assert got == pytest.approx(out.stats["balance_after"], rel=1e-12)
    # by default each rank follows its own half
    mine = [res[("yolov5_autobalance", False)]["stats"]["balance_after"] for res in results]
    assert mine[0] != mine[1]
