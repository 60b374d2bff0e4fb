"""`tandem serve`: starts M engine cores and N API processes on this machine, waits until the server
answers, supervises the children (one that dies after start-up is restarted in place; the others keep
serving), and stops them all on Ctrl-C / SIGTERM (no orphans)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

from tandem.args import API_GROUP, ENGINE_GROUP, check_tls_files, unparse_group
from tandem.gpu_placement import count_gpus, place_engines
from tandem.model_config import ModelConfigError, ModelSpec, load_model_specs

_POLL_S = 0.5
_MAX_RESTARTS = 5  # per child; past this the server stops instead of restarting in a loop


class PortInUse(OSError):
    """The port is already taken (by another server, or an earlier `tandem serve`)."""


def _bind_listener(host: str, port: int) -> socket.socket:
    # One socket, bound once and inherited by every API process (the kernel spreads accept() across
    # them). No SO_REUSEPORT: with it a second `tandem serve` on the same port would silently share
    # the port with the first one instead of failing.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(
            f"cannot listen on {host}:{port}: {exc.strerror}. Is another server using it? "
            "Pick another port with --port."
        ) from exc
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
        self._specs: dict[str, tuple[list[str], tuple[int, ...], dict[str, str] | None]] = {}
        self.num_restarts: dict[str, int] = {}

    def start(
        self,
        name: str,
        argv: list[str],
        pass_fds: tuple[int, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        # Own process group per child, so a terminal's Ctrl-C reaches us first and we stop them in order.
        proc = subprocess.Popen(argv, pass_fds=pass_fds, start_new_session=True, env=env)
        self._specs[name] = (argv, pass_fds, env)
        self.procs = [(n, p) for n, p in self.procs if n != name] + [(name, proc)]

    def restart(self, name: str) -> bool:
        """Starts a dead child again with the same command line; False once it has failed too often."""
        self.num_restarts[name] = self.num_restarts.get(name, 0) + 1
        if self.num_restarts[name] > _MAX_RESTARTS:
            return False
        argv, pass_fds, env = self._specs[name]
        self.start(name, argv, pass_fds, env)
        return True

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
    # The launcher asks its own child on loopback: over HTTPS the certificate names the public host, so
    # it is not verified here.
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return resp.status == 200
    except OSError:
        return False


def _model_specs(serve_parser: argparse.ArgumentParser, ns: argparse.Namespace) -> list[ModelSpec]:
    """The models to start: those of --model-config, or the one model of the command line."""
    if ns.model_config is None:
        engine_flags = unparse_group(serve_parser, ENGINE_GROUP, ns)
        return [ModelSpec(ns.model, ns.data_parallel_size, engine_flags, ns.device, ns.tensor_parallel_size)]
    if ns.model is not None or ns.served_model_name:
        raise ModelConfigError(
            "--model-config lists the models: give each `model` and `served_model_name` in the file, "
            "not on the command line"
        )
    return load_model_specs(ns.model_config, serve_parser, ns)


def _gpu_devices(plan: list[ModelSpec]) -> list[str] | None:
    """Disjoint GPUs for the engines on a GPU host (None: leave their --device alone)."""
    num_gpus = count_gpus()
    devices = place_engines([s.device for s in plan], [s.tensor_parallel_size for s in plan], num_gpus)
    if devices is None and num_gpus and len(plan) > 1:
        needed = sum(s.tensor_parallel_size for s in plan)
        print(
            f"tandem serve: {len(plan)} engines need {needed} GPUs and {num_gpus} are visible; "
            "engines left on automatic placement share the first GPUs",
            file=sys.stderr,
            flush=True,
        )
    return devices


def serve(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    serve_parser = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr,index]
    api_flags = unparse_group(serve_parser, API_GROUP, ns)
    tls_problem = check_tls_files(ns)
    if tls_problem is not None:
        print(f"tandem serve: {tls_problem}", file=sys.stderr)
        return 2
    try:
        specs = _model_specs(serve_parser, ns)
    except ModelConfigError as exc:
        print(f"tandem serve: {exc}", file=sys.stderr)
        return 2
    try:
        listener = _bind_listener(ns.host, ns.port)
    except PortInUse as exc:
        print(f"tandem serve: {exc}", file=sys.stderr)
        return 2
    run_dir = tempfile.mkdtemp(prefix="tandem-")
    # One engine list over all models, in the file's order: the first model is the default one.
    plan = [spec for spec in specs for _ in range(spec.num_engines)]
    engines = [f"ipc://{run_dir}/engine-{i}.sock" for i in range(len(plan))]
    # Request metrics of all API processes are summed from per-process files in this folder.
    metrics_dir = os.path.join(run_dir, "metrics")
    os.mkdir(metrics_dir)
    api_env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    children = Children()
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    devices = _gpu_devices(plan)
    for i, (spec, address) in enumerate(zip(plan, engines, strict=True)):
        model = [spec.model] if spec.model else []
        placed = ["--device", devices[i]] if devices else []  # the last --device given wins
        argv = _child_argv(
            "engine", *model, "--listen", address, "--engine-id", f"engine-{i}", *spec.engine_argv, *placed
        )
        children.start(f"engine-{i}", argv + _security_argv(ns))
    engine_args = [arg for address in engines for arg in ("--engine", address)]
    # With one model the API process renames it too; several models are named on their engines only.
    names = ["--served-model-name", *ns.served_model_name] if ns.served_model_name else []
    for i in range(ns.api_server_count):
        argv = _child_argv("api", *engine_args, "--fd", str(listener.fileno()), *api_flags, *names)
        children.start(f"api-{i}", argv + _security_argv(ns), pass_fds=(listener.fileno(),), env=api_env)
    # The listener stays open here too (this process never accepts on it), so a restarted API process
    # can inherit it again.

    host = f"[{ns.host}]" if ":" in ns.host else ns.host
    url = f"{'https' if ns.ssl_certfile else 'http'}://{host}:{ns.port}"
    health_url = f"{url}/health"
    announced = False
    exit_code = 0
    while not stopping:
        exited = children.first_exited()
        if exited is not None:
            name, code = exited
            # Before the first healthy answer an exit is a start-up failure: restarting would loop.
            if announced and children.restart(name):
                print(f"tandem: {name} exited with code {code}; restarted it", file=sys.stderr, flush=True)
                continue
            print(f"tandem: {name} exited with code {code}; stopping the server", file=sys.stderr, flush=True)
            exit_code = code or 1
            break
        if not announced and _healthy(health_url):
            print(f"tandem: serving on {url} (OpenAI API at {url}/v1)", flush=True)
            announced = True
        time.sleep(_POLL_S)
    children.stop(timeout_s=ns.shutdown_timeout + 5)
    listener.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    return exit_code
