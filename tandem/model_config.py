"""`tandem serve --model-config FILE`: several models in one launch. The file (YAML, or JSON, which YAML
reads too) is a list with one entry per model: its `model` path, `served_model_name`, how many engines
(`data_parallel_size`, or `engines`), and any engine option under its flag name (`max_model_len`,
`dtype`, ...). Options an entry leaves out take the value given on the command line."""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.args import ENGINE_GROUP, unparse_group


class ModelConfigError(ValueError):
    """The file cannot be read or names an option that does not exist; the message says where."""


@dataclass(frozen=True)
class ModelSpec:
    model: str | None  # None: the default model
    num_engines: int
    engine_argv: list[str]  # the engine options, as flags for `tandem engine`
    device: str = "auto"  # its --device, for GPU placement (tandem/gpu_placement.py)
    tensor_parallel_size: int = 1


def _engine_dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    group = next(g for g in parser._action_groups if g.title == ENGINE_GROUP)
    return {action.dest: action for action in group._group_actions}


def _read(path: str) -> Any:
    import yaml  # only `tandem serve --model-config` needs it

    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ModelConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ModelConfigError(f"{path} is not valid YAML or JSON: {exc}") from exc


def _option_value(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """The entry's value as the parsed namespace would hold it (the child process parses it again)."""
    if isinstance(action, argparse._StoreTrueAction | argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ModelConfigError(f"{where}: `{key}` must be true or false, got {value!r}")
        return value
    if action.nargs == "+":
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str | int | float) for v in values):
            raise ModelConfigError(f"{where}: `{key}` must be a name or a list of names")
        return [str(v) for v in values]
    if action.dest == "speculative_config" and isinstance(value, dict):
        value = json.dumps(value)  # vLLM's JSON object, written as YAML; checked like the flag's text
        from engine.spec.config import parse_speculative_config  # no torch: the flag's own check

        try:
            parse_speculative_config(value)
        except ValueError as exc:
            raise ModelConfigError(f"{where}: {exc}") from None
        return value
    if isinstance(value, dict | list) or value is None:
        raise ModelConfigError(f"{where}: `{key}` must be a single value, got {value!r}")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if action.choices is not None and text not in action.choices:
        raise ModelConfigError(f"{where}: `{key}` must be one of {sorted(action.choices)}, got {value!r}")
    return text


def load_model_specs(
    path: str, parser: argparse.ArgumentParser, defaults: argparse.Namespace
) -> list[ModelSpec]:
    """One ModelSpec per entry of the file; `defaults` holds the command line's engine options."""
    entries = _read(path)
    if not isinstance(entries, list) or not entries:
        raise ModelConfigError(f"{path} must hold a non-empty list of models")
    dests = _engine_dests(parser)
    specs = []
    for i, entry in enumerate(entries):
        where = f"{path}, model {i + 1}"
        if not isinstance(entry, dict):
            raise ModelConfigError(f"{where}: each entry must be a mapping such as {{model: PATH}}")
        ns = copy.copy(defaults)
        model = None
        num_engines = 1
        for raw_key, value in entry.items():
            key = str(raw_key).replace("-", "_")
            if key == "model":
                model = None if value is None else str(value)
            elif key in ("data_parallel_size", "engines"):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ModelConfigError(f"{where}: `{raw_key}` must be a whole number of at least 1")
                num_engines = value
            elif key in dests:
                setattr(ns, key, _option_value(dests[key], str(raw_key), value, where))
            else:
                known = ", ".join(["model", "data_parallel_size", "engines", *sorted(dests)])
                raise ModelConfigError(f"{where}: unknown option `{raw_key}` (known: {known})")
        argv = unparse_group(parser, ENGINE_GROUP, ns)
        specs.append(ModelSpec(model, num_engines, argv, str(ns.device), int(ns.tensor_parallel_size)))
    return specs
