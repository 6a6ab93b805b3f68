"""The Hydra main of every tool: composition, the schema as the only judge, and the exit mapping.

`tool(name, schema, body)` gives a `main()` for a console script or `python -m`. Before `body` runs,
the composed config is compared with the schema, so a key appended with `+` that no dataclass
declares fails (Hydra accepts it and `to_object` would drop it without a word), and `to_object`
runs every `__post_init__` check. A bad command therefore exits 2 before any work, in every tool;
Hydra's own composition errors (a misspelt key, a wrong type) exit 2 as well. Console log lines get a
timestamp when stdout is not a terminal; each tool's run body adds its log file (`logfile.attach`) once
its output folder is known.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import typing
from collections.abc import Callable
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from trainer.runtime import helptext, logfile
from trainer.runtime.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, guarded

# the configs are a package (conf/__init__.py) installed with the code: found from any directory
CONFIG_PATH = "pkg://conf"


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of `node` that `schema` (a dataclass, searched recursively) does not declare."""
    names = {f.name for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    found = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in names:
            found.append(path)
            continue
        child = node._get_node(key)
        if not isinstance(child, DictConfig) or child._is_none() or child._is_missing():
            continue
        sub = OmegaConf.get_type(child)  # the chosen dataclass of an `Any` field (source=csv, say)
        if not (isinstance(sub, type) and dataclasses.is_dataclass(sub)):
            sub = hints.get(key)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            found += unknown_keys(child, sub, f"{path}.")
    return found


def judge(raw: DictConfig, schema: type) -> Any:
    """The typed config, or a `ConfigError` naming the first unknown key or impossible value."""
    unknown = unknown_keys(raw, schema)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a setting of this tool (unknown: {', '.join(unknown)}); "
                          "`+` cannot add settings, `--help` lists them")
    try:
        return OmegaConf.to_object(raw)  # runs every __post_init__ check
    except MissingMandatoryValue as err:
        key = err.full_key
        raise ConfigError(f"{key}: required, set it on the command line ({key}=...)") from None
    except OmegaConfBaseException as err:  # a value of the wrong type met only while converting
        raise ConfigError(f"{getattr(err, 'full_key', '') or 'config'}: {err.msg}") from None


def typed(schema: type, values: dict) -> Any:
    """A schema filled from plain `values` and judged like a command line: for library callers and
    tests, so that a choice such as `tta="rotate"` fails as it would from the shell."""
    try:
        raw = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{getattr(err, 'full_key', '') or 'config'}: {err.msg}") from None
    return judge(raw, schema)


def tool(config_name: str, schema: type, body: Callable[[Any], int], doc: str | None = None
         ) -> Callable[[], None]:
    """`main()` of a tool whose primary config is `conf/<config_name>.yaml`, typed by `schema`;
    `doc` (the entry point's docstring) opens its `--help`."""
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    log = logging.getLogger(f"taxotrain.{config_name}")
    started = []

    @hydra.main(config_path=CONFIG_PATH, config_name=config_name, version_base="1.3")
    def hydra_main(raw: DictConfig) -> None:
        started.append(True)
        logfile.stamp_console()  # Hydra has set the console up by now; a batch log needs the times
        code = guarded(lambda: body(judge(raw, schema)), log)
        if code == EXIT_OK and HydraConfig.get().mode == RunMode.MULTIRUN:
            return  # the sweep goes on; a failed point ends it with its code
        sys.exit(code)

    def main() -> None:
        # our own text: the schema's keys, defaults and comments; Hydra's --help would dump every group
        if {"-h", "--help"} & set(sys.argv[1:]):
            print(helptext.render(config_name, schema, doc))
            raise SystemExit(EXIT_OK)
        try:
            hydra_main()
        except SystemExit as stop:
            # Hydra reports a composition error (misspelt key, wrong type, unknown group) with exit 1
            # before our function runs: that is a bad command
            if stop.code == EXIT_FAILED and not started:
                raise SystemExit(EXIT_USAGE) from None
            raise

    return main


def multirun() -> bool:
    """Whether this process runs one point of a Hydra `-m` sweep."""
    return HydraConfig.get().mode == RunMode.MULTIRUN
