"""The DETR family under DistributedDataParallel (2 gloo processes): with ``reduce_across_ranks``
two ranks holding half a batch each produce exactly the parameter gradient of one process
holding the whole batch (the number of boxes, D-FINE's GO-set size and DDF counts, DETR's
cross-entropy weight sum and ultralytics' matched counts averaged over ranks)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from test_detr_edge import NC, REG, make_loss

WORLD = 2
Q, QDN, FEAT, GROUPS = 5, 12, 6, 2
COUNTS = [3, 1, 0, 2]  # rank 0: 4 boxes, rank 1: 2 boxes
KINDS = ["detr", "rtdetrv2", "ultralytics", "dfine", "deim"]


class Head(torch.nn.Module):
    """Per-query linear head: features -> logits, sigmoid boxes, corners."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(FEAT, NC + 1 + 4 + 4 * (REG + 1))

    def forward(self, x, nc):
        y = self.lin(x)
        return {"pred_logits": y[..., :nc], "pred_boxes": torch.sigmoid(y[..., NC + 1:NC + 5]),
                "pred_corners": y[..., NC + 5:]}


def batch():
    g = torch.Generator().manual_seed(0)
    b = len(COUNTS)
    feats = torch.randn(5, b, Q, FEAT, generator=g, dtype=torch.float64)  # main, aux 0, aux 1, enc, pre
    dn_feats = torch.randn(2, b, QDN, FEAT, generator=g, dtype=torch.float64)
    refs = torch.rand(5, b, Q, 4, generator=g, dtype=torch.float64) * 0.4 + 0.3
    dn_refs = torch.rand(2, b, QDN, 4, generator=g, dtype=torch.float64) * 0.4 + 0.3
    targets = []
    for n in COUNTS:
        c = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, NC, (n,), generator=g), "boxes": torch.cat((c, wh), 1)})
    return feats, dn_feats, refs, dn_refs, targets


def outputs(kind, model, feats, dn_feats, refs, dn_refs, targets):
    nc = NC + 1 if kind == "detr" else NC
    layers = [model(f, nc) for f in feats]
    corners = kind in ("dfine", "deim")
    for l, r in zip(layers, refs):
        if corners:
            l["ref_points"] = r
        else:
            del l["pred_corners"]
    main, aux0, aux1, enc, pre = layers
    out = dict(main, aux_outputs=[aux0, aux1])
    if kind == "detr":
        return out
    if kind == "ultralytics":
        out["aux_outputs"] = [enc, aux0, aux1]
    else:
        out["enc_aux_outputs"] = [{k: enc[k] for k in ("pred_logits", "pred_boxes")}]
        out["enc_meta"] = {"class_agnostic": False}
    dn = [model(f, nc) for f in dn_feats]
    for l, r in zip(dn, dn_refs):
        if corners:
            l["ref_points"] = r
        else:
            del l["pred_corners"]
    pos = [torch.cat([torch.arange(n) + k * QDN // GROUPS for k in range(GROUPS)]) for n in (t["labels"].numel() for t in targets)]
    if corners:
        out["pre_outputs"] = {k: pre[k] for k in ("pred_logits", "pred_boxes")}
        out["up"], out["reg_scale"] = torch.tensor([0.5], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)
        for a in out["aux_outputs"]:
            a["teacher_corners"], a["teacher_logits"] = main["pred_corners"], main["pred_logits"]
        for a in dn:
            a["teacher_corners"], a["teacher_logits"] = dn[-1]["pred_corners"], dn[-1]["pred_logits"]
        out["dn_outputs"] = dn
        out["dn_meta"] = {"dn_positive_idx": pos, "dn_num_group": GROUPS, "dn_num_split": [QDN, Q]}
    elif kind == "ultralytics":
        counts = [t["labels"].numel() for t in targets]
        offs = [sum(counts[:i]) for i in range(len(counts))]
        out["dn_aux_outputs"] = dn
        out["dn_meta"] = {"dn_pos_idx": pos, "dn_gt_idx": [torch.arange(n) + o for n, o in zip(counts, offs)],
                          "dn_num_group": GROUPS, "dn_num_split": [QDN, Q]}
    else:
        out["dn_aux_outputs"] = dn
        out["dn_meta"] = {"dn_positive_idx": pos, "dn_num_group": GROUPS, "dn_num_split": [QDN, Q]}
    return out


def run(kind, model, sl, reduce):
    feats, dn_feats, refs, dn_refs, targets = batch()
    loss_fn = make_loss(kind, reduce_across_ranks=reduce)
    out = outputs(kind, model, feats[:, sl], dn_feats[:, sl], refs[:, sl], dn_refs[:, sl], targets[sl])
    res = loss_fn(out, targets[sl])
    res.total.backward()
    return res


def _worker(rank, tmp, state):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        half = len(COUNTS) // WORLD
        sl = slice(rank * half, (rank + 1) * half)
        results = {}
        for kind, reduce in [(k, True) for k in KINDS] + [("rtdetrv2", False)]:
            model = Head().double()
            model.load_state_dict(state)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            res = run(kind, lambda x, nc: ddp(x, nc), sl, reduce)
            results[kind, reduce] = {"grads": {k: p.grad.clone() for k, p in model.named_parameters()},
                                     "total": res.total.detach().clone(), "normalizer": res.stats["normalizer"]}
        torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_with_half_batches_give_the_whole_batch_gradient(tmp_path):
    torch.manual_seed(0)
    state = Head().double().state_dict()
    ref = {}
    for kind in KINDS:
        model = Head().double()
        model.load_state_dict(state)
        res = run(kind, model, slice(None), True)
        ref[kind] = ({k: p.grad.clone() for k, p in model.named_parameters()}, res)

    mp.spawn(_worker, args=(str(tmp_path), state), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for kind in KINDS:
        grads, res = ref[kind]
        for r in ranks:
            assert r[kind, True]["normalizer"] == res.stats["normalizer"] / WORLD  # the mean of 4 and 2 boxes
            for k, g in grads.items():
                torch.testing.assert_close(r[kind, True]["grads"][k], g, rtol=1e-10, atol=1e-13, msg=f"{kind} {k}")
    # each rank's own normalizers (the default, no collective) make the gradient depend on the split
    grads, _ = ref["rtdetrv2"]
    diff = max(float((ranks[0]["rtdetrv2", False]["grads"][k] - g).abs().max()) for k, g in grads.items())
    assert diff > 1e-6
