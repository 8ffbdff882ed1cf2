"""Checking a claimed value (``--expect``): compared at the precision it is written with; when it
does not hold, the intermediate quantities and each family's common slips (its ``variants``) that
reproduce it are named."""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from .steps import Check, Explanation, formatter, index_names, show, to_plain

__all__ = ["check_claim"]

LN2 = math.log(2.0)
LN10 = math.log(10.0)


def _decimals(text: str) -> Tuple[float, float]:
    """Half a unit of the last written digit (absolute), and a relative part for e-notation."""
    t = text.strip().lower()
    if "e" in t:
        mant, _, exp = t.partition("e")
        dec = len(mant.split(".")[1]) if "." in mant else 0
        return 0.5 * 10 ** (int(exp) - dec), 0.0
    dec = len(t.split(".")[1]) if "." in t else 0
    return 0.5 * 10 ** (-dec), 0.0


def _parse_claim(claimed: Any) -> Tuple[List[float], List[float], List[str]]:
    if isinstance(claimed, str):
        parts = [p for p in re.split(r"[,;\s]+", claimed.strip()) if p]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"expect: expected a number or comma-separated numbers, got {claimed!r}") from None
        if not parts or not all(math.isfinite(v) for v in vals):
            raise ValueError(f"expect: expected finite numbers, got {claimed!r}")
        return vals, [_decimals(p)[0] * 1.0001 + 1e-12 for p in parts], parts
    if isinstance(claimed, torch.Tensor):
        claimed = claimed.reshape(-1).tolist()
    if isinstance(claimed, (int, float)):
        claimed = [claimed]
    vals = [float(v) for v in claimed]
    return vals, [max(abs(v) * 1e-6, 1e-9) for v in vals], [repr(v) for v in vals]


def check_claim(e: Explanation, claimed: Any) -> Check:
    vals, tols, texts = _parse_claim(claimed)
    text_of = dict(zip(vals, texts))
    fmt = formatter(4)
    res = e.result.reshape(-1)
    lines: List[str] = []
    mismatches: List[Dict[str, Any]] = []
    elem_shape = e.result.shape
    names = index_names(elem_shape) if e.result.ndim else [""]
    if e.result.ndim == 0:
        if len(vals) != 1:
            raise ValueError(f"expect: expected 1 value (the result is a scalar), got {len(vals)}")
        pairs = [(None, vals[0], tols[0])]
    elif len(vals) == res.numel():
        pairs = [(i, vals[i], tols[i]) for i in range(len(vals))]
    elif len(vals) == 1:
        pairs = [(None, vals[0], tols[0])]
    else:
        raise ValueError(
            f"expect: expected 1 value or {res.numel()} (one per element of the result), got {len(vals)}")
    for i, v, tol in pairs:
        if i is None:
            hit = [k for k in range(res.numel()) if abs(float(res[k]) - v) <= tol]
            if hit:
                continue
            actual = float(res[0]) if res.numel() == 1 else float("nan")
            where = "the result" if e.result.ndim == 0 else "any element of the result"
            actual_text = show(e.result, fmt)
        else:
            actual = float(res[i])
            if abs(actual - v) <= tol:
                continue
            where = f"element {names[i]}"
            actual_text = fmt(actual)
        inp = _describe_element(e, i)
        mm = {"index": i, "claimed": v, "actual": actual if i is not None or res.numel() == 1 else to_plain(e.result),
              "matches": []}
        lines.append(f"claim {text_of[v]} for {where}{inp} does not hold: {e.function} gives {actual_text}.")
        found = _explain_value(e, v, tol, i)
        if found:
            for desc in found:
                lines.append(f"  {text_of[v]} is {desc}.")
            mm["matches"] = found
        else:
            lines.append(f"  {text_of[v]} matches none of the intermediate quantities or common variants tried.")
        mismatches.append(mm)
    holds = not mismatches
    if holds:
        lines.insert(0, f"claim {', '.join(texts)} holds (to the precision it is written with).")
    return Check(claimed=vals, holds=holds, lines=lines, mismatches=mismatches)


def _describe_element(e: Explanation, i: Optional[int]) -> str:
    if i is None or e.result.ndim == 0:
        if e.result.ndim == 0 and e.elementwise.numel() == 1:
            i = 0
        else:
            return ""
    fmt = formatter(4)
    parts = []
    for name, t in e.inputs.items():
        if t.shape == e.result.shape or (e.result.ndim == 0 and t.numel() == 1):
            parts.append(f"{name}={fmt(float(t.reshape(-1)[i]))}")
        elif t.ndim >= 1 and e.result.ndim >= 1 and t.shape[0] == e.result.shape[0] and t.ndim == e.result.ndim + 1:
            parts.append(f"{name}={show(t[i], fmt)}")
    return f" ({', '.join(parts)})" if parts else ""


def _explain_value(e: Explanation, v: float, tol: float, i: Optional[int]) -> List[str]:
    fmt = formatter(4)
    found: List[str] = []

    def at(t: torch.Tensor) -> List[Tuple[str, float]]:
        t = t.detach().double()
        if t.ndim == 0:
            return [("", float(t))]
        nd = e.result.ndim
        if i is not None and t.shape == e.result.shape:
            return [("", float(t.reshape(-1)[i]))]
        if i is not None and t.ndim > nd and t.shape[:nd] == e.result.shape:
            sub = t.reshape(e.result.numel(), -1)[i]
            return [(f" (component {k})", float(s)) for k, s in enumerate(sub)]
        flat = t.reshape(-1)
        nm = index_names(t.shape)
        return [(f" at {nm[k]}", float(flat[k])) for k in range(flat.numel())]

    for desc, t in e.variants:
        for suffix, val in at(t):
            if abs(val - v) <= tol:
                found.append(f"{desc}{suffix}: {fmt(val)}")
                break
    for s in e.steps:
        for suffix, val in at(s.values):
            if abs(val - v) <= tol:
                found.append(f"the intermediate {s.symbol} = {s.formula}{suffix}: {fmt(val)}, not the loss")
                break
    for base, div in (("log base 2", LN2), ("log base 10", LN10)):
        for suffix, val in at(e.result):
            if abs(val / div - v) <= tol:
                found.append(f"the loss with {base} instead of the natural log{suffix}: {fmt(val / div)}")
                break
    return found
