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
        components: detached named terms, each under the original implementation's convention
            (e.g. YOLO's ``"box"``, ``"obj"``, ``"cls"`` after the gains and before ``* batch_size``),
            for logging.
        stats: assignment and quality figures, never part of the graph. Every detector loss has
            ``num_pos`` (int, positives on this rank), ``num_targets`` (int, valid target boxes on
            this rank), ``iou_mean`` (float, mean IoU of the positives' decoded boxes with their
            targets, 0.0 without positives) and ``normalizer`` (float, the divisor of the main
            terms); scalars are Python ``int``/``float``, gathered with one device synchronization.
        terms: the weighted terms *with their graph*, one per component name, whose sum is
            ``total`` (to rounding): what a framework that sums a loss dict and backpropagates
            (torchvision's training loop) needs.
    """

    total: torch.Tensor
    components: Dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Dict[str, Any] = field(default_factory=dict)
    terms: Dict[str, torch.Tensor] = field(default_factory=dict)

    def backward(self, *args: Any, **kwargs: Any) -> None:
        """Shorthand for ``self.total.backward(...)``."""
        self.total.backward(*args, **kwargs)

    def items(self) -> Dict[str, float]:
        """The components as plain floats, for logging."""
        return {k: float(v) for k, v in self.components.items()}
