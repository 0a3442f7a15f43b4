"""One optimiser step of Jim-Net on a batch of pairs, at a chosen precision (:mod:`jimray.precision`).

Shared by the rounds' training pass (:func:`jimray.train.loop._train_pass`), pretraining
(:func:`jimray.train.pretrain.alignment_step`) and ``jimray bench gpu``. Pure torch: no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from jimray.model.losses import jimnet_loss
from jimray.precision import autocast, tf32_scope, uses_tf32


def pair_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    source: torch.Tensor,
    target: torch.Tensor,
    source_tilts: torch.Tensor,
    target_tilts: torch.Tensor,
    labels: torch.Tensor | None,
    gamma: Sequence[float],
    lambda_reg: float,
    lowpass_cycles_per_voxel: float,
    precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """Forward, eq. 7 loss, backward and ``optimizer.step()`` on ``source``/``target`` ``(b, d, h, w)`` with tilt
    ranges ``(b,)`` (degrees) and ``labels`` ``(b,)`` int64 (None: no CE term). Returns the loss terms, detached
    float32 scalars (:func:`jimray.model.losses.jimnet_loss`'s keys).

    ``precision``: forward and loss under bf16 autocast for ``bf16`` (backward outside it, in the forward's
    dtypes; float32 parameters, no loss scaling), the whole step with TF32 matmuls/convolutions for ``tf32``."""
    with tf32_scope(uses_tf32(precision)):
        with autocast(precision, source.device):
            out = model(source, target)
            terms = jimnet_loss(out, source, target, source_tilts, target_tilts, labels, gamma, lambda_reg,
                                lowpass_cycles_per_voxel)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        terms["total"].float().backward()
        optimizer.step()
    return {key: value.detach().float() for key, value in terms.items()}
