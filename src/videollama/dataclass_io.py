"""Typed dataclasses from plain dicts (JSON, YAML), and dotted ``key.sub=value`` overrides.

One builder and one override function for every config of the project: model configs
(``config.json``, presets) and training recipes alike. Imports no torch.

- :func:`build` makes a (nested) dataclass from a dict, coercing values to the declared field
  types (a YAML ``2e-4`` read as a string becomes the float it means, lists become tuples where
  a tuple is declared) and refusing unknown keys: a typo must never be silently ignored.
- :func:`set_dotted` sets ``a.b.c`` in a nested dict; :func:`parse_override` reads
  ``a.b.c=value`` with the value parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


def build(cls: type, d: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from the mapping ``d``; errors name the dotted field (``where.field``)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown keys {unknown} (known: {sorted(known)})")
    return cls(**{name: _coerce(hints[name], value, f"{where}.{name}" if where else name)
                  for name, value in d.items()})


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value or {}, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if tp is Any:
        return value
    try:
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            # PyYAML reads "2e-4" (no dot) as a string: accept it as the number it means.
            number = float(value)
            if not math.isfinite(number):  # .nan, .inf, 1e400: no setting of ours means them
                raise ValueError(f"{where}: expected a finite number, got {value!r}")
            return number
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if tp is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError) as e:
        if str(e).startswith(f"{where}: "):
            raise
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item_types = args if origin is tuple and Ellipsis not in args else (args[0],) * len(value)
        if origin is tuple and len(item_types) != len(value):
            raise ValueError(f"{where}: expected {len(item_types)} values, got {value!r}")
        items = [_coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def set_dotted(d: dict[str, Any], key: str, value: Any, *, opaque: tuple[str, ...] = ()) -> None:
    """Set ``d[a][b][c] = value`` for ``key`` ``"a.b.c"``, making missing sections, in place.

    ``opaque`` lists dotted paths of free-form dicts whose own keys are dotted names: below
    ``model.overrides`` the rest of the key stays one entry (``model.overrides.decoder.num_layers``
    sets ``d["model"]["overrides"]["decoder.num_layers"]``).
    """
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override key {key!r} has an empty part")
    for prefix in opaque:
        head = prefix.split(".")
        if parts[:len(head)] == head and len(parts) > len(head):
            parts = [*head, ".".join(parts[len(head):])]
            break
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)``, the value parsed as YAML (``1e-4``, ``[x, y]``, ``null``)."""
    import yaml  # a core dependency that imports no torch

    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, text = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: the value is not valid YAML ({e})") from e
