"""The one helper pair between the workflow's config and the stages' command lines, plus logging set-up.

* :func:`config_flags` (used by the workflow while it parses, so it imports nothing heavy): a config section
  -> command-line flags, typed by the config schema (``workflow/schemas/config.schema.yaml``): numbers
  formatted, booleans ``--x`` / ``--no-x``, lists comma-joined, text shell-quoted, nested sections prefixed
  (``tiling.mask.dark_max`` -> ``--mask-dark-max``). Values were validated against the schema first, and
  nothing is ever evaluated.
* :func:`add_dataclass_options` and :func:`dataclass_from_args` (used by every stage's ``__main__``): one
  option per field of the stage's parameter dataclass, whose field names are the config keys, so the two
  sides meet by name (``tests/test_cli.py`` round-trips every section). Each option's ``--help`` text is the
  field's ``metadata["help"]``, else the schema's description of that config key, else the comment on the
  field's line in the dataclass.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any

#: The config schema of a source checkout (the workflow and its rules always run from one).
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"

#: The config section each parameter dataclass reads (its field names are that section's keys).
SECTIONS = {
    "TilingParams": "tiling",
    "MaskParams": "tiling.mask",
    "ExtractParams": "features",
    "CohortParams": "expression",
    "NormalizeParams": "expression",
    "SplitParams": "splits",
    "CohortConfig": "synth",
    "SummaryParams": "summary",
    "FigureParams": "figures",
}


class ConfigFlagError(ValueError):
    """A config value that does not fit its schema type (validation should have caught it)."""


@functools.cache
def config_schema(path: str | None = None) -> dict[str, Any]:
    """The parsed config schema ({} when this is not a source checkout, e.g. an installed wheel)."""
    import yaml

    schema_path = Path(path) if path else SCHEMA_PATH
    if not schema_path.is_file():
        return {}
    with open(schema_path) as f:
        return yaml.safe_load(f)


def section_schema(section: str, schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The schema of ``section`` ("tiling.mask" for nested ones); {} when unknown."""
    node: Mapping[str, Any] = schema if schema is not None else config_schema()
    for part in section.split("."):
        node = node.get("properties", {}).get(part, {})
    return dict(node)


def _format(value: Any, schema: Mapping[str, Any], where: str) -> str:
    kind = schema.get("type")
    if isinstance(value, bool):
        if kind in ("integer", "number"):
            raise ConfigFlagError(f"config {where}: {value!r} is not a number")
        return str(value).lower()  # e.g. features.compile: true | false | auto
    if kind == "integer":
        if not isinstance(value, int):
            raise ConfigFlagError(f"config {where}: {value!r} is not a whole number")
        return str(value)
    if kind == "number":
        if not isinstance(value, int | float):
            raise ConfigFlagError(f"config {where}: {value!r} is not a number")
        return repr(float(value))
    return shlex.quote(str(value))


def config_flags(values: Mapping[str, Any], schema: Mapping[str, Any], *, prefix: str = "",
                 skip: Iterable[str] = (), command: str | None = None, where: str = "") -> list[str]:
    """``values`` (one config section) as flags, in the schema's key order.

    ``skip``: keys the rule passes otherwise (paths that are rule inputs, threads). ``command``: for a
    section read by several commands (``expression``: cohort and normalize), only keys whose schema entry
    lists it under ``x-commands``.
    """
    out: list[str] = []
    skip = set(skip)
    for key, sub in schema.get("properties", {}).items():
        if key in skip or key not in values:
            continue
        if command is not None and command not in sub.get("x-commands", [command]):
            continue
        value, flag, here = values[key], "--" + (prefix + key).replace("_", "-"), f"{where}.{key}".lstrip(".")
        if sub.get("type") == "object":
            out += config_flags(value, sub, prefix=f"{prefix}{key}_", where=here)
        elif sub.get("type") == "boolean":
            if not isinstance(value, bool):
                raise ConfigFlagError(f"config {here}: {value!r} is not true/false")
            out.append(flag if value else "--no-" + flag[2:])
        elif sub.get("type") == "array":
            out.append(f"{flag} {shlex.quote(','.join(str(v) for v in value))}")
        else:
            out.append(f"{flag} {_format(value, sub, here)}")
    return out


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


_TYPES = {"int": int, "float": float, "str": str}


@functools.cache
def _field_comments(cls) -> dict[str, str]:
    """Trailing ``# comments`` of a dataclass's field lines (``name: type = default  # what it is``)."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, flags=re.M)
    return {m.group(1): m.group(2).strip() for m in found}


def _help(f, cls, section: str | None) -> str | None:
    """The field's metadata help, else the schema's description of its config key, else its source comment."""
    text = f.metadata.get("help")
    if not text and section:
        text = " ".join(str(section_schema(f"{section}.{f.name}").get("description", "")).split())
    text = text or _field_comments(cls).get(f.name)
    return text.replace("%", "%%") if text else None  # argparse %-formats help texts


def add_dataclass_options(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: tuple[str, ...] = (),
                          section: str | None = None, choices: Mapping[str, Iterable[str]] | None = None) -> None:
    """One ``--name`` option per field of ``cls``, defaulting to the field's default.

    Booleans are ``--x/--no-x``, ``tuple[...]`` fields comma-separated lists; nested dataclass fields are left
    to the caller (add them with a ``prefix``). ``section`` (default: from :data:`SECTIONS`) names the config
    section whose schema descriptions become the help texts.
    """
    section = section or SECTIONS.get(cls.__name__)
    for f in fields(cls):
        if f.name in skip or (isinstance(f.type, type) and is_dataclass(f.type)) or str(f.type) in SECTIONS:
            continue
        flag, dest = "--" + (prefix + f.name).replace("_", "-"), prefix + f.name
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        text = _help(f, cls, section)
        kind = str(getattr(f.type, "__name__", f.type))
        allowed = choices.get(f.name) if choices else None
        if allowed is None and section and kind == "str":
            allowed = section_schema(f"{section}.{f.name}").get("enum")  # the schema's enumerated values
        extra: dict[str, Any] = {"choices": tuple(allowed)} if allowed else {}
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, dest=dest,
                                help=f"{text} (default: {str(default).lower()})" if text else None)
            continue
        if kind.startswith("tuple"):
            conv, metavar, shown = _csv, "A,B,...", ",".join(default) or "none"
        else:
            conv = _TYPES.get(kind, str)
            metavar, shown = conv.__name__.upper(), '""' if default == "" else default
        parser.add_argument(flag, type=conv, default=default, dest=dest, metavar=None if extra else metavar,
                            help=f"{text} (default: {shown})" if text else None, **extra)


def dataclass_from_args(cls, args: argparse.Namespace, prefix: str = "", **extra):
    """Rebuild ``cls`` from the options :func:`add_dataclass_options` registered (``extra`` fills the rest)."""
    values = {f.name: getattr(args, prefix + f.name) for f in fields(cls) if hasattr(args, prefix + f.name)}
    return cls(**{**values, **extra})


def configure_logging() -> None:
    """The one logging set-up of every stage's command line (timestamps; rule logs capture stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
