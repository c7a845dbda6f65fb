"""The parts of a Transformer layer the package acts on: attention sites and FFN sites.

One job: say, for one attention block or one FFN, which modules hold it and which
canonical rows / columns of their weights belong to each head, key/value group or FFN unit.
Paths are full module names (``model.get_submodule(path)``); canonical weights are
``[out, in]`` (see arch.layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# (module path, canonical dim, index [units, k]): unit u owns index[u] along dim
Members = list[tuple[str, int, torch.Tensor]]


@dataclass(frozen=True)
class AttentionSite:
    """One attention block.

    name: the module whose forward computes attention (where a kernel is attached).
    q, k, v, o: the projections; with a fused QKV (``qkv_layout`` "blocked" or
    "interleaved") q == k == v is that one module. Grouped-query attention has
    ``num_kv_heads < num_heads``: query head h reads key/value head h // group_size.
    q_norm / k_norm: norms applied to queries / keys, per head (``qk_norm`` "head") or over
    the whole width ("width"). rotary_dims: leading dims of each head that rotary position
    embeddings rotate (0: none); those dims come in pairs, so a head can only go whole.
    """

    name: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_layout: str = "separate"
    q_norm: Optional[str] = None
    k_norm: Optional[str] = None
    qk_norm: Optional[str] = None
    cross: bool = False
    rotary_dims: int = 0
    layer: Optional[str] = None

    @property
    def fused(self) -> bool:
        return self.qkv_layout != "separate"

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def projections(self) -> tuple[str, ...]:
        return (self.q, self.o) if self.fused else (self.q, self.k, self.v, self.o)

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    # -- where each head lives --------------------------------------------------------
    def rows(self, part: str) -> torch.Tensor:
        """Canonical rows of the q (or k, v) projection per head: [heads of that part, d]."""
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        per = lambda n: torch.arange(n * d).view(n, d)
        if self.qkv_layout == "separate":
            return per(h if part == "q" else g)
        if self.qkv_layout == "blocked":
            offset = {"q": 0, "k": h * d, "v": h * d + g * d}[part]
            return per(h if part == "q" else g) + offset
        # interleaved: per kv group [q heads of the group; k; v], each head_dim long
        stride = (self.group_size + 2) * d
        group = torch.arange(g).view(g, 1, 1) * stride
        if part == "q":
            return (group + torch.arange(self.group_size * d).view(1, self.group_size, d)
                    ).reshape(h, d)
        start = self.group_size * d + (0 if part == "k" else d)
        return (group + start + torch.arange(d).view(1, 1, d)).reshape(g, d)

    def o_cols(self) -> torch.Tensor:
        """Canonical columns of the output projection per query head: [heads, d]."""
        return torch.arange(self.num_heads * self.head_dim).view(self.num_heads, self.head_dim)

    def head_members(self) -> Members:
        """Units of head pruning. Without grouping (as many kv heads as heads) a unit is one
        head: its Q, K, V rows and O columns. With grouped-query attention a unit is one
        key/value group: its K and V rows and the Q rows and O columns of its query heads
        (a kv head goes with the query heads that read it)."""
        r = self.group_size
        q = self.rows("q").reshape(self.num_kv_heads, r * self.head_dim)
        o = self.o_cols().reshape(self.num_kv_heads, r * self.head_dim)
        k, v = self.rows("k"), self.rows("v")
        if self.fused:
            return [(self.q, 0, torch.cat([q, k, v], dim=1)), (self.o, 1, o)]
        return [(self.q, 0, q), (self.k, 0, k), (self.v, 0, v), (self.o, 1, o)]

    def query_head_members(self) -> Members:
        """Units that are single query heads: their Q rows and O columns (keys and values
        stay, shared by the group)."""
        return [(self.q, 0, self.rows("q")), (self.o, 1, self.o_cols())]


@dataclass(frozen=True)
class FFNSite:
    """One feed-forward block: down(act(up(x))) or, gated, down(act(gate(x)) * up(x)).

    name: the module that owns the parts. With ``gate_up_fused`` up == gate is one module
    whose canonical rows are [gate; up]. act: (owner path, attribute) of the activation,
    ``activation`` its kernel name (gelu, gelu_tanh, relu, silu) or None when unknown.
    dropout: (owner path, attribute) of a dropout between the activation and down (a float
    attribute or a Dropout module), or None.
    """

    name: str
    up: str
    down: str
    units: int
    gate: Optional[str] = None
    gate_up_fused: bool = False
    act: Optional[tuple[str, str]] = None
    activation: Optional[str] = None
    dropout: Optional[tuple[str, str]] = None
    layer: Optional[str] = None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def first_layers(self) -> tuple[str, ...]:
        """The layers whose output rows are the FFN's units (up, and the gate)."""
        if self.gate is None or self.gate_up_fused:
            return (self.up,)
        return (self.gate, self.up)

    def unit_members(self) -> Members:
        """Unit u of the FFN: row u of up (and of the gate) and column u of down."""
        u = torch.arange(self.units).view(-1, 1)
        if self.gate_up_fused:
            first = [(self.up, 0, torch.cat([u, u + self.units], dim=1))]
        else:
            first = [(name, 0, u) for name in self.first_layers]
        return first + [(self.down, 1, u)]

    def dropout_p(self, model: torch.nn.Module) -> float:
        """The probability of the dropout between the activation and down, read now (it can
        change with the config)."""
        if self.dropout is None:
            return 0.0
        owner, attr = self.dropout
        value = getattr(model.get_submodule(owner), attr, 0.0)
        if isinstance(value, torch.nn.Module):
            value = getattr(value, "p", 0.0)
        return float(value or 0.0)


@dataclass(frozen=True)
class AddNormSite:
    """A post-norm block's end, one module: norm(dropout(dense(h)) + residual).

    name: the module (its forward takes h and the residual); dense, dropout, norm: paths of
    its parts (the norm a torch LayerNorm over the last dim).
    """

    name: str
    dense: str
    dropout: str
    norm: str
    layer: Optional[str] = None


@dataclass(frozen=True)
class RMSNormSite:
    """An RMS norm module: x / rms(x) * w, w its weight or (offset) 1 + weight.

    eps_attr: the attribute holding its epsilon. round_normed: x / rms is rounded to the input
    dtype before the weight multiplies it (Llama style), else the product is in fp32.
    """

    name: str
    offset: bool
    round_normed: bool
    eps_attr: str
    layer: Optional[str] = None
