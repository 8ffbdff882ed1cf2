"""What a loss family module builds with: :class:`Spec` (one explainable loss) and the helpers
shared by several families (stable log-sigmoid, the functional loss by name, the common
variants tried when a claimed value does not hold)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["Spec", "log_sigmoid", "functional_loss", "divisor_count", "flip_variants", "reduction_variants",
           "generic_call", "flip_and_reduction_variants"]


@dataclass
class Spec:
    """One explainable loss.

    ``function``/``formula``/``source``: what the explanation prints as its heading;
    ``options``: the keyword options the loss takes and their defaults (the functional defaults);
    ``work(x, y, opts, fmt)``: the worked computation, a dict with ``steps`` (a list of
    :class:`~detloss.tools.explain.steps.Step`), ``elementwise`` (the per-element loss before the
    reduction) and ``gradient`` (a closed-form gradient Step, or None); it may set
    ``opts["_divisor"]`` when 'mean' divides by something other than the element count;
    ``call(x, y, opts)``: the detloss.functional call whose result is the explanation's result;
    ``variants(call, x, y, opts)``: (description, tensor) pairs of common slips, tried when a claim
    does not hold; ``target_kind``: "float" | "index-or-soft" (integer targets stay integers) | "box";
    ``input_rows``: the input is [N, C] rows (a 1-D input is one row); ``soft_target``: with
    ``input_rows``, a target of one row's shape is a distribution (else it is one index per row);
    ``input_names``: how the input and the target are printed; ``requires``: options that must be
    given, with what each is (for the error message).
    """

    function: str
    formula: str
    source: str
    options: Dict[str, Any]
    work: Callable[..., Dict[str, Any]]
    call: Callable[..., torch.Tensor]
    target_kind: str = "float"
    variants: Optional[Callable[..., List[Tuple[str, torch.Tensor]]]] = None
    input_rows: bool = False
    soft_target: bool = False
    input_names: Tuple[str, str] = ("x", "y")
    requires: Dict[str, str] = field(default_factory=dict)


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(x)) = -softplus(-x), stable for any logit."""
    return -F.softplus(-x)


def functional_loss(name: str) -> Callable[..., torch.Tensor]:
    from detloss import functional

    if not hasattr(functional, name):
        raise NotImplementedError(f"detloss.functional.{name} is not available in this installation")
    return getattr(functional, name)


def divisor_count(elem: torch.Tensor, o: Dict[str, Any]) -> float:
    """What 'mean' divides an element-wise loss by (1 for 'sum' and 'none')."""
    return float(elem.numel()) if o.get("reduction") == "mean" else 1.0


def flip_variants(call, x, y, o, branches: str = ""):
    out = []
    if torch.all((y == 0) | (y == 1)):
        out.append(("the value for the opposite target (1 - y), i.e. the other branch of the formula"
                    + (f" ({branches})" if branches else ""), call(x, 1 - y, o)))
    return out


def reduction_variants(call, x, y, o):
    out = []
    if "reduction" in o:
        for r in ("none", "sum", "mean"):
            if r != o["reduction"]:
                out.append((f"reduction='{r}'", call(x, y, {**o, "reduction": r})))
    return out


def generic_call(fn_name: str, keys: Sequence[str]) -> Callable[..., torch.Tensor]:
    def call(x, y, o):
        kw = {k: o[k] for k in keys if k in o and o[k] is not None}
        return functional_loss(fn_name)(x, y, **kw)

    return call


def flip_and_reduction_variants(call, x, y, o):
    return flip_variants(call, x, y, o) + reduction_variants(call, x, y, o)
