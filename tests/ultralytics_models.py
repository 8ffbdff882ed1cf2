"""Stand-ins for ultralytics models that allow only the reads ultralytics' criteria make.

:func:`minimal_model` builds, from a case's ``config.model`` (tests/data/ultralytics_tasks), an
object exposing exactly what the manifest's ``minimal_model`` lists: ``parameters()``, ``args``
with the case's fields only, ``model[-1]`` (a head whose class and bases carry ultralytics' head
names), ``class_weights`` when the case sets them. Any other attribute read raises
:class:`ForbiddenRead`, which is *not* an AttributeError, so ``getattr(obj, name, default)`` does
not swallow it; fields the criteria read through ``getattr(..., None)`` and the case does not set
raise AttributeError as on a real model. Every read is recorded in ``reads_of(obj)``.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import torch

__all__ = ["ForbiddenRead", "Strict", "minimal_model", "reads_of", "HEAD_BASES", "MODEL_CLASS"]


class ForbiddenRead(Exception):
    """An attribute ultralytics' criteria never read was read."""


class Strict:
    """An object with a fixed set of readable fields (see the module docstring)."""

    def __init__(self, label: str, fields: Dict[str, Any], absent: Iterable[str] = ()) -> None:
        object.__setattr__(self, "_label", label)
        object.__setattr__(self, "_fields", dict(fields))
        object.__setattr__(self, "_absent", set(absent))
        object.__setattr__(self, "_reads", [])

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            return object.__getattribute__(self, name)
        get = object.__getattribute__
        get(self, "_reads").append(name)
        fields = get(self, "_fields")
        if name in fields:
            return fields[name]
        if name in get(self, "_absent"):
            raise AttributeError(f"{get(self, '_label')} has no {name!r}")
        raise ForbiddenRead(f"{get(self, '_label')}.{name} was read; ultralytics' criteria never read it")

    def __setattr__(self, name: str, value: Any) -> None:
        raise ForbiddenRead(f"{object.__getattribute__(self, '_label')}.{name} was written")


def reads_of(obj: Strict) -> List[str]:
    """The attribute names read on ``obj`` so far, in order (with repeats)."""
    return list(object.__getattribute__(obj, "_reads"))


def _classes() -> Dict[str, type]:
    out: Dict[str, type] = {}
    for name, base in (
        ("Detect", Strict), ("v10Detect", "Detect"), ("OBB", "Detect"), ("OBB26", "OBB"),
        ("Pose", "Detect"), ("Pose26", "Pose"), ("Segment", "Detect"), ("Segment26", "Segment"),
        ("DetectionModel", Strict), ("OBBModel", "DetectionModel"), ("PoseModel", "DetectionModel"),
        ("SegmentationModel", "DetectionModel"), ("IterableSimpleNamespace", Strict),
    ):
        out[name] = type(name, (out[base] if isinstance(base, str) else base,), {})
    return out


_CLASSES = _classes()
#: Head class name -> its stand-in class (bases mirror ultralytics': OBB26(OBB(Detect)), ...).
HEAD_BASES = {k: v for k, v in _CLASSES.items() if not k.endswith("Model") and k != "IterableSimpleNamespace"}
#: Task -> the task model's class name.
MODEL_CLASS = {"detect": "DetectionModel", "obb": "OBBModel", "pose": "PoseModel", "segment": "SegmentationModel"}

#: Head fields the criteria read with getattr(..., None) / hasattr: AttributeError when unset.
_OPTIONAL_HEAD = ("one2one_cv2", "flow_model", "kpt_shape")


def minimal_model(
    model_cfg: Dict[str, Any],
    task: str = "detect",
    *,
    args: Optional[Dict[str, Any]] = None,
    head: Optional[Dict[str, Any]] = None,
    extra_head: Optional[Dict[str, Any]] = None,
) -> Strict:
    """The strict stand-in for a case's ``config.model`` (``args``, ``head``, ``class_weights``,
    ``kpt_oks_sigmas``); ``args`` / ``head`` override entries; ``extra_head`` adds head fields
    (e.g. ``{"flow_model": module}``: the case's ``flow_model`` entry is only a description, so a
    head without ``extra_head`` has none and ``hasattr(head, "flow_model")`` is False)."""
    hcfg = dict(model_cfg["head"], **(head or {}))
    fields: Dict[str, Any] = {
        "stride": torch.tensor(hcfg["stride"], dtype=getattr(torch, hcfg.get("stride_dtype", "float32"))),
        "nc": hcfg["nc"],
        "reg_max": hcfg["reg_max"],
    }
    if "one2one_cv2" in hcfg:
        fields["one2one_cv2"] = object()  # present; its value is never read
    if "kpt_shape" in hcfg:
        fields["kpt_shape"] = list(hcfg["kpt_shape"])
    fields.update(extra_head or {})
    head_obj = HEAD_BASES[hcfg["type"]]("model.model[-1]", fields, absent=[k for k in _OPTIONAL_HEAD if k not in fields])
    args_obj = _CLASSES["IterableSimpleNamespace"]("model.args", dict(model_cfg["args"], **(args or {})))
    param = torch.zeros(1)
    mfields: Dict[str, Any] = {"parameters": lambda: iter([param]), "args": args_obj, "model": [head_obj]}
    cw = model_cfg.get("class_weights")
    if cw is not None:  # {"values": [...], "dtype": "float32"}: a float32 tensor, as the trainer builds it
        mfields["class_weights"] = torch.tensor(cw["values"], dtype=getattr(torch, cw.get("dtype", "float32")))
    if model_cfg.get("kpt_oks_sigmas") is not None:
        mfields["kpt_oks_sigmas"] = list(model_cfg["kpt_oks_sigmas"])
    absent = [k for k in ("class_weights", "kpt_oks_sigmas") if k not in mfields]
    return _CLASSES[MODEL_CLASS[task]]("model", mfields, absent=absent)
