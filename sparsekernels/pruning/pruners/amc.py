"""AMCPruner (He et al. 2018, AutoML for Model Compression; NNI 2.10 signature).

One job: a small DDPG agent picks each layer's sparsity, layer by layer, so that the
pruned model meets a FLOPs (``target='flops'``) or parameter (``target='params'``) budget,
and learns from the evaluator's score of the pruned model.

For every ``config_list`` entry with amount ``s``: remove ``s`` of the FLOPs (or weights)
of the layers it selects. A layer's FLOPs are measured on one forward of ``dummy_input``
(2 x tokens x weight elements for Linear / Conv1D; 2 x outputs x kernel for convs) and
pruning a fraction of its units removes that fraction of them (sparse FLOPs).

Episode: for each layer in order the state is (layer index, out / in size, its share of
the entry's FLOPs, the share removed so far, the share left after it, the previous
action); the actor's action (plus truncated Gaussian exploration noise, decaying by
``delta_decay``; uniform during ``warmup`` episodes) is the layer's sparsity, clipped so
the budget stays reachable with the remaining layers at their caps and is not
overshot. The per-layer choices are then rescaled onto integer unit counts that meet
the budget (within one unit), pruned with ``pruning_algorithm``, finetuned
(``finetuner``) and scored (``evaluator.evaluate()``, higher is better). The reward,
minus a moving-average baseline, is given to every transition of the episode; the critic
learns ``r + discount * Q'(s', mu'(s'))``, the actor maximises ``Q(s, mu(s))``; target
nets follow with rate ``tau``. ``compress()`` loads the best episode's masks.

``ddpg_params`` (NNI's keys and defaults): ``hidden1`` 300, ``hidden2`` 300, ``lr_c``
1e-3, ``lr_a`` 1e-4, ``warmup`` 100, ``discount`` 1.0, ``bsize`` 64, ``rmsize`` 100
(episodes kept in the replay buffer), ``tau`` 0.01, ``init_delta`` 0.5, ``delta_decay``
0.99, ``seed`` 0.

Iterative use: ``masks = pruner.compute_masks()`` (runs the episodes, weights unchanged)
then ``pruner.load_masks(masks)``.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from sparsekernels.arch import layers
from sparsekernels.pruning.pruners.search import AllocationSearch
from sparsekernels.arch.inputs import run_model

DDPG_DEFAULTS = {"hidden1": 300, "hidden2": 300, "lr_c": 1e-3, "lr_a": 1e-4, "warmup": 100,
                 "discount": 1.0, "bsize": 64, "rmsize": 100, "tau": 0.01,
                 "init_delta": 0.5, "delta_decay": 0.99, "seed": 0}
STATE_DIM = 7
AMC_ALGORITHMS = ("l1", "l2", "fpgm", "apoz", "mean_activation", "taylorfo", "level")


def layer_flops(model: nn.Module, names: Sequence[str], dummy_input: Any) -> dict[str, int]:
    """FLOPs (2 x multiply-adds) of each named weight layer on one forward."""
    modules = dict(model.named_modules())
    flops = {n: 0 for n in names}
    handles = []

    def hook(name):
        def fn(module, args, out):
            if not isinstance(out, torch.Tensor):
                return
            kind = layers.type_name(module)
            if kind in ("Conv2d", "Conv1d"):
                flops[name] += 2 * out.numel() * module.weight[0].numel()
            elif kind == "Embedding":
                flops[name] += 0
            else:
                out_f = layers.out_features(module)
                flops[name] += 2 * (out.numel() // max(out_f, 1)) * module.weight.numel()
        return fn

    for n in names:
        handles.append(modules[n].register_forward_hook(hook(n)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, dummy_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return flops


def _mlp(sizes: Sequence[int], last: nn.Module | None = None) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    if last is not None:
        mods.append(last)
    return nn.Sequential(*mods)


class DDPG:
    """Actor ``state -> action in [0, 1]``, critic ``(state, action) -> Q``, target nets,
    a replay buffer of transitions ``(s, a, r, s', done)``."""

    def __init__(self, params: Mapping[str, Any], steps_per_episode: int):
        self.p = dict(params)
        self.gen = torch.Generator().manual_seed(int(self.p["seed"]))
        with torch.random.fork_rng():
            torch.manual_seed(int(self.p["seed"]))
            h1, h2 = int(self.p["hidden1"]), int(self.p["hidden2"])
            self.actor = _mlp([STATE_DIM, h1, h2, 1], nn.Sigmoid()).double()
            self.critic = _mlp([STATE_DIM + 1, h1, h2, 1]).double()
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.opt_a = torch.optim.Adam(self.actor.parameters(), lr=float(self.p["lr_a"]))
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=float(self.p["lr_c"]))
        self.capacity = int(self.p["rmsize"]) * steps_per_episode
        self.buffer: list[tuple[torch.Tensor, float, float, torch.Tensor, float]] = []
        self.baseline: float | None = None

    def act(self, state: torch.Tensor, episode: int) -> float:
        warmup = int(self.p["warmup"])
        if episode < warmup:
            return float(torch.rand((), generator=self.gen, dtype=torch.float64))
        with torch.no_grad():
            mean = float(self.actor(state.unsqueeze(0)))
        sigma = float(self.p["init_delta"]) * float(self.p["delta_decay"]) ** (episode - warmup)
        for _ in range(100):            # truncated normal on [0, 1]
            a = mean + sigma * float(torch.randn((), generator=self.gen, dtype=torch.float64))
            if 0.0 <= a <= 1.0:
                return a
        return min(max(mean, 0.0), 1.0)

    def remember(self, episode: list[tuple[torch.Tensor, float, torch.Tensor, float]],
                 reward: float) -> None:
        self.baseline = reward if self.baseline is None else \
            0.95 * self.baseline + 0.05 * reward
        advantage = reward - self.baseline
        for s, a, s2, done in episode:
            self.buffer.append((s, a, advantage, s2, done))
        del self.buffer[:max(0, len(self.buffer) - self.capacity)]

    def update(self) -> None:
        size = min(int(self.p["bsize"]), len(self.buffer))
        idx = torch.randint(len(self.buffer), (size,), generator=self.gen)
        s = torch.stack([self.buffer[i][0] for i in idx])
        a = torch.tensor([[self.buffer[i][1]] for i in idx], dtype=torch.float64)
        r = torch.tensor([[self.buffer[i][2]] for i in idx], dtype=torch.float64)
        s2 = torch.stack([self.buffer[i][3] for i in idx])
        done = torch.tensor([[self.buffer[i][4]] for i in idx], dtype=torch.float64)
        with torch.no_grad():
            q_next = self.critic_target(torch.cat([s2, self.actor_target(s2)], 1))
            y = r + float(self.p["discount"]) * (1.0 - done) * q_next
        loss_c = (self.critic(torch.cat([s, a], 1)) - y).square().mean()
        self.opt_c.zero_grad()
        loss_c.backward()
        self.opt_c.step()
        loss_a = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
        self.opt_a.zero_grad()
        loss_a.backward()
        self.opt_a.step()
        tau = float(self.p["tau"])
        with torch.no_grad():
            for net, target in ((self.actor, self.actor_target),
                                (self.critic, self.critic_target)):
                for p, q in zip(net.parameters(), target.parameters()):
                    q.mul_(1 - tau).add_(tau * p)


class AMCPruner(AllocationSearch):
    """``AMCPruner(total_episode, dummy_input, model, config_list, evaluator,
    pruning_algorithm='l1', log_dir='.', keep_intermediate_result=False, finetuner=None,
    ddpg_params=None, pruning_params=None, target='flops')``. ``cost[name]`` is a layer's
    FLOPs (or weights); after a search ``cost_kept[name]`` is what the best allocation
    keeps of it, and ``agent`` is the trained DDPG agent."""

    def __init__(self, total_episode: int, dummy_input: Any, model: nn.Module,
                 config_list: Sequence[Mapping[str, Any]], evaluator: Any,
                 pruning_algorithm: str = "l1", log_dir: str | os.PathLike = ".",
                 keep_intermediate_result: bool = False, finetuner: Callable | None = None,
                 ddpg_params: Mapping[str, Any] | None = None,
                 pruning_params: Mapping[str, Any] | None = None, target: str = "flops"):
        owner = type(self).__name__
        if isinstance(total_episode, bool) or not isinstance(total_episode, int) \
                or total_episode < 1:
            raise ValueError(f"{owner}: total_episode must be a positive int, got "
                             f"{total_episode!r}")
        if target not in ("flops", "params"):
            raise ValueError(f"{owner}: target must be 'flops' or 'params', got {target!r}")
        if dummy_input is None:
            raise ValueError(f"{owner}: dummy_input is needed to measure each layer's FLOPs")
        if evaluator is None or not callable(getattr(evaluator, "evaluate", None)):
            raise TypeError(f"{owner}: evaluator must have an evaluate() method (its score "
                            f"is the reward), got {type(evaluator).__name__}")
        if pruning_algorithm not in AMC_ALGORITHMS:
            raise ValueError(f"{owner}: pruning_algorithm must be one of "
                             f"{', '.join(AMC_ALGORITHMS)}, got {pruning_algorithm!r}")
        params = dict(ddpg_params or {})
        unknown = sorted(set(params) - set(DDPG_DEFAULTS))
        if unknown:
            raise ValueError(f"{owner}: unknown ddpg_params key {unknown[0]!r}; allowed: "
                             f"{', '.join(DDPG_DEFAULTS)}")
        for key, value in params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{owner}: ddpg_params[{key!r}] must be a number >= 0, got "
                                 f"{value!r}")
        self.ddpg_params = {**DDPG_DEFAULTS, **params}
        self.target = target
        super().__init__(model, config_list, pruning_algorithm, total_episode, log_dir,
                         keep_intermediate_result, finetuner, False, dummy_input, evaluator,
                         pruning_params)
        self.amc_dummy_input = dummy_input
        self._setup_search()
        names = [s.name for s in self.layout.slots]
        modules = self._modules()
        sizes = {n: modules[n].weight.numel() for n in names}
        if target == "flops":
            flops = layer_flops(model, names, dummy_input)
            missing = [n for n in names if flops[n] == 0]
            if missing:
                raise ValueError(f"{owner}: {missing[0]!r} has no FLOPs on dummy_input (it "
                                 "never ran, or is an Embedding); exclude it or use "
                                 "target='params'")
            self.cost = {n: float(flops[n]) for n in names}
        else:
            self.cost = {n: float(sizes[n]) for n in names}
        self._per_element = {n: self.cost[n] / sizes[n] for n in names}

    # ------------------------------------------------------------------ episode
    def _episode(self, agent: DDPG, episode: int, lower: Mapping[str, int]):
        actions: dict[str, float] = {}
        transitions = []
        slots = self.layout.slots
        modules = self._modules()
        max_out = max(layers.canonical_shape(modules[s.name])[0] for s in slots)
        max_in = max(math.prod(layers.canonical_shape(modules[s.name])[1:]) for s in slots)
        for index, entry in self.layout.entries.items():
            total = sum(self.cost[s.name] for s in entry)
            budget = entry[0].config.amount * total
            removed, previous = 0.0, 0.0
            for i, s in enumerate(entry):
                cost = self.cost[s.name]
                rest = sum(self.cost[t.name] * t.max_units / t.units for t in entry[i + 1:])
                shape = layers.canonical_shape(modules[s.name])
                state = torch.tensor(
                    [i / len(entry), shape[0] / max_out, math.prod(shape[1:]) / max_in,
                     cost / total, removed / total, (total - removed - cost) / total,
                     previous], dtype=torch.float64)
                lo = max((budget - removed - rest) / cost, lower[s.name] / s.units)
                hi = min(s.max_units / s.units, max((budget - removed) / cost, 0.0))
                action = agent.act(state, episode)
                chosen = min(max(action, lo), max(hi, lo))
                actions[s.name] = chosen
                removed += chosen * cost
                previous = chosen
                transitions.append([state, chosen, None, 0.0])
        for k, tr in enumerate(transitions):     # next states; the last one ends it
            nxt = transitions[k + 1][0] if k + 1 < len(transitions) else tr[0]
            tr[2], tr[3] = nxt, float(k + 1 == len(transitions))
        return actions, [tuple(t) for t in transitions]

    def _search(self) -> None:
        agent = DDPG(self.ddpg_params, len(self.layout.slots))
        lower = self.layout.lower_bounds(self, self.kept_masks())
        for episode in range(self.total_iteration):
            actions, transitions = self._episode(agent, episode, lower)
            counts = self.layout.allocate(actions, lower, self._per_element)
            score, _ = self.evaluate_counts(counts)
            agent.remember(transitions, score)
            if episode >= int(self.ddpg_params["warmup"]):
                for _ in range(len(transitions)):
                    agent.update()
        self.agent = agent
        units = {s.name: s for s in self.layout.slots}
        self.cost_kept = {n: self.cost[n] * (1 - c / units[n].units)
                          for n, c in self.best_counts.items()}


__all__ = ["AMCPruner", "DDPG", "layer_flops"]
