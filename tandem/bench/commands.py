"""The `tandem bench` sub-commands: argument definitions (light) and dispatch (imports lazily)."""

from __future__ import annotations

import argparse

from tandem.args import add_engine_args, add_model_arg
from tandem.bench.latency import add_latency_args
from tandem.bench.serve import add_serve_args
from tandem.bench.throughput import add_throughput_args


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="Benchmarks: serving load test, offline throughput, latency.")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    serve = kinds.add_parser("serve", help="Load-test a running OpenAI-compatible server.")
    add_serve_args(serve)
    throughput = kinds.add_parser("throughput", help="Offline throughput of a batch through the LLM API.")
    add_model_arg(throughput)
    add_engine_args(throughput)
    add_throughput_args(throughput)
    latency = kinds.add_parser("latency", help="Single-request latency per output token through the LLM API.")
    add_model_arg(latency)
    add_engine_args(latency)
    add_latency_args(latency)


def run_bench(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    # The sub-command's own parser, for mapping its engine flags back to config fields.
    bench_parser = _subparser(_subparser(parser, "bench"), ns.bench_command)
    if ns.bench_command == "serve":
        from tandem.bench.serve import run_serve_bench

        return run_serve_bench(ns)
    if ns.bench_command == "throughput":
        from tandem.bench.throughput import run_throughput_bench

        return run_throughput_bench(bench_parser, ns)
    from tandem.bench.latency import run_latency_bench

    return run_latency_bench(bench_parser, ns)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]
