"""Summary statistics of a benchmark run: throughput and latency percentiles, free of any transport."""

from __future__ import annotations

from dataclasses import dataclass, field

PERCENTILES = (90, 99)  # the median is reported as its own key


@dataclass
class RequestResult:
    """What one benchmark request measured; times in seconds."""

    success: bool
    prompt_len: int  # tokens (from the server's usage when it reports one)
    output_len: int = 0
    ttft: float | None = None  # time to the first generated text
    latency: float = 0.0  # request start to its last byte
    itl: list[float] = field(default_factory=list)  # gaps between successive text chunks
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft is None or self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


def distribution(values: list[float], *, scale: float = 1000.0) -> dict[str, float | None]:
    """mean, median, std, p90 and p99, scaled (default: seconds -> milliseconds)."""
    import numpy as np  # here, not at import time: `tandem serve` imports this module's parser side

    if not values:
        return {"mean": None, "median": None, "std": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64) * scale
    out: dict[str, float | None] = {"mean": float(arr.mean()), "median": float(np.median(arr))}
    out["std"] = float(arr.std())
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    """Aggregate metrics of a run; latencies in milliseconds."""
    ok = [r for r in results if r.success]
    output_tokens = sum(r.output_len for r in ok)
    input_tokens = sum(r.prompt_len for r in ok)
    duration_s = max(duration_s, 1e-9)
    return {
        "duration_s": duration_s,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itl]),
        "e2el_ms": distribution([r.latency for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:10],
    }


def format_summary(summary: dict, title: str = "Serving benchmark") -> str:
    """A human-readable table of `summarize`'s result."""
    lines = [f"{'=' * 20} {title} {'=' * 20}"]

    def row(name: str, value: object) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<40}{text:>14}")

    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    row("Benchmark duration (s):", summary["duration_s"])
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    for key, label in (
        ("ttft_ms", "Time to first token"),
        ("tpot_ms", "Time per output token (excl. 1st)"),
        ("itl_ms", "Inter-token latency"),
        ("e2el_ms", "End-to-end latency"),
    ):
        lines.append(f"{'-' * 18} {label} {'-' * 18}")
        dist = summary[key]
        for stat in ("mean", "median", *(f"p{p}" for p in PERCENTILES)):
            value = dist[stat]
            row(
                f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} (ms):",
                "-" if value is None else value,
            )
    for error in summary.get("errors", []):
        lines.append(f"error: {error}")
    lines.append("=" * (42 + len(title)))
    return "\n".join(lines)
