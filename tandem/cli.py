"""`tandem` command line: serve (engines + API processes), engine, api, keys, bench."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import sys
from urllib.parse import urlparse

from tandem.args import (
    add_api_args,
    add_engine_args,
    add_model_arg,
    add_security_args,
    check_tls_files,
    engine_config,
    frontend_config,
)

# The extra (pyproject.toml) each command needs, and a module that only that extra installs.
_EXTRAS = {"engine": ("engine", "torch"), "api": ("api", "starlette")}
_COMMAND_EXTRAS = {"serve": ("api", "engine"), "engine": ("engine",), "api": ("api",)}


def missing_extras(command: str) -> list[str]:
    """The extras `command` needs that this install lacks (an API pod installs tandem[api] alone)."""
    needed = (_EXTRAS[side] for side in _COMMAND_EXTRAS.get(command, ()))
    return [extra for extra, module in needed if importlib.util.find_spec(module) is None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="OpenAI-compatible LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="Run engines and API processes on this machine.")
    add_model_arg(serve)
    add_engine_args(serve)
    add_api_args(serve)
    add_security_args(serve)
    serve.add_argument("--api-server-count", type=int, default=1, help="API processes sharing the port.")
    serve.add_argument(
        "--data-parallel-size", type=int, default=1, help="Engine cores (one model replica each)."
    )
    serve.add_argument(
        "--model-config",
        default=None,
        help="Serve several models: a YAML or JSON list of {model, served_model_name, data_parallel_size, "
        "and any engine option}; one API tier in front of all (see docs/deployment.md).",
    )

    engine = sub.add_parser("engine", help="Run one headless engine core (for systemd).")
    add_model_arg(engine)
    add_engine_args(engine)
    add_security_args(engine)
    engine.add_argument(
        "--listen",
        default="tcp://127.0.0.1:7100",
        help="ZeroMQ address to bind (tcp://HOST:PORT or ipc://PATH).",
    )
    engine.add_argument("--engine-id", default="engine-0", help="Name of this engine in logs and metrics.")

    api = sub.add_parser(
        "api", help="Run one API process in front of running engines (no model files needed)."
    )
    api.add_argument(
        "--engine", action="append", required=True, help="Engine address; repeat for several engines."
    )
    api.add_argument(
        "--served-model-name", nargs="+", default=None, help="Override the names engines announce."
    )
    add_api_args(api)
    add_security_args(api)
    api.add_argument("--fd", type=int, default=None, help=argparse.SUPPRESS)

    keys = sub.add_parser("keys", help="CurveZMQ key management.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    gen = keys_sub.add_parser("generate", help="Write a server and a client key pair into DIR.")
    gen.add_argument("dir", help="Folder to create the keys in.")

    from tandem.bench.commands import add_bench_parser

    add_bench_parser(sub)
    return parser


def _is_loopback_address(address: str) -> bool:
    parsed = urlparse(address)
    if parsed.scheme in ("ipc", "inproc"):
        return True
    host = (parsed.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_engine_security(address: str, curve_keys: str | None, insecure: bool) -> str | None:
    """An error message when an engine would listen off loopback without authentication."""
    if curve_keys or insecure or _is_loopback_address(address):
        return None
    return (
        f"refusing to listen on {address} without CurveZMQ keys: anyone who can reach it could submit work. "
        "Create keys with `tandem keys generate DIR` and pass --curve-keys DIR on the engine and the API "
        "processes, or pass --insecure on a network you trust."
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    missing = missing_extras(ns.command)
    if missing:
        extras = ",".join(missing)
        print(
            f"tandem {ns.command}: this install lacks tandem[{extras}]: pip install 'tandem[{extras}]'",
            file=sys.stderr,
        )
        return 2
    if ns.command == "serve":
        from tandem.launcher import serve

        return serve(parser, ns)
    if ns.command == "engine":
        problem = check_engine_security(ns.listen, ns.curve_keys, ns.insecure)
        if problem:
            print(f"tandem engine: {problem}", file=sys.stderr)
            return 2
        from engine.main import run_engine

        return run_engine(engine_config(ns, listen=ns.listen, engine_id=ns.engine_id))
    if ns.command == "api":
        from frontend.server import run_api_server

        problem = check_tls_files(ns)
        if problem:
            print(f"tandem api: {problem}", file=sys.stderr)
            return 2

        return run_api_server(frontend_config(ns, engines=ns.engine, fd=ns.fd))
    if ns.command == "bench":
        from tandem.bench.commands import run_bench

        return run_bench(parser, ns)
    if ns.command == "keys":
        from tandem.keys import generate_keys

        paths = generate_keys(ns.dir)
        print("\n".join(str(p) for p in paths))
        return 0
    parser.error(f"unknown command {ns.command}")
    return 2
