"""What partc prints for programs: JSON documents with a schema version and unit-suffixed keys.

partc computes in seconds, bytes and bytes per second; its JSON shows milliseconds, bytes and
Mbit/s, each key saying its unit: ``_ms``, ``_bytes``, ``_mbit_s``, ``_per_s`` (counts have no
suffix). Every document a command prints is an object whose first keys are ``schema_version``
(``SCHEMA_VERSION``, raised when a key changes meaning or goes away) and ``command``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

SCHEMA_VERSION = 1
SCALES = {"_ms": 1e3, "_mbit_s": 8e-6}  # from seconds, from bytes per second; anything else as is


def document(command: str, body: Mapping[str, object]) -> str:
    """The JSON text ``partc COMMAND --json`` prints: ``body`` after the schema version and the command."""
    return json.dumps({"schema_version": SCHEMA_VERSION, "command": command, **body}, indent=1)


def with_units(value: object, names: Mapping[str, str] | None = None) -> object:
    """``value`` (dicts, lists and numbers, as ``dataclasses.asdict`` gives) with unit-suffixed keys.

    A key ending in ``_s`` (seconds) becomes ``_ms``; a key in ``names`` becomes the name it
    maps to (``"latency": "latency_ms"``, ``"bandwidth": "bandwidth_mbit_s"``). Only keys
    holding numbers (or lists of them, or None) are renamed, so that maps keyed by node or
    link names keep their keys; the numbers are converted as the new key's suffix says.
    """
    names = names or {}
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            new = names.get(key, key)
            if new.endswith("_s") and not new.endswith(("_per_s", "_mbit_s")):
                new = new[:-2] + "_ms"
            if new != key and _numbers(item):
                out[new] = _scaled(item, next((s for suffix, s in SCALES.items() if new.endswith(suffix)), 1))
            else:
                out[key] = with_units(item, names)
        return out
    if isinstance(value, (list, tuple)):
        return [with_units(item, names) for item in value]
    return value


def _numbers(value: object) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_numbers(v) for v in value)
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _scaled(value: object, scale: float) -> object:
    if isinstance(value, (list, tuple)):
        return [_scaled(v, scale) for v in value]
    return value if value is None or scale == 1 else value * scale
