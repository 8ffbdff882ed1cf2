"""Values computed on first read: :class:`Deferred`, the dataclass field :class:`DeferredField`
and the dict :class:`DeferredDict`.

The detector losses hand their steps large tensors that the steps of the loss itself never read
in that form (YOLOv8's class logits of all levels concatenated ``[B, A, nc]``, the task-aligned
assigner's dense target scores ``[B, A, nc]``); a variant that overrides a step may. Such a value
is stored as a :class:`Deferred` and built the first time it is read, once; an object holding
one behaves as if it held the value.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch

__all__ = ["Deferred", "DeferredField", "DeferredDict", "is_deferred"]

_UNSET = object()


class Deferred:
    """``fn()``, computed on the first call and remembered (objects sharing it share the value).

    It is computed in the autograd mode of its creation: a value deferred with gradients on keeps
    its graph even when first read under ``torch.no_grad()`` (an assigner reading the logits)."""

    __slots__ = ("_fn", "_value", "_grad")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn: Optional[Callable[[], Any]] = fn
        self._value: Any = _UNSET
        self._grad = torch.is_grad_enabled()

    @property
    def computed(self) -> bool:
        return self._value is not _UNSET

    def __call__(self) -> Any:
        if self._value is _UNSET:
            fn, self._fn = self._fn, None
            with torch.set_grad_enabled(self._grad):
                self._value = fn()  # type: ignore[misc]
        return self._value

    def __repr__(self) -> str:
        return f"Deferred(computed={self.computed})"


def is_deferred(value: Any) -> bool:
    """Whether ``value`` is a :class:`Deferred` not computed yet."""
    return isinstance(value, Deferred) and not value.computed


class DeferredField:
    """A dataclass field that may be given a :class:`Deferred`: reading the attribute returns the
    value (computed on the first read). ``vars(obj)`` shows what was stored, so building another
    dataclass from ``**vars(obj)`` passes the :class:`Deferred` on unread.

    Declare it as the field's class attribute (``x: Tensor = DeferredField()``); the field has no
    default."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        if obj is None:
            raise AttributeError(self.name)  # no default for the dataclass
        value = obj.__dict__[self.name]
        if isinstance(value, Deferred):
            value = obj.__dict__[self.name] = value()
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value


class DeferredDict(dict):
    """A dict whose values may be :class:`Deferred`: every read (``d[k]``, ``get``, ``items``,
    ``values``, iteration by ``dict(d)`` / ``{**d}``) computes them. :meth:`raw` looks at a value
    without computing it."""

    def raw(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key, default)

    def __getitem__(self, key: Any) -> Any:
        value = dict.__getitem__(self, key)
        if isinstance(value, Deferred):
            value = value()
            dict.__setitem__(self, key, value)
        return value

    def __iter__(self) -> Iterator[Any]:  # defined so that dict(d) and {**d} read through __getitem__
        return dict.__iter__(self)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self) -> List[Any]:  # type: ignore[override]
        return [self[k] for k in self]

    def items(self) -> List[Tuple[Any, Any]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self:
            value = self[key]
            dict.__delitem__(self, key)
            return value
        return dict.pop(self, key, *default)

    def copy(self) -> "DeferredDict":
        return DeferredDict(dict.items(self))
