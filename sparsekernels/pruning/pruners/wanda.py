"""WandaPruner: prune by ``|W_ij| * ||X_j||_2`` (Sun et al., 2023), one-shot, layer by layer.

One job: Wanda's criterion on the shared one-shot flow (:mod:`.oneshot`). ``X_j`` is input
feature ``j`` of the layer over the calibration tokens. Granularities: ``"fine"`` (the
default) compares the scores within each output row, as the paper does (every row gets the
same amount up to one weight, and the layer exactly ``round(sparsity * numel)``); an N:M
pattern (``"2:4"``, ``"4:8"``) within each group of M inputs of a row; ``"block"`` ranks
``[bm, bk]`` blocks of the layer by their summed scores; ``"out_channel"`` /
``"in_channel"`` rank rows / columns by their summed scores; ``"head"`` ranks attention
heads (with grouped-query attention: key/value heads with their query heads) by the scores
of their Q/K/V rows and output-projection columns, ``"query_head"`` the same number of
query heads in every key/value group. Kept weights are not changed (unless
``reconstruct=`` trains them afterwards: :mod:`.reconstruct`).
"""

from __future__ import annotations


from sparsekernels.pruning.config import NM
from sparsekernels.pruning.granularity import ElementPool, RowGroupPool
from sparsekernels.pruning.pruners.oneshot import OneShotPruner, wanda_scores


class WandaPruner(OneShotPruner):
    """``WandaPruner(model, config_list, calibration_data)``; ``compress()`` returns
    ``(model, masks)`` with the pruned weights zero and the kept ones unchanged (trained
    per layer against the dense model with ``reconstruct=``)."""

    granularities = ("fine", NM, "block", "out_channel", "in_channel", "head", "query_head")

    def _build_plan(self):
        plan = super()._build_plan()
        # "fine" compares within each output row (the paper's choice)
        return [(RowGroupPool(p.module, p.shape, p.shape[1]), c)
                if isinstance(p, ElementPool) and not p.prune_bias else (p, c)
                for p, c in plan]

    def _prune_pool(self, pool, sparsity, stats, modules):
        tensors = {n: wanda_scores(modules[n], stats.mean_square(n)).cpu()
                   for n in pool.modules}
        keep = pool.select(self._unit_scores(pool, tensors), sparsity)
        masks = pool.masks(keep)
        self._zero_(modules, masks)
        return masks
