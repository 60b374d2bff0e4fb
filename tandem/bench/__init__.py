"""`tandem bench`: serving, offline-throughput and latency benchmarks."""
