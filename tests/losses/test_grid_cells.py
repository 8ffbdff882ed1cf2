"""detloss.losses._grid_cells: the grid heads' cell reads (objectness planes, positives' rows) and
their one gradient buffer per level, on YOLOv5's channel-last outputs and YOLOv3's channel-first
raw inputs; and that YOLOv3Loss's backward writes each layer's gradient into one such buffer."""
from __future__ import annotations

import pytest
import torch

from detloss import YOLOv3Loss
from detloss.losses import _grid_cells
from detloss.losses._grid_cells import cell_coordinates, flat_cells, gather_cells, zero_gradient


def _channel_first(x, na):
    nb, c, h, w = x.shape
    return x.reshape(nb, na, c // na, h, w).permute(0, 1, 3, 4, 2)


@pytest.mark.parametrize("shape, perm", [((2, 3, 4, 5, 7), None), ((2, 3, 7, 4, 5), (0, 1, 3, 4, 2)), ((1, 1, 6, 1, 3), (0, 1, 3, 4, 2))])
def test_zero_gradient_follows_a_permuted_layout(shape, perm):
    t = torch.randn(shape)
    view = t if perm is None else t.permute(perm)
    g = zero_gradient(view.shape, view.stride(), view.dtype, view.device)
    assert g.shape == view.shape and bool((g == 0).all())
    assert [g.stride(d) for d in range(g.ndim) if g.shape[d] > 1] == [view.stride(d) for d in range(g.ndim) if g.shape[d] > 1]


def test_zero_gradient_of_an_expanded_tensor_is_contiguous():
    view = torch.randn(3, 1, 5).expand(3, 4, 5)  # overlapping: no dense layout to follow
    g = zero_gradient(view.shape, view.stride(), view.dtype, view.device)
    assert g.is_contiguous() and g.shape == view.shape


def test_cell_coordinates_inverts_flat_cells():
    shape = (3, 2, 5, 7, 9)
    gen = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, n, (50,), generator=gen) for n in shape[:4]]
    flat = flat_cells(shape, *idx)
    assert all(torch.equal(a, b) for a, b in zip(cell_coordinates(shape, flat), idx))
    assert torch.equal(flat, torch.arange(3 * 2 * 5 * 7).view(3, 2, 5, 7)[tuple(idx)])


@pytest.mark.parametrize("layout", ["channel-last", "channel-first"])
def test_gather_cells_values_and_gradcheck(layout):
    """Values equal plain indexing; gradients (float64 gradcheck) on both layouts, a repeated
    cell accumulating, a level with no positives, a level that needs no gradient."""
    gen = torch.Generator().manual_seed(1)
    na, nc, sizes = 2, 3, [(4, 5), (2, 3), (3, 3)]
    no = 5 + nc
    if layout == "channel-last":
        raw = [torch.randn(2, na, h, w, no, generator=gen, dtype=torch.float64) for h, w in sizes]
        view = lambda x: x  # noqa: E731
    else:
        raw = [torch.randn(2, na * no, h, w, generator=gen, dtype=torch.float64) for h, w in sizes]
        view = lambda x: _channel_first(x, na)  # noqa: E731
    flats = [torch.tensor([0, 7, 7, 33, 39]), torch.tensor([], dtype=torch.long), torch.tensor([5, 2])]
    w_box = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    w_cls = [torch.randn(f.numel(), nc, generator=gen, dtype=torch.float64) for f in flats]
    w_obj = [torch.randn(view(r).shape[:4], generator=gen, dtype=torch.float64) for r in raw]

    objs, box, classes = gather_cells([view(r) for r in raw], flats)
    for r, f, o, c in zip(raw, flats, objs, classes):
        v = view(r)
        assert torch.equal(o, v[..., 4])
        assert torch.equal(c, v.reshape(-1, no)[f][:, 5:])
    assert torch.equal(box, torch.cat([view(r).reshape(-1, no)[f][:, :4] for r, f in zip(raw, flats)]))

    def f(x0, x1):
        objs, box, classes = gather_cells([view(x0), view(x1), view(raw[2])], flats)
        out = (box * w_box).sum() + sum((o * w).sum() for o, w in zip(objs, w_obj))
        return out + sum((c * w).sum() for c, w in zip(classes, w_cls))

    x0, x1 = raw[0].clone().requires_grad_(True), raw[1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x0, x1))
    f(x0, x1).backward()
    assert x0.grad.stride() == x0.stride() and x1.grad.stride() == x1.stride()


def _yolov3_case(nb=2, img=128, nc=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(nb, 3 * (5 + nc), img // s, img // s, generator=gen) for s in (32, 16, 8)]
    targets = torch.tensor([[0, 1, 0.3, 0.4, 0.2, 0.3], [0, 2, 0.6, 0.6, 0.5, 0.4], [1, 0, 0.5, 0.5, 0.05, 0.08],
                            [1, 3, 0.52, 0.5, 0.06, 0.07]])
    return inputs, targets


@pytest.mark.parametrize("flavor", ["darknet", "pytorch-yolov3"])
def test_yolov3_backward_writes_one_buffer_per_layer(flavor, monkeypatch):
    """Each layer's gradient is the one buffer :func:`zero_gradient` gave (nothing copied or added
    after it), and equals the gradient of the same loss through plain autograd indexing."""
    buffers = []
    real = _grid_cells.zero_gradient

    def spy(*args):
        g = real(*args)
        buffers.append(g)
        return g

    monkeypatch.setattr(_grid_cells, "zero_gradient", spy)
    inputs, targets = _yolov3_case()
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    loss = YOLOv3Loss(4, img_size=128, flavor=flavor)
    out = loss(leaves, targets)
    assert out.stats["num_pos"] > 0
    out.total.backward()
    assert len(buffers) == 3
    for x, g in zip(leaves, buffers):
        assert x.grad.data_ptr() == g.data_ptr() and x.grad.is_contiguous()

    # the same loss with the cell reads through plain indexing (no custom backward)
    def plain(preds, flats):
        objs = [p[..., 4] for p in preds]
        rows = [p[tuple(cell_coordinates(p.shape, f))] for p, f in zip(preds, flats)]
        return objs, torch.cat([r[:, :4] for r in rows]), [r[:, 5:] for r in rows]

    monkeypatch.setattr("detloss.losses.yolov3.gather_cells", plain)
    again = [x.detach().clone().requires_grad_(True) for x in inputs]
    ref = loss(again, targets)
    ref.total.backward()
    assert torch.allclose(ref.total, out.total, rtol=1e-6)
    for x, y in zip(leaves, again):
        assert torch.allclose(x.grad, y.grad, rtol=1e-5, atol=1e-7)
