"""`slotserve serve`'s options: flag > `--config` file > default, checked before anything starts.

The config file is YAML or JSON with keys spelled with `-` or `_`; an unknown key, a
value of the wrong type or out of range is an `OptionError` whose one-line message names
the option and what is valid.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields


class OptionError(ValueError):
    """A bad option (flag or --config key); the message names it and what is valid."""


@dataclass(frozen=True)
class ServeOptions:
    """The resolved options: flag > --config file > these defaults."""

    bundle: str | None = None
    replicas: int | None = None            # None: 1 (or autoscaling_config)
    address: str | None = None             # None: start a local Ray
    host: str = "127.0.0.1"
    port: int = 8000
    dashboard_port: int = 8265
    store: str | None = None               # None: $SLOTSERVE_HOME
    memory_budget: str | int | None = None
    device: str | None = None              # None: cuda when a GPU is visible, else cpu
    name: str = "slotserve"
    served_name: str | None = None
    autoscaling_config: dict | None = None  # config file only: Ray Serve's autoscaling_config


# What each option accepts (for the config file; argparse already typed the flags).
_TYPES: dict[str, tuple[type, ...]] = {
    "bundle": (str,), "replicas": (int,), "address": (str,), "host": (str,), "port": (int,),
    "dashboard_port": (int,), "store": (str,), "memory_budget": (str, int), "device": (str,),
    "name": (str,), "served_name": (str,), "autoscaling_config": (dict,),
}
VALID_KEYS = sorted(_TYPES)
assert set(VALID_KEYS) == {f.name for f in fields(ServeOptions)}


def load_config(path: str | None) -> dict:
    """The --config file as {option: value}; OptionError for an unreadable file, an
    unknown key or a value of the wrong type."""
    if not path:
        return {}
    import yaml
    try:
        with open(path) as f:
            data = yaml.safe_load(f)  # JSON is YAML too
    except (OSError, yaml.YAMLError) as exc:
        raise OptionError(f"cannot read --config {path}: {' '.join(str(exc).split())}") from None  # one line
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionError(f"{path} must hold a mapping of options; valid keys: {', '.join(VALID_KEYS)}")
    cfg = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _TYPES:
            raise OptionError(f"{path}: unknown option {key!r}; valid keys: {', '.join(VALID_KEYS)}")
        want = _TYPES[name]
        # bool is an int to Python, never a port or a replica count
        if value is not None and (not isinstance(value, want) or isinstance(value, bool)):
            kinds = " or ".join({str: "a string", int: "an integer", dict: "a mapping"}[t] for t in want)
            raise OptionError(f"{path}: {key} must be {kinds}, got {value!r}")
        cfg[name] = value
    return cfg


def resolve_options(args: argparse.Namespace) -> ServeOptions:
    """Flag > --config file > default, for every option; then check the values."""
    cfg = load_config(getattr(args, "config", None))
    given = {}
    for name in VALID_KEYS:
        flag = getattr(args, name, None)
        if flag is not None:
            given[name] = flag
        elif cfg.get(name) is not None:
            given[name] = cfg[name]
    if given.get("store"):
        # absolute now: the command runs Ray from another directory (slotserve.cli.local_ray.neutral_cwd)
        given["store"] = os.path.abspath(os.path.expanduser(given["store"]))
    opts = ServeOptions(**given)
    for name in ("port", "dashboard_port"):
        if not 1 <= getattr(opts, name) <= 65535:
            raise OptionError(f"{name} must be in 1..65535, got {getattr(opts, name)}")
    if opts.replicas is not None and opts.replicas < 1:
        raise OptionError(f"replicas must be >= 1, got {opts.replicas}")
    if opts.device not in (None, "cpu", "cuda"):
        raise OptionError(f"device must be cpu or cuda, got {opts.device!r}")
    if not opts.host:
        raise OptionError("host must not be empty (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    if opts.memory_budget is not None:
        from slotserve.slots.planner import parse_size
        try:
            parse_size(opts.memory_budget)
        except ValueError as exc:
            raise OptionError(f"memory_budget: {exc}") from None
    return opts
