"""`tandem serve`: starts M engine cores and N API processes on this machine, waits until the server
answers, supervises the children, and stops them all on Ctrl-C / SIGTERM (no orphans)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from tandem.args import API_GROUP, ENGINE_GROUP, unparse_group

_POLL_S = 0.5


def _bind_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _child_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tandem", *args]


def _security_argv(ns: argparse.Namespace) -> list[str]:
    argv = ["--curve-keys", ns.curve_keys] if ns.curve_keys else []
    return argv + (["--insecure"] if ns.insecure else [])


class Children:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        # Own process group per child, so a terminal's Ctrl-C reaches us first and we stop them in order.
        proc = subprocess.Popen(argv, pass_fds=pass_fds, start_new_session=True)
        self.procs.append((name, proc))

    def first_exited(self) -> tuple[str, int] | None:
        for name, proc in self.procs:
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def stop(self, timeout_s: float) -> None:
        # API processes first (they finish their requests), then engines.
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _name, proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def serve(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    serve_parser = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    engine_flags = unparse_group(serve_parser, ENGINE_GROUP, ns)
    api_flags = unparse_group(serve_parser, API_GROUP, ns)
    run_dir = tempfile.mkdtemp(prefix="tandem-")
    engines = [f"ipc://{run_dir}/engine-{i}.sock" for i in range(ns.data_parallel_size)]
    listener = _bind_listener(ns.host, ns.port)
    children = Children()
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    model = [ns.model] if ns.model else []
    for i, address in enumerate(engines):
        argv = _child_argv("engine", *model, "--listen", address, "--engine-id", f"engine-{i}", *engine_flags)
        children.start(f"engine-{i}", argv + _security_argv(ns))
    engine_args = [arg for address in engines for arg in ("--engine", address)]
    names = ["--served-model-name", *ns.served_model_name] if ns.served_model_name else []
    for i in range(ns.api_server_count):
        argv = _child_argv("api", *engine_args, "--fd", str(listener.fileno()), *api_flags, *names)
        children.start(f"api-{i}", argv + _security_argv(ns), pass_fds=(listener.fileno(),))
    listener.close()  # the children hold it now

    host = f"[{ns.host}]" if ":" in ns.host else ns.host
    url = f"http://{host}:{ns.port}"
    announced = False
    exit_code = 0
    while not stopping:
        exited = children.first_exited()
        if exited is not None:
            name, code = exited
            print(f"tandem: {name} exited with code {code}; stopping the server", file=sys.stderr, flush=True)
            exit_code = code or 1
            break
        if not announced and _healthy(f"{url}/health"):
            print(f"tandem: serving on {url} (OpenAI API at {url}/v1)", flush=True)
            announced = True
        time.sleep(_POLL_S)
    children.stop(timeout_s=ns.shutdown_timeout + 5)
    for address in engines:
        path = address.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)
    os.rmdir(run_dir) if not os.listdir(run_dir) else None
    return exit_code
