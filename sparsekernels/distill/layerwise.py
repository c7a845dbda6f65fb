"""DynamicLayerwiseDistiller: CoFi's layer-wise distillation with a dynamic layer map.

At every step each chosen teacher layer i is matched to the student layer m(i) whose
hidden states, after a learnable linear map W, are closest in MSE; the search is
monotonic (m(i) >= m(i-1) for teacher layers in order), so the mapping never crosses.
The loss (NNI's BERT recipe by default):

    ce_weight * CE(student, labels)
      + kd_weight * (T^2 * KL(teacher || student at temperature T) + hidden_weight * sum_i MSE)

The teacher is not a submodule: it is neither trained, saved, nor wrapped by DDP. W maps
the student's hidden size to the teacher's, so the student may be narrower than the
teacher; after the student's hidden channels are removed (speedup), call
`resize_student_hidden(kept)` and W keeps the matching columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DistillConfig:
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    temperature: float = 2.0
    hidden_weight: float = 1.0
    # teacher hidden-state indices to match (0 = embeddings); None: every layer output
    teacher_layers: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("ce_weight", "kd_weight", "hidden_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"DistillConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"DistillConfig.temperature must be > 0, got {self.temperature}")


@dataclass
class DistillOutput:
    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    hidden: torch.Tensor
    matching: list[int] = field(default_factory=list)  # student layer for each teacher layer
    logits: torch.Tensor | None = None


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the hidden size of {type(model).__name__}: pass "
                     "student_hidden_size / teacher_hidden_size")


class DynamicLayerwiseDistiller(nn.Module):
    """Wraps a student and a (frozen) teacher; `forward(**inputs, labels=...)` returns a
    DistillOutput whose `.loss` trains the student and the layer map. Models must accept
    `output_hidden_states=True` and return `logits` and `hidden_states` (transformers)."""

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 config: DistillConfig = DistillConfig(), student_hidden_size: int | None = None,
                 teacher_hidden_size: int | None = None):
        super().__init__()
        if student is teacher:
            raise ValueError("student and teacher are the same object: distil from a copy "
                             "(copy.deepcopy(model)) taken before pruning")
        self.student = student
        self.config = config
        object.__setattr__(self, "teacher", teacher)  # not registered: frozen, not saved
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        hs = student_hidden_size or _hidden_size(student)
        ht = teacher_hidden_size or _hidden_size(teacher)
        self.layer_map = nn.Linear(hs, ht, bias=False)
        with torch.no_grad():  # start as the identity on the shared channels
            self.layer_map.weight.zero_()
            n = min(hs, ht)
            self.layer_map.weight[:n, :n] = torch.eye(n)
        self.last_matching: list[int] = []

    def resize_student_hidden(self, kept: torch.Tensor) -> None:
        """The student's hidden channels `kept` (indices into the previous width) remain."""
        kept = torch.as_tensor(kept, dtype=torch.long, device=self.layer_map.weight.device)
        weight = self.layer_map.weight.detach()[:, kept]
        self.layer_map = nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                                   device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.layer_map.weight.copy_(weight)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher always runs without dropout
        return self

    def forward(self, labels: torch.Tensor | None = None, **inputs) -> DistillOutput:
        cfg = self.config
        with torch.no_grad():
            t_out = self.teacher(**inputs, output_hidden_states=True)
        s_out = self.student(**inputs, output_hidden_states=True)
        hs, ht = s_out.hidden_states, t_out.hidden_states
        if hs[-1].shape[-1] != self.layer_map.in_features:
            raise RuntimeError(
                f"the student's hidden size is {hs[-1].shape[-1]} but the layer map expects "
                f"{self.layer_map.in_features}: after removing hidden channels call "
                "distiller.resize_student_hidden(kept_indices)")
        token_mask = inputs.get("attention_mask")
        weights = None if token_mask is None else token_mask.to(hs[-1].dtype).unsqueeze(-1)
        teacher_layers = cfg.teacher_layers or tuple(range(1, len(ht)))
        mapped = [self.layer_map(h) for h in hs]
        hidden = hs[-1].new_zeros(())
        matching, start = [], 1 if len(hs) > 1 else 0
        for i in teacher_layers:
            target = ht[i].to(mapped[0].dtype)
            losses = [self._mse(mapped[j], target, weights) for j in range(start, len(hs))]
            best = int(torch.stack([l.detach() for l in losses]).argmin())
            hidden = hidden + losses[best]
            start = start + best
            matching.append(start)
        self.last_matching = matching
        s_logits, t_logits = s_out.logits, t_out.logits
        temp = cfg.temperature
        kl = F.kl_div(F.log_softmax(s_logits.float() / temp, -1), F.softmax(t_logits.float() / temp, -1),
                      reduction="batchmean") * temp ** 2
        if labels is not None:
            ce = F.cross_entropy(s_logits.float().view(-1, s_logits.shape[-1]), labels.view(-1))
        else:
            ce = kl.new_zeros(())
        loss = cfg.ce_weight * ce + cfg.kd_weight * (kl + cfg.hidden_weight * hidden)
        return DistillOutput(loss, ce.detach(), kl.detach(), hidden.detach(), matching, s_logits)

    @staticmethod
    def _mse(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        if weights is None:
            return F.mse_loss(a, b)
        diff = (a - b).pow(2) * weights
        return diff.sum() / (weights.sum() * a.shape[-1]).clamp_min(1)
