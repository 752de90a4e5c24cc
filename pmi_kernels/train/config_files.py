"""--config files: JSON, or YAML by extension (.yaml, .yml), as TRL's and accelerate's configs
are; the same keys and the same checks either way (config.read_config_file)."""

from __future__ import annotations

import json
import re

YAML_SUFFIXES = (".yaml", ".yml")
# YAML 1.1 (PyYAML) reads 1e-5 as a string; YAML 1.2, and every recipe's author, as a number.
YAML_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                            |[-+]?\.(?:inf|Inf|INF)
                            |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def is_yaml(path: str) -> bool:
    return path.lower().endswith(YAML_SUFFIXES)


def yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", YAML_FLOAT, list("-+0123456789."))
    return Loader


def load_config_values(path: str, fh):
    """The file's top-level value: a YAML file's through a safe loader (a parse error is a
    ValueError naming the file and the line), any other file as JSON (json.JSONDecodeError)."""
    if not is_yaml(path):
        return json.load(fh)
    import yaml

    try:
        return yaml.load(fh, Loader=yaml_loader())  # a SafeLoader: plain values only, no Python objects
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") from None
