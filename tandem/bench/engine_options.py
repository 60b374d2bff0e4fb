"""Turns the engine flags of `tandem bench throughput|latency` into `LLM` keyword options."""

from __future__ import annotations

import argparse
import dataclasses

from tandem.args import ENGINE_GROUP


def llm_options(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> dict:
    """The engine-group flags the user changed, by EngineConfig field name."""
    from engine.config import EngineConfig

    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    group = next(g for g in parser._action_groups if g.title == ENGINE_GROUP)
    options = {}
    for action in group._group_actions:
        value = getattr(ns, action.dest)
        if value is None or value == action.default:
            continue
        if action.dest == "served_model_name":
            options["served_model_names"] = tuple(value)
        elif action.dest in fields:
            options[action.dest] = value
    return options
