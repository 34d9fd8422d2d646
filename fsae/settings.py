"""The settings machinery every stage's config is built on (``fsae.config.Config`` for CAM training,
``fsae.segment.config.SegConfig``, ``fsae.refine.irn.config.IRNConfig``, ``fsae.refine.psa.config.PSAConfig``).

A recipe file (``configs/**.yaml``) is a nested mapping whose keys are a config's dataclass fields::

    data: {root: data/synthetic, num_classes: 4}
    fsae: {enabled: true}

``--set fsae.tau_fae=0.9`` style overrides apply on top (values parsed as YAML). Unknown keys are an
error naming the file (or override) and the key.

- each field declares its allowed values once, with ``setting(default, ...)`` (a range, choices, a list
  length); the type comes from the annotation. Every value set from a file, an override or a saved dict is
  checked; an error names the source, the field, the value and what is allowed;
- a root config (a ``Settings`` subclass) has ``from_dict``, ``to_dict``, ``save`` and ``hash``: the hash of
  every field except those in its ``not_hashed`` tuple, the fields that do not decide the output
  (logging, devices, worker counts, where the data lies, inference and evaluation settings);
- ``changes(old, new)`` lists the deciding fields that differ (resume refusals name them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from fsae.errors import ConfigError

# --------------------------------------------------------------------------------- allowed values


@dataclass(frozen=True)
class Rule:
    """What a field allows besides its type: ``choices``, or a range ``low..high`` (each end open or
    closed; for a list, every item), and for a list its ``length`` (exact) or ``nonempty``."""

    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    length: int | None = None
    nonempty: bool = False
    words: tuple | None = None  # strings allowed besides the numbers, e.g. ("auto",)

    def accepts(self, value: Any) -> bool:
        if isinstance(value, list):
            if (self.length is not None and len(value) != self.length) or (self.nonempty and not value):
                return False
            return all(self._item_ok(v) for v in value)
        return self._item_ok(value)

    def _item_ok(self, v: Any) -> bool:
        if self.choices is not None and v not in self.choices:
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(str(c) for c in self.choices))
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        if bounds:
            parts.append(" and ".join(bounds))
        if self.length is not None:
            parts.append(f"{self.length} items")
        elif self.nonempty:
            parts.append("at least one item")
        if self.words:
            parts.append("or " + " or ".join(self.words))
        return ", ".join(parts)


def setting(default: Any = MISSING, *, factory: Any = MISSING, choices=None, low=None, high=None,
            low_open: bool = False, high_open: bool = False, length: int | None = None,
            nonempty: bool = False, words=None) -> Any:
    """A dataclass field with its allowed values (``Rule``); ``factory`` for list defaults; ``words``: strings
    allowed besides the numbers (``infer.batch_size: auto``)."""
    rule = Rule(tuple(choices) if choices is not None else None, low, high, low_open, high_open, length, nonempty,
                tuple(words) if words is not None else None)
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def positive(default: Any) -> Any:
    return setting(default, low=0, low_open=True)


def at_least(bound: float, default: Any) -> Any:
    return setting(default, low=bound)


def fraction(default: Any, low_open: bool = False, high_open: bool = False) -> Any:
    """A value in [0, 1] (ends open as asked)."""
    return setting(default, low=0, high=1, low_open=low_open, high_open=high_open)


def _kinds(annotation: Any) -> tuple[str, bool]:
    """``"list[int] | None"`` -> (``"list[int]"``, optional)."""
    parts = [p.strip() for p in str(annotation).split("|")]
    optional = "None" in parts
    base = [p for p in parts if p != "None"]
    return (base[0] if base else "None"), optional


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _coerce_scalar(value: Any, kind: str) -> Any:
    """``value`` as ``kind`` (int, float, bool, str), or raise ValueError. YAML reads ``1e-4`` as a string and
    ``1`` as an int: those become floats; a fractional number is not an int; only true/false are booleans."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError
    if isinstance(value, bool):
        raise ValueError
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError
    if kind == "float":
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            out = float(value.strip())
        else:
            raise ValueError
        if not math.isfinite(out):
            raise ValueError
        return out
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return str(value)  # a split or folder named 2012
        raise ValueError
    return value


def check_value(value: Any, f: dataclasses.Field, name: str) -> Any:
    """``value`` converted to field ``f``'s type and checked against its rule; ConfigError naming ``name``,
    the value and what is allowed."""
    kind, optional = _kinds(f.type)
    rule: Rule | None = f.metadata.get("rule")
    allowed = rule.describe() if rule else ""
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} = null is not allowed; expected {_describe(kind, allowed)}")
    if rule is not None and rule.words and value in rule.words:
        return value
    refusal = ConfigError(f"{name} = {value!r} is not allowed; expected {_describe(kind, allowed)}")
    try:
        if kind.startswith("list["):
            if not isinstance(value, (list, tuple)):
                raise ValueError
            converted = [_coerce_scalar(v, kind[5:-1]) for v in value]
        else:
            converted = _coerce_scalar(value, kind)
    except ValueError:
        raise refusal from None
    if rule is not None and not rule.accepts(converted):
        raise refusal
    return converted


def _describe(kind: str, allowed: str) -> str:
    if kind.startswith("list["):
        what = f"a list of {_TYPE_WORDS.get(kind[5:-1], kind[5:-1]).split(' ', 1)[-1]}s"
    else:
        what = _TYPE_WORDS.get(kind, kind)
    return f"{what} ({allowed})" if allowed else what


def check_sweep(sweep, name: str = "eval.sweep") -> None:
    """A threshold sweep ``[start, stop, step]``: step > 0 and start <= stop."""
    start, stop, step = sweep
    if not (step > 0 and start <= stop):
        raise ConfigError(f"{name} = {list(sweep)} is not allowed; expected START STOP STEP with step > 0 and "
                          f"start <= stop, e.g. 0 0.6 0.01")


def check_range_pair(pair, name: str) -> None:
    """``[low, high]`` with low <= high."""
    if pair is not None and pair[0] > pair[1]:
        raise ConfigError(f"{name} = {list(pair)} is not allowed; expected [low, high] with low <= high")


def check_device(device: str, name: str = "device") -> str:
    """A torch device string that this machine has: ``cpu``, ``cuda``, ``cuda:N``, ``mps``. ConfigError
    otherwise (imports torch)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{name} = {device!r} is not a device; expected cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{name} = {device!r}: this machine has no CUDA GPU (torch sees none); use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"{name} = {device!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{name} = {device!r}: this machine has no Apple MPS device; use cpu")
    elif parsed.type != "cpu":
        raise ConfigError(f"{name} = {device!r} is not supported; expected cpu, cuda, cuda:N or mps")
    return device


# --------------------------------------------------------------------------------- the machinery


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


class Settings:
    """Base of a stage's root config: ``from_dict``, ``to_dict``, ``save``, ``hash`` and ``check``.

    ``not_hashed``: dotted field names (or whole sections) that do not decide the stage's output; all other
    fields go into ``hash()``, which checkpoints store so that a resume refuses another config.
    """

    not_hashed: ClassVar[tuple[str, ...]] = ()
    # Fields added after runs were written, hashed only when off their default, so that those runs' checkpoints
    # still resume (e.g. train.precision: they were trained in fp32).
    hashed_unless_default: ClassVar[tuple[str, ...]] = ()
    # Fields removed from the recipes, with the one value that stayed: a config saved before the removal (a run's
    # config.yaml, a checkpoint) that holds that value still loads; any other value is refused naming the key.
    removed_keys: ClassVar[dict[str, Any]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hashed_fields(self) -> dict[str, Any]:
        """``{dotted name: value}`` of the fields that decide the output."""
        defaults = _flat(type(self)().to_dict()) if self.hashed_unless_default else {}
        return {k: v for k, v in _flat(self.to_dict()).items() if not _excluded(k, self.not_hashed)
                and not (k in self.hashed_unless_default and v == defaults[k])}

    def hash(self) -> str:
        text = json.dumps(self.hashed_fields(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "checkpoint"):
        """A config from a (saved) nested dict, every value checked; ConfigError naming ``where``."""
        cfg = cls()
        _apply(cfg, data, where)
        validate(cfg, where)
        return cfg

    def save(self, path: str | Path) -> Path:
        from fsae.io import write_text

        return write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def check(self) -> None:
        """Rules between fields (a subclass adds its own); ConfigError naming the fields."""


def _excluded(name: str, not_hashed: tuple[str, ...]) -> bool:
    return any(name == n or name.startswith(n + ".") for n in not_hashed)


def changes(old: Settings, new: Settings, hashed_only: bool = True, within: str = "") -> list[str]:
    """The fields where two configs differ, ``"train.epochs 3 -> 4"``, sorted; with ``hashed_only`` only
    those that decide the output (those that make ``hash()`` differ); ``within`` a section, e.g. ``"model"``."""
    if hashed_only:
        a, b = old.hashed_fields(), new.hashed_fields()
    else:
        a, b = _flat(old.to_dict()), _flat(new.to_dict())
    names = [k for k in sorted(set(a) | set(b)) if not within or _excluded(k, (within,))]
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in names if a.get(k) != b.get(k)]


def describe_changes(old: Settings, new: Settings, limit: int = 8, hashed_only: bool = True,
                     within: str = "") -> str:
    """``changes`` as one line: ``"fsae.tau_fae 0.95 -> 0.9, train.epochs 15 -> 4"``, at most ``limit``."""
    changed = changes(old, new, hashed_only, within)
    return ", ".join(changed[:limit]) + (f", ... ({len(changed)} fields)" if len(changed) > limit else "")


def validate(cfg: Any, where: str = "config") -> Any:
    """Check every field of ``cfg`` (types, ranges, choices) and the rules between fields (``check``)."""

    def walk(obj: Any, prefix: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                try:
                    setattr(obj, f.name, check_value(value, f, f"{prefix}{f.name}"))
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None

    walk(cfg, "")
    if isinstance(cfg, Settings):
        try:
            cfg.check()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return cfg


def _removed(cfg: Any) -> dict[str, Any]:
    return getattr(cfg, "removed_keys", {})


def _apply(obj: Any, updates: dict[str, Any], where: str, prefix: str = "", removed: dict | None = None) -> None:
    known = {f.name: f for f in fields(obj)}
    removed = _removed(obj) if removed is None else removed
    for key, value in updates.items():
        if f"{prefix}{key}" in removed:
            kept = removed[f"{prefix}{key}"]
            if value == kept:
                continue
            raise ConfigError(f"{where}: '{prefix}{key}: {value}' was removed; only {kept!r} remains "
                              "(docs/decisions.md): delete the key")
        if key not in known:
            raise ConfigError(f"{where}: unknown config key '{prefix}{key}' (known: {', '.join(known)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{prefix}{key}' must be a mapping, got {value!r}")
            _apply(current, value, where, f"{prefix}{key}.", removed)
        else:
            try:
                setattr(obj, key, check_value(value, known[key], f"{prefix}{key}"))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``a.b=value`` strings (value parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. fsae.enabled=true")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _apply(cfg, nested, f"override {item!r}")
    return cfg


def fill_config(cfg: Any, path: str | Path | None = None, overrides: list[str] | None = None,
                what: str = "config") -> Any:
    """Apply the recipe YAML at ``path`` (if any), then ``overrides``, to the dataclass ``cfg`` (any of the
    project's settings dataclasses: ``Config``, ``SegConfig``, ``IRNConfig``), then check every value. A
    ``name`` field not set by the file becomes the file's stem."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: {what} file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of {what} sections")
        _apply(cfg, data, str(path))
        if "name" not in data and any(f.name == "name" for f in fields(cfg)):
            cfg.name = path.stem
    apply_overrides(cfg, overrides or [])
    return validate(cfg, str(path) if path is not None else "config")
