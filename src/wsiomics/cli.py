"""Helpers shared by the stages' command lines: dataclass fields as options, logging set-up."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

_TYPES = {"int": int, "float": float, "str": str}


def add_dataclass_options(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """One ``--name`` option per field of ``cls`` (``--x/--no-x`` for booleans), defaulting to the field's default."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        help_text = f.metadata.get("help")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, dest=prefix + f.name,
                                help=help_text)
        else:
            kind = _TYPES.get(getattr(f.type, "__name__", str(f.type)), float)
            parser.add_argument(flag, type=kind, default=f.default, dest=prefix + f.name, metavar=kind.__name__.upper(),
                                help=f"{help_text} (default: {f.default})" if help_text else None)


def dataclass_from_args(cls, args: argparse.Namespace, prefix: str = "", **extra):
    """Rebuild ``cls`` from the options ``add_dataclass_options`` registered."""
    values = {f.name: getattr(args, prefix + f.name) for f in fields(cls) if hasattr(args, prefix + f.name)}
    return cls(**{**values, **extra})


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
