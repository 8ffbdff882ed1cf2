"""The result type every detector loss returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch


@dataclass
class LossOutput:
    """What a detector loss returns.

    Attributes:
        total: the scalar tensor to call ``backward()`` on.
        components: detached named terms (e.g. ``"box"``, ``"obj"``, ``"cls"``), each a tensor.
        stats: assignment and quality figures (``num_pos``, mean IoU of positives, recall, ...);
            plain Python numbers, lists or small tensors, never part of the graph.
    """

    total: torch.Tensor
    components: Dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Dict[str, Any] = field(default_factory=dict)

    def backward(self, *args: Any, **kwargs: Any) -> None:
        """Shorthand for ``self.total.backward(...)``."""
        self.total.backward(*args, **kwargs)

    def items(self) -> Dict[str, float]:
        """The components as plain floats, for logging."""
        return {k: float(v) for k, v in self.components.items()}
