"""SparseGPTPruner: one-shot OBS pruning with weight reconstruction (Frantar & Alistarh,
2023), layer by layer.

One job: SparseGPT on the shared one-shot flow (:mod:`.oneshot`); the math is in
:mod:`.obs`. Each selected layer gets the Hessian ``H = 2 X^T X / n`` of its calibration
inputs, dampened by ``percdamp * mean(diag H)``, and its columns are swept in lazy batches
of ``blocksize``. Granularities: ``"fine"`` (the default; chosen by ``w^2 / [H^-1]_ii``
within each column batch, adaptive per row), N:M patterns (``"2:4"``, ``"4:8"``), ``"block"``
``[bm, bk]`` (blocks chosen by the OBS error of removing the whole block: how many each
group of ``bk`` columns loses across the whole layer, which ones as the sweep reaches the
group), ``"out_channel"`` (rows of least output energy ``w H w^T``; rows cannot
be reconstructed, so the others stay), ``"in_channel"`` and ``"head"`` (input columns /
a head's output-projection columns chosen by their joint OBS error and removed with the
joint OBS update of the remaining columns; a head's Q/K/V rows are zeroed; with grouped-
query attention a unit is a key/value head with its query heads, as the model map groups
them), and ``"query_head"`` (as many query heads in every key/value group, each group
solved on the columns the groups before it left).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from sparsekernels.arch import layers
from sparsekernels.pruning.config import NM
from sparsekernels.pruning.granularity import BlockPool, ChannelPool, ElementPool, RowGroupPool
from sparsekernels.pruning.pruners.obs import (
    ObsPattern, column_group_errors, damped_inverse, remove_columns_, row_energy,
    sparsegpt_prune)
from sparsekernels.pruning.pruners.oneshot import OneShotPruner


class SparseGPTPruner(OneShotPruner):
    """``SparseGPTPruner(model, config_list, calibration_data, percdamp=0.01,
    blocksize=128)``.

    ``compress()`` returns ``(model, masks)`` where the model's weights are *updated*: the
    pruned ones are zero and the kept ones changed to reconstruct each layer's output on
    the calibration inputs (the masks alone, applied to the original weights, do not give
    this model).
    """

    granularities = ("fine", NM, "block", "out_channel", "in_channel", "head", "query_head")
    gram = True

    def __init__(self, model: torch.nn.Module, config_list: Sequence[Mapping[str, Any]],
                 calibration_data: Any, percdamp: float = 0.01, blocksize: int = 128, *,
                 sequential: bool = True, reconstruct: Any = None):
        if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) \
                or not math.isfinite(percdamp) or percdamp <= 0:
            raise ValueError(f"SparseGPTPruner: percdamp must be a positive number (a "
                             f"fraction of the mean Hessian diagonal), got {percdamp!r}")
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise ValueError(f"SparseGPTPruner: blocksize must be a positive int, got "
                             f"{blocksize!r}")
        self.percdamp = float(percdamp)
        self.blocksize = blocksize
        super().__init__(model, config_list, calibration_data, sequential=sequential,
                         reconstruct=reconstruct)

    def _prune_pool(self, pool, sparsity, stats, modules):
        if isinstance(pool, ChannelPool):
            return self._prune_channels(pool, sparsity, stats, modules)
        name = pool.module
        module = modules[name]
        if isinstance(pool, ElementPool):
            pattern = ObsPattern("fine", sparsity)
        elif isinstance(pool, RowGroupPool):
            pattern = ObsPattern("nm", sparsity, group=pool.group)
        elif isinstance(pool, BlockPool):
            pattern = ObsPattern("block", sparsity, block=pool.block)
        else:
            raise TypeError(f"SparseGPTPruner cannot prune a {type(pool).__name__}")
        weight = layers.to_canonical(module, module.weight.detach())
        updated, keep = sparsegpt_prune(weight, stats.hessian(name), pattern,
                                        self.blocksize, self.percdamp)
        module.weight.data.copy_(layers.from_canonical(module, updated))
        return {name: {"weight": keep.to("cpu", torch.float32)}}

    def _prune_channels(self, pool, sparsity, stats, modules):
        columns = [m for m in pool.members if m.dim == 1]
        weights = {m.module: layers.to_canonical(modules[m.module],
                                                 modules[m.module].weight.detach()).float()
                   for m in pool.members}
        scores = torch.zeros(pool.num_units, dtype=torch.float64)
        hinv = {}
        if columns:      # in_channel, heads: the joint OBS error of the units' columns
            for m in columns:
                hinv[m.module] = self._live_inverse(weights[m.module], stats.hessian(m.module))
                scores += column_group_errors(weights[m.module], hinv[m.module],
                                              m.index).cpu()
        else:            # out_channel: the output energy of the units' rows
            for m in pool.members:
                energy = row_energy(weights[m.module], stats.hessian(m.module)).cpu()
                scores += energy[m.index].sum(1)
        keep = pool.select(scores, sparsity)
        pruned = ~keep
        for m in columns:
            w = weights[m.module].clone()
            remove_columns_(w, hinv[m.module], m.index[pruned].reshape(-1))
            module = modules[m.module]
            module.weight.data.copy_(layers.from_canonical(module, w))
        masks = pool.masks(keep)
        self._zero_(modules, masks)
        return masks

    def _live_inverse(self, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """The damped inverse Hessian of the columns still alive, zero elsewhere: columns
        an earlier pool removed from this layer (another key/value group's query heads)
        are out of the problem and take no compensation."""
        live = (weight != 0).any(0).nonzero().flatten().to(hessian.device)
        hinv = torch.zeros(hessian.shape, dtype=torch.float64, device=weight.device)
        part = damped_inverse(hessian[live][:, live], self.percdamp).to(weight.device)
        hinv[live.to(weight.device).unsqueeze(1), live.to(weight.device)] = part
        return hinv
