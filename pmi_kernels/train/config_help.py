"""Each config key's help: one text, kept beside its field in TrainConfig (option(...)'s
metadata), that makes both `pmi-opsd train --help` (in groups) and docs/config.md."""

from __future__ import annotations

import dataclasses
import json
from typing import Dict, List

# The help's groups, in the order a reader meets them.
MODEL, DATA, METHOD, OPTIMIZATION, ROLLOUTS, EVALUATION, LOGGING, DISTRIBUTED, PACKING = GROUPS = (
    "model",
    "data",
    "method and loss",
    "optimization",
    "rollouts",
    "evaluation",
    "checkpoints and logging",
    "distributed",
    "packing",
)


def option(default=dataclasses.MISSING, *, help: str, group: str, factory=dataclasses.MISSING, shown=None):
    """A TrainConfig field with its help text and group (shown: the default as the help says it,
    where the value itself is too long to read)."""
    if group not in GROUPS:
        raise ValueError(f"option: group {group!r} is not one of {GROUPS}")
    metadata = {"help": help, "group": group, "shown": shown}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return value_text(value)


def value_text(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "none"
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    return str(value)


def defaults_line(f: dataclasses.Field, toy_defaults: Dict) -> str:
    toy = f"; the toy: {value_text(toy_defaults[f.name])}" if f.name in toy_defaults else ""
    return f"default {default_text(f)}{toy}"


def add_config_arguments(parser, cls, types: Dict, toy_defaults: Dict) -> None:
    """One flag per field of cls, in its group, its help the field's text and its default."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} ({defaults_line(f, toy_defaults)})".replace("%", "%%")
        group = groups[f.metadata["group"]]
        if types[f.name][0] is bool:
            group.add_argument(flag, dest=f.name, nargs="?", const="true", metavar="true|false", help=text)
        else:
            group.add_argument(flag, dest=f.name, help=text)


def config_reference(cls, toy_defaults: Dict) -> str:
    """docs/config.md's tables: each group's keys, their defaults and help."""
    lines: List[str] = []
    for group in GROUPS:
        lines += [
            "",
            f"## {group[0].upper()}{group[1:]}",
            "",
            "| key (flag) | default | what it does |",
            "|---|---|---|",
        ]
        for f in dataclasses.fields(cls):
            if f.metadata["group"] == group:
                flag = "--" + f.name.replace("_", "-")
                default = defaults_line(f, toy_defaults)[len("default ") :].replace("|", "\\|")
                text = f.metadata["help"].replace("|", "\\|")
                lines.append(f"| `{f.name}` (`{flag}`) | `{default}` | {text} |")
    return "\n".join(lines[1:]) + "\n"


REFERENCE = "docs/config.md"
REFERENCE_HEAD = """# The training configuration

Every key of `pmi-opsd train`'s configuration, by group: a flag (`--lora-rank 16`), a key of a
`--config` file (JSON, or YAML by extension), and a field of `pmi_kernels.train.TrainConfig`.
Booleans are `true`/`false`, lists a JSON list or comma-separated, dicts JSON, `null` where a key
allows none. Where the toy (no `--model-path`) has its own default, the table gives both.
`pmi-opsd train --help` prints the same text. This file is generated from the fields' help
(`pmi_kernels/train/config_help.py`), and a test checks that it matches them: regenerate it with
`python -c "from pmi_kernels.train.config_help import write_reference; write_reference()"`.

"""


def reference_text() -> str:
    from .config import TOY_DEFAULTS, TrainConfig

    return REFERENCE_HEAD + config_reference(TrainConfig, TOY_DEFAULTS)


def write_reference(path: str = REFERENCE) -> None:
    with open(path, "w") as fh:
        fh.write(reference_text())
