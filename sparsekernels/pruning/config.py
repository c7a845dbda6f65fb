"""Parse and validate an NNI-style ``config_list`` and match it against a model.

One job: turn the user's list of dicts into frozen :class:`PruningConfig` entries and
decide which module each entry prunes. Everything here runs before a model is touched,
so a bad entry is refused with the model unchanged.

Selection keys (NNI 2.x and 3.x): ``op_types`` (class names; ``"default"`` means the
pruner's default layer types), ``op_names``, ``op_names_re`` (``re.fullmatch``),
``op_partial_names`` (substring), ``exclude: True`` and NNI 3's ``exclude_op_names``,
``exclude_op_names_re``, ``exclude_op_types``. Keys in one entry are AND-ed.

Amount keys: ``sparsity`` == ``sparsity_per_layer`` == ``sparse_ratio`` (NNI 3), or
``total_sparsity`` (one global ranking across the entry's layers) with an optional
``max_sparsity_per_layer`` (float, or ``{op_name: float}``; NNI 3 alias
``max_sparse_ratio``).

Granularity: ``"fine"``, ``"out_channel"``, ``"in_channel"``, ``"block"`` (with
``block_size: [bm, bk]``), ``"head"`` (whole heads; under grouped-query attention whole
key/value groups with their query heads), ``"query_head"`` (the same number of query
heads in every key/value group), or an N:M pattern such as ``"2:4"`` / ``"4:8"``: keep N
of every M consecutive input weights of each output row (NVIDIA's semantics), so the
sparsity is ``1 - N/M``; an N:M entry may leave ``sparsity`` out, and if it sets it, it
must equal ``1 - N/M`` (no ``total_sparsity``). Left out, each pruner uses NNI's default
for it (``"fine"`` for LevelPruner, ``"out_channel"`` for the channel pruners).

When several entries match a module, the later one wins, as in NNI; an ``exclude``
entry removes the modules it matches from what earlier entries selected.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from sparsekernels.arch import layers

GRANULARITIES = ("fine", "out_channel", "in_channel", "block", "head", "query_head")
NM = "N:M"   # the granularity kind of "2:4", "4:8" ... (see parse_nm)

_SELECT_KEYS = ("op_types", "op_names", "op_names_re", "op_partial_names")
_EXCLUDE_KEYS = ("exclude_op_types", "exclude_op_names", "exclude_op_names_re")
_SPARSITY_ALIASES = ("sparsity", "sparsity_per_layer", "sparse_ratio")
_MAX_ALIASES = ("max_sparsity_per_layer", "max_sparse_ratio")
ALLOWED_KEYS = frozenset(
    _SELECT_KEYS
    + _EXCLUDE_KEYS
    + _SPARSITY_ALIASES
    + _MAX_ALIASES
    + ("exclude", "total_sparsity", "granularity", "block_size")
)


class ConfigError(ValueError):
    """A ``config_list`` entry is invalid; the message names the entry and the fix."""


@dataclass(frozen=True)
class PruningConfig:
    """One validated ``config_list`` entry.

    ``index`` is the entry's position in the user's list (used in error messages).
    Exactly one of ``sparsity`` and ``total_sparsity`` is set unless ``exclude``.
    ``max_sparsity_per_layer`` maps op names to caps; the key ``"*"`` is the default cap.
    """

    index: int
    op_types: tuple[str, ...] | None = None
    op_names: tuple[str, ...] | None = None
    op_names_re: tuple[str, ...] | None = None
    op_partial_names: tuple[str, ...] | None = None
    exclude: bool = False
    exclude_op_types: tuple[str, ...] = ()
    exclude_op_names: tuple[str, ...] = ()
    exclude_op_names_re: tuple[str, ...] = ()
    sparsity: float | None = None
    total_sparsity: float | None = None
    max_sparsity_per_layer: tuple[tuple[str, float], ...] = ()
    granularity: str | None = None     # None: the pruner's default (NNI's per pruner)
    block_size: tuple[int, int] | None = None

    @property
    def is_global(self) -> bool:
        return self.total_sparsity is not None

    @property
    def amount(self) -> float:
        """The requested sparsity (per layer, or total for a global entry)."""
        value = self.total_sparsity if self.is_global else self.sparsity
        return 0.0 if value is None else value

    def max_sparsity_for(self, name: str) -> float:
        caps = dict(self.max_sparsity_per_layer)
        return caps.get(name, caps.get("*", 1.0))


def _err(index: int, msg: str) -> ConfigError:
    return ConfigError(f"config_list[{index}]: {msg}")


def _str_tuple(index: int, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise _err(index, f"'{key}' must be a list of strings, got the string {value!r}; "
                          f"write [{value!r}]")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _err(index, f"'{key}' must be a list of strings, got {value!r}")
    if not value:
        raise _err(index, f"'{key}' is empty; remove it or list at least one name")
    return tuple(value)


def _fraction(index: int, key: str, value: Any, *, upper_inclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _err(index, f"'{key}' must be a number, got {value!r}")
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise _err(index, f"'{key}' must lie in {interval}, got {value!r}")
    return float(value)


def parse_nm(granularity: Any) -> tuple[int, int] | None:
    """``(N, M)`` for an N:M granularity string such as ``"2:4"``, else None (no checks)."""
    if not isinstance(granularity, str):
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", granularity)
    return (int(match[1]), int(match[2])) if match else None


def granularity_kind(granularity: str | None) -> str | None:
    """``"N:M"`` for any N:M pattern, else the granularity itself (what pruners list)."""
    return NM if parse_nm(granularity) is not None else granularity


def _nm_entry(index: int, granularity: Any) -> tuple[int, int] | None:
    """The entry's valid N:M pattern, None when it is not one; refuses a malformed one."""
    nm = parse_nm(granularity)
    if nm is None:
        return None
    n, m = nm
    if not 1 <= n < m:
        raise _err(index, f"granularity {granularity!r} is not a valid N:M pattern: N (the "
                          f"weights kept) must be at least 1 and below M (the group size), "
                          "e.g. '2:4' or '4:8'")
    return nm


def _one_of(index: int, entry: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, Any] | None:
    present = [k for k in keys if k in entry]
    if len(present) > 1:
        raise _err(index, f"{' and '.join(repr(k) for k in present)} mean the same thing; "
                          "set only one of them")
    return (present[0], entry[present[0]]) if present else None


def parse_entry(index: int, entry: Any) -> PruningConfig:
    """Validate one ``config_list`` entry (a dict) into a :class:`PruningConfig`."""
    if not isinstance(entry, Mapping):
        raise _err(index, f"each entry must be a dict, got {type(entry).__name__}")
    unknown = sorted(set(entry) - ALLOWED_KEYS)
    if unknown:
        raise _err(index, f"unknown key {unknown[0]!r}; allowed keys are "
                          f"{', '.join(sorted(ALLOWED_KEYS))}")
    fields: dict[str, Any] = {"index": index}
    for key in _SELECT_KEYS + _EXCLUDE_KEYS:
        if key in entry:
            fields[key] = _str_tuple(index, key, entry[key])
    for key in ("op_names_re", "exclude_op_names_re"):
        for pattern in fields.get(key, ()):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise _err(index, f"'{key}' pattern {pattern!r} is not a valid regex: {exc}")
    exclude = entry.get("exclude", False)
    if not isinstance(exclude, bool):
        raise _err(index, f"'exclude' must be True or False, got {exclude!r}")
    fields["exclude"] = exclude

    per_layer = _one_of(index, entry, _SPARSITY_ALIASES)
    cap = _one_of(index, entry, _MAX_ALIASES)
    total = entry.get("total_sparsity")
    nm = None if exclude else _nm_entry(index, entry.get("granularity"))
    if exclude:
        amount_keys = [k for k in entry if k in _SPARSITY_ALIASES + _MAX_ALIASES
                       + ("total_sparsity", "granularity", "block_size")]
        if amount_keys:
            raise _err(index, f"an 'exclude': True entry only selects modules; remove "
                              f"{amount_keys[0]!r}")
        if not any(k in entry for k in _SELECT_KEYS):
            raise _err(index, "an 'exclude': True entry needs a selection "
                              "(op_types, op_names, op_names_re or op_partial_names)")
        return PruningConfig(**fields)

    if per_layer is not None and total is not None:
        raise _err(index, f"{per_layer[0]!r} and 'total_sparsity' conflict; use "
                          f"{per_layer[0]!r} for a per-layer amount or 'total_sparsity' "
                          "for one global ranking")
    if nm is not None:
        implied = (nm[1] - nm[0]) / nm[1]
        if total is not None:
            raise _err(index, f"granularity {entry['granularity']!r} fixes the sparsity of "
                              f"every layer at {implied:g}; remove 'total_sparsity'")
        if per_layer is None:
            per_layer = ("sparsity", implied)
        elif not isinstance(per_layer[1], (int, float)) or isinstance(per_layer[1], bool) \
                or abs(per_layer[1] - implied) > 1e-9:
            raise _err(index, f"granularity {entry['granularity']!r} keeps {nm[0]} of every "
                              f"{nm[1]} weights, a sparsity of {implied:g}, but "
                              f"{per_layer[0]!r} is {per_layer[1]!r}; remove it or set "
                              f"{implied:g}")
    if per_layer is None and total is None:
        raise _err(index, "no amount; set 'sparsity' (per layer) or 'total_sparsity' "
                          "(global), or add 'exclude': True")
    if per_layer is not None:
        fields["sparsity"] = _fraction(index, per_layer[0], per_layer[1])
    else:
        fields["total_sparsity"] = _fraction(index, "total_sparsity", total)
    if cap is not None:
        if total is None:
            raise _err(index, f"{cap[0]!r} only applies with 'total_sparsity'")
        key, value = cap
        if isinstance(value, Mapping):
            pairs = tuple((str(n), _fraction(index, f"{key}[{n!r}]", v, upper_inclusive=True))
                          for n, v in value.items())
        else:
            pairs = (("*", _fraction(index, key, value, upper_inclusive=True)),)
        fields["max_sparsity_per_layer"] = pairs

    granularity = entry.get("granularity")
    if nm is not None:
        granularity = f"{nm[0]}:{nm[1]}"
    elif granularity is not None and granularity not in GRANULARITIES:
        raise _err(index, f"'granularity' must be one of {', '.join(GRANULARITIES)} or an "
                          f"N:M pattern such as '2:4', got {granularity!r}")
    fields["granularity"] = granularity
    block = entry.get("block_size")
    if granularity == "block":
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                           for b in block)):
            raise _err(index, f"granularity 'block' needs 'block_size': [bm, bk] with two "
                              f"positive ints, got {block!r}")
        fields["block_size"] = (int(block[0]), int(block[1]))
    elif block is not None:
        raise _err(index, "'block_size' only applies with granularity 'block'; add "
                          "'granularity': 'block' or remove 'block_size'")
    return PruningConfig(**fields)


def parse_config_list(config_list: Any) -> tuple[PruningConfig, ...]:
    """Validate a whole ``config_list``; raises :class:`ConfigError` naming the entry."""
    if isinstance(config_list, Mapping) or not isinstance(config_list, (list, tuple)):
        raise ConfigError(f"config_list must be a list of dicts, got "
                          f"{type(config_list).__name__}; wrap a single dict in a list")
    if not config_list:
        raise ConfigError("config_list is empty; add at least one entry such as "
                          "{'op_types': ['Linear'], 'sparsity': 0.5}")
    configs = tuple(parse_entry(i, e) for i, e in enumerate(config_list))
    if all(c.exclude for c in configs):
        raise ConfigError("config_list only excludes modules; add an entry with a sparsity")
    return configs


def _type_matches(module: torch.nn.Module, types: Iterable[str], default: Sequence[str]) -> bool:
    expanded = set()
    for t in types:
        expanded.update(default if t == "default" else (t,))
    # NNI matches the class name; a subclass of a known layer also matches its kind
    return type(module).__name__ in expanded or layers.type_name(module) in expanded


def entry_matches(config: PruningConfig, name: str, module: torch.nn.Module,
                  default_types: Sequence[str]) -> bool:
    """Whether ``config`` selects ``module`` (all present selection keys must agree)."""
    if config.op_types is not None and not _type_matches(module, config.op_types, default_types):
        return False
    if config.op_names is not None and name not in config.op_names:
        return False
    if config.op_names_re is not None and not any(re.fullmatch(p, name)
                                                  for p in config.op_names_re):
        return False
    if config.op_partial_names is not None and not any(p in name
                                                       for p in config.op_partial_names):
        return False
    if not config.exclude and all(getattr(config, k) is None for k in _SELECT_KEYS):
        if layers.type_name(module) not in default_types:
            return False
    if _type_matches(module, config.exclude_op_types, default_types):
        return False
    if name in config.exclude_op_names:
        return False
    if any(re.fullmatch(p, name) for p in config.exclude_op_names_re):
        return False
    return True


def select_targets(model: torch.nn.Module, configs: Sequence[PruningConfig],
                   default_types: Sequence[str],
                   supported_types: Sequence[str]) -> dict[str, PruningConfig]:
    """Map each selected module name to the entry that prunes it (later entries win).

    Raises :class:`ConfigError` when an entry matches nothing, or selects a module whose
    type this pruner cannot prune.
    """
    modules = [(n, m) for n, m in model.named_modules() if n]
    targets: dict[str, PruningConfig] = {}
    for config in configs:
        matched = [(n, m) for n, m in modules if entry_matches(config, n, m, default_types)]
        if not config.exclude:
            prunable = [(n, m) for n, m in matched if layers.type_name(m) in supported_types]
            # a type or a name asked for explicitly must be prunable; patterns
            # (op_names_re, op_partial_names) may also match containers, which are skipped
            bad = [(n, m) for n, m in matched if layers.type_name(m) not in supported_types
                   and (config.op_types is not None or n in (config.op_names or ())
                        or not prunable)]
            if bad:
                n, m = bad[0]
                raise _err(config.index,
                           f"selects {n!r} of type {type(m).__name__}, which this pruner "
                           f"cannot prune; supported types: {', '.join(supported_types)}")
            matched = prunable
            caps = {name for name, _ in config.max_sparsity_per_layer if name != "*"}
            unknown = sorted(caps - {n for n, _ in matched})
            if unknown:
                raise _err(config.index, f"'max_sparsity_per_layer' names {unknown[0]!r}, "
                                         "which this entry does not select")
        if not matched:
            raise _err(config.index, "the selection matches no module of the model; check "
                                     "op_types / op_names against model.named_modules()")
        for n, _ in matched:
            if config.exclude:
                targets.pop(n, None)
            else:
                targets[n] = config
    if not targets:
        raise ConfigError("config_list selects no module after exclusions")
    return targets
