"""Coupled channels: which layers read and write the same channels, found by one forward.

One job: find channel groups by running the model once on ``dummy_input`` and following
each feature dimension through the operations between layers.

How: every supported layer (Linear, Conv1D, Conv2d, Embedding) owns an *input space*
and an *output space* of channels, every norm layer (LayerNorm, T5LayerNorm, BatchNorm)
one space. Module hooks tag a layer's output tensor with its output space; a
``TorchFunctionMode`` carries tags through the operations between layers (element-wise
ops and residual adds keep a feature dim in place, ``transpose``/``permute`` move it,
``view``/``reshape``/``flatten`` keep it when it stays a whole dimension, reductions and
head splits drop it, ``matmul`` takes the last dim of its right operand). When a layer
reads a tagged tensor, its input space joins the tag's space (union-find). Free
parameters that meet a tagged tensor (ViT's ``cls_token`` and position embeddings) join
too. Then structural rules add what tracing cannot see: Q and K output channels are
contracted together, V's output channels are O's input channels (GPT-2's fused
``c_attn`` is split into its Q, K and V thirds), and modules sharing one weight (tied
embeddings) share its channels.

If the forward fails under tracing, :class:`TracingError` names the operation and the
module it ran in.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.overrides import TorchFunctionMode

from sparsekernels.arch import layers
from sparsekernels.arch.inputs import run_model

_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "prod",
               "logsumexp", "var_mean", "std_mean", "argmax", "argmin", "all", "any"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_MATMULS = {"matmul", "__matmul__", "bmm", "mm", "baddbmm", "addmm", "einsum"}


class TracingError(RuntimeError):
    """The model could not be traced for channel dependencies."""


@dataclass(frozen=True)
class GroupMember:
    """Channel ``j`` of the group is ``index[j]`` along ``dim`` of ``name``.

    ``kind`` is ``"out"`` / ``"in"`` (canonical dim 0 / 1 of a layer's weight), ``"norm"``
    (a norm layer's weight and bias) or ``"param"`` (a free parameter's last dim).
    """

    name: str
    kind: str
    index: torch.Tensor

    @property
    def dim(self) -> int:
        return 1 if self.kind == "in" else 0


@dataclass(frozen=True)
class ChannelGroup:
    size: int
    members: tuple[GroupMember, ...]

    def names(self, kind: str | None = None) -> set[str]:
        return {m.name for m in self.members if kind is None or m.kind == kind}


class _Spaces:
    """Union-find over channel spaces of equal size (channel j <-> channel j)."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.members: list[list[GroupMember]] = []

    def new(self, size: int, member: GroupMember | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.members.append([member] if member else [])
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb and self.size[ra] == self.size[rb]:
            self.parent[rb] = ra
        return ra


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in _tensors(o)]
    if hasattr(obj, "to_tuple"):        # transformers ModelOutput
        return _tensors(obj.to_tuple())
    return []


def _feature_dim(module: torch.nn.Module, t: torch.Tensor) -> int:
    name = layers.type_name(module)
    if name.startswith(("Conv2d", "Conv1d", "BatchNorm")) and t.dim() >= 3:
        return 1
    return t.dim() - 1


class _Tracer(TorchFunctionMode):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.spaces = _Spaces()
        # id(tensor) -> (weakref to it, {dim: space}); weak so tracing keeps no activations
        self.labels: dict[int, tuple[weakref.ref, dict[int, int]]] = {}
        self.inside = 0
        self.module_stack: list[str] = []
        self.last_op = "<none>"
        self.param_names = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.param_names.setdefault(id(p), n)
        self.layer_space: dict[tuple[str, str], int] = {}
        self.leaf_params: set[int] = set()
        for name, module in model.named_modules():
            tname = layers.type_name(module)
            if tname in layers.WEIGHT_TYPES and isinstance(getattr(module, "weight", None),
                                                            torch.Tensor):
                out_f, in_f = layers.out_features(module), layers.in_features(module)
                self.layer_space[(name, "out")] = self.spaces.new(
                    out_f, GroupMember(name, "out", torch.arange(out_f)))
                self.layer_space[(name, "in")] = self.spaces.new(
                    in_f, GroupMember(name, "in", torch.arange(in_f)))
            elif tname in layers.NORM_TYPES and isinstance(getattr(module, "weight", None),
                                                           torch.Tensor):
                c = module.weight.shape[0]
                self.layer_space[(name, "norm")] = self.spaces.new(
                    c, GroupMember(name, "norm", torch.arange(c)))
            else:
                continue
            self.leaf_params.update(id(p) for p in module.parameters(recurse=False))
        self.param_space: dict[int, int] = {}

    # ---------------------------------------------------------------- labels
    def label(self, t: torch.Tensor) -> dict[int, int]:
        entry = self.labels.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        if isinstance(t, torch.nn.Parameter) and id(t) not in self.leaf_params \
                and t.dim() >= 1 and t.shape[-1] > 1:
            space = self.param_space.get(id(t))
            if space is None:
                name = self.param_names.get(id(t), "<parameter>")
                space = self.spaces.new(t.shape[-1], GroupMember(
                    name, "param", torch.arange(t.shape[-1])))
                self.param_space[id(t)] = space
            return {t.dim() - 1: space}
        return {}

    def tag(self, t: torch.Tensor, dim: int, space: int) -> None:
        entry = self.labels.get(id(t))
        current = entry[1] if entry is not None and entry[0]() is t else {}
        if dim in current:
            space = self.spaces.union(current[dim], space)
        self.labels[id(t)] = (weakref.ref(t), {**current, dim: space})

    # ----------------------------------------------------------------- hooks
    def pre_hook(self, name, module, args, kwargs):
        self.module_stack.append(name)
        kind = "norm" if (name, "norm") in self.layer_space else "in"
        if (name, kind) in self.layer_space:
            self.inside += 1
            if layers.type_name(module) != "Embedding":
                inputs = _tensors(args) or _tensors(kwargs)
                if inputs:
                    x = inputs[0]
                    d = _feature_dim(module, x)
                    space = self.label(x).get(d)
                    if space is not None:
                        self.spaces.union(space, self.layer_space[(name, kind)])

    def post_hook(self, name, module, args, kwargs, output):
        kind = "norm" if (name, "norm") in self.layer_space else "out"
        if (name, kind) in self.layer_space:
            self.inside -= 1
            outs = _tensors(output)
            if outs:
                self.tag(outs[0], _feature_dim(module, outs[0]),
                         self.layer_space[(name, kind)])
        self.module_stack.pop()

    # ----------------------------------------------------------- propagation
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.last_op = getattr(func, "__name__", repr(func))
        out = func(*args, **kwargs)
        if self.inside == 0:
            self.propagate(self.last_op, args, kwargs, out)
        return out

    def propagate(self, op: str, args, kwargs, out) -> None:
        outs = _tensors(out)
        if not outs:
            return
        inputs = [t for t in _tensors(args) + _tensors(kwargs)]
        labeled = [(t, self.label(t)) for t in inputs]
        labeled = [(t, lab) for t, lab in labeled if lab]
        if not labeled:
            return
        op = op.strip("_") if op.startswith("__") and op not in ("__matmul__",) else op
        if op in ("transpose", "swapaxes", "permute", "movedim", "t"):
            self._move(op, args, kwargs, labeled[0], outs[0])
        elif op in _RESHAPES:
            self._reshape(labeled[0], outs[0])
        elif op in _MATMULS:
            if op == "einsum":
                return
            mats = [t for t in inputs if t.dim() >= 1]
            if len(mats) >= 2:
                a, b = mats[-2], mats[-1]
                lab_b = self.label(b)
                if b.dim() >= 2 and (b.dim() - 1) in lab_b:
                    self.tag(outs[0], outs[0].dim() - 1, lab_b[b.dim() - 1])
                lab_a = self.label(a)
                if a.dim() >= 2 and outs[0].dim() >= 2 and (a.dim() - 2) in lab_a:
                    self.tag(outs[0], outs[0].dim() - 2, lab_a[a.dim() - 2])
        elif op in _REDUCTIONS:
            self._reduce(args, kwargs, labeled, outs)
        else:
            for o in outs:
                for t, lab in labeled:
                    for d, space in lab.items():
                        r = d - t.dim()
                        if -r <= o.dim() and o.shape[r] == t.shape[d] and t.shape[d] > 1:
                            self.tag(o, o.dim() + r, space)

    def _move(self, op, args, kwargs, labeled, out) -> None:
        t, lab = labeled
        n = t.dim()
        rest = list(args[1:])
        if op == "t":
            perm = list(range(n))[::-1]
        elif op == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            dims = dims or kwargs.get("dims", ())
            perm = [d % n for d in dims]
        elif op == "movedim":
            src = rest[0] if rest else kwargs.get("source")
            dst = rest[1] if len(rest) > 1 else kwargs.get("destination")
            perm = list(range(n))
            s, d = src % n, dst % n
            perm.pop(s)
            perm.insert(d, s)
        else:
            a = rest[0] if rest else kwargs.get("dim0")
            b = rest[1] if len(rest) > 1 else kwargs.get("dim1")
            perm = list(range(n))
            perm[a % n], perm[b % n] = perm[b % n], perm[a % n]
        for new_dim, old_dim in enumerate(perm):
            if old_dim in lab:
                self.tag(out, new_dim, lab[old_dim])

    def _reshape(self, labeled, out) -> None:
        t, lab = labeled
        for d, space in lab.items():
            before = 1
            for s in t.shape[:d]:
                before *= s
            acc = 1
            for nd in range(out.dim()):
                if acc == before and out.shape[nd] == t.shape[d]:
                    self.tag(out, nd, space)
                    break
                acc *= out.shape[nd]

    def _reduce(self, args, kwargs, labeled, outs) -> None:
        t, lab = labeled[0]
        dims = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(
            args[1], torch.Tensor) else None)
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool)
                          else False)
        if dims is None:
            return
        dims = {d % t.dim() for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        o = outs[0]
        for d, space in lab.items():
            if d in dims:
                continue
            nd = d if keep else d - sum(1 for r in dims if r < d)
            if nd < o.dim() and o.shape[nd] == t.shape[d]:
                self.tag(o, nd, space)


def _structural(tracer: _Tracer, model: torch.nn.Module) -> dict[tuple[str, str], list]:
    """Attention and tied-weight couplings; returns the fused-QKV splits."""
    from sparsekernels.arch.find import find_attention

    spaces, ls = tracer.spaces, tracer.layer_space
    splits: dict[tuple[str, str], list] = {}
    for site in find_attention(model):
        if site.fused:
            parts = []
            for part in ("q", "k", "v"):
                idx = site.rows(part).reshape(-1)
                parts.append((spaces.new(idx.numel(), GroupMember(site.q, "out", idx)), idx))
            splits[(site.q, "out")] = parts
            spaces.union(parts[0][0], parts[1][0])
            spaces.union(parts[2][0], ls[(site.o, "in")])
        else:
            spaces.union(ls[(site.q, "out")], ls[(site.k, "out")])
            spaces.union(ls[(site.v, "out")], ls[(site.o, "in")])
    modules = dict(model.named_modules())
    by_weight: dict[int, list[str]] = {}
    for name, module in modules.items():
        if (name, "out") in ls:
            by_weight.setdefault(id(module.weight), []).append(name)
    for names in by_weight.values():
        for stored_dim in (0, 1):
            picked = [ls[(n, _space_kind(modules[n], stored_dim))] for n in names]
            for other in picked[1:]:
                spaces.union(picked[0], other)
    return splits


def _space_kind(module: torch.nn.Module, stored_dim: int) -> str:
    """Which space (``"out"``/``"in"``) a dim of the *stored* 2-D weight belongs to."""
    canonical_dim = 1 - stored_dim if layers.is_transposed(module) else stored_dim
    return "out" if canonical_dim == 0 else "in"


def trace(model: torch.nn.Module, dummy_input: Any):
    """Run the model once under the tracer: its channel spaces and the fused-QKV splits."""
    tracer = _Tracer(model)
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(
            lambda m, a, k, name=name: tracer.pre_hook(name, m, a, k), with_kwargs=True))
        handles.append(module.register_forward_hook(
            lambda m, a, k, o, name=name: tracer.post_hook(name, m, a, k, o),
            with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracer:
            run_model(model, dummy_input)
    except Exception as exc:
        where = tracer.module_stack[-1] if tracer.module_stack else "<model>"
        raise TracingError(
            f"dependency tracing failed at operation {tracer.last_op!r} in module "
            f"{where!r}: {type(exc).__name__}: {exc}. Check that dummy_input is what the "
            "model's forward accepts (a tensor, a tuple of positional args or a dict of "
            "keyword args), or use mode='normal'") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    splits = _structural(tracer, model)
    return tracer, splits


def find_channel_groups(model: torch.nn.Module, dummy_input: Any) -> list[ChannelGroup]:
    """Channel groups of ``model`` with more than one member, found by tracing."""
    tracer, _ = trace(model, dummy_input)
    spaces = tracer.spaces
    roots: dict[int, list[GroupMember]] = {}
    for i in range(len(spaces.parent)):
        roots.setdefault(spaces.find(i), []).extend(spaces.members[i])
    return [ChannelGroup(spaces.size[r], tuple(ms)) for r, ms in roots.items() if len(ms) > 1]
