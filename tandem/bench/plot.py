"""Latency distributions of a serving benchmark as one PNG (matplotlib, the optional `plot` extra)."""

from __future__ import annotations

PLOT_EXTRA_HINT = "plotting needs matplotlib: pip install 'tandem[plot]' (or pip install matplotlib)"


def check_plotting() -> str | None:
    """An error message when matplotlib is missing (checked before a run, not after it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return PLOT_EXTRA_HINT
    return None


def plot_latencies(result: dict, path: str) -> None:
    """Histograms of TTFT, TPOT, ITL and end-to-end latency (milliseconds) from a result JSON dict."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    panels = [
        ("ttfts_ms", "Time to first token (ms)"),
        ("tpots_ms", "Time per output token (ms)"),
        ("itls_ms", "Inter-token latency (ms)"),
        ("e2els_ms", "End-to-end latency (ms)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        values = [v for v in result.get(key, []) if v is not None]
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 2)), color="tab:blue", alpha=0.8)
            for pct, style in ((50, "-"), (90, "--"), (99, ":")):
                value = sorted(values)[min(len(values) - 1, int(len(values) * pct / 100))]
                ax.axvline(value, color="tab:red", linestyle=style, label=f"p{pct} {value:.1f}")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_ylabel("requests" if key != "itls_ms" else "gaps")
    summary = result.get("summary", {})
    fig.suptitle(
        f"{result.get('model', '')} @ {result.get('base_url', '')}: "
        f"{summary.get('completed', 0)} requests, {summary.get('output_throughput', 0.0):.1f} output tok/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
