"""The shared step-by-step machinery: :class:`Step` (one worked quantity), :class:`Check` (the
verdict on a claimed value), :class:`Explanation` (a loss worked out, rendered as text or plain
data), and the number formatting and reduction helpers every family uses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["Step", "Check", "Explanation", "to_plain", "formatter", "show", "short", "index_names", "per_element",
           "reduce_elements", "describe_reduction"]


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
        d: Dict[str, Any] = {"symbol": self.symbol, "formula": self.formula, "values": to_plain(self.values)}
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
        worked = reduce_elements(self.elementwise, self.reduction, self.divisor)
        return bool(torch.allclose(worked.double(), self.result.detach().double(), rtol=1e-6, atol=1e-9))

    def check(self, claimed: Any) -> Check:
        """Check a claimed value (a number, a list, or a string like ``"0.4181"``/``"0.1,0.2"``)."""
        from .claims import check_claim

        self.check_result = check_claim(self, claimed)
        return self.check_result

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {
            "loss": self.loss,
            "function": self.function,
            "formula": self.formula,
            "source": self.source,
            "inputs": {k: to_plain(v) for k, v in self.inputs.items()},
            "options": {k: (to_plain(v) if isinstance(v, torch.Tensor) else v) for k, v in self.options.items()},
            "steps": [s.to_dict() for s in self.steps],
            "elementwise": to_plain(self.elementwise),
            "reduction": self.reduction,
            "reduction_text": self.reduction_text,
            "result": to_plain(self.result.detach()),
            "gradient": to_plain(self.gradient),
            "consistent": self.consistent,
        }
        if self.gradient_formula is not None:
            d["gradient_formula"] = self.gradient_formula.to_dict()
        if self.check_result is not None:
            d["check"] = self.check_result.to_dict()
        return d

    def render(self, digits: int = 4) -> str:
        """The explanation as text, numbers with ``digits`` digits after the point (0 to 15)."""
        fmt = formatter(digits)
        out = [f"{self.loss}: {self.formula}", f"  computed by {self.function}; source: {self.source}"]
        opts = {k: v for k, v in self.options.items() if v is not None}
        if opts:
            out.append("  options: " + ", ".join(f"{k}={short(v, fmt)}" for k, v in opts.items()))
        out.append("")
        for name, t in self.inputs.items():
            out.append(f"{name:>8} = {show(t, fmt)}")
        out.append("")
        for i, s in enumerate(self.steps, 1):
            out.append(f"{i}. {s.symbol} = {s.formula}")
            if s.details:
                out.extend("     " + line for line in s.details)
            else:
                out.append(f"     {s.symbol} = {show(s.values, fmt)}")
            if s.note:
                out.append(f"     ({s.note})")
        out.append(f"{len(self.steps) + 1}. reduction '{self.reduction}': {self.reduction_text}")
        out.append("")
        out.append(f"result = {show(self.result.detach(), fmt)}")
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
                out.append(f"     formula:  {show(g.values, fmt)}")
            out.append(f"     autograd: {show(self.gradient, fmt)}")
        else:
            out.append(f"gradient {what}, by autograd through {self.function}:")
            out.append(f"     {show(self.gradient, fmt)}")
        if self.check_result is not None:
            out.append("")
            out.extend(self.check_result.lines)
        return "\n".join(out)


def to_plain(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        t = t.detach()
        return t.item() if t.ndim == 0 else t.tolist()
    return t


MAX_DIGITS = 15


def formatter(digits: int) -> Callable[[float], str]:
    """A number formatter with ``digits`` digits after the point (0 to :data:`MAX_DIGITS`)."""
    if isinstance(digits, bool) or not isinstance(digits, int) or not 0 <= digits <= MAX_DIGITS:
        raise ValueError(f"digits: expected a whole number of digits after the point from 0 to {MAX_DIGITS}, "
                         f"got {digits!r}")
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


def show(t: Any, fmt: Callable[[float], str]) -> str:
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.ndim == 0:
            return fmt(t.item())
        if t.ndim == 1:
            return "[" + ", ".join(fmt(v) for v in t.tolist()) + "]"
        return "[" + ", ".join(show(r, fmt) for r in t) + "]"
    return str(t)


def short(v: Any, fmt: Callable[[float], str]) -> str:
    if isinstance(v, torch.Tensor):
        return show(v, fmt)
    if isinstance(v, float):
        return fmt(v)
    return repr(v) if isinstance(v, str) else str(v)


def index_names(shape: torch.Size) -> List[str]:
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


def per_element(shape: torch.Size, fn: Callable[[int], str]) -> List[str]:
    names = index_names(shape)
    return [f"{names[i]:>6} {fn(i)}" for i in range(len(names))]


def reduce_elements(elements: torch.Tensor, reduction: str, divisor: Optional[float] = None) -> torch.Tensor:
    if reduction == "none":
        return elements
    if reduction == "sum":
        return elements.sum()
    if divisor is not None:
        return elements.sum() / divisor
    return elements.mean()


def describe_reduction(elements: torch.Tensor, reduction: str, fmt: Callable[[float], str], divisor: Any = None) -> str:
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
