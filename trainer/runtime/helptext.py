"""`--help` of a tool: its description, every setting of its schema with the default and the comment
written next to the field, and the config groups its primary config composes.

Hydra's own `--help` dumps the composed config of every group, without a word on what a key is for.
The schema is the only judge of a tool's settings and the one place those words live, so the help is
read from its source (`inspect` + `tokenize`), and the groups from the yaml files shipped in `conf`.
"""
from __future__ import annotations

import dataclasses
import enum
import inspect
import io
import textwrap
import tokenize
import typing
from importlib import resources
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

CONF = "conf"  # the package that holds the yaml files (cli.CONFIG_PATH is pkg://conf)
COLUMN = 40    # where the comments start, so a long listing reads as a table


def own_comments(cls: type) -> dict[str, str]:
    """The comment of each field declared in `cls`'s body: the trailing one, else the lines just above."""
    notes: dict[str, str] = {}
    above: list[str] = []
    line: list[tokenize.TokenInfo] = []
    trailing, depth = "", 0
    source = textwrap.dedent(inspect.getsource(cls))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.INDENT, tokenize.DEDENT):
            depth += 1 if tok.type == tokenize.INDENT else -1
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if line:
                trailing = trailing or text
            else:
                above.append(text)
        elif tok.type == tokenize.NL:
            above = above if line or tok.line.strip() else []  # a blank line detaches a comment
        elif tok.type == tokenize.NEWLINE:
            if depth == 1 and len(line) > 1 and line[0].type == tokenize.NAME and line[1].string == ":":
                notes[line[0].string] = trailing or " ".join(above)
            line, above, trailing = [], [], ""
        else:
            line.append(tok)
    return notes


def comments(cls: type) -> dict[str, str]:
    """Comments of every field of `cls`, inherited ones included; a subclass that redeclares a field
    without a comment (to change its default) keeps the base class's words."""
    merged: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            merged |= {name: text for name, text in own_comments(base).items() if text}
    return merged


def shown(value: object) -> str:
    """A value as it is written in an override (`null`, `true`, `[0.08, 1.0]`, a Choice's name)."""
    if value is None or isinstance(value, bool):
        return str(value).lower() if value is not None else "null"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(shown, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    return str(value)


def row(left: str, note: str = "", indent: str = "  ") -> str:
    return f"{indent}{left:<{COLUMN - len(indent)}}  # {note}" if note else f"{indent}{left}"


def default_of(field: dataclasses.Field) -> object:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "???"


def with_choices(kind: object, note: str) -> str:
    """An enumerated setting's note names its choices, unless the comment already lists them all."""
    if not (isinstance(kind, type) and issubclass(kind, enum.Enum)):
        return note
    names = [str(m.value) for m in kind]
    if all(name in note for name in names):
        return note
    return " | ".join(names) + (f": {note}" if note else "")


def rows(cls: type, value: object, prefix: str, groups: dict[str, str | None], indent: str = "  "
         ) -> list[str]:
    """One line per setting of `cls` (dataclasses recursively); `value`, when given, holds the defaults
    (a nested field's factory may change them: evaluate's logger is disabled)."""
    notes, hints, lines = comments(cls), typing.get_type_hints(cls), []
    for field in dataclasses.fields(cls):
        key, kind, note = prefix + field.name, hints[field.name], notes.get(field.name, "")
        default = default_of(field) if value is None else getattr(value, field.name)
        if dataclasses.is_dataclass(kind):
            lines += rows(kind, default, f"{key}.", groups, indent)
        elif kind is Any and options(key):  # a group (source=csv); otherwise a free value (data.background)
            lines += any_rows(key, note, groups)
        else:
            lines.append(row(f"{key} = {shown(default)}", with_choices(kind, note), indent))
    return lines


def any_rows(key: str, note: str, groups: dict[str, str | None]) -> list[str]:
    """An `Any` field is a group whose chosen file says its type (`source=csv`): each option's settings."""
    lines = [row(f"{key}=NAME (default {groups.get(key) or 'none'})", note or f"conf/{key}/NAME.yaml; each:")]
    for option in options(key):
        schema = stored_schema(key, option)
        if schema is None:
            continue
        lines.append(f"  {key}={option}:")
        lines += rows(schema, None, f"{key}.", groups, "    ")
    return lines if len(lines) > 1 else [*lines, f"    see conf/{key}/"]


def stored_schema(group: str, option: str) -> type | None:
    """The dataclass that `conf/<group>/<option>.yaml` names first in its defaults list, if stored."""
    names = [d for d in defaults_list(f"{group}/{option}") if isinstance(d, str) and d != "_self_"]
    store = ConfigStore.instance()
    if not names or f"{names[0]}.yaml" not in store.list(group):
        return None
    kind = OmegaConf.get_type(store.load(f"{group}/{names[0]}.yaml").node)
    return kind if dataclasses.is_dataclass(kind) else None


def defaults_list(name: str) -> list:
    path = resources.files(CONF).joinpath(f"{name}.yaml")
    return (yaml.safe_load(path.read_text()) or {}).get("defaults", []) if path.is_file() else []


def config_groups(name: str) -> dict[str, str | None]:
    """{group: default option} of a primary config, following the configs it includes (training.yaml);
    `override hydra/...` entries are Hydra's business."""
    found: dict[str, str | None] = {}
    for entry in defaults_list(name):
        if isinstance(entry, str):
            found |= config_groups(entry)  # another config of conf/; a `*_schema` entry has no file
            continue
        for key, option in entry.items():
            if not key.startswith("override"):
                optional = key.startswith("optional ")
                found[key.removeprefix("optional ")] = f"{option}, if present" if optional else option
    return found


def options(group: str) -> list[str]:
    folder = resources.files(CONF).joinpath(group)
    if not folder.is_dir():
        return []
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def group_lines(groups: dict[str, str | None]) -> list[str]:
    return [row(f"{group}: {', '.join(options(group)) or '(none yet)'}", f"default: {default or 'none'}")
            for group, default in groups.items()]


def render(config_name: str, schema: type, doc: str | None) -> str:
    """The whole `--help` of the tool whose primary config is `conf/<config_name>.yaml`."""
    groups = config_groups(config_name)
    text = [inspect.cleandoc(doc or schema.__doc__ or config_name), "",
            "Settings (key=value on the command line; ??? = required; schema defaults):",
            *rows(schema, None, "", groups)]
    if groups:
        text += ["", "Config groups (group=option picks conf/<group>/<option>.yaml):",
                 *group_lines(groups)]
    text += ["", "--hydra-help: Hydra's own options (-m sweeps, --cfg job prints the composed config)."]
    return "\n".join(text)
