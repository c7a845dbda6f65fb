"""Evaluators: how a pruner trains and evaluates the user's model (NNI 3 conventions).

One job: give data-driven pruners four things, whatever the training loop is: patch the
loss (``patch_loss``), run code around optimizer steps (``patch_optimizer_step``), train
for N optimizer steps (``train``) and evaluate (``evaluate``).

* :class:`TorchEvaluator` wraps a plain training function::

      def training_func(model, optimizers, training_step, lr_schedulers=None,
                        max_steps=None, max_epochs=None): ...
      def training_step(batch, model) -> loss: ...

  ``train(max_steps)`` stops after ``max_steps`` optimizer steps even if
  ``training_func`` ignores ``max_steps``.
* :class:`TransformersEvaluator` wraps a Hugging Face ``Trainer`` (transformers 4.x and
  5.x): the loss is patched on ``compute_loss`` (either signature), step hooks go on the
  optimizer the trainer creates, ``train(max_steps)`` sets ``args.max_steps`` for the run.

The user's optimizer, scheduler and trainer objects are used as they are (no ``nni.trace``).
Pruners keep parameter objects unchanged, so those optimizers stay valid after pruning.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch

LossPatch = Callable[[torch.Tensor, Any], torch.Tensor]
StepHook = Callable[[], None]


class _StopTraining(BaseException):
    """Raised after the requested number of optimizer steps (a BaseException, so a
    training loop's ``except Exception`` does not swallow it)."""


class Evaluator:
    """Common bookkeeping: the bound model, the loss patch, step hooks."""

    def __init__(self):
        self.model: torch.nn.Module | None = None
        self._loss_patch: LossPatch | None = None
        self._before: list[StepHook] = []
        self._after: list[StepHook] = []
        self._steps = 0
        self._max_steps: int | None = None

    def bind_model(self, model: torch.nn.Module) -> None:
        self.model = model

    def unbind_model(self) -> None:
        self.revert_loss()
        self.revert_optimizer_step()
        self.model = None

    def _require_model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}: no model bound; call bind_model(model)")
        return self.model

    def patch_loss(self, patch: LossPatch) -> None:
        """Training uses ``patch(loss, batch)`` instead of ``loss``."""
        self._loss_patch = patch

    def revert_loss(self) -> None:
        self._loss_patch = None

    def patch_optimizer_step(self, before: Sequence[StepHook] = (),
                             after: Sequence[StepHook] = ()) -> None:
        """Call ``before`` hooks right before and ``after`` hooks right after every
        optimizer step (gradients are still there in both)."""
        self._before.extend(before)
        self._after.extend(after)

    def revert_optimizer_step(self) -> None:
        self._before.clear()
        self._after.clear()

    def _apply_loss_patch(self, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        return loss if self._loss_patch is None else self._loss_patch(loss, batch)

    def _pre_step(self, *args, **kwargs) -> None:
        for hook in self._before:
            hook()

    def _post_step(self, *args, **kwargs) -> None:
        for hook in self._after:
            hook()
        self._steps += 1
        if self._max_steps is not None and self._steps >= self._max_steps:
            raise _StopTraining

    def train(self, max_steps: int | None = None, max_epochs: int | None = None) -> None:
        raise NotImplementedError

    def evaluate(self) -> Any:
        raise NotImplementedError

    def cannot_evaluate(self) -> str | None:
        """None when evaluate() can run, else why not (checked by the pruners that score
        their iterations, before they change anything)."""
        return None

    def get_dummy_input(self) -> Any:
        return None


def _as_list(obj) -> list:
    if obj is None:
        return []
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


class TorchEvaluator(Evaluator):
    """Evaluator for a plain PyTorch training loop (NNI 3 signature)."""

    def __init__(self, training_func: Callable, optimizers: Any, training_step: Callable,
                 lr_schedulers: Any = None, dummy_input: Any = None,
                 evaluating_func: Callable | None = None):
        super().__init__()
        if not callable(training_func) or not callable(training_step):
            raise TypeError("TorchEvaluator: training_func and training_step must be callables")
        opts = _as_list(optimizers)
        if not opts or not all(isinstance(o, torch.optim.Optimizer) for o in opts):
            raise TypeError("TorchEvaluator: optimizers must be a torch.optim.Optimizer or a "
                            f"list of them, got {type(optimizers).__name__}")
        self.training_func = training_func
        self.optimizers = optimizers
        self.training_step = training_step
        self.lr_schedulers = lr_schedulers
        self.dummy_input = dummy_input
        self.evaluating_func = evaluating_func
        self._hook_handles: list = []

    def bind_model(self, model: torch.nn.Module) -> None:
        params = {id(p) for p in model.parameters()}
        for opt in _as_list(self.optimizers):
            owned = [id(p) in params for g in opt.param_groups for p in g["params"]]
            if owned and not any(owned):
                raise ValueError("TorchEvaluator: the optimizer holds none of the model's "
                                 "parameters; build it on the model being pruned")
        super().bind_model(model)

    def _patched_step(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
        return self._apply_loss_patch(self.training_step(batch, model), batch)

    def train(self, max_steps: int | None = None, max_epochs: int | None = None) -> None:
        """Run ``training_func``; stops after ``max_steps`` optimizer steps."""
        model = self._require_model()
        self._steps, self._max_steps = 0, max_steps
        for opt in _as_list(self.optimizers):
            self._hook_handles.append(opt.register_step_pre_hook(self._pre_step))
            self._hook_handles.append(opt.register_step_post_hook(self._post_step))
        was_training = model.training
        model.train()
        try:
            self.training_func(model, self.optimizers, self._patched_step,
                               lr_schedulers=self.lr_schedulers, max_steps=max_steps,
                               max_epochs=max_epochs)
        except _StopTraining:
            pass
        finally:
            for h in self._hook_handles:
                h.remove()
            self._hook_handles.clear()
            self._max_steps = None
            model.train(was_training)

    def evaluate(self) -> Any:
        if self.evaluating_func is None:
            raise RuntimeError("TorchEvaluator: no evaluating_func was given")
        return self.evaluating_func(self._require_model())

    def cannot_evaluate(self) -> str | None:
        if self.evaluating_func is None:
            return "a TorchEvaluator without evaluating_func"
        return None

    def get_dummy_input(self) -> Any:
        return self.dummy_input


class TransformersEvaluator(Evaluator):
    """Evaluator for a Hugging Face ``Trainer`` built on the model being pruned."""

    def __init__(self, trainer: Any, dummy_input: Any = None):
        super().__init__()
        if not hasattr(trainer, "train") or not hasattr(trainer, "compute_loss"):
            raise TypeError("TransformersEvaluator: trainer must be a transformers.Trainer, "
                            f"got {type(trainer).__name__}")
        self.trainer = trainer
        self.dummy_input = dummy_input
        self._original_compute_loss = None
        self._original_create_optimizer = None
        self._hooked: dict[int, list] = {}

    def bind_model(self, model: torch.nn.Module) -> None:
        if self.trainer.model is not model:
            raise ValueError("TransformersEvaluator: trainer.model is not the model being "
                             "pruned; build the Trainer with model=<that model>")
        super().bind_model(model)

    def patch_loss(self, patch: LossPatch) -> None:
        super().patch_loss(patch)
        if self._original_compute_loss is not None:
            return
        original = self.trainer.compute_loss
        self._original_compute_loss = original

        @functools.wraps(original)
        def compute_loss(model, inputs, *args, **kwargs):
            # 4.x: (model, inputs, return_outputs=False); >= 4.46 and 5.x add
            # num_items_in_batch; pass whatever the trainer passes.
            result = original(model, inputs, *args, **kwargs)
            if isinstance(result, tuple):
                return (self._apply_loss_patch(result[0], inputs),) + tuple(result[1:])
            return self._apply_loss_patch(result, inputs)

        self.trainer.compute_loss = compute_loss

    def revert_loss(self) -> None:
        super().revert_loss()
        if self._original_compute_loss is not None:
            self.trainer.__dict__.pop("compute_loss", None)
            self._original_compute_loss = None

    def _hook_optimizer(self) -> None:
        opt = getattr(self.trainer, "optimizer", None)
        inner = getattr(opt, "optimizer", opt)          # accelerate's AcceleratedOptimizer
        if isinstance(inner, torch.optim.Optimizer) and id(inner) not in self._hooked:
            self._hooked[id(inner)] = [inner.register_step_pre_hook(self._pre_step),
                                       inner.register_step_post_hook(self._post_step)]

    def _unhook_optimizers(self) -> None:
        for handles in self._hooked.values():
            for h in handles:
                h.remove()
        self._hooked.clear()

    def train(self, max_steps: int | None = None, max_epochs: int | None = None) -> None:
        """``trainer.train()`` with ``args.max_steps`` / ``num_train_epochs`` overridden."""
        self._require_model()
        args = self.trainer.args
        saved = (args.max_steps, args.num_train_epochs)
        if max_steps is not None:
            args.max_steps = int(max_steps)
        if max_epochs is not None:
            args.num_train_epochs = max_epochs
        self._steps, self._max_steps = 0, None
        original_create = self.trainer.create_optimizer

        def create_optimizer(*a, **k):
            result = original_create(*a, **k)
            self._hook_optimizer()
            return result

        self.trainer.create_optimizer = create_optimizer
        self._hook_optimizer()
        try:
            self.trainer.train()
        finally:
            self.trainer.__dict__.pop("create_optimizer", None)
            self._unhook_optimizers()
            args.max_steps, args.num_train_epochs = saved

    def evaluate(self) -> Any:
        self._require_model()
        return self.trainer.evaluate()

    def cannot_evaluate(self) -> str | None:
        if getattr(self.trainer, "eval_dataset", None) is None:
            return "a TransformersEvaluator whose Trainer has no eval_dataset"
        return None

    def get_dummy_input(self) -> Any:
        return self.dummy_input
