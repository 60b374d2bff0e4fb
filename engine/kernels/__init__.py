"""Fused ops of the engine: a torch path for CPU, Triton kernels for CUDA, one dispatch point."""
