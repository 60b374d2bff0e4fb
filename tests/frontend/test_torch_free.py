"""The API process's whole default path starts without torch: app, server, CLI entry, routes built."""

from __future__ import annotations

import subprocess
import sys

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
