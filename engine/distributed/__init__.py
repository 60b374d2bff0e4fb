"""Tensor parallelism: how a model is cut across ranks, the collectives its layers call, and the worker
processes that run ranks 1..N-1 next to the engine core (rank 0)."""
