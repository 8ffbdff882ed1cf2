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


def level_maps(flat: torch.Tensor, feats: List[torch.Tensor]) -> List[torch.Tensor]:
    """A head output ``(B, C, A)`` as per-level views ``[B, C, h, w]`` (the sizes of ``feats``)."""
    sizes = [f.shape[2] * f.shape[3] for f in feats]
    return [t.unflatten(2, tuple(f.shape[2:])) for t, f in zip(flat.split(sizes, 2), feats)]


def detect_maps(branch: Dict[str, Any]) -> List[torch.Tensor]:
    """``boxes`` and ``scores`` of one head's outputs as YOLOv8Loss's per-level ``[B, 4R + nc, h, w]``."""
    return [torch.cat(p, 1) for p in zip(level_maps(branch["boxes"], branch["feats"]), level_maps(branch["scores"], branch["feats"]))]


def target_rows(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """YOLO target rows ``(image, class, *bboxes)`` of a collated batch."""
    return torch.cat((batch["batch_idx"].reshape(-1, 1), batch["cls"].reshape(-1, 1), batch["bboxes"]), 1)


def flow_state(arrays: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The stored RealNVP state (``flow.<name>`` arrays) under its state_dict names."""
    return {k[len("flow."):]: v for k, v in arrays.items() if k.startswith("flow.")}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str = "") -> None:
    """``|actual - expected| <= rtol * max|expected| + atol`` elementwise (config.tolerance)."""
    actual = actual.detach().to(torch.float64)
    expected = expected.to(torch.float64)
    assert actual.shape == expected.shape, (what, tuple(actual.shape), tuple(expected.shape))
    if not expected.numel():
        return
    bound = tol["rtol"] * float(expected.abs().max()) + tol["atol"]
    err = float((actual - expected).abs().max())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def manifest_entry(folder: str, name: str) -> dict:
    """The case's entry in its folder's manifest.json ``cases`` (the recorded counts: ``n_targets``,
    ``assignment`` num_fg / target_scores_sum, ...)."""
    cases = json.loads((DATA / folder / "manifest.json").read_text())["cases"]
    return next(c for c in cases if c["file"] == name)


def check_dropin_case(criterion_cls: Any, name: str, folder: str = "ultralytics_tasks", flow: Any = None, wrap_preds: bool = False) -> Any:
    """Run one ultralytics_tasks case through a drop-in criterion built from the case's strict
    stand-in model (tests/ultralytics_models.py) under the case's default dtype, at every recorded
    schedule point: the loss vector, the items (names and values), and the gradients of
    ``loss.sum()`` w.r.t. every preds leaf (and ``flow``'s parameters) at the gradient points, to
    config.tolerance. ``flow``: the head's flow model (``extra_head``); ``wrap_preds``: pass preds
    as the ``(inference, dict)`` tuple of eval mode. Returns ``(criterion, model)``."""
    from ultralytics_models import minimal_model  # only the drop-in tests need the stand-ins

    arrays, cfg = load_case(folder, name)
    tol = cfg["tolerance"]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, cfg["default_dtype"]))
    try:
        model = minimal_model(cfg["model"], cfg["task"], extra_head={"flow_model": flow} if flow is not None else None)
        crit = criterion_cls(model)
        assert crit.form == ("e2e" if "one2one_cv2" in cfg["model"]["head"] else "single")
        params = list(flow.named_parameters()) if flow is not None else []
        for k, point in zip(schedule_points(cfg), cfg["schedule"]):
            while crit.updates < k:
                crit.update()
            if point["o2m"] is not None:
                assert (crit.o2m, crit.o2o) == (point["o2m"], point["o2o"])
            preds, leaves = task_preds(arrays, cfg)
            loss, items = crit((None, preds) if wrap_preds else preds, task_batch(arrays))
            assert loss.dtype == torch.get_default_dtype()
            assert list(items) == cfg["item_names"]
            assert_rel_close(loss, arrays[f"loss.u{k}"], tol, f"loss.u{k}")
            assert_rel_close(torch.stack(list(items.values())), arrays[f"items.u{k}"], tol, f"items.u{k}")
            if k in cfg["grad_points"]:
                grads = torch.autograd.grad(loss.sum(), list(leaves.values()) + [p for _, p in params], allow_unused=True)
                for path, g in zip(leaves, grads):
                    expected = arrays[f"grad.u{k}.{path[len('pred.'):]}"]
                    assert_rel_close(torch.zeros_like(expected) if g is None else g, expected, tol, f"u{k} {path}")
                for (pname, _), g in zip(params, grads[len(leaves):]):
                    if f"flowgrad.u{k}.{pname}" in arrays:
                        assert_rel_close(g, arrays[f"flowgrad.u{k}.{pname}"], tol, f"u{k} flow {pname}")
        return crit, model
    finally:
        torch.set_default_dtype(previous)


def check_reads(model: Any, cfg: dict) -> None:
    """The stand-in model saw exactly the reads ultralytics' criterion made (config.reads)."""
    from ultralytics_models import reads_of

    fields = object.__getattribute__(model, "_fields")
    head, args = fields["model"][-1], fields["args"]
    assert set(reads_of(model)) == set(cfg["reads"]["model"]), reads_of(model)
    assert set(reads_of(head)) - {"one2one_cv2"} == set(cfg["reads"]["head"]) - {"one2one_cv2"}, reads_of(head)
    assert set(reads_of(args)) == set(cfg["reads"]["args"]), reads_of(args)
