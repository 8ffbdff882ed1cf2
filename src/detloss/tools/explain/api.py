"""The entry point, :func:`explain`: parses the inputs, makes the functional call a user would
make (the result and autograd's gradient), runs the family's worked computation alongside and
gathers the variants used to diagnose a wrong claim."""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional

import torch

from .registry import ALIASES, LOSSES
from .steps import Explanation, describe_reduction, formatter

__all__ = ["explain", "parse_numbers", "as_tensor", "TENSOR_OPTIONS"]

# Options given as numbers per element or per class (parsed like --input, in the input's dtype).
TENSOR_OPTIONS = ("weight", "pos_weight", "label")


def as_tensor(name: str, value: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``value`` (a tensor, a number, a nested list or a string for :func:`parse_numbers`) as a
    tensor of finite numbers; ``name`` is the argument named in the errors."""
    if isinstance(value, str):
        return parse_numbers(name, value, dtype or torch.float64)
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.tensor(value, dtype=dtype or torch.float64)
        except Exception:
            raise TypeError(f"{name}: expected a tensor, a number or a (nested) list of numbers, got {value!r}") from None
    if value.is_floating_point() or value.is_complex():
        bad = ~torch.isfinite(value.detach())
        if bool(bad.any()):
            k = int(bad.reshape(-1).nonzero()[0])
            raise ValueError(f"{name}: expected finite numbers, got {value.detach().reshape(-1)[k].item()} "
                             f"at position {k}")
    return value


_SEPARATOR = re.compile(r"\s*,\s*|\s+")


def parse_numbers(name: str, text: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``"0.7,0.2,0.1"`` -> 1-D tensor; rows separated by ``;`` or ``/`` -> 2-D (``"1,2;3,4"``).

    Values are separated by commas or spaces; an empty value (``"1,,2"``, a trailing comma, an
    empty row) and a value that is not a finite number (``nan``, ``inf``, ``1e400``) are errors."""
    expected = f"{name}: expected comma-separated finite numbers (rows separated by ';')"
    text = text.strip()
    if not text:
        raise ValueError(f"{expected}, got an empty string")
    multi_row = bool(re.search(r"[;/]", text))
    parsed: List[List[float]] = []
    for r, row in enumerate(re.split(r"[;/]", text)):
        where = f" in row {r}" if multi_row else ""
        if not row.strip():
            raise ValueError(f"{expected}, got an empty row {r}: {text!r}")
        values = []
        for k, token in enumerate(_SEPARATOR.split(row.strip())):
            if not token:
                raise ValueError(f"{expected}, got an empty value at position {k}{where}: {text!r}")
            try:
                v = float(token)
            except ValueError:
                raise ValueError(f"{expected}, got {token!r} at position {k}{where}: {text!r}") from None
            if not math.isfinite(v):
                raise ValueError(f"{expected}, got {token!r} at position {k}{where}"
                                 + ("" if token.lower().lstrip("+-") in ("nan", "inf", "infinity") else
                                    " (beyond the float range)"))
            values.append(v)
        parsed.append(values)
    if not multi_row:
        return torch.tensor(parsed[0], dtype=dtype)
    if len({len(r) for r in parsed}) != 1:
        raise ValueError(f"{name}: every row must have the same number of values, got rows of {[len(r) for r in parsed]}")
    return torch.tensor(parsed, dtype=dtype)


def explain(loss_name: str, input: Any, target: Any, expect: Any = None, **options: Any) -> Explanation:
    """Work ``loss_name`` out step by step on ``input`` and ``target``.

    ``loss_name``: one of :data:`LOSSES` (``bce-with-logits``, ``bce``, ``cross-entropy``, ``focal``,
    ``qfl``, ``varifocal``, ``bce-blur``, ``smooth-l1``, ``l1``, ``mse``, ``iou-loss``, ``dfl``) or an
    alias (``iou``, ``giou``, ``diou``, ``ciou``). ``input``/``target``: tensors, numbers or lists
    (lists become float64). ``options``: the functional loss's keyword arguments (``reduction``,
    ``alpha``, ``gamma``, ``beta``, ``weight``, ``pos_weight``, ``label_smoothing``, ``ignore_index``,
    ``kind``, ``box_format``, ``convention``, ``label``); an option the loss does not take is an error.
    ``expect``: optional claimed value(s), checked with :meth:`Explanation.check`.
    """
    if not isinstance(loss_name, str):
        raise TypeError(f"loss_name: expected a string, got {type(loss_name).__name__}")
    name = loss_name.strip().lower().replace("_", "-")
    preset: Dict[str, Any] = {}
    if name in ALIASES:
        name, preset = ALIASES[name]
    if name not in LOSSES:
        choices = sorted(LOSSES) + sorted(ALIASES)
        raise ValueError(f"loss_name: expected one of {choices}, got {loss_name!r}")
    spec = LOSSES[name]
    for k in options:
        if k not in spec.options:
            raise ValueError(f"{k}: not an option of {name} (its options: {sorted(spec.options)})")
    for k, v in options.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{k}: expected a finite number, got {v}")
    opts: Dict[str, Any] = {**spec.options, **preset, **{k: v for k, v in options.items() if v is not None}}
    if "reduction" in opts:
        from detloss._checks import check_reduction

        check_reduction(opts["reduction"])
    x = as_tensor("input", input)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    y = as_tensor("target", target, x.dtype)
    if spec.input_rows and x.ndim == 1:  # a single row
        x = x[None]
        y = y[None] if (spec.soft_target and y.shape == x.shape[1:]) else y.reshape(1)
    if spec.input_rows and x.ndim != 2:
        raise ValueError(f"input: expected logits of shape [C] or [N, C] (rows separated by ';'), got {tuple(x.shape)}")
    if spec.target_kind != "index-or-soft" and not y.is_floating_point():
        y = y.to(x.dtype)
    if spec.target_kind == "index-or-soft" and y.is_floating_point() and not (spec.soft_target and y.shape == x.shape):
        fractional = y != y.round()
        if bool(fractional.any()):
            k = int(fractional.reshape(-1).nonzero()[0])
            raise ValueError(f"target: expected class indices (whole numbers) for {name}"
                             + (" or a distribution of the input's shape" if spec.soft_target else "")
                             + f", got {y.reshape(-1)[k].item()} at position {k}")
    for key in TENSOR_OPTIONS:
        if opts.get(key) is not None:
            opts[key] = as_tensor(key, opts[key], x.dtype).to(x.dtype)
    for key, what in spec.requires.items():
        if opts.get(key) is None:
            raise ValueError(f"{key}: {name} needs {what}, got none")
    fmt = formatter(4)
    # The result: exactly the functional call a user would make.
    xg = x.detach().clone().requires_grad_(True)
    result = spec.call(xg, y, opts)
    total = result.sum() if result.ndim else result
    grad = torch.autograd.grad(total, xg, allow_unused=True)[0] if total.requires_grad else None
    if grad is None:
        grad = torch.zeros_like(x)
    result = result.detach()
    xc = x.detach().to(result.dtype) if result.is_floating_point() else x.detach()
    yc = y.to(result.dtype) if y.is_floating_point() else y
    wopts = dict(opts)
    for key in TENSOR_OPTIONS:
        if wopts.get(key) is not None:
            wopts[key] = wopts[key].to(xc.dtype)
    with torch.no_grad():
        worked = spec.work(xc, yc, wopts, fmt)
    reduction = opts.get("reduction", "mean")
    elem = worked["elementwise"]
    names = spec.input_names
    inputs = {names[0]: x.detach(), names[1]: y}
    if opts.get("label") is not None:
        inputs["label"] = opts["label"]
    e = Explanation(
        loss=name, function=spec.function, formula=spec.formula, source=spec.source, inputs=inputs,
        options={k: v for k, v in wopts.items() if not k.startswith("_")}, steps=worked["steps"], elementwise=elem,
        reduction=reduction, reduction_text=describe_reduction(elem, reduction, fmt, wopts.get("_divisor")),
        result=result, gradient=grad, gradient_formula=worked.get("gradient"), divisor=wopts.get("_divisor"),
    )
    if spec.variants is not None:
        def _vcall(xx, yy, oo):
            with torch.no_grad():
                return spec.call(xx, yy, oo)
        try:
            e.variants = [(d, t.detach()) for d, t in spec.variants(_vcall, x.detach(), y, opts)]
        except NotImplementedError:
            e.variants = []
    if expect is not None:
        e.check(expect)
    return e
