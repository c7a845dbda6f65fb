"""Find the attention blocks of a model and the channels each head owns.

One job: structural discovery of multi-head attention. An attention block is a module
with q/k/v-like projection children (``query/key/value``, ``q/k/v``, ``q_proj/...``,
``q_lin/...``) or GPT-2's fused ``c_attn`` Conv1D, plus an output projection (a child
``o``/``o_proj``/``out_proj``/``out_lin``/``c_proj``/``dense``, or BERT's sibling
``output.dense``). The head count is read from the block, its parent or ``model.config``
under any of the names transformers has used (``num_attention_heads``, ``num_heads``,
``n_heads``, ``n_head``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsekernels.pruning import layers

_QKV_NAMES = (("query", "key", "value"), ("q", "k", "v"), ("q_proj", "k_proj", "v_proj"),
              ("q_lin", "k_lin", "v_lin"))
_OUT_NAMES = ("o", "o_proj", "out_proj", "out_lin", "c_proj", "dense")
_HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "attention_heads")


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block: projection module names, head count and head size.

    For GPT-2 ``fused`` is True and ``q == k == v`` is the ``c_attn`` Conv1D whose
    canonical rows are ``[Q; K; V]``, each ``num_heads * head_dim`` long.
    """

    name: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    head_dim: int
    fused: bool = False

    @property
    def projections(self) -> tuple[str, ...]:
        return (self.q, self.o) if self.fused else (self.q, self.k, self.v, self.o)

    def head_members(self) -> list[tuple[str, int, torch.Tensor]]:
        """``(module, canonical dim, index[H, k])``: head ``h`` owns ``index[h]`` along
        ``dim`` of that module's canonical weight (rows of Q/K/V, columns of O)."""
        h, d = self.num_heads, self.head_dim
        per_head = torch.arange(h * d).view(h, d)
        if self.fused:
            qkv = torch.cat([per_head + i * h * d for i in range(3)], dim=1)
            return [(self.q, 0, qkv), (self.o, 1, per_head)]
        return [(self.q, 0, per_head), (self.k, 0, per_head), (self.v, 0, per_head),
                (self.o, 1, per_head)]


def read_heads(*objects) -> int | None:
    """The head count: the first positive integer head attribute of `objects`, in order."""
    for obj in objects:
        if obj is None:
            continue
        for attr in _HEAD_ATTRS:
            value = getattr(obj, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_attention_blocks(model: torch.nn.Module) -> list[AttentionBlock]:
    """All attention blocks of ``model`` in ``named_modules`` order."""
    modules = dict(model.named_modules())
    config = getattr(model, "config", None)
    blocks = []
    for name, module in modules.items():
        children = dict(module.named_children())
        parent = modules.get(name.rpartition(".")[0]) if name else None
        parent_name = name.rpartition(".")[0]
        found = None
        for qn, kn, vn in _QKV_NAMES:
            if all(c in children for c in (qn, kn, vn)):
                o = next((c for c in _OUT_NAMES if c in children), None)
                if o is not None:
                    o_name = _join(name, o)
                elif parent is not None and isinstance(getattr(parent, "output", None),
                                                       torch.nn.Module) \
                        and isinstance(getattr(parent.output, "dense", None), torch.nn.Module):
                    o_name = _join(parent_name, "output.dense")
                else:
                    continue
                found = (_join(name, qn), _join(name, kn), _join(name, vn), o_name, False)
                break
        if found is None and "c_attn" in children and "c_proj" in children \
                and "q_attn" not in children:
            c = _join(name, "c_attn")
            found = (c, c, c, _join(name, "c_proj"), True)
        if found is None:
            continue
        q, k, v, o, fused = found
        heads = read_heads(module, parent, config)
        if heads is None:
            raise ValueError(f"attention block {name!r}: cannot read the number of heads; "
                             f"set one of {', '.join(_HEAD_ATTRS)} on the module or "
                             "model.config")
        width = layers.out_features(modules[q]) // (3 if fused else 1)
        if width % heads:
            raise ValueError(f"attention block {name!r}: projection width {width} is not a "
                             f"multiple of {heads} heads")
        blocks.append(AttentionBlock(name, q, k, v, o, heads, width // heads, fused))
    return blocks
