"""A loss worked step by step with real numbers: ``detloss explain LOSS --input ... --target ...``.

Python API::

    from detloss.tools.explain import explain
    e = explain("bce-with-logits", [0.7, 0.2, 0.1], [1, 0, 0])
    print(e.render())          # sigmoids, each term with its formula, the reduction, the gradient
    e.result                   # the value detloss.functional.bce_with_logits returns
    e.to_dict()                # the same as plain data (what ``--json`` prints)
    e.check([0.6486])          # checks a claimed value; says where it goes wrong

The result always comes from :mod:`detloss.functional` (the same call a user would make); the
intermediate numbers (sigmoid, p_t, alpha_t, log-sum-exp, IoU terms, ...) are computed alongside
from the textbook formula of each loss, and the final step of that worked computation is checked
against the functional result (``Explanation.consistent``). The gradient is the one autograd
returns through the functional loss; where the closed form is short it is printed next to it.

A claim (``--expect``) is compared at the precision it is written with (0.4181 means
0.41805..0.41815). When it does not hold, every intermediate quantity and a set of common
slips (the other target branch, alpha or the modulating factor forgotten, logits read as
probabilities, another reduction, a log in another base, ...) are evaluated, each through
detloss.functional, and the ones that reproduce the claim are named.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["explain", "Explanation", "Step", "Check", "LOSSES", "add_arguments", "run"]

LN2 = math.log(2.0)
LN10 = math.log(10.0)


# ----------------------------------------------------------------------------- data types
@dataclass
class Step:
    """One quantity of the worked computation.

    ``symbol``/``formula``: what it is (``p``, ``sigmoid(x) = 1 / (1 + exp(-x))``);
    ``values``: its numbers (a tensor, same layout as the elements it is computed for);
    ``details``: optional per-element lines with the formula instantiated.
    """

    symbol: str
    formula: str
    values: torch.Tensor
    details: Optional[List[str]] = None
    note: str = ""

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"symbol": self.symbol, "formula": self.formula, "values": _tolist(self.values)}
        if self.details:
            d["details"] = list(self.details)
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class Check:
    """The verdict on a claimed value (``--expect``)."""

    claimed: List[float]
    holds: bool
    lines: List[str]
    mismatches: List[Dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"claimed": self.claimed, "holds": self.holds, "diagnosis": self.lines, "mismatches": self.mismatches}


@dataclass
class Explanation:
    """A loss worked step by step. ``result`` is what :mod:`detloss.functional` returns."""

    loss: str
    function: str
    formula: str
    source: str
    inputs: Dict[str, torch.Tensor]
    options: Dict[str, Any]
    steps: List[Step]
    elementwise: torch.Tensor  # the per-element loss of the worked computation (before reduction)
    reduction: str
    reduction_text: str
    result: torch.Tensor
    gradient: torch.Tensor  # d result / d input by autograd through the functional loss (sum if 'none')
    gradient_formula: Optional[Step] = None
    divisor: Optional[float] = None  # what 'mean' divides by when it is not the element count
    variants: List[Tuple[str, torch.Tensor]] = field(default_factory=list)
    check_result: Optional[Check] = None

    @property
    def consistent(self) -> bool:
        """The worked computation reproduces the functional result (to 1e-6 relative)."""
        worked = _reduce(self.elementwise, self.reduction, self.divisor)
        return bool(torch.allclose(worked.double(), self.result.detach().double(), rtol=1e-6, atol=1e-9))

    def check(self, claimed: Any) -> Check:
        """Check a claimed value (a number, a list, or a string like ``"0.4181"``/``"0.1,0.2"``)."""
        self.check_result = _check_claim(self, claimed)
        return self.check_result

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {
            "loss": self.loss,
            "function": self.function,
            "formula": self.formula,
            "source": self.source,
            "inputs": {k: _tolist(v) for k, v in self.inputs.items()},
            "options": {k: (_tolist(v) if isinstance(v, torch.Tensor) else v) for k, v in self.options.items()},
            "steps": [s.to_dict() for s in self.steps],
            "elementwise": _tolist(self.elementwise),
            "reduction": self.reduction,
            "reduction_text": self.reduction_text,
            "result": _tolist(self.result.detach()),
            "gradient": _tolist(self.gradient),
            "consistent": self.consistent,
        }
        if self.gradient_formula is not None:
            d["gradient_formula"] = self.gradient_formula.to_dict()
        if self.check_result is not None:
            d["check"] = self.check_result.to_dict()
        return d

    def render(self, digits: int = 4) -> str:
        fmt = _formatter(digits)
        out = [f"{self.loss}: {self.formula}", f"  computed by {self.function}; source: {self.source}"]
        opts = {k: v for k, v in self.options.items() if v is not None}
        if opts:
            out.append("  options: " + ", ".join(f"{k}={_short(v, fmt)}" for k, v in opts.items()))
        out.append("")
        for name, t in self.inputs.items():
            out.append(f"{name:>8} = {_show(t, fmt)}")
        out.append("")
        for i, s in enumerate(self.steps, 1):
            out.append(f"{i}. {s.symbol} = {s.formula}")
            if s.details:
                out.extend("     " + line for line in s.details)
            else:
                out.append(f"     {s.symbol} = {_show(s.values, fmt)}")
            if s.note:
                out.append(f"     ({s.note})")
        out.append(f"{len(self.steps) + 1}. reduction '{self.reduction}': {self.reduction_text}")
        out.append("")
        out.append(f"result = {_show(self.result.detach(), fmt)}")
        if not self.consistent:
            out.append("  (the worked steps above differ from the functional result beyond 1e-6)")
        out.append("")
        name0 = next(iter(self.inputs))
        what = "d result / d " + name0 + (" (of the sum of the elements)" if self.reduction == "none" else "")
        if self.gradient_formula is not None:
            g = self.gradient_formula
            out.append(f"gradient {what} = {g.formula}")
            if g.details:
                out.extend("     " + line for line in g.details)
            else:
                out.append(f"     formula:  {_show(g.values, fmt)}")
            out.append(f"     autograd: {_show(self.gradient, fmt)}")
        else:
            out.append(f"gradient {what}, by autograd through {self.function}:")
            out.append(f"     {_show(self.gradient, fmt)}")
        if self.check_result is not None:
            out.append("")
            out.extend(self.check_result.lines)
        return "\n".join(out)


# ----------------------------------------------------------------------------- small helpers
def _tolist(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        t = t.detach()
        return t.item() if t.ndim == 0 else t.tolist()
    return t


def _formatter(digits: int) -> Callable[[float], str]:
    def fmt(v: float) -> str:
        if isinstance(v, bool):
            return str(v)
        v = float(v)
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        if v == int(v) and abs(v) < 1e6:
            return str(int(v))
        if v != 0 and (abs(v) < 10 ** (-digits) or abs(v) >= 1e6):
            return f"{v:.{digits}e}"
        return f"{v:.{digits}f}"

    return fmt


def _show(t: Any, fmt: Callable[[float], str]) -> str:
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.ndim == 0:
            return fmt(t.item())
        if t.ndim == 1:
            return "[" + ", ".join(fmt(v) for v in t.tolist()) + "]"
        return "[" + ", ".join(_show(r, fmt) for r in t) + "]"
    return str(t)


def _short(v: Any, fmt: Callable[[float], str]) -> str:
    if isinstance(v, torch.Tensor):
        return _show(v, fmt)
    if isinstance(v, float):
        return fmt(v)
    return repr(v) if isinstance(v, str) else str(v)


def _index_names(shape: torch.Size) -> List[str]:
    n = int(torch.tensor(shape).prod().item()) if len(shape) else 1
    if len(shape) <= 1:
        return [f"[{i}]" for i in range(n)]
    out = []
    for i in range(n):
        idx, rest = [], i
        for d in reversed(shape):
            idx.append(rest % d)
            rest //= d
        out.append("[" + ",".join(str(k) for k in reversed(idx)) + "]")
    return out


def _details(shape: torch.Size, fn: Callable[[int], str]) -> List[str]:
    names = _index_names(shape)
    return [f"{names[i]:>6} {fn(i)}" for i in range(len(names))]


def _reduce(elements: torch.Tensor, reduction: str, divisor: Optional[float] = None) -> torch.Tensor:
    if reduction == "none":
        return elements
    if reduction == "sum":
        return elements.sum()
    if divisor is not None:
        return elements.sum() / divisor
    return elements.mean()


def _reduction_text(elements: torch.Tensor, reduction: str, fmt: Callable[[float], str], divisor: Any = None) -> str:
    flat = elements.detach().reshape(-1).tolist()
    shown = " + ".join(fmt(v) for v in flat[:8]) + (" + ..." if len(flat) > 8 else "")
    if reduction == "none":
        return "none: the per-element values are the result"
    if reduction == "sum":
        return f"L = sum = {shown} = {fmt(sum(flat))}"
    if divisor is None:
        divisor, label = len(flat), "n"
    else:
        divisor, label = float(divisor), "sum of weights"
    return f"L = ({shown}) / {fmt(divisor)} ({label}) = {fmt(sum(flat) / divisor)}"


def _as_tensor(name: str, value: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, str):
        return parse_numbers(name, value, dtype or torch.float64)
    try:
        return torch.tensor(value, dtype=dtype or torch.float64)
    except Exception:
        raise TypeError(f"{name}: expected a tensor, a number or a (nested) list of numbers, got {value!r}") from None


def parse_numbers(name: str, text: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``"0.7,0.2,0.1"`` -> 1-D tensor; rows separated by ``;`` or ``/`` -> 2-D (``"1,2;3,4"``)."""
    text = text.strip()
    if not text:
        raise ValueError(f"{name}: expected comma-separated numbers (rows separated by ';'), got an empty string")
    rows = [r for r in re.split(r"[;/]", text) if r.strip()]
    parsed: List[List[float]] = []
    for r in rows:
        try:
            parsed.append([float(v) for v in r.replace(" ", ",").split(",") if v.strip()])
        except ValueError:
            raise ValueError(
                f"{name}: expected comma-separated numbers (rows separated by ';'), got {text!r}"
            ) from None
    if len(parsed) == 1 and not re.search(r"[;/]", text):
        return torch.tensor(parsed[0], dtype=dtype)
    if len({len(r) for r in parsed}) != 1:
        raise ValueError(f"{name}: every row must have the same number of values, got rows of {[len(r) for r in parsed]}")
    return torch.tensor(parsed, dtype=dtype)


def _logsig(x: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(x)) = -softplus(-x), stable for any logit."""
    return -F.softplus(-x)


def _fn(name: str) -> Callable[..., torch.Tensor]:
    from .. import functional

    if not hasattr(functional, name):
        raise NotImplementedError(f"detloss.functional.{name} is not available in this installation")
    return getattr(functional, name)


# ----------------------------------------------------------------------------- the losses
@dataclass
class _Spec:
    function: str
    formula: str
    source: str
    options: Dict[str, Any]  # allowed options and their defaults (the functional defaults)
    work: Callable[..., Dict[str, Any]]
    call: Callable[..., torch.Tensor]  # (x, y, opts) -> functional result
    target_kind: str = "float"  # "float" | "index-or-soft" | "box"
    variants: Optional[Callable[..., List[Tuple[str, torch.Tensor]]]] = None


# --- binary cross-entropy family
def _work_bce_with_logits(x, y, o, fmt):
    w, pw = o.get("weight"), o.get("pos_weight")
    p = torch.sigmoid(x)
    logp, log1mp = _logsig(x), _logsig(-x)
    pwt = torch.ones_like(x) if pw is None else torch.as_tensor(pw, dtype=x.dtype).expand_as(x)
    wt = torch.ones_like(x) if w is None else torch.as_tensor(w, dtype=x.dtype).expand_as(x)
    term = -(pwt * y * logp + (1 - y) * log1mp)
    elem = wt * term
    fy, fp, fe, fw, fpw = y.reshape(-1), p.reshape(-1), elem.reshape(-1), wt.reshape(-1), pwt.reshape(-1)

    def detail(i):
        a, b = float(fy[i]), float(fp[i])
        pre = "" if w is None else f"{fmt(float(fw[i]))} * "
        pws = "" if pw is None else f"{fmt(float(fpw[i]))} * "
        if a == 1:
            s = f"y=1: l = -{pws}log(p) = {pre}-{pws}log({fmt(b)})"
        elif a == 0:
            s = f"y=0: l = -log(1 - p) = {pre}-log(1 - {fmt(b)})"
        else:
            s = f"y={fmt(a)}: l = {pre}-[{pws}{fmt(a)} * log({fmt(b)}) + {fmt(1 - a)} * log(1 - {fmt(b)})]"
        return f"{s} = {fmt(float(fe[i]))}"

    steps = [
        Step("p", "sigmoid(x) = 1 / (1 + exp(-x))", p),
        Step(
            "l",
            ("w * " if w is not None else "")
            + ("-[pos_weight * y * log(p) + (1 - y) * log(1 - p)]" if pw is not None else "-[y * log(p) + (1 - y) * log(1 - p)]"),
            elem,
            _details(x.shape, detail),
            note="log(p) is computed as -softplus(-x), stable for any logit",
        ),
    ]
    n = _divisor_count(elem, o)
    grad = wt * (p * (pwt * y + 1 - y) - pwt * y) / n
    gtxt = ("w * " if w is not None else "") + (
        "(p * (pos_weight * y + 1 - y) - pos_weight * y)" if pw is not None else "(p - y)"
    ) + (" / n" if o["reduction"] == "mean" else "")
    fg = grad.reshape(-1)
    gdetails = _details(x.shape, lambda i: f"({fmt(float(fp[i]))} - {fmt(float(fy[i]))}){' / ' + fmt(n) if n != 1 else ''} = {fmt(float(fg[i]))}") if pw is None and w is None else None
    return {"steps": steps, "elementwise": elem, "gradient": Step("dL/dx", gtxt, grad, gdetails)}


def _divisor_count(elem: torch.Tensor, o: Dict[str, Any]) -> float:
    return float(elem.numel()) if o.get("reduction") == "mean" else 1.0


def _work_bce(x, y, o, fmt):
    w = o.get("weight")
    wt = torch.ones_like(x) if w is None else torch.as_tensor(w, dtype=x.dtype).expand_as(x)
    logp = torch.log(x).clamp(min=-100)
    log1mp = torch.log1p(-x).clamp(min=-100)
    elem = -wt * (y * logp + (1 - y) * log1mp)
    fy, fx, fe = y.reshape(-1), x.reshape(-1), elem.reshape(-1)

    def detail(i):
        a, b = float(fy[i]), float(fx[i])
        if a == 1:
            s = f"y=1: l = -log(p) = -log({fmt(b)})"
        elif a == 0:
            s = f"y=0: l = -log(1 - p) = -log(1 - {fmt(b)})"
        else:
            s = f"y={fmt(a)}: l = -[{fmt(a)} * log({fmt(b)}) + {fmt(1 - a)} * log(1 - {fmt(b)})]"
        return f"{s} = {fmt(float(fe[i]))}"

    steps = [
        Step("log p, log(1-p)", "natural logs of the probabilities, each clamped at -100 (as torch does)",
             torch.stack((logp, log1mp), -1)),
        Step("l", ("w * " if w is not None else "") + "-[y * log(p) + (1 - y) * log(1 - p)]", elem, _details(x.shape, detail)),
    ]
    n = _divisor_count(elem, o)
    grad = wt * (x - y) / (x * (1 - x)).clamp(min=1e-12) / n
    return {"steps": steps, "elementwise": elem,
            "gradient": Step("dL/dp", ("w * " if w is not None else "") + "(p - y) / (p * (1 - p))" + (" / n" if n != 1 else ""), grad)}


def _flip_variants(call, x, y, o, branches: str = ""):
    out = []
    if torch.all((y == 0) | (y == 1)):
        out.append(("the value for the opposite target (1 - y), i.e. the other branch of the formula"
                    + (f" ({branches})" if branches else ""), call(x, 1 - y, o)))
    return out


def _reduction_variants(call, x, y, o):
    out = []
    if "reduction" in o:
        for r in ("none", "sum", "mean"):
            if r != o["reduction"]:
                out.append((f"reduction='{r}'", call(x, y, {**o, "reduction": r})))
    return out


def _v_bce_with_logits(call, x, y, o):
    v = _flip_variants(call, x, y, o, "-log(1 - p) where y = 1, -log(p) where y = 0") + _reduction_variants(call, x, y, o)
    if torch.all((x >= 0) & (x <= 1)):
        bce = _fn("binary_cross_entropy")
        v.append(("the input read as probabilities (binary_cross_entropy, no sigmoid)",
                  bce(x, y, reduction=o["reduction"])))
    return v


def _v_bce(call, x, y, o):
    v = _flip_variants(call, x, y, o) + _reduction_variants(call, x, y, o)
    v.append(("the input read as logits (bce_with_logits)", _fn("bce_with_logits")(x, y, reduction=o["reduction"])))
    return v


# --- cross-entropy
def _ce_soft(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Soft (probability) targets when the target has the logits' shape; class indices otherwise."""
    return y.shape == x.shape and y.is_floating_point()


def _work_cross_entropy(x, y, o, fmt):
    # x: [N, C] logits (a single row [C] is made [1, C] by explain()).
    soft = _ce_soft(x, y)
    eps = float(o.get("label_smoothing") or 0.0)
    w = o.get("weight")
    ignore = int(o["ignore_index"]) if o.get("ignore_index") is not None else -100
    N, C = x.shape
    m = x.max(-1, keepdim=True).values
    lse = m + torch.log(torch.exp(x - m).sum(-1, keepdim=True))
    logq = x - lse
    q = torch.exp(logq)
    wc = torch.ones(C, dtype=x.dtype) if w is None else w
    if soft:
        t = y
        valid = torch.ones(N, dtype=torch.bool)
    else:
        yi = y.long().reshape(-1)
        valid = yi != ignore
        bad = valid & ((yi < 0) | (yi >= C))
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            raise ValueError(f"target: expected class indices in [0, {C - 1}] (or ignore_index {ignore}), "
                             f"got {int(yi[k])} at row {k}")
        t = F.one_hot(yi.clamp(0, C - 1), C).to(x.dtype) * valid[:, None]
    ts = t * (1 - eps) + eps / C * valid[:, None].to(x.dtype)
    elem = -(ts * wc * logq).sum(-1) * valid
    if soft:
        divisor = None
    elif w is not None:
        divisor = float((wc[yi.clamp(0, C - 1)] * valid).sum())
    else:
        divisor = None if bool(valid.all()) else float(valid.sum())
    steps = [
        Step("m", "max_c x_c (subtracted for stability)", m.squeeze(-1)),
        Step("lse", "m + log(sum_c exp(x_c - m))  (log-sum-exp)", lse.squeeze(-1)),
        Step("log q", "x - lse  (log-softmax)", logq),
        Step("q", "softmax(x) = exp(log q)", q),
    ]
    if soft:
        steps.append(Step("t", "the target distribution as given (soft targets)", t))
    else:
        steps.append(Step("t", "one-hot of the class index"
                          + ("" if bool(valid.all()) else f" (rows with target {ignore} are ignored)"), t))
    if eps:
        steps.append(Step("t'", f"(1 - eps) * t + eps / C with eps={fmt(eps)}, C={C}  (label smoothing)", ts))
    tn = "t'" if eps else "t"

    def detail(i):
        if not bool(valid[i]):
            return f"ignored (target {ignore}) = 0"
        if not soft and not eps:
            c = int(yi[i])
            pre = "" if w is None else f"{fmt(float(wc[c]))} * "
            return f"y={c}: l = {pre}-log q_{c} = {pre}-({fmt(float(logq[i, c]))}) = {fmt(float(elem[i]))}"
        terms = " + ".join(f"{fmt(float(ts[i, c]))} * ({fmt(float(logq[i, c]))})" for c in range(C) if float(ts[i, c]) != 0)
        return f"l = -[{terms}] = {fmt(float(elem[i]))}"

    steps.append(Step("l", ("-sum_c w_c * " if w is not None else "-sum_c ") + f"{tn}_c * log q_c", elem,
                      _details(torch.Size([N]), detail)))
    o["_divisor"] = divisor
    n = 1.0
    if o["reduction"] == "mean":
        n = divisor if divisor is not None else float(N)
    grad = None
    if w is None:
        gr = (q * ts.sum(-1, keepdim=True) - ts) * valid[:, None] / n
        grad = Step("dL/dx", "(softmax(x) * sum_c t_c - t)" + (" / n" if n != 1 else ""), gr)
    return {"steps": steps, "elementwise": elem, "gradient": grad}


def _call_cross_entropy(x, y, o):
    soft = _ce_soft(x, y)
    kw = {k: o[k] for k in ("weight", "label_smoothing", "reduction") if o.get(k) is not None}
    if o.get("ignore_index") is not None:
        kw["ignore_index"] = int(o["ignore_index"])
    tgt = y if soft else y.long()
    return _fn("cross_entropy")(x, tgt, **kw)


def _v_cross_entropy(call, x, y, o):
    v = _reduction_variants(call, x, y, o)
    if o.get("label_smoothing"):
        v.append(("no label smoothing", call(x, y, {**o, "label_smoothing": 0.0})))
    x2 = x
    v.append(("softmax probabilities q (no log taken)", torch.softmax(x, -1)))
    soft = _ce_soft(x, y)
    if not soft and torch.all((x >= 0) & (x <= 1)):
        yi = y.long().reshape(-1)
        v.append(("-log of the input read as a probability (no softmax)", -torch.log(x2[torch.arange(x2.shape[0]), yi.clamp(min=0)].clamp(min=1e-12))))
    if not soft:
        bce = _fn("bce_with_logits")
        onehot = F.one_hot(y.long().reshape(-1).clamp(min=0), x2.shape[-1]).to(x.dtype)
        v.append(("sigmoid BCE over the classes (one-hot target) instead of softmax cross-entropy",
                  bce(x2, onehot, reduction="none").sum(-1)))
        v.append(("sigmoid BCE over the classes, mean over all elements", bce(x2, onehot, reduction="mean")))
    return v


# --- focal family
def _work_sigmoid_focal(x, y, o, fmt):
    alpha, gamma = float(o["alpha"]), float(o["gamma"])
    p = torch.sigmoid(x)
    ce = -(y * _logsig(x) + (1 - y) * _logsig(-x))
    pt = p * y + (1 - p) * (1 - y)
    mod = (1 - pt) ** gamma
    at = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else torch.ones_like(x)
    elem = at * mod * ce
    fy, fp, fpt, fat, fm, fc, fe = (t.reshape(-1) for t in (y, p, pt, at, mod, ce, elem))

    def detail(i):
        return (f"y={fmt(float(fy[i]))}: {fmt(float(fat[i]))} * {fmt(float(fm[i]))} * {fmt(float(fc[i]))}"
                f" = {fmt(float(fe[i]))}")

    steps = [
        Step("p", "sigmoid(x)", p),
        Step("ce", "-[y * log(p) + (1 - y) * log(1 - p)]  (BCE with logits)", ce),
        Step("p_t", "p * y + (1 - p) * (1 - y)  (probability of the true label)", pt),
        Step("alpha_t", (f"alpha * y + (1 - alpha) * (1 - y), alpha={fmt(alpha)}" if alpha >= 0 else "1 (alpha < 0: no class weighting)"), at),
        Step("(1 - p_t)^gamma", f"modulating factor, gamma={fmt(gamma)}", mod),
        Step("l", "alpha_t * (1 - p_t)^gamma * ce", elem, _details(x.shape, detail)),
    ]
    return {"steps": steps, "elementwise": elem, "gradient": None}


def _v_focal(call, x, y, o):
    branches = ("a target-1 element computed with the target-0 formula -(1 - alpha) * p^gamma * log(1 - p), "
                "or a target-0 element with the target-1 formula -alpha * (1 - p)^gamma * log(p)")
    v = _flip_variants(call, x, y, o, branches) + _reduction_variants(call, x, y, o)
    if float(o["alpha"]) >= 0:
        v.append(("no alpha weighting (alpha = -1)", call(x, y, {**o, "alpha": -1.0})))
        v.append(("alpha and 1 - alpha swapped", call(x, y, {**o, "alpha": 1 - float(o["alpha"])})))
    v.append(("no modulating factor (gamma = 0: alpha-weighted BCE)", call(x, y, {**o, "gamma": 0.0})))
    v.append(("plain BCE with logits (no alpha, gamma = 0)", call(x, y, {**o, "gamma": 0.0, "alpha": -1.0})))
    npos = float((y > 0).sum())
    if npos > 0:
        v.append(("the summed loss divided by the number of positives",
                  call(x, y, {**o, "reduction": "sum"}) / npos))
    if torch.all((x > 0) & (x < 1)):
        logit = torch.log(x) - torch.log1p(-x)
        v.append(("the input read as a probability (no sigmoid)", call(logit, y, o)))
    return v


def _work_softmax_focal(x, y, o, fmt):
    # x: [N, C] logits, y: [N] class indices (explain() makes a single row 2-D).
    alpha, gamma = float(o["alpha"]), float(o["gamma"])
    w = o.get("weight")
    ignore = int(o["ignore_index"]) if o.get("ignore_index") is not None else -100
    N, C = x.shape
    yi = y.long().reshape(-1)
    valid = yi != ignore
    safe = torch.where(valid, yi, torch.zeros_like(yi)).clamp(0, C - 1)
    logq = torch.log_softmax(x, -1)
    logp_y = logq[torch.arange(N), safe]
    p_y = logp_y.exp()
    mod = (1 - p_y).clamp(min=0) ** gamma
    w_t = valid.to(x.dtype) if w is None else w[safe] * valid
    elem = -alpha * mod * logp_y * w_t
    o["_divisor"] = float(w_t.sum()) if not bool(valid.all()) or w is not None else None
    steps = [
        Step("log q", "log_softmax(x)", logq),
        Step("p_y", "softmax(x) at the target class", p_y),
        Step("(1 - p_y)^gamma", f"modulating factor, gamma={fmt(gamma)}", mod),
        Step("l", f"-alpha * {'w_y * ' if w is not None else ''}(1 - p_y)^gamma * log p_y, alpha={fmt(alpha)}", elem),
    ]
    return {"steps": steps, "elementwise": elem, "gradient": None}


def _call_softmax_focal(x, y, o):
    kw = {k: o[k] for k in ("weight", "alpha", "gamma", "reduction") if o.get(k) is not None}
    if o.get("ignore_index") is not None:
        kw["ignore_index"] = int(o["ignore_index"])
    return _fn("softmax_focal_loss")(x, y.long(), **kw)


def _work_qfl(x, y, o, fmt):
    gamma, alpha = float(o["gamma"]), o.get("alpha")
    p = torch.sigmoid(x)
    ce = -(y * _logsig(x) + (1 - y) * _logsig(-x))
    mod = (y - p).abs() ** gamma
    steps = [Step("p", "sigmoid(x)", p), Step("ce", "-[y * log(p) + (1 - y) * log(1 - p)]  (y is the soft IoU-quality target)", ce),
             Step("|y - p|^gamma", f"modulating factor, gamma={fmt(gamma)}", mod)]
    elem = ce * mod
    if alpha is not None:
        af = y * float(alpha) + (1 - y) * (1 - float(alpha))
        steps.append(Step("alpha_t", f"y * alpha + (1 - y) * (1 - alpha), alpha={fmt(float(alpha))}", af))
        elem = elem * af
    steps.append(Step("l", ("alpha_t * " if alpha is not None else "") + "|y - p|^gamma * ce", elem))
    return {"steps": steps, "elementwise": elem, "gradient": None}


def _work_varifocal(x, y, o, fmt):
    label = o["label"]
    alpha, gamma = float(o["alpha"]), float(o["gamma"])
    p = torch.sigmoid(x)
    ce = -(y * _logsig(x) + (1 - y) * _logsig(-x))
    weight = alpha * p ** gamma * (1 - label) + y * label
    elem = ce * weight
    steps = [
        Step("p", "sigmoid(x)", p),
        Step("ce", "BCE with logits against the target score q: -[q * log(p) + (1 - q) * log(1 - p)]", ce),
        Step("w", f"alpha * p^gamma * (1 - label) + q * label, alpha={fmt(alpha)}, gamma={fmt(gamma)}", weight,
             note="negatives are down-weighted by p^gamma, positives weighted by their IoU-aware score q"),
        Step("l", "w * ce", elem),
    ]
    return {"steps": steps, "elementwise": elem, "gradient": None}


def _work_bce_blur(x, y, o, fmt):
    alpha = float(o["alpha"])
    p = torch.sigmoid(x)
    ce = -(y * _logsig(x) + (1 - y) * _logsig(-x))
    dx = p - y
    af = 1 - torch.exp((dx - 1) / (alpha + 1e-4))
    elem = ce * af
    steps = [
        Step("p", "sigmoid(x)", p),
        Step("ce", "-[y * log(p) + (1 - y) * log(1 - p)]", ce),
        Step("dx", "p - y", dx),
        Step("alpha_factor", f"1 - exp((dx - 1) / (alpha + 1e-4)), alpha={fmt(alpha)}  (damps false negatives from missing labels)", af),
        Step("l", "alpha_factor * ce", elem),
    ]
    return {"steps": steps, "elementwise": elem, "gradient": None}


# --- regression
def _work_smooth_l1(x, y, o, fmt):
    beta = float(o["beta"])
    d = (x - y).abs()
    quad = d < beta
    elem = torch.where(quad, 0.5 * d ** 2 / beta if beta > 0 else d, d - 0.5 * beta)
    fd, fq, fe = d.reshape(-1), quad.reshape(-1), elem.reshape(-1)

    def detail(i):
        if bool(fq[i]):
            return f"|d|={fmt(float(fd[i]))} < beta: 0.5 * d^2 / beta = {fmt(float(fe[i]))}"
        return f"|d|={fmt(float(fd[i]))} >= beta: |d| - 0.5 * beta = {fmt(float(fe[i]))}"

    steps = [Step("|d|", "|x - y|", d),
             Step("l", f"0.5 * d^2 / beta if |d| < beta else |d| - 0.5 * beta  (beta={fmt(beta)})", elem,
                  _details(x.shape, detail))]
    n = _divisor_count(elem, o)
    g = torch.where(quad, (x - y) / beta if beta > 0 else torch.sign(x - y), torch.sign(x - y)) / n
    return {"steps": steps, "elementwise": elem,
            "gradient": Step("dL/dx", "[(x - y) / beta in the quadratic branch, sign(x - y) in the linear one]" + (" / n" if n != 1 else ""), g)}


def _v_smooth_l1(call, x, y, o):
    v = _reduction_variants(call, x, y, o)
    v.append(("the L1 loss |x - y|", _fn("l1_loss")(x, y, reduction=o["reduction"])))
    v.append(("the quadratic branch everywhere, 0.5 * d^2 / beta",
              _reduce_simple(0.5 * (x - y) ** 2 / max(float(o["beta"]), 1e-12), o["reduction"])))
    v.append(("the Huber loss (beta * smooth L1)", call(x, y, o) * float(o["beta"])))
    if float(o["beta"]) != 1.0:
        v.append(("beta = 1 (the default)", call(x, y, {**o, "beta": 1.0})))
    return v


def _reduce_simple(t, reduction):
    return t if reduction == "none" else (t.sum() if reduction == "sum" else t.mean())


def _work_l1(x, y, o, fmt):
    d = x - y
    elem = d.abs()
    n = _divisor_count(elem, o)
    return {"steps": [Step("d", "x - y", d), Step("l", "|d|", elem)], "elementwise": elem,
            "gradient": Step("dL/dx", "sign(x - y)" + (" / n" if n != 1 else ""), torch.sign(d) / n)}


def _work_mse(x, y, o, fmt):
    d = x - y
    elem = d ** 2
    n = _divisor_count(elem, o)
    return {"steps": [Step("d", "x - y", d), Step("l", "d^2", elem)], "elementwise": elem,
            "gradient": Step("dL/dx", "2 * (x - y)" + (" / n" if n != 1 else ""), 2 * d / n)}


def _v_regression(call, x, y, o):
    v = _reduction_variants(call, x, y, o)
    v.append(("the L1 loss", _fn("l1_loss")(x, y, reduction=o["reduction"])))
    v.append(("the squared error (MSE)", _fn("mse_loss")(x, y, reduction=o["reduction"])))
    v.append(("the root of the mean squared error", _fn("mse_loss")(x, y, reduction="mean").sqrt()))
    v.append(("half the squared error", 0.5 * _fn("mse_loss")(x, y, reduction=o["reduction"])))
    return v


# --- IoU family
def _work_iou(x, y, o, fmt):
    kind, conv = o["kind"], o["convention"]
    eps = float(o.get("eps") or 1e-7)
    if o["box_format"] == "cxcywh":
        from ..boxes import cxcywh_to_xyxy

        a, b = cxcywh_to_xyxy(x), cxcywh_to_xyxy(y)
    else:
        a, b = x, y
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    yolo = conv == "yolov5"
    h_eps = eps if yolo and o["box_format"] == "xyxy" else 0  # bbox_iou adds eps to heights of xyxy boxes only
    w1, h1 = ax2 - ax1, ay2 - ay1 + h_eps
    w2, h2 = bx2 - bx1, by2 - by1 + h_eps
    inter = (torch.min(ax2, bx2) - torch.max(ax1, bx1)).clamp(min=0) * (torch.min(ay2, by2) - torch.max(ay1, by1)).clamp(min=0)
    if yolo:
        union = w1 * h1 + w2 * h2 - inter + eps
        iou = inter / union
    else:
        union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
        iou = inter / (union + eps)
    steps = [
        Step("inter", "intersection area", inter),
        Step("union", "area(a) + area(b) - inter" + (" + eps" if yolo else ""), union),
        Step("IoU", "inter / union" + ("" if yolo else " (+ eps in the denominator)"), iou),
    ]
    metric = iou
    cw = torch.max(ax2, bx2) - torch.min(ax1, bx1)
    ch = torch.max(ay2, by2) - torch.min(ay1, by1)
    if kind == "giou":
        c_area = cw * ch + (eps if yolo else 0)
        metric = iou - (c_area - union) / (c_area + (0 if yolo else eps))
        steps += [Step("C", "area of the smallest enclosing box" + (" + eps" if yolo else ""), c_area),
                  Step("GIoU", "IoU - (C - union) / C" + ("" if yolo else " (+ eps in the denominator)"), metric)]
    elif kind in ("diou", "ciou"):
        c2 = cw ** 2 + ch ** 2 + eps
        rho2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4
        steps += [Step("c^2", "squared diagonal of the enclosing box + eps", c2),
                  Step("rho^2", "squared distance between the box centres", rho2),
                  Step("rho^2 / c^2", "distance term", rho2 / c2)]
        metric = iou - rho2 / c2
        if kind == "diou":
            steps.append(Step("DIoU", "IoU - rho^2 / c^2", metric))
        else:
            if yolo:
                v = (4 / math.pi ** 2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
                alpha = v / (v - iou + (1 + eps))
            else:
                v = (4 / math.pi ** 2) * (torch.atan((bx2 - bx1) / (by2 - by1)) - torch.atan((ax2 - ax1) / (ay2 - ay1))) ** 2
                alpha = v / (1 - iou + v + eps)
            metric = iou - rho2 / c2 - alpha * v
            steps += [Step("v", "(4 / pi^2) * (atan(w_b / h_b) - atan(w_a / h_a))^2  (aspect term)", v),
                      Step("alpha", "v / (1 - IoU + v + eps)  (aspect weight" + (", no gradient)" if yolo else ")"), alpha),
                      Step("CIoU", "IoU - rho^2 / c^2 - alpha * v", metric)]
    elif kind == "eiou":
        c2 = cw ** 2 + ch ** 2 + eps
        rho2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4
        dist, wterm, hterm = rho2 / c2, (w1 - w2) ** 2 / (cw ** 2 + eps), (h1 - h2) ** 2 / (ch ** 2 + eps)
        metric = iou - (dist + wterm + hterm)
        steps += [Step("rho^2 / c^2", "centre distance over the enclosing diagonal (+ eps)", dist),
                  Step("(w_a - w_b)^2 / C_w^2", "width term (enclosing width, + eps)", wterm),
                  Step("(h_a - h_b)^2 / C_h^2", "height term (enclosing height, + eps)", hterm),
                  Step("EIoU", "IoU - rho^2 / c^2 - width term - height term  (Zhang et al. 2021)", metric)]
    elif kind == "siou":
        from ..functional.iou import SIOU_THETA

        dx = (bx1 + bx2 - ax1 - ax2) / 2
        dy = (by1 + by2 - ay1 - ay2) / 2
        angle = 2 * (dx * dy).abs() / (dx ** 2 + dy ** 2 + eps)
        gamma = 2 - angle
        rho_x, rho_y = dx ** 2 / (cw ** 2 + eps), dy ** 2 / (ch ** 2 + eps)
        distance = (1 - torch.exp(-gamma * rho_x)) + (1 - torch.exp(-gamma * rho_y))
        omega_w = (w1 - w2).abs() / (torch.maximum(w1, w2) + eps)
        omega_h = (h1 - h2).abs() / (torch.maximum(h1, h2) + eps)
        shape = (1 - torch.exp(-omega_w)) ** SIOU_THETA + (1 - torch.exp(-omega_h)) ** SIOU_THETA
        metric = iou - 0.5 * (distance + shape)
        steps += [Step("Lambda", "angle cost 1 - 2 sin^2(arcsin(|dy| / sigma) - pi/4) = 2 |dx dy| / sigma^2", angle),
                  Step("Delta", "distance cost sum over x, y of 1 - exp(-(2 - Lambda) (d / C)^2)", distance),
                  Step("Omega", f"shape cost sum over w, h of (1 - exp(-|a - b| / max(a, b)))^{SIOU_THETA:g}", shape),
                  Step("SIoU", "IoU - (Delta + Omega) / 2  (Gevorgyan 2022)", metric)]
    elem = 1 - metric
    names = {"iou": "IoU", "giou": "GIoU", "diou": "DIoU", "ciou": "CIoU", "eiou": "EIoU", "siou": "SIoU"}
    steps.append(Step("l", "1 - " + names[kind], elem))
    return {"steps": steps, "elementwise": elem, "gradient": None}


def _call_iou(x, y, o):
    kw = {} if o.get("eps") is None else {"eps": float(o["eps"])}
    return _fn("iou_loss")(x, y, kind=o["kind"], box_format=o["box_format"], convention=o["convention"],
                           reduction=o["reduction"], **kw)


def _v_iou(call, x, y, o):
    v = _reduction_variants(call, x, y, o)
    for k in ("iou", "giou", "diou", "ciou", "eiou", "siou"):
        if k != o["kind"]:
            v.append((f"the {k} loss (kind='{k}')", call(x, y, {**o, "kind": k})))
    v.append((f"the {o['kind']} value itself (1 - loss)", 1 - call(x, y, {**o, "reduction": "none"})))
    other = "xyxy" if o["box_format"] == "cxcywh" else "cxcywh"
    try:
        v.append((f"the boxes read as {other}", call(x, y, {**o, "box_format": other})))
    except Exception:
        pass
    c2 = "yolov5" if o["convention"] == "torchvision" else "torchvision"
    v.append((f"convention='{c2}'", call(x, y, {**o, "convention": c2})))
    return v


# --- DFL
def _work_dfl(x, y, o, fmt):
    # x: [n, bins] logits, y: [n] targets in [0, bins - 1] (explain() makes a single row 2-D).
    nb = x.shape[-1]
    left = y.floor().long().clamp(0, nb - 1)
    right = (left + 1).clamp(max=nb - 1)
    wl = (left + 1).to(x.dtype) - y
    wr = y - left.to(x.dtype)
    logq = torch.log_softmax(x, -1)
    rows = torch.arange(x.shape[0])
    lq_l, lq_r = logq[rows, left], logq[rows, right]
    elem = -(wl * lq_l + wr * lq_r)

    def detail(i):
        return (f"t={fmt(float(y[i]))}: -[{fmt(float(wl[i]))} * ({fmt(float(lq_l[i]))}) + "
                f"{fmt(float(wr[i]))} * ({fmt(float(lq_r[i]))})] = {fmt(float(elem[i]))}")

    steps = [
        Step("log q", "log_softmax over the bins", logq),
        Step("i, i+1", "the two bins around the target: i = floor(t)", torch.stack((left, left + 1), -1).to(x.dtype)),
        Step("w_left, w_right", "(i + 1 - t, t - i)", torch.stack((wl, wr), -1)),
        Step("l", "-[w_left * log q_i + w_right * log q_(i+1)]", elem, _details(torch.Size([x.shape[0]]), detail)),
    ]
    return {"steps": steps, "elementwise": elem, "gradient": None}


def _call_dfl(x, y, o):
    return _fn("distribution_focal_loss")(x, y, reduction=o["reduction"])


def _generic_call(fn_name: str, keys: Sequence[str]) -> Callable[..., torch.Tensor]:
    def call(x, y, o):
        kw = {k: o[k] for k in keys if k in o and o[k] is not None}
        return _fn(fn_name)(x, y, **kw)

    return call


def _call_varifocal(x, y, o):
    return _fn("varifocal_loss")(x, y, o["label"], alpha=o["alpha"], gamma=o["gamma"], reduction=o["reduction"])


def _v_generic(call, x, y, o):
    return _flip_variants(call, x, y, o) + _reduction_variants(call, x, y, o)


def _v_gamma(call, x, y, o):
    v = _v_generic(call, x, y, o)
    if "gamma" in o:
        v.append(("no modulating factor (gamma = 0)", call(x, y, {**o, "gamma": 0.0})))
    return v


def _v_gamma_only(call, x, y, o):
    return _reduction_variants(call, x, y, o) + [("no modulating factor (gamma = 0)", call(x, y, {**o, "gamma": 0.0}))]


_BCE_SRC = "torch.nn.functional.binary_cross_entropy(_with_logits)"

LOSSES: Dict[str, _Spec] = {
    "bce-with-logits": _Spec(
        "detloss.functional.bce_with_logits", "l = -w [pos_weight * y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]",
        _BCE_SRC, {"weight": None, "pos_weight": None, "reduction": "mean"}, _work_bce_with_logits,
        _generic_call("bce_with_logits", ("weight", "pos_weight", "reduction")), variants=_v_bce_with_logits),
    "bce": _Spec(
        "detloss.functional.binary_cross_entropy", "l = -w [y log p + (1 - y) log(1 - p)], logs clamped at -100",
        _BCE_SRC, {"weight": None, "reduction": "mean"}, _work_bce,
        _generic_call("binary_cross_entropy", ("weight", "reduction")), variants=_v_bce),
    "cross-entropy": _Spec(
        "detloss.functional.cross_entropy", "l = -sum_c t_c log softmax(x)_c (t: one-hot, smoothed or soft target)",
        "torch.nn.functional.cross_entropy; label smoothing: Szegedy et al. 2016 (Inception v3)",
        {"weight": None, "ignore_index": -100, "label_smoothing": 0.0, "reduction": "mean"}, _work_cross_entropy,
        _call_cross_entropy, target_kind="index-or-soft", variants=_v_cross_entropy),
    "focal": _Spec(
        "detloss.functional.sigmoid_focal_loss", "l = alpha_t (1 - p_t)^gamma * BCE(x, y)",
        "Lin et al. 2017, Focal Loss for Dense Object Detection; torchvision.ops.sigmoid_focal_loss",
        {"alpha": 0.25, "gamma": 2.0, "reduction": "none"}, _work_sigmoid_focal,
        _generic_call("sigmoid_focal_loss", ("alpha", "gamma", "reduction")), variants=_v_focal),
    "softmax-focal": _Spec(
        "detloss.functional.softmax_focal_loss", "l = -alpha w_y (1 - p_y)^gamma log p_y, p = softmax(x)",
        "Lin et al. 2017, Focal Loss (multi-class form); mmcv softmax_focal_loss",
        {"weight": None, "alpha": 0.25, "gamma": 2.0, "ignore_index": -100, "reduction": "mean"},
        _work_softmax_focal, _call_softmax_focal, target_kind="index-or-soft", variants=_v_gamma_only),
    "qfl": _Spec(
        "detloss.functional.quality_focal_loss", "l = |y - sigmoid(x)|^gamma * BCE(x, y) [* alpha_t]",
        "Li et al. 2020, Generalized Focal Loss; YOLOv5 utils/loss.py QFocalLoss", {"gamma": 2.0, "alpha": None, "reduction": "mean"},
        _work_qfl, _generic_call("quality_focal_loss", ("gamma", "alpha", "reduction")), variants=_v_gamma),
    "varifocal": _Spec(
        "detloss.functional.varifocal_loss", "l = [alpha p^gamma (1 - label) + q label] * BCE(x, q)",
        "Zhang et al. 2021, VarifocalNet; ultralytics utils/loss.py VarifocalLoss",
        {"label": None, "alpha": 0.75, "gamma": 2.0, "reduction": "mean"}, _work_varifocal, _call_varifocal,
        variants=_v_gamma),
    "bce-blur": _Spec(
        "detloss.functional.bce_blur", "l = BCE(x, y) * (1 - exp((sigmoid(x) - y - 1) / (alpha + 1e-4))), mean",
        "YOLOv5 utils/loss.py BCEBlurWithLogitsLoss", {"alpha": 0.05, "reduction": "mean"}, _work_bce_blur,
        _generic_call("bce_blur", ("alpha",)), variants=_v_generic),
    "smooth-l1": _Spec(
        "detloss.functional.smooth_l1_loss", "l = 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta, d = x - y",
        "Girshick 2015, Fast R-CNN; torch.nn.functional.smooth_l1_loss", {"beta": 1.0, "reduction": "mean"},
        _work_smooth_l1, _generic_call("smooth_l1_loss", ("beta", "reduction")), variants=_v_smooth_l1),
    "l1": _Spec("detloss.functional.l1_loss", "l = |x - y|", "torch.nn.functional.l1_loss", {"reduction": "mean"},
                _work_l1, _generic_call("l1_loss", ("reduction",)), variants=_v_regression),
    "mse": _Spec("detloss.functional.mse_loss", "l = (x - y)^2", "torch.nn.functional.mse_loss", {"reduction": "mean"},
                 _work_mse, _generic_call("mse_loss", ("reduction",)), variants=_v_regression),
    "iou-loss": _Spec(
        "detloss.functional.iou_loss", "l = 1 - IoU_kind(a, b)",
        "GIoU: Rezatofighi et al. 2019; DIoU/CIoU: Zheng et al. 2020; EIoU: Zhang et al. 2021; SIoU: Gevorgyan 2022; "
        "torchvision.ops / YOLOv5 bbox_iou",
        {"kind": "giou", "box_format": "xyxy", "convention": "torchvision", "eps": None, "reduction": "none"},
        _work_iou, _call_iou, target_kind="box", variants=_v_iou),
    "dfl": _Spec(
        "detloss.functional.distribution_focal_loss", "l = -[(i + 1 - t) log q_i + (t - i) log q_(i+1)], i = floor(t)",
        "Li et al. 2020, Generalized Focal Loss (DFL); ultralytics DFLoss", {"reduction": "mean"}, _work_dfl, _call_dfl,
        variants=_reduction_variants),
}
# Short names for the IoU kinds: `detloss explain ciou ...` == `detloss explain iou-loss --kind ciou ...`.
ALIASES = {"giou": ("iou-loss", {"kind": "giou"}), "diou": ("iou-loss", {"kind": "diou"}),
           "ciou": ("iou-loss", {"kind": "ciou"}), "iou": ("iou-loss", {"kind": "iou"}),
           "eiou": ("iou-loss", {"kind": "eiou"}), "siou": ("iou-loss", {"kind": "siou"}),
           "sigmoid-focal": ("focal", {}), "binary-cross-entropy": ("bce", {}), "smooth_l1": ("smooth-l1", {}),
           "quality-focal": ("qfl", {}), "distribution-focal": ("dfl", {}), "vfl": ("varifocal", {})}


# ----------------------------------------------------------------------------- the API
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
    opts: Dict[str, Any] = {**spec.options, **preset, **{k: v for k, v in options.items() if v is not None}}
    if "reduction" in opts:
        from .._checks import check_reduction

        check_reduction(opts["reduction"])
    x = _as_tensor("input", input)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    y = _as_tensor("target", target, x.dtype)
    if name in ("cross-entropy", "softmax-focal", "dfl") and x.ndim == 1:  # a single row
        x = x[None]
        y = y[None] if (name == "cross-entropy" and y.shape == x.shape[1:]) else y.reshape(1)
    if name in ("cross-entropy", "softmax-focal", "dfl") and x.ndim != 2:
        raise ValueError(f"input: expected logits of shape [C] or [N, C] (rows separated by ';'), got {tuple(x.shape)}")
    if spec.target_kind != "index-or-soft" and not y.is_floating_point():
        y = y.to(x.dtype)
    for key in ("weight", "pos_weight", "label"):
        if opts.get(key) is not None:
            opts[key] = _as_tensor(key, opts[key], x.dtype).to(x.dtype)
    if name == "varifocal" and opts.get("label") is None:
        raise ValueError("label: varifocal needs the 0/1 label of every element (--label), got none")
    fmt = _formatter(4)
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
    for key in ("weight", "pos_weight", "label"):
        if wopts.get(key) is not None:
            wopts[key] = wopts[key].to(xc.dtype)
    with torch.no_grad():
        worked = spec.work(xc, yc, wopts, fmt)
    reduction = opts.get("reduction", "mean")
    elem = worked["elementwise"]
    names = {"iou-loss": ("boxes a", "boxes b"), "dfl": ("logits", "target t"), "bce": ("p", "y"),
             "cross-entropy": ("x", "target")}.get(name, ("x", "y"))
    inputs = {names[0]: x.detach(), names[1]: y}
    if opts.get("label") is not None:
        inputs["label"] = opts["label"]
    e = Explanation(
        loss=name, function=spec.function, formula=spec.formula, source=spec.source, inputs=inputs,
        options={k: v for k, v in wopts.items() if not k.startswith("_")}, steps=worked["steps"], elementwise=elem,
        reduction=reduction, reduction_text=_reduction_text(elem, reduction, fmt, wopts.get("_divisor")),
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


# ----------------------------------------------------------------------------- claims
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
        return vals, [_decimals(p)[0] * 1.0001 + 1e-12 for p in parts], parts
    if isinstance(claimed, torch.Tensor):
        claimed = claimed.reshape(-1).tolist()
    if isinstance(claimed, (int, float)):
        claimed = [claimed]
    vals = [float(v) for v in claimed]
    return vals, [max(abs(v) * 1e-6, 1e-9) for v in vals], [repr(v) for v in vals]


def _check_claim(e: Explanation, claimed: Any) -> Check:
    vals, tols, texts = _parse_claim(claimed)
    text_of = dict(zip(vals, texts))
    fmt = _formatter(4)
    res = e.result.reshape(-1)
    lines: List[str] = []
    mismatches: List[Dict[str, Any]] = []
    elem_shape = e.result.shape
    names = _index_names(elem_shape) if e.result.ndim else [""]
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
            actual_text = _show(e.result, fmt)
        else:
            actual = float(res[i])
            if abs(actual - v) <= tol:
                continue
            where = f"element {names[i]}"
            actual_text = fmt(actual)
        inp = _describe_element(e, i)
        mm = {"index": i, "claimed": v, "actual": actual if i is not None or res.numel() == 1 else _tolist(e.result),
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
    fmt = _formatter(4)
    parts = []
    for name, t in e.inputs.items():
        if t.shape == e.result.shape or (e.result.ndim == 0 and t.numel() == 1):
            parts.append(f"{name}={fmt(float(t.reshape(-1)[i]))}")
        elif t.ndim >= 1 and e.result.ndim >= 1 and t.shape[0] == e.result.shape[0] and t.ndim == e.result.ndim + 1:
            parts.append(f"{name}={_show(t[i], fmt)}")
    return f" ({', '.join(parts)})" if parts else ""


def _explain_value(e: Explanation, v: float, tol: float, i: Optional[int]) -> List[str]:
    fmt = _formatter(4)
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
        nm = _index_names(t.shape)
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


# ----------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("loss", help="one of: " + ", ".join(sorted(LOSSES)) + " (aliases: " + ", ".join(sorted(ALIASES)) + ")")
    parser.add_argument("--input", required=True, help="comma-separated numbers; rows separated by ';' (e.g. '1,2;3,4')")
    parser.add_argument("--target", required=True, help="same layout as --input (class indices for cross-entropy)")
    parser.add_argument("--reduction", choices=("none", "mean", "sum"))
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--gamma", type=float)
    parser.add_argument("--beta", type=float)
    parser.add_argument("--weight", help="per-element weight (bce) or per-class weight (cross-entropy)")
    parser.add_argument("--pos-weight", dest="pos_weight")
    parser.add_argument("--label-smoothing", dest="label_smoothing", type=float)
    parser.add_argument("--ignore-index", dest="ignore_index", type=int)
    parser.add_argument("--label", help="varifocal: 0/1 label per element")
    parser.add_argument("--kind", choices=("iou", "giou", "diou", "ciou", "eiou", "siou"))
    parser.add_argument("--box-format", dest="box_format", choices=("xyxy", "cxcywh"))
    parser.add_argument("--convention", choices=("torchvision", "yolov5"))
    parser.add_argument("--expect", help="a claimed value (or one per element) to check")
    parser.add_argument("--digits", type=int, default=4, help="digits after the point (default 4)")
    parser.add_argument("--json", action="store_true", help="print the explanation as JSON")


_OPTION_KEYS = ("reduction", "alpha", "gamma", "beta", "weight", "pos_weight", "label_smoothing", "ignore_index",
                "label", "kind", "box_format", "convention")


def run(args: argparse.Namespace) -> int:
    import sys

    options = {k: getattr(args, k) for k in _OPTION_KEYS if getattr(args, k, None) is not None}
    try:
        e = explain(args.loss, args.input, args.target, **options)
        if args.expect is not None:
            e.check(args.expect)
    except (ValueError, TypeError, NotImplementedError) as exc:
        print(f"detloss explain: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(e.to_dict(), indent=2))
    else:
        print(e.render(digits=args.digits))
    if e.check_result is not None and not e.check_result.holds:
        return 1
    return 0
