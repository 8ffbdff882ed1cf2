"""The detr_family reference cases (tests/data/detr_family, see its manifest.json): loading a case
and rebuilding the originals' ``outputs`` dict and ``targets`` from it, as the manifest's
``format.rebuild`` describes."""
from __future__ import annotations

import json
from typing import Dict, List, Tuple

import numpy as np
import torch

from reference_cases import DATA

FOLDER = DATA / "detr_family"
MANIFEST = json.loads((FOLDER / "manifest.json").read_text())
CASES = {c["name"]: c for c in MANIFEST["cases"]}


def names(api: str = None, family: str = None) -> List[str]:
    return [n for n, c in CASES.items() if (api is None or c["config"]["api"] == api)
            and (family is None or c["config"]["family"] == family)]


def load(name: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    z = np.load(FOLDER / CASES[name]["file"], allow_pickle=False)
    cfg = json.loads(str(z["config"]))
    return {k: torch.from_numpy(z[k]) for k in z.files if k != "config"}, cfg


def _nest(flat: Dict[str, torch.Tensor]) -> dict:
    root: dict = {}
    for path, t in flat.items():
        parts = path.split(".")
        node = root
        for p in parts[:-1]:
            key = int(p) if p.isdigit() else p
            if key not in node:
                node[key] = {}
            node = node[key]
        node[parts[-1]] = t
    return _lists(root)


def _lists(node):
    if isinstance(node, dict):
        if node and all(isinstance(k, int) for k in node):
            return [_lists(node[i]) for i in range(len(node))]
        return {k: _lists(v) for k, v in node.items()}
    return node


def targets(arrays, cfg, dtype=None) -> List[dict]:
    out = []
    for b in range(cfg["num_images"]):
        boxes = arrays[f"tgt.{b}.boxes"]
        out.append({"labels": arrays[f"tgt.{b}.labels"], "boxes": boxes if dtype is None else boxes.to(dtype)})
    return out


def outputs(arrays, cfg, dtype=None):
    """(outputs dict, leaves {grad path: tensor requiring grad}) for the detloss call."""
    if cfg["family"] == "ultralytics":
        return _ultralytics_outputs(arrays, cfg, dtype)
    no_grad = ("ref_points", "up", "reg_scale")
    leaves = {}
    flat = {}
    for k, v in arrays.items():
        if not k.startswith("out."):
            continue
        path = k[4:]
        t = v.clone() if dtype is None else v.to(dtype)
        if not path.endswith(no_grad):
            t.requires_grad_(True)
            leaves[path] = t
        flat[path] = t
    out = _nest(flat)
    if cfg["family"] != "detr":
        out["enc_meta"] = {"class_agnostic": False}
    dn = cfg.get("dn_meta")
    if dn is not None:
        none = dn.get("dn_positive_idx_is_none", False)
        out["dn_meta"] = {
            "dn_positive_idx": None if none else [arrays[f"dn_meta.dn_positive_idx.{b}"] for b in range(cfg["num_images"])],
            "dn_num_group": dn["dn_num_group"],
            "dn_num_split": dn["dn_num_split"],
        }
    if cfg["family"] in ("dfine", "deim"):
        for a in out.get("aux_outputs", []):
            a["teacher_corners"] = out["pred_corners"]
            a["teacher_logits"] = out["pred_logits"]
        dn_layers = out.get("dn_outputs", [])
        for a in dn_layers:
            a["teacher_corners"] = dn_layers[-1]["pred_corners"]
            a["teacher_logits"] = dn_layers[-1]["pred_logits"]
    return out, leaves


def _ultralytics_outputs(arrays, cfg, dtype=None):
    """RT-DETRv2's layout from ultralytics' stacked layers (encoder output first, last decoder
    layer last), as the RTDETRLoss(convention="ultralytics") docstring describes."""
    def leaf(k):
        t = arrays[k].clone() if dtype is None else arrays[k].to(dtype)
        return t.requires_grad_(True)

    leaves = {"dec_bboxes": leaf("out.dec_bboxes"), "dec_scores": leaf("out.dec_scores")}
    boxes, scores = leaves["dec_bboxes"], leaves["dec_scores"]
    out = {
        "pred_logits": scores[-1],
        "pred_boxes": boxes[-1],
        "aux_outputs": [{"pred_logits": s, "pred_boxes": b} for s, b in zip(scores[:-1], boxes[:-1])],
    }
    if "out.dn_bboxes" in arrays:
        leaves["dn_bboxes"] = leaf("out.dn_bboxes")
        leaves["dn_scores"] = leaf("out.dn_scores")
        out["dn_aux_outputs"] = [{"pred_logits": s, "pred_boxes": b}
                                 for s, b in zip(leaves["dn_scores"], leaves["dn_bboxes"])]
    dn = cfg.get("dn_meta")
    if dn is not None:
        n = cfg["num_images"]
        out["dn_meta"] = {
            "dn_pos_idx": [arrays[f"dn_meta.dn_pos_idx.{b}"] for b in range(n)],
            "dn_gt_idx": [arrays[f"dn_meta.dn_gt_idx.{b}"] for b in range(n)],
            "dn_num_group": dn["dn_num_group"],
            "dn_num_split": dn["dn_num_split"],
        }
    return out, leaves


def matches(arrays, tag: str, num_images: int):
    """The original's per-image (query, target) pairs for one match tag, as sets."""
    return [set(map(tuple, arrays[f"match.{tag}.{b}"].T.tolist())) for b in range(num_images)]


def build_loss(cfg, **overrides):
    """The detloss loss a case's config names, with the case's matcher and loss kwargs."""
    import detloss

    kw = dict(cfg.get("loss_kwargs", {}))
    kw.update(overrides)
    if cfg["family"] == "ultralytics":
        return detloss.RTDETRLoss(cfg["num_classes"], convention="ultralytics", **kw)
    matcher = detloss.HungarianMatcher(**cfg["matcher"], clamp_sizes=cfg["family"] in ("dfine", "deim"))
    if cfg["api"] == "RTDETRLoss":
        kw["convention"] = cfg["convention"]
    return getattr(detloss, cfg["api"])(cfg["num_classes"], matcher=matcher, **kw)


def layer_outputs(out, cfg):
    """The matched layers of an outputs dict by match tag (main, aux_i, enc_i, pre)."""
    layers = {"main": out}
    for i, x in enumerate(out.get("aux_outputs", [])):
        layers[f"aux_{i}"] = x
    for i, x in enumerate(out.get("enc_aux_outputs", [])):
        layers[f"enc_{i}"] = x
    if "pre_outputs" in out:
        layers["pre"] = out["pre_outputs"]
    return layers
