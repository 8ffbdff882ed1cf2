"""Loading the reference cases copied into tests/data/<folder>/ (see each folder's manifest.json)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"


def case_names(folder: str, pattern: str = "c*.npz") -> List[str]:
    """The case files of one reference folder, sorted."""
    return sorted(p.name for p in (DATA / folder).glob(pattern))


def load_case(folder: str, name: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """A case's arrays as tensors (without its ``config`` and version strings) and its config."""
    d = np.load(DATA / folder / name)
    cfg = json.loads(str(d["config"]))
    return {k: torch.from_numpy(d[k]) for k in d.files if k != "config" and not k.endswith("version")}, cfg


# ---------------------------------------------------------------------------- ultralytics_tasks
# Cases of tests/data/ultralytics_tasks/ (manifest "format": preds_structure, preds_alias,
# requires_grad, batch.<key>, loss.u<k> / items.u<k> / grad.u<k>.<path> per schedule point).


def task_preds(arrays: Dict[str, torch.Tensor], cfg: dict) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """The criterion's ``preds`` rebuilt from ``config.preds_structure`` (a string is an array name,
    ``{"list": [...]}`` a list, ``{"tuple": [...]}`` a tuple, any other object a dict), and its
    leaves by array name: fresh copies, ``requires_grad`` where ``config.requires_grad`` says so;
    ``config.preds_alias`` names are detached views of their source (the one-to-one branch's
    ``feats`` and ``proto``)."""
    grad = set(cfg.get("requires_grad", ()))
    alias = cfg.get("preds_alias", {})
    leaves: Dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        if name in alias:
            return tensor(alias[name]).detach()
        if name not in leaves:
            leaves[name] = arrays[name].clone().requires_grad_(name in grad)
        return leaves[name]

    def build(node: Any) -> Any:
        if isinstance(node, str):
            return tensor(node)
        if set(node) == {"list"}:
            return [build(x) for x in node["list"]]
        if set(node) == {"tuple"}:
            return tuple(build(x) for x in node["tuple"])
        return {k: build(v) for k, v in node.items()}

    preds = build(cfg["preds_structure"])
    return preds, {k: v for k, v in leaves.items() if v.requires_grad}


def task_batch(arrays: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The collated batch (``batch.<key>`` arrays) as the criterion receives it."""
    return {k[len("batch."):]: v.clone() for k, v in arrays.items() if k.startswith("batch.")}


def schedule_points(cfg: dict) -> List[int]:
    """The ``updates`` counts recorded for the case (``[0]`` without a schedule)."""
    return [int(p["updates"]) for p in cfg["schedule"]]
