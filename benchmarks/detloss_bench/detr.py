"""Benchmark: the DETR family against the originals' code, in the same process on the same inputs.

Peers (run unmodified, imported from the environment; rows are skipped with a note where one is
not installed): Hugging Face transformers' ports of DETR's ``SetCriterion`` / ``HungarianMatcher``
(``transformers.loss.loss_for_object_detection.ImageLoss``) and of RT-DETR's criterion
(``transformers.loss.loss_rt_detr.RTDetrLoss``), and ultralytics' ``RTDETRDetectionLoss``.

Measured, at batch 8, 300 queries, 80 classes, 6 decoder layers (plus the encoder output for
RT-DETR) and RT-DETR's denoising part (100 denoising queries per group budget: 20 groups of 10
boxes, or 2 of 100 -> 200 or 400 denoising queries, 6 layers), with 10 and 100 boxes per image:
the matcher over every matched layer, and the whole loss forward + backward (median time, and
the peak memory torch allocates during it beyond the inputs; the runs of detloss and the peer
interleaved). Synthetic float32 head outputs.
Before timing, the totals (and the matcher's pairs) of detloss and the peer are checked equal.

Run: ``python benchmarks/run.py detr`` (``--quick`` for tiny sizes) in an environment with the
peers, e.g. ``PYTHONPATH=src:benchmarks /work/venv-int/bin/python benchmarks/run.py detr``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import torch

from detloss import DETRLoss, RTDETRLoss
from detloss.assign.hungarian import check_set_targets
from ._common import fmt_mb, fmt_ms, interleaved_median_times, peak_memory, print_table

DN_BUDGET = 100  # RT-DETR's num_denoising: groups = budget // most boxes in an image


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # a peer that is not installed (or does not import) is skipped
        return e


def synthetic(bs: int, queries: int, nc: int, layers: int, boxes: int, seed: int = 0):
    """Per-layer logits / boxes ``[L, B, Q, .]`` (decoder layers, last = final), an encoder
    layer, denoising layers with RT-DETR's positive indices, and ``boxes`` targets per image."""
    g = torch.Generator().manual_seed(seed)
    groups = max(DN_BUDGET // boxes, 1)
    qdn = 2 * boxes * groups  # a positive and a negative query per box and group
    dec_logits = torch.randn(layers, bs, queries, nc, generator=g)
    dec_boxes = torch.sigmoid(torch.randn(layers, bs, queries, 4, generator=g))
    enc_logits = torch.randn(bs, queries, nc, generator=g)
    enc_boxes = torch.sigmoid(torch.randn(bs, queries, 4, generator=g))
    dn_logits = torch.randn(layers, bs, qdn, nc, generator=g)
    dn_boxes = torch.sigmoid(torch.randn(layers, bs, qdn, 4, generator=g))
    targets = []
    for _ in range(bs):
        wh = torch.rand(boxes, 2, generator=g) * 0.28 + 0.02
        c = wh / 2 + torch.rand(boxes, 2, generator=g) * (1 - wh)
        targets.append({"labels": torch.randint(0, nc, (boxes,), generator=g), "boxes": torch.cat((c, wh), 1)})
    pos = [torch.cat([torch.arange(boxes) + k * 2 * boxes for k in range(groups)]) for _ in range(bs)]
    offs = [b * boxes for b in range(bs)]
    meta = {"dn_positive_idx": pos, "dn_num_group": groups, "dn_num_split": [qdn, queries]}
    ultra_meta = {"dn_pos_idx": pos, "dn_gt_idx": [torch.arange(boxes) + o for o in offs],
                  "dn_num_group": groups, "dn_num_split": [qdn, queries]}
    return SimpleNamespace(dec_logits=dec_logits, dec_boxes=dec_boxes, enc_logits=enc_logits, enc_boxes=enc_boxes,
                           dn_logits=dn_logits, dn_boxes=dn_boxes, targets=targets, meta=meta, ultra_meta=ultra_meta)



# ---------------------------------------------------------------------- the three losses, both ways
def detr_case(data, nc, hf):
    """DETR: detloss.DETRLoss vs transformers' ImageLoss (its DETR port)."""
    layers = data.dec_logits.shape[0]
    wd = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    wd_all = dict(wd, **{f"{k}_{i}": v for i in range(layers - 1) for k, v in wd.items()})
    ours = DETRLoss(nc, weight_dict=wd_all)
    # DETR's logits have a no-object column
    logits = torch.cat((data.dec_logits, data.dec_logits[..., :1]), -1)

    def run_ours(x):
        lg, bx = x["logits"].unbind(0), x["boxes"].unbind(0)  # as the models split their stacked layers
        out = {"pred_logits": lg[-1], "pred_boxes": bx[-1],
               "aux_outputs": [{"pred_logits": lg[i], "pred_boxes": bx[i]} for i in range(layers - 1)]}
        return ours(out, data.targets).total

    runs = {"detloss": (run_ours, lambda: ours.matcher.match_layers(
        [(logits[i], data.dec_boxes[i]) for i in range(layers)], check_set_targets(data.targets, len(data.targets))))}
    if not isinstance(hf, Exception):
        peer = hf.ImageLoss(hf.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2), nc, 0.1,
                            ["labels", "boxes", "cardinality"])
        hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in data.targets]

        def run_peer(x):
            lg, bx = x["logits"].unbind(0), x["boxes"].unbind(0)
            out = {"logits": lg[-1], "pred_boxes": bx[-1],
                   "auxiliary_outputs": [{"logits": lg[i], "pred_boxes": bx[i]} for i in range(layers - 1)]}
            d = peer(out, hf_targets)
            return sum(d[k] * wd_all[k] for k in d if k in wd_all)

        runs["transformers"] = (run_peer, lambda: [peer.matcher({"logits": logits[i], "pred_boxes": data.dec_boxes[i]},
                                                                hf_targets) for i in range(layers)])
    return runs, {"logits": logits, "boxes": data.dec_boxes}


def rtdetr_case(data, nc, hf):
    """RT-DETRv2's criterion: detloss.RTDETRLoss vs transformers' RTDetrLoss (its RT-DETR port,
    where the encoder output is the last aux layer)."""
    layers = data.dec_logits.shape[0]
    ours = RTDETRLoss(nc, alpha=0.75, gamma=2.0)

    def layer_dicts(x, lk):
        lg, bx = x["dec_logits"].unbind(0), x["dec_boxes"].unbind(0)  # as the models split their stacked layers
        aux = [{lk: lg[i], "pred_boxes": bx[i]} for i in range(layers - 1)]
        enc = {lk: x["enc_logits"], "pred_boxes": x["enc_boxes"]}
        dn = [{lk: d, "pred_boxes": b} for d, b in zip(x["dn_logits"].unbind(0), x["dn_boxes"].unbind(0))]
        return {lk: lg[-1], "pred_boxes": bx[-1]}, aux, enc, dn

    def run_ours(x):
        main, aux, enc, dn = layer_dicts(x, "pred_logits")
        out = dict(main, aux_outputs=aux, enc_aux_outputs=[enc], dn_aux_outputs=dn, dn_meta=data.meta,
                   enc_meta={"class_agnostic": False})
        return ours(out, data.targets).total

    matched = [(data.dec_logits[i], data.dec_boxes[i]) for i in range(layers)] + [(data.enc_logits, data.enc_boxes)]
    runs = {"detloss": (run_ours, lambda: ours.matcher.match_layers(
        matched, check_set_targets(data.targets, len(data.targets))))}
    if not isinstance(hf, Exception):
        cfg = SimpleNamespace(matcher_class_cost=2.0, matcher_bbox_cost=5.0, matcher_giou_cost=2.0, use_focal_loss=True,
                              matcher_alpha=0.25, matcher_gamma=2.0, num_labels=nc, weight_loss_vfl=1.0,
                              weight_loss_bbox=5.0, weight_loss_giou=2.0, eos_coefficient=1e-4,
                              focal_loss_alpha=0.75, focal_loss_gamma=2.0)
        peer = hf.RTDetrLoss(cfg)
        hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in data.targets]

        def run_peer(x):
            main, aux, enc, dn = layer_dicts(x, "logits")
            out = dict(main, auxiliary_outputs=aux + [enc], dn_auxiliary_outputs=dn, denoising_meta_values=data.meta)
            return sum(peer(out, hf_targets).values())

        runs["transformers"] = (run_peer, lambda: [peer.matcher({"logits": lg, "pred_boxes": bx}, hf_targets)
                                                   for lg, bx in matched])
    names = ("dec_logits", "dec_boxes", "enc_logits", "enc_boxes", "dn_logits", "dn_boxes")
    return runs, {n: getattr(data, n) for n in names}


def ultralytics_case(data, nc, ul):
    """ultralytics' RT-DETR loss: detloss.RTDETRLoss(convention="ultralytics") vs RTDETRDetectionLoss."""
    layers = data.dec_logits.shape[0]
    ours = RTDETRLoss(nc, convention="ultralytics")

    def stacked(x):  # ultralytics' layout: encoder output first, last decoder layer last
        return (torch.cat((x["enc_boxes"][None], x["dec_boxes"])), torch.cat((x["enc_logits"][None], x["dec_logits"])))

    def run_ours(x):
        out = ours.ultralytics_outputs(*stacked(x), x["dn_boxes"], x["dn_logits"], data.ultra_meta)
        return ours(out, data.targets).total

    stack = (torch.cat((data.enc_boxes[None], data.dec_boxes)), torch.cat((data.enc_logits[None], data.dec_logits)))
    runs = {"detloss": (run_ours, lambda: ours.matcher.match_layers(
        [(stack[1][i], stack[0][i]) for i in range(layers + 1)], check_set_targets(data.targets, len(data.targets))))}
    if not isinstance(ul, Exception):
        peer = ul.RTDETRDetectionLoss(nc=nc, use_vfl=True)
        batch = {"cls": torch.cat([t["labels"] for t in data.targets]), "bboxes": torch.cat([t["boxes"] for t in data.targets]),
                 "gt_groups": [len(t["labels"]) for t in data.targets]}

        def run_peer(x):
            return sum(peer(stacked(x), batch, x["dn_boxes"], x["dn_logits"], data.ultra_meta).values())

        runs["ultralytics"] = (run_peer, lambda: [peer.matcher(stack[0][i], stack[1][i], batch["bboxes"], batch["cls"],
                                                               batch["gt_groups"]) for i in range(layers + 1)])
    names = ("dec_logits", "dec_boxes", "enc_logits", "enc_boxes", "dn_logits", "dn_boxes")
    return runs, {n: getattr(data, n) for n in names}


def _pairs(found) -> List[set]:
    """Matcher results (detloss Assignments or per-image pair lists, per layer) as sets."""
    out = []
    for layer in found:
        if hasattr(layer, "extras"):
            layer = layer.extras["indices"]
        out.append([set(zip(i.tolist(), j.tolist())) for i, j in layer])
    return out


def _check(name, runs, inputs, peer_offsets=None):
    totals = {}
    for who, (loss, _) in runs.items():
        totals[who] = float(loss({k: v.detach() for k, v in inputs.items()}))
    ref = totals["detloss"]
    for who, t in totals.items():
        if abs(t - ref) > 2e-4 * abs(ref):
            raise AssertionError(f"{name}: detloss total {ref} and {who}'s {t} disagree")
    matches = {who: _pairs(m()) for who, (_, m) in runs.items()}
    for who, m in matches.items():
        if who != "detloss" and who != "ultralytics" and m != matches["detloss"]:
            raise AssertionError(f"{name}: detloss and {who} matched differently")
        if who == "ultralytics":  # its target indices are offsets into the batch's concatenation
            offs = peer_offsets or []
            fixed = [[{(q, t - offs[b]) for q, t in img} for b, img in enumerate(layer)] for layer in m]
            if fixed != matches["detloss"]:
                raise AssertionError(f"{name}: detloss and ultralytics matched differently")
    return totals


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/run.py detr", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--layers", type=int, default=6, help="decoder layers")
    p.add_argument("--boxes", type=int, nargs="+", default=[10, 100], help="targets per image")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--peers", action="store_true", help="require the peers: a missing one is an error")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.queries, args.classes, args.layers, args.boxes, args.repeats = 2, 12, 5, 2, [3], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_detr = _optional("transformers.loss.loss_for_object_detection")
    hf_rtdetr = _optional("transformers.loss.loss_rt_detr")
    ul = _optional("ultralytics.models.utils.loss")
    for name, mod in (("transformers", hf_detr), ("transformers", hf_rtdetr), ("ultralytics", ul)):
        if isinstance(mod, Exception):
            if args.peers:
                print(f"detr: error: {name} is not importable here ({type(mod).__name__}: {mod})", file=sys.stderr)
                return 2
            print(f"note: {name} is not importable here ({type(mod).__name__}: {mod}); its rows are skipped")
    print(f"DETR family, batch {args.batch_size}, {args.queries} queries, {args.classes} classes, {args.layers} decoder "
          f"layers, float32, {torch.get_num_threads()} threads; ratio = peer / detloss (> 1: detloss is faster / smaller)")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: List[List[object]] = []
    for nb in args.boxes:
        data = synthetic(args.batch_size, args.queries, args.classes, args.layers, nb)
        offsets = [b * nb for b in range(args.batch_size)]
        for name, (runs, inputs) in (
            ("DETR", detr_case(data, args.classes, hf_detr)),
            ("RT-DETRv2", rtdetr_case(data, args.classes, hf_rtdetr)),
            ("RT-DETR ultralytics", ultralytics_case(data, args.classes, ul)),
        ):
            _check(f"{name}, {nb} boxes", runs, inputs, offsets)

            def step(loss, inputs=inputs):
                leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
                loss(leaves).backward()

            for what, fns in (("matcher", {w: m for w, (_, m) in runs.items()}),
                              ("loss fwd+bwd", {w: (lambda l=l: step(l)) for w, (l, _) in runs.items()})):
                t = interleaved_median_times(fns, args.repeats)
                mem = {w: peak_memory(f) for w, f in fns.items()}
                peer = next((w for w in fns if w != "detloss"), None)
                row = [nb, name, what, fmt_ms(t["detloss"]), fmt_mb(mem["detloss"])]
                if peer:
                    row += [f"{peer}", fmt_ms(t[peer]), fmt_mb(mem[peer]), f"{t[peer] / t['detloss']:.2f}x",
                            f"{mem[peer] / max(mem['detloss'], 1):.2f}x"]
                else:
                    row += ["(not installed)", "", "", "", ""]
                rows.append(row)
    print_table(["boxes/img", "loss", "what", "time detloss", "peak detloss", "peer", "time peer", "peak peer",
                 "time ratio", "peak ratio"], rows)
    if load_before is not None:
        print(f"machine load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
              f"({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
