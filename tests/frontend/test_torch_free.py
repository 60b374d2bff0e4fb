"""The API process's whole default path starts without torch: app, server, CLI entry, routes built.
And contract/, shared by both sides, imports only what both sides may."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

CODE = """
import sys
from tandem.cli import build_parser
from tandem.args import frontend_config
from frontend.server import run_api_server  # noqa: F401  (what `tandem api` runs)
from frontend.app import build_app

ns = build_parser().parse_args(["api", "--engine", "ipc:///tmp/tandem-torch-free-check.sock"])
app = build_app(frontend_config(ns, engines=ns.engine))
assert app.routes
print(sorted(m for m in ("torch", "transformers", "triton") if m in sys.modules))
"""


def test_api_process_default_path_never_imports_torch() -> None:
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


# contract/ holds the facts both sides share, so it may import only what both sides may.
CONTRACT_MAY_IMPORT = {"contract", "protocol", "msgspec", "jinja2", "llguidance"}
CONTRACT_CODE = """
import importlib, pkgutil, sys
import contract
for module in pkgutil.iter_modules(contract.__path__):
    importlib.import_module(f"contract.{module.name}")
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numpy", "frontend", "engine", "tandem"}))
"""


def test_contract_imports_only_what_both_sides_may() -> None:
    # The source's import statements (found through the import system: this also runs against an
    # installed package in .ci/api_only.sh) ...
    spec = importlib.util.find_spec("contract")
    assert spec is not None and spec.submodule_search_locations
    for path in sorted(Path(spec.submodule_search_locations[0]).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in CONTRACT_MAY_IMPORT, f"{path.name}: {name}"
    # ... and what importing every module really loads.
    result = subprocess.run(
        [sys.executable, "-c", CONTRACT_CODE], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
