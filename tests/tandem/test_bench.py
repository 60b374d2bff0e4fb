"""`tandem bench`: statistics, prompt datasets, the serving benchmark against a real server, and the
offline throughput/latency commands on the shared in-process model."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tandem import LLM
from tandem.bench import datasets
from tandem.bench.commands import _subparser
from tandem.bench.latency import run_latency_bench
from tandem.bench.stats import RequestResult, distribution, summarize
from tandem.bench.throughput import run_throughput_bench
from tandem.cli import build_parser
from tests.server_process import REPO


def test_summary_counts_only_successes_and_scales_to_ms() -> None:
    ok = RequestResult(True, prompt_len=10, output_len=5, ttft=0.2, latency=1.0, itl=[0.2, 0.2, 0.2, 0.2])
    ok2 = RequestResult(True, prompt_len=6, output_len=3, ttft=0.4, latency=0.8, itl=[0.2, 0.2])
    bad = RequestResult(False, prompt_len=7, error="HTTP 503: busy")
    summary = summarize([ok, ok2, bad], duration_s=2.0)
    assert (summary["completed"], summary["failed"]) == (2, 1)
    assert summary["total_input_tokens"] == 16 and summary["total_output_tokens"] == 8
    assert summary["output_throughput"] == pytest.approx(8 / 2.0)
    assert summary["total_token_throughput"] == pytest.approx(24 / 2.0)
    assert summary["ttft_ms"]["mean"] == pytest.approx(300.0)
    # TPOT excludes the first token: (1.0 - 0.2) / 4 and (0.8 - 0.4) / 2.
    assert summary["tpot_ms"]["median"] == pytest.approx(np.median([200.0, 200.0]))
    assert summary["itl_ms"]["p99"] == pytest.approx(200.0)
    assert summary["errors"] == ["HTTP 503: busy"]


def test_distribution_percentiles_and_empty() -> None:
    values = [float(v) for v in range(1, 101)]
    d = distribution(values, scale=1.0)
    assert d["median"] == pytest.approx(np.median(values))
    assert d["p90"] == pytest.approx(np.percentile(values, 90))
    assert distribution([])["p99"] is None


def test_random_text_adds_up_to_exact_token_counts() -> None:
    rng = random.Random(0)
    one_token = datasets.word_counter()
    assert len(datasets.random_text(rng, one_token, 37).split()) == 37
    # A tokenizer where most words take several tokens: the sum of word lengths must still be exact.
    lens = {w: 1 + i % 3 for i, w in enumerate(datasets.WORDS)}
    lens.update(dict.fromkeys(datasets.WORDS[:5], 2))
    counter = datasets.TokenCounter("tokenizer", lens, len)
    for target in (1, 2, 9, 50):
        text = datasets.random_text(rng, counter, target)
        assert sum(lens[w] for w in text.split()) == target


def test_shared_prefix_prompts_share_their_prefixes() -> None:
    samples = datasets.shared_prefix_requests(
        random.Random(1),
        datasets.word_counter(),
        12,
        num_prefixes=3,
        prefix_len=20,
        suffix_len=5,
        output_len=4,
    )
    prefixes = {" ".join(s.prompt.split()[:20]) for s in samples}
    assert len(prefixes) == 3
    assert len({s.prompt for s in samples}) == 12
    assert all(s.prompt_len == 25 and s.output_len == 4 for s in samples)


def test_jsonl_prompts(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('"plain string"\n{"prompt": "two words", "output_len": 9}\n\n{"text": "t"}\n')
    samples = datasets.jsonl_requests(str(path), datasets.word_counter(), 5, default_output_len=3)
    assert [s.prompt for s in samples] == ["plain string", "two words", "t", "plain string", "two words"]
    assert [s.output_len for s in samples] == [3, 9, 3, 3, 9]
    assert samples[1].prompt_len == 2
    path.write_text('{"nothing": 1}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:1"):
        datasets.jsonl_requests(str(path), datasets.word_counter(), None, 3)


def _bench_serve(base_url: str, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    result_path = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tandem", "bench", "serve", "--base-url", base_url, "--result-json", str(result_path),
         "--disable-tqdm", *args],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(result_path.read_text())


def test_bench_serve_against_a_real_server(default_server, tmp_path: Path) -> None:
    proc, result = _bench_serve(
        default_server.base_url, tmp_path,
        "--num-prompts", "3", "--random-input-len", "8", "--random-output-len", "3", "--max-concurrency", "2",
    )  # fmt: skip
    summary = result["summary"]
    assert (summary["completed"], summary["failed"]) == (3, 0)
    assert result["output_lens"] == [3, 3, 3]  # ignore_eos + max_tokens fix the output length
    assert result["model"] == "SmolLM2-135M-Instruct"
    if result["token_count_method"] != "words":  # sized with real token counts: the server agrees exactly
        assert result["input_lens"] == [8, 8, 8]
    assert all(t is not None and t > 0 for t in result["ttfts_ms"])
    assert len(result["itls_ms"]) >= 3
    assert "Output token throughput" in proc.stdout and "prompt lengths counted by" in proc.stderr


def test_bench_serve_chat_and_shared_prefix(default_server, tmp_path: Path) -> None:
    _, result = _bench_serve(
        default_server.base_url, tmp_path, "--endpoint", "chat", "--dataset", "shared-prefix",
        "--num-prompts", "2", "--num-prefixes", "1", "--prefix-len", "16", "--random-input-len", "2",
        "--random-output-len", "2",
    )  # fmt: skip
    assert (result["summary"]["completed"], result["summary"]["failed"]) == (2, 0)
    assert result["output_lens"] == [2, 2]


def test_bench_serve_reports_failures(default_server, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tandem", "bench", "serve", "--base-url", default_server.base_url,
         "--model", "no-such-model", "--num-prompts", "1", "--random-input-len", "2", "--random-output-len", "1",
         "--disable-tqdm"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Failed requests:" in proc.stdout and "HTTP 404" in proc.stdout


def test_plot_needs_matplotlib_or_draws(default_server, tmp_path: Path) -> None:
    from tandem.bench.plot import check_plotting

    png = tmp_path / "lat.png"
    proc = subprocess.run(
        [sys.executable, "-m", "tandem", "bench", "serve", "--base-url", default_server.base_url, "--plot", str(png),
         "--num-prompts", "1", "--random-input-len", "2", "--random-output-len", "2", "--disable-tqdm"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    if check_plotting() is None:
        assert proc.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG"
    else:
        assert proc.returncode == 2 and "pip install 'tandem[plot]'" in proc.stderr and not png.exists()


def _parse(*argv: str):  # noqa: ANN202
    parser = build_parser()
    ns = parser.parse_args(["bench", *argv])
    return _subparser(_subparser(parser, "bench"), argv[0]), ns


def test_bench_throughput(offline_llm: LLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.json"
    parser, ns = _parse("throughput", "--num-prompts", "3", "--input-len", "5", "--output-len", "2",
                        "--result-json", str(out), "--disable-tqdm")  # fmt: skip
    assert run_throughput_bench(parser, ns, llm=offline_llm) == 0
    result = json.loads(out.read_text())
    assert (result["total_input_tokens"], result["total_output_tokens"]) == (15, 6)
    assert result["output_tokens_per_s"] == pytest.approx(6 / result["elapsed_s"])
    assert "output tokens/s" in capsys.readouterr().out


def test_bench_latency(offline_llm: LLM, tmp_path: Path) -> None:
    out = tmp_path / "l.json"
    parser, ns = _parse("latency", "--input-len", "4", "--output-len", "3", "--num-iters-warmup", "1",
                        "--num-iters", "2", "--result-json", str(out))  # fmt: skip
    steps_before = offline_llm.stepper.step_count
    assert run_latency_bench(parser, ns, llm=offline_llm) == 0
    result = json.loads(out.read_text())
    assert len(result["latencies_s"]) == 2
    assert result["latency_ms"]["mean"] > result["ttft_ms"]["mean"] > 0
    # 1 warm-up of 3 tokens, 2 first-token runs of 1 step, 2 timed runs of 3 steps.
    assert offline_llm.stepper.step_count - steps_before == 3 + 2 + 6


def test_engine_flags_become_llm_options() -> None:
    from tandem.bench.engine_options import llm_options

    parser, ns = _parse(
        "throughput", "--max-num-seqs", "8", "--no-enable-prefix-caching", "--kv-cache-memory", "1G"
    )
    assert llm_options(parser, ns) == {
        "max_num_seqs": 8,
        "enable_prefix_caching": False,
        "kv_cache_memory": 2**30,
    }
