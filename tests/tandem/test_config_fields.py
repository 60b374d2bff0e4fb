"""Each process's frozen config is the one place settings are read from: no dead fields, no side doors."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

from engine.config import EngineConfig
from frontend.config import FrontendConfig
from tandem.args import add_api_args, add_security_args, frontend_config

ROOT = Path(__file__).resolve().parents[2]


def _attributes_read(package: str, skip: str) -> set[str]:
    """Every attribute name read (obj.name) anywhere in the package's source, except in `skip`."""
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        if path.name == skip and path.parent == ROOT / package:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
    return names


@pytest.mark.parametrize(("config", "package"), [(FrontendConfig, "frontend"), (EngineConfig, "engine")])
def test_every_config_field_is_read_by_its_process(config: type, package: str) -> None:
    read = _attributes_read(package, skip="config.py")
    dead = [f.name for f in dataclasses.fields(config) if f.name not in read]
    assert dead == [], f"{config.__name__} fields nothing in {package}/ reads: {dead}"


def test_metrics_dir_comes_from_the_prometheus_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    # prometheus_client reads PROMETHEUS_MULTIPROC_DIR itself when a metric is created, so the launcher
    # sets the variable; the frontend reads the folder from its config only.
    parser = argparse.ArgumentParser()
    add_api_args(parser)
    add_security_args(parser)
    engines = ["tcp://127.0.0.1:1"]
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert frontend_config(parser.parse_args([]), engines=engines).metrics_dir is None
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/tandem-metrics")
    assert frontend_config(parser.parse_args([]), engines=engines).metrics_dir == "/tmp/tandem-metrics"
