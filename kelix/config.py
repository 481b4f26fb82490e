"""Typed configuration: one dataclass per area, presets `tiny` / `small` / `paper`, overrides from params.yaml.

Each area owns its dataclass and its presets beside its code (`kelix/tokenizer/config.py`, ...); this module
composes them into `KelixConfig`, applies overrides and hashes sections. Overrides are strict: an unknown key
or a value of the wrong type is a `ConfigError` naming the key, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kelix.data.config import DataConfig, data_preset
from kelix.dit.config import DiTConfig, dit_preset
from kelix.eval.config import EvalConfig, eval_preset
from kelix.llm.config import LLMConfig, llm_preset
from kelix.runtime_config import RuntimeConfig, runtime_preset
from kelix.tokenizer.config import TokenizerConfig, tokenizer_preset
from kelix.train.config import TrainConfig

PRESETS = ("tiny", "small", "paper")


class ConfigError(ValueError):
    """A config override or params file that does not fit the typed config."""


@dataclass
class KelixConfig:
    preset: str
    data: DataConfig
    tokenizer: TokenizerConfig
    llm: LLMConfig
    dit: DiTConfig
    eval: EvalConfig
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, name: str) -> Any:
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section {name!r}; sections are {', '.join(SECTIONS)}")
        return getattr(self, name)


SECTIONS = ("data", "tokenizer", "llm", "dit", "eval", "runtime")


def preset_config(preset: str) -> KelixConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return KelixConfig(
        preset=preset,
        data=data_preset(preset),
        tokenizer=tokenizer_preset(preset),
        llm=llm_preset(preset),
        dit=dit_preset(preset),
        eval=eval_preset(preset),
        runtime=runtime_preset(preset),
    )


def load_config(
    preset: str | None = None,
    params: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> KelixConfig:
    """Resolve a config: preset, then the params file, then `a.b=c` overrides (last wins).

    The params file may name its own `preset:`; an explicit `preset` argument wins over it.
    """
    tree: dict[str, Any] = {}
    if params is not None:
        path = Path(params)
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ConfigError(f"params file {path} {what}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"params file {path} is not readable YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"params file {path} must hold a mapping at the top level")
        tree = loaded
    file_preset = tree.pop("preset", None)
    cfg = preset_config(preset or file_preset or "tiny")
    _apply_tree(cfg, tree, prefix="")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or exc  # a ReaderError (control character) has no .problem
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it to pass a "
                              "string") from exc
        set_value(cfg, key.strip(), value)
    check_ranges(cfg)
    return cfg


def check_ranges(cfg: KelixConfig) -> None:
    """Refuse training schedules no run could use (a negative step count, a zero batch), naming every bad key at
    once: types are checked as values are set, ranges here, after the preset, params file and overrides."""
    found = []
    for section in SECTIONS:
        part = cfg.section(section)
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if isinstance(value, TrainConfig):
                found += value.problems(f"{section}.{f.name}")
    if found:
        raise ConfigError("; ".join(found))


def set_value(cfg: Any, dotted: str, value: Any) -> None:
    """Set one dotted key (`tokenizer.num_codebooks`) on a config, checking its type."""
    parts = dotted.split(".")
    target = cfg
    for i, part in enumerate(parts[:-1]):
        target = _child(target, part, ".".join(parts[: i + 1]))
    _set_field(target, parts[-1], value, dotted)


def _set_field(target: Any, name: str, value: Any, dotted: str) -> None:
    fields = {f.name for f in dataclasses.fields(target)}
    if name not in fields:
        raise ConfigError(f"unknown config key {dotted!r}; {_where(target)} has {', '.join(sorted(fields))}")
    hint = typing.get_type_hints(type(target))[name]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted} is a section; give it a mapping, not {value!r}")
        _apply_tree(getattr(target, name), value, prefix=dotted + ".")
        return
    setattr(target, name, coerce(value, hint, dotted))


def _apply_tree(target: Any, tree: dict[str, Any], prefix: str) -> None:
    for key, value in tree.items():
        _set_field(target, str(key), value, f"{prefix}{key}")


def _child(target: Any, part: str, dotted: str) -> Any:
    if not dataclasses.is_dataclass(target):
        raise ConfigError(f"{dotted!r} is not a config section")
    names = {f.name for f in dataclasses.fields(target)}
    if part not in names:
        raise ConfigError(f"unknown config key {dotted!r}; {_where(target)} has {', '.join(sorted(names))}")
    child = getattr(target, part)
    if not dataclasses.is_dataclass(child):
        raise ConfigError(f"{dotted!r} is a value, not a section")
    return child


def _where(target: Any) -> str:
    return type(target).__name__


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a field's type hint; ints widen to floats, nothing else is converted."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} fits none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {coerce(k, kt, key): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section; give it a mapping, not {value!r}")
        obj = hint()
        _apply_tree(obj, value, prefix=key + ".")
        return obj
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; people write learning rates that way.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def canonical_json(obj: Any) -> str:
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a config (or any JSON-able tree): the basis of stage keys and lineage tags."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def config_from_dict(tree: dict[str, Any]) -> KelixConfig:
    """Rebuild a config saved with `to_dict` (e.g. from a registered model's lineage)."""
    tree = dict(tree)
    cfg = preset_config(tree.pop("preset", "tiny"))
    _apply_tree(cfg, tree, prefix="")
    return cfg
