"""`LoraSpec`: what to adapt and how, validated at construction.

Target grammar follows HF PEFT's `LoraConfig` so configs carry over:

- ``"all-linear"``: every linear site except the model's output layer (``lm_head``);
- any other ``str``: a regex, full-matched against the module FQN (``re.fullmatch``);
- a list of ``str``: each entry matches the FQN exactly or as a dotted suffix (``"q_proj"`` matches
  ``model.layers.0.self_attn.q_proj``);
- a callable: gets a :class:`lora_fx.Site` and returns ``True`` to adapt it.

The adapter's scale is ``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``, Kalajdzievski 2023).
``use_dora`` makes it a DoRA adapter (PEFT's formula and keys, see `lora_fx.sites.dora`).

A spec is immutable and hashable: lists become tuples and dicts become :class:`FrozenMapping`, so changing the
objects a spec was built from never changes the spec (or the record of it on a graph).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, fields
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch

from lora_fx.errors import LoraSpecError

ALL_LINEAR = "all-linear"
INITS = ("default", "gaussian")
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")

NamePattern = Union[str, Sequence[str]]


class FrozenMapping(Mapping):
    """An immutable, hashable dict (insertion-ordered), equal to any mapping with the same items."""

    def __init__(self, items=()):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return repr(self._items)


def name_matches(pattern: NamePattern, fqn: str) -> bool:
    """PEFT's module-name rule: a str is a full-match regex; a list matches exact names or dotted suffixes."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, fqn) is not None
    return any(fqn == name or fqn.endswith("." + name) for name in pattern)


def pattern_key_matches(key: str, fqn: str) -> bool:
    """PEFT's `rank_pattern`/`alpha_pattern` rule: the key regex matches a dotted suffix of the FQN."""
    return re.match(rf"(.*\.)?({key})$", fqn) is not None


@dataclass(frozen=True)
class LoraSpec:
    """One adapter: which sites get a LoRA branch, with what rank, scale, dropout and init.

    `targets` selects modules (their `.weight`) and `target_parameters` named parameters (MoE experts), each with
    PEFT's rules; with neither, "all-linear"; with `target_parameters` alone, only those parameters."""

    # None: "all-linear", or nothing when only target_parameters are given
    targets: Union[str, Sequence[str], Callable, None] = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    adapter: str = "default"
    exclude: NamePattern | None = None
    layers: int | Sequence[int] | None = None
    rank_pattern: Mapping[str, int] | None = None
    alpha_pattern: Mapping[str, float] | None = None
    use_rslora: bool = False
    init: str = "default"
    target_parameters: Sequence[str] | None = None               # PEFT's: parameter names or dotted suffixes
    use_dora: bool = False                                       # DoRA (Liu et al. 2024), see lora_fx.sites.dora

    def __post_init__(self):
        problems: list[str] = []
        target_parameters = _check_parameter_names(self.target_parameters, problems)
        targets = self.targets
        if targets is None:
            targets = None if target_parameters else ALL_LINEAR
        normalized = {
            "targets": targets if targets is None else _check_targets(targets, problems),
            "target_parameters": target_parameters,
            "exclude": _check_exclude(self.exclude, problems),
            "layers": _check_layers(self.layers, problems),
            "rank_pattern": _check_pattern_map("rank_pattern", self.rank_pattern, _is_positive_int, "positive int",
                                               problems),
            "alpha_pattern": _check_pattern_map("alpha_pattern", self.alpha_pattern, _is_positive_number,
                                                "positive finite number", problems),
        }
        if not _is_positive_int(self.rank):
            problems.append(f"`rank` must be a positive int, got {_shown(self.rank)}")
        if not _is_positive_number(self.alpha):
            problems.append(f"`alpha` must be a positive finite number, got {_shown(self.alpha)}")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            problems.append(f"`dropout` must be a number in [0, 1), got {_shown(self.dropout)}")
        if problem := adapter_name_problem(self.adapter):
            problems.append(problem)
        if not isinstance(self.use_rslora, bool):
            problems.append(f"`use_rslora` must be a bool, got {self.use_rslora!r}")
        if not isinstance(self.use_dora, bool):
            problems.append(f"`use_dora` must be a bool, got {self.use_dora!r}")
        if self.init not in INITS:
            problems.append(f"`init` must be one of {INITS}, got {self.init!r}")
        if problems:
            raise LoraSpecError("invalid LoraSpec:\n  - " + "\n  - ".join(problems))
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    def rank_for(self, fqn: str) -> int:
        """The rank of the site `fqn`: the first matching `rank_pattern` entry, else `rank`."""
        return _pattern_value(self.rank_pattern, fqn, self.rank)

    def alpha_for(self, fqn: str) -> float:
        """The alpha of the site `fqn`: the first matching `alpha_pattern` entry, else `alpha`."""
        return _pattern_value(self.alpha_pattern, fqn, self.alpha)

    def scale_for(self, fqn: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        rank = self.rank_for(fqn)
        return self.alpha_for(fqn) / (math.sqrt(rank) if self.use_rslora else rank)

    def differences(self, other: "LoraSpec") -> list[str]:
        """Names of the fields whose values differ from `other`'s."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def adapter_name_problem(name) -> str | None:
    """Why `name` cannot name an adapter (None: it can). Names become attribute names in the module tree
    (`<fqn>.lora_A.<name>.weight`), so they may not be paths or clash with nn.Module attributes."""
    if not (isinstance(name, str) and _ADAPTER_NAME.fullmatch(name)):
        return f"`adapter` must be a non-empty name of letters, digits, '_' or '-', got {name!r}"
    if hasattr(torch.nn.Module(), name):
        return (f"`adapter` {name!r} is an nn.Module attribute name, which would clash in the module tree "
                f"(`<module>.lora_A.{name}.weight`); choose another name")
    return None


def _pattern_value(patterns: Mapping | None, fqn: str, default):
    for key, value in (patterns or {}).items():
        if pattern_key_matches(key, fqn):
            return value
    return default


def _shown(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive_number(value) -> bool:
    try:
        return _is_number(value) and math.isfinite(value) and value > 0
    except OverflowError:           # an int too large for a float, e.g. 10**400
        return False


def _regex_problem(field: str, pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as err:
        return f"`{field}` is not a valid regular expression ({err}): {pattern!r}"
    return None


def _check_names(field: str, value, problems: list[str]):
    """A regex str or a non-empty list of non-empty names; returns the normalized value (tuple for lists)."""
    if isinstance(value, str):
        problem = _regex_problem(field, value) if value != ALL_LINEAR else None
        if value == "":
            problem = f"`{field}` must not be an empty string"
        elif (field == "targets" and value != ALL_LINEAR
              and difflib.SequenceMatcher(None, value.lower(), ALL_LINEAR).ratio() >= 0.8):
            problem = (f"`targets` {value!r} looks like a misspelling of {ALL_LINEAR!r} (as a regex it would only "
                       f"match a module named exactly that); did you mean {ALL_LINEAR!r}?")
        if problem:
            problems.append(problem)
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = tuple(sorted(value) if isinstance(value, (set, frozenset)) else value)
        bad = [n for n in names if not (isinstance(n, str) and n)]
        if not names or bad:
            problems.append(f"`{field}` as a list must hold non-empty module names, got {value!r}")
        return names
    problems.append(f"`{field}` must be 'all-linear', a regex str, a list of module names or a callable(Site) -> bool, "
                    f"got {type(value).__name__}: {value!r}")
    return value


def _check_parameter_names(value, problems):
    """None, or a non-empty list of parameter names / dotted suffixes (PEFT's `target_parameters`) as a tuple."""
    if value is None:
        return None
    names = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else value
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        problems.append(f"`target_parameters` must be a non-empty list of parameter names (e.g. "
                        f"['mlp.experts.gate_up_proj']), got {value!r}")
        return value
    return tuple(names)


def _check_targets(value, problems):
    """A callable(Site) -> bool, or names (see `_check_names`)."""
    return value if callable(value) and not isinstance(value, str) else _check_names("targets", value, problems)


def _check_exclude(value, problems):
    """None, or names other than 'all-linear'."""
    if value == ALL_LINEAR:
        problems.append("`exclude` cannot be 'all-linear'; give a regex or a list of module names")
    return value if value is None or value == ALL_LINEAR else _check_names("exclude", value, problems)


def _check_layers(value, problems):
    if value is None:
        return None
    values = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(values, (list, tuple)) and values and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return tuple(values)
    problems.append(f"`layers` must be a non-negative int or a non-empty list of them, got {value!r}")
    return value


def _check_pattern_map(field, value, is_valid, what, problems):
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        problems.append(f"`{field}` must be a non-empty dict of regex -> {what}, got {value!r}")
        return value
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            problems.append(f"`{field}` keys must be non-empty regex strings, got {key!r}")
        elif problem := _regex_problem(field, key):
            problems.append(problem)
        if not is_valid(item):
            problems.append(f"`{field}[{key!r}]` must be a {what}, got {item!r}")
    return FrozenMapping(value)
