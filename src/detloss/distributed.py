"""Reductions across ranks for loss normalizers (number of positives, sum of target scores).

Every helper is a no-op on a single process: when ``torch.distributed`` is not available or
not initialized, :func:`world_size` is 1, :func:`reduce_sum` and :func:`reduce_mean` return
their input unchanged.

Why detector losses need them. DistributedDataParallel (DDP) *averages* parameter gradients
over the ``W`` ranks: ``g = (1 / W) * sum_r grad(loss_r)``. A loss normalized by a local
count, ``loss_r = S_r / N_r``, then gives a gradient that depends on how the batch was split.
Normalizing every rank by the global mean ``N / W`` (``N = sum_r N_r``) instead gives
``g = (1 / W) * sum_r grad(S_r) * W / N = grad(S) / N``: exactly the single-process gradient
of the whole batch. That is what :func:`reduce_mean` is for::

    num_pos = detloss.distributed.reduce_mean(torch.tensor(float(local_num_pos)))
    loss = local_sum / num_pos.clamp(min=1.0)

The reductions run on detached values (normalizers carry no gradient); ``all_reduce`` needs a
tensor on the backend's device (CPU for gloo, CUDA for nccl).
"""
from __future__ import annotations

import torch

from ._checks import check_tensor

__all__ = ["is_initialized", "world_size", "rank", "reduce_sum", "reduce_mean"]


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of ranks in the default process group; 1 when not initialized."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group; 0 when not initialized."""
    return torch.distributed.get_rank() if is_initialized() else 0


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (``all_reduce`` with SUM on a detached copy).

    Returns the input itself when not distributed. The input is never modified.
    """
    check_tensor("tensor", tensor)
    if not is_initialized() or world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks: ``reduce_sum(tensor) / world_size()``.

    Same convention as mmcv/mmdetection's ``reduce_mean``. Integer tensors are converted to
    the default floating dtype first. Returns the input itself when not distributed.
    """
    check_tensor("tensor", tensor)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    if not is_initialized() or world_size() == 1:
        return tensor
    return reduce_sum(tensor) / world_size()
