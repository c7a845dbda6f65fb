"""What one-shot pruners gather from calibration data, one transformer layer at a time.

One job: move calibration activations through a model and measure the inputs of the
layers being pruned.

* :func:`transformer_layers` picks the stack of transformer layers from the model map.
* :func:`capture_layer_inputs` runs the model up to its first layer and keeps what that
  layer is called with: the hidden states and the other arguments (attention mask,
  position embeddings ...). The other arguments are passed to every layer of the stack, as
  the SparseGPT and Wanda references do (a model whose layers take different ones, such as
  Gemma 2's alternating sliding-window masks, gets the first layer's: the same masks when
  the calibration windows are shorter than the sliding window); a KV cache is never passed.
* :func:`run_layer` turns one layer's inputs into the next layer's.
* :class:`InputStatistics` hooks Linear / Conv1D layers and accumulates, per input feature,
  the sum of squares (Wanda's ``||X_j||^2``) and optionally the Gram matrix ``X^T X``
  (SparseGPT's Hessian ``2 X^T X / n``) with the row count ``n``. Layers fed the same
  tensor (Q, K and V; gate and up) share one accumulator. Under torch.distributed the sums
  and counts are added across ranks, so every rank prunes the same.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from sparsekernels.arch import find_layers, layers
from sparsekernels.arch.inputs import run_model
from sparsekernels.pruning.distributed import all_reduce_sum_

PRUNABLE_TYPES = ("Linear", "Conv1D")
_CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


def transformer_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """``(name, layers)`` of the model's transformer layer stack, or None: the longest of the
    model map's layer lists (``arch.find_layers``: repeated blocks holding weight layers,
    outermost only), ties to the first (the encoder of an encoder-decoder); a list of bare
    Linears is not a stack of layers."""
    modules = dict(model.named_modules())
    stacks = [(name, modules[name]) for name, paths in find_layers(model)
              if layers.type_name(modules[paths[0]]) not in PRUNABLE_TYPES]
    return max(stacks, key=lambda s: len(s[1])) if stacks else None   # max keeps the first


def check_batches(owner: str, calibration_data: Any) -> list[Any]:
    """The calibration batches as a list, refused (before anything runs) when empty or when
    an item is not a model input (a tensor, a tuple/list of positional inputs, a dict)."""
    if isinstance(calibration_data, (torch.Tensor, Mapping, str, bytes)) \
            or not isinstance(calibration_data, Iterable):
        raise TypeError(f"{owner}: calibration_data must be an iterable of model inputs (a "
                        f"list of batches), got {type(calibration_data).__name__}; wrap a "
                        "single batch in a list")
    batches = list(calibration_data)
    if not batches:
        raise ValueError(f"{owner}: calibration_data is empty; give at least one batch of "
                         "model inputs (e.g. a list of input_ids tensors)")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, tuple, list, Mapping)):
            raise TypeError(f"{owner}: calibration_data[{i}] is a {type(batch).__name__}; "
                            "each batch must be a tensor, a tuple of positional inputs or a "
                            "dict of keyword inputs, as the model's forward takes them")
    return batches


@contextlib.contextmanager
def calibration_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no autograd and no KV cache while calibrating; restored afterwards."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    was_training = model.training
    model.eval()
    if use_cache is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        if use_cache is not None:
            config.use_cache = use_cache
        model.train(was_training)


@dataclass
class LayerInput:
    """What one layer is called with for one batch: ``layer(hidden, *args, **kwargs)``."""

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


class _Stop(Exception):
    """Raised by the capture hook: the rest of the model need not run."""


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache")     # transformers' Cache classes


def _split_call(args: tuple, kwargs: dict) -> LayerInput:
    # a KV cache would grow each time a layer runs: never pass one
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: None if k in _CACHE_ARGS or _is_cache(v) else v for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    if args:
        hidden, rest = args[0], tuple(args[1:])
    elif "hidden_states" in kwargs:
        hidden, rest = kwargs.pop("hidden_states"), ()
    else:
        raise RuntimeError("the first transformer layer was called without hidden states "
                           "(no positional argument and no 'hidden_states' keyword)")
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError(f"the first transformer layer's hidden states are a "
                           f"{type(hidden).__name__}, not a tensor")
    return LayerInput(hidden, rest, kwargs)


def capture_layer_inputs(model: torch.nn.Module, layer: torch.nn.Module,
                         batches: Sequence[Any]) -> list[LayerInput]:
    """Run ``model`` on each batch up to ``layer`` and keep the layer's inputs."""
    captured: list[LayerInput] = []

    def hook(module, args, kwargs):
        captured.append(_split_call(args, kwargs))
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            try:
                run_model(model, batch)
            except _Stop:
                continue
            raise RuntimeError(f"calibration batch {i} ran through the model without calling "
                               "its first transformer layer")
    finally:
        handle.remove()
    return captured


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states a layer returns (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def run_layer(layer: torch.nn.Module, inputs: Sequence[LayerInput]) -> list[LayerInput]:
    """The next layer's inputs: each batch's hidden states replaced by ``layer``'s output."""
    return [LayerInput(layer_output(layer(x.hidden, *x.args, **x.kwargs)), x.args, x.kwargs)
            for x in inputs]


class InputStatistics:
    """Per-feature statistics of the inputs of ``modules`` (see module docstring).

    Use as a context manager around the forwards; call :meth:`next_batch` before each
    forward (inputs are shared only within one), then :meth:`reduce_` once after them.
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module], gram: bool):
        self.modules = dict(modules)
        self.gram = gram
        self._sq: dict[str, torch.Tensor] = {}
        self._xtx: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        self._alias: dict[str, str] = {}       # module -> the module whose input it shares
        self._seen_batches: dict[str, int] = {}
        self._memo: list[tuple[torch.Tensor, str]] = []
        self._batch = -1
        self._handles: list = []

    def __enter__(self) -> "InputStatistics":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: self._observe(name, m, args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._memo.clear()

    def next_batch(self) -> None:
        self._memo.clear()
        self._batch += 1

    def _observe(self, name: str, module: torch.nn.Module, x: torch.Tensor) -> None:
        owner = next((o for t, o in self._memo if t is x), None)
        first = name not in self._seen_batches and name not in self._alias
        if first and owner is not None and self._batch == 0:
            self._alias[name] = owner
            return
        if name in self._alias:
            if owner != self._alias[name]:
                raise RuntimeError(f"{name!r} shared its input with {self._alias[name]!r} on "
                                   "the first calibration batch but not on a later one")
            return
        x2 = x.detach().reshape(-1, layers.in_features(module)).float()
        sq = x2.square().sum(0).double()
        if name in self._sq:
            self._sq[name] += sq
            self._count[name] += x2.shape[0]
        else:
            self._sq[name], self._count[name] = sq, x2.shape[0]
        if self.gram:
            xtx = x2.t() @ x2
            if name in self._xtx:
                self._xtx[name] += xtx
            else:
                self._xtx[name] = xtx
        self._seen_batches[name] = self._batch
        # layers that share an input are called back to back; a short memo keeps the
        # whole-model pass from holding every layer's input
        self._memo = self._memo[-3:] + [(x, name)]

    def _owner(self, name: str) -> str:
        owner = self._alias.get(name, name)
        if owner not in self._count:
            raise RuntimeError(f"{name!r} never ran on the calibration data, so it has no "
                               "input statistics; check that its inputs reach it")
        return owner

    def reduce_(self) -> None:
        """Add the sums and counts of every rank (no-op without torch.distributed)."""
        owners = sorted(self._count)
        counts = torch.tensor([float(self._count[o]) for o in owners], dtype=torch.float64,
                              device=self._sq[owners[0]].device if owners else "cpu")
        tensors = [self._sq[o] for o in owners] + [counts]
        if self.gram:
            tensors += [self._xtx[o] for o in owners]
        all_reduce_sum_(tensors)
        self._count = {o: int(c) for o, c in zip(owners, counts.tolist())}

    def count(self, name: str) -> int:
        return self._count[self._owner(name)]

    def mean_square(self, name: str) -> torch.Tensor:
        """``[in]``: the mean of ``x_j ** 2`` over the input rows (float64)."""
        owner = self._owner(name)
        return self._sq[owner] / max(self._count[owner], 1)

    def hessian(self, name: str) -> torch.Tensor:
        """``[in, in]``: ``2 X^T X / n`` (float32), the layer-wise reconstruction Hessian."""
        owner = self._owner(name)
        return self._xtx[owner] * (2.0 / max(self._count[owner], 1))


def collect_statistics(modules: Mapping[str, torch.nn.Module], gram: bool,
                       forwards: Iterable[Any]) -> InputStatistics:
    """Statistics of ``modules``' inputs over ``forwards`` (an iterable whose each step runs
    one batch), added across ranks."""
    stats = InputStatistics(modules, gram)
    with stats:
        iterator = iter(forwards)
        while True:
            stats.next_batch()
            try:
                next(iterator)
            except StopIteration:
                break
    stats.reduce_()
    return stats
