"""Loading a run config: dataclass defaults -> YAML file -> `a.b=value` overrides, checked against the types.

Unknown keys and invalid values raise `ConfigError` naming the key and the fix. A tagged union (model
configs) is resolved by its `kind` key. Must not import torch.distributed or deepspeed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from symeq_dist.config.base import ConfigError, check
from symeq_dist.config.models import MODEL_CONFIGS
from symeq_dist.config.run import RunConfig
from symeq_dist.errors import MissingInput

# The flat model section of configs stored before issue 9 (every kind's fields in one class).
LEGACY_MODEL_KEYS = frozenset({"latent", "num_latents", "hidden", "num_z0", "num_z1", "trunk_width", "mlp_width"})

# ---------------------------------------------------------------- loading and coercion

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        check(value in typing.get_args(tp), key,
              f"invalid value {value!r}; choose one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if all(dataclasses.is_dataclass(a) for a in args):
            return _build_tagged(args, value, key)
        if value is None:
            check(type(None) in args, key, "may not be null")
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple and typing.get_args(tp)[-1] is Ellipsis:  # tuple[X, ...]: any length
        check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(tp)
        check(isinstance(value, (list, tuple)) and len(value) == len(args), key,
               f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # internal: a field type we forgot


def _build(cls: type, data: dict[str, Any], prefix: str, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{(prefix + '.') if prefix else ''}{close[0]}'? " if close else ""
            raise ConfigError(f"{full}: unknown key{where}; {hint}valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if prefix and "*" in str(err):  # EngineConfig does not know which player it is
            raise ConfigError(str(err).replace("engines.*", prefix)) from None
        raise


def _build_tagged(classes: tuple[type, ...], value: Any, key: str) -> Any:
    """A tagged union of dataclasses: `kind` picks the class (default: the first class's kind)."""
    check(isinstance(value, dict), key, f"expected a mapping with a 'kind' key, got {value!r}")
    by_kind = {cls.kind: cls for cls in classes}
    kind = value.get("kind", classes[0].kind)
    check(kind in by_kind, f"{key}.kind", f"invalid value {kind!r}; choose one of {', '.join(by_kind)}")
    return _build(by_kind[kind], value, key, where=f" for {key}.kind={kind}")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ["train.steps=200", "engines.decoder.lr=2e-4"] into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.steps=200")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({_first_line(err)}); quote "
                              "lists and mappings completely, e.g. 'model.image_shape=[1,28,28]'") from None
        _set_dotted(tree, key.strip().lstrip("-"), value)
    return tree


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, cls: type = RunConfig) -> Any:
    """Load a run config (`cls`: RunConfig, or PriorRunConfig for `symeq prior train`): defaults, then the YAML
    file, then dotted overrides.

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ConfigError: unknown key or invalid value (the message names the key and the fix).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingInput(f"config file {path} not found; the shipped configs are in configs/")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid YAML: {_first_line(err)}; fix the file (the shipped configs in "
                              "configs/ show the format)") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...)")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    return _build(cls, data, "")


def with_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A config dict (e.g. a checkpoint's stored one) with dotted overrides applied."""
    return _merge(data, parse_overrides(overrides))


def config_from_dict(data: dict[str, Any], *, cls: type = RunConfig) -> Any:
    """Rebuild a RunConfig (or `cls`, e.g. PriorRunConfig) from `to_dict()` output (e.g. a checkpoint's stored config).

    Configs stored before model configs became one class per kind hold every model field of every kind;
    the fields the stored kind does not have are dropped (they had no effect on that kind).
    """
    model = data.get("model")
    if cls is not RunConfig:
        return _build(cls, data, "")
    if isinstance(model, dict):
        cls = MODEL_CONFIGS.get(model.get("kind", "mlp"))
        if cls is not None:
            own = {f.name for f in dataclasses.fields(cls)}
            model = {k: v for k, v in model.items() if k in own or k not in LEGACY_MODEL_KEYS}
            data = {**data, "model": model}
    return _build(RunConfig, data, "")


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
