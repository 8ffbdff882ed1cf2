"""Host-device synchronizations of one YOLOv8Loss forward + backward, counted on CPU.

A TorchFunctionMode sees every Python-level call that makes an accelerator wait for the host to
read a value: ``item`` / ``bool`` / ``int`` / ``float`` / ``index`` / ``tolist`` of a tensor,
``nonzero``, ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without
``output_size`` and indexing by a bool mask. The bound is the one the README states: one for
the checks of the inputs and the targets' padding size, two in the task-aligned assigner's
candidate path (the number of window cells and of candidates), one for the list of positives,
one for the stats.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode

from detloss import YOLOv8Loss

#: What YOLOv8Loss may synchronize per forward + backward (see the module docstring).
MAX_SYNCS = 5
#: Without targets: the checks and the stats.
MAX_SYNCS_NO_TARGETS = 2

_READS = {
    torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.masked_select, torch.Tensor.masked_select,
    torch.unique, torch.Tensor.unique, torch.Tensor.bincount, torch.bincount, torch.argwhere, torch.Tensor.argwhere,
}


class CountSyncs(TorchFunctionMode):
    """Counts the synchronizing calls made while active, by name (``self.calls``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None
        if func in _READS:
            name = getattr(func, "__name__", repr(func))
        elif func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
                name = "repeat_interleave"
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                name = "bool mask index"
        if name is not None:
            self.calls[name] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def problem(n_boxes: int, bs: int = 2, nc: int = 6, size: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    no = 64 + nc
    feats = [torch.randn(bs, no, size // s, size // s, generator=g, requires_grad=True) for s in (8, 16, 32)]
    n = bs * n_boxes
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
    img = torch.arange(bs).repeat_interleave(n_boxes).float()
    cls = torch.randint(0, nc, (n,), generator=g).float()
    return feats, torch.cat((img[:, None], cls[:, None], c, wh), 1), nc


def count_step(loss_fn, feats, targets) -> CountSyncs:
    loss_fn(feats, targets)  # first call outside: nothing cached on purpose, but keep it like a training step
    with CountSyncs() as counter:
        out = loss_fn(feats, targets)
        out.total.backward()
    return counter


def test_the_counter_sees_each_kind_of_read():
    t = torch.tensor([0.0, 1.0, 2.0])
    with CountSyncs() as c:
        bool(t.sum() > 0)
        int(t.max())
        t.tolist()
        t.nonzero()
        t[t > 0]
        torch.repeat_interleave(t, torch.tensor([1, 2, 0]))
        torch.repeat_interleave(t, torch.tensor([1, 2, 0]), output_size=3)  # not a sync
        t + 1  # not a sync
    assert c.calls == {"__bool__": 1, "__int__": 1, "tolist": 1, "nonzero": 1, "bool mask index": 1, "repeat_interleave": 1}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("n_boxes", [1, 8, 40])
def test_forward_backward_synchronizes_at_most_the_documented_number(monkeypatch, n_boxes, fused):
    if fused:  # the fused head pass, run eagerly (no compile): what large inputs take
        monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "0")
        monkeypatch.setenv("DETLOSS_COMPILE", "0")
    feats, targets, nc = problem(n_boxes)
    counter = count_step(YOLOv8Loss(nc), feats, targets)
    assert 1 <= counter.total <= MAX_SYNCS, dict(counter.calls)


def test_without_targets():
    feats, _, nc = problem(1)
    counter = count_step(YOLOv8Loss(nc), feats, torch.zeros(0, 6))
    assert counter.total <= MAX_SYNCS_NO_TARGETS, dict(counter.calls)


def test_bad_input_is_still_refused_by_its_own_check():
    feats, targets, nc = problem(4)
    loss_fn = YOLOv8Loss(nc)
    bad = targets.clone()
    bad[3, 1] = nc  # class out of range
    with pytest.raises(ValueError, match="class < num_classes"):
        loss_fn(feats, bad)
    bad = targets.clone()
    bad[2, 4] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        loss_fn(feats, bad)
    nan_feats = [f.detach().clone() for f in feats]
    nan_feats[1][0, 3, 1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"feats\[1\]: expected finite values.*\(0, 3, 1, 2\)"):
        loss_fn(nan_feats, targets)
    big = [f.detach().clone() for f in feats]
    big[0][:, :4] = 3e38  # finite, but the per-level sum overflows: the exact check clears it
    assert torch.isfinite(loss_fn(big, targets).total)
