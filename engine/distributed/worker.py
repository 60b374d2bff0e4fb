"""Entry point of a tensor-parallel worker process (ranks 1..N-1): load this rank's shard, then run
whatever rank 0 broadcasts until it says stop. Workers never talk to API processes."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection

from engine.config import EngineConfig
from engine.cpu_threads import configure_openmp

logger = logging.getLogger(__name__)


def run_worker(config: EngineConfig, rank: int, port: int, pipe: Connection) -> None:
    """multiprocessing (spawn) target. Exits with rank 0: its death closes `pipe` (where an idle worker
    waits) and ends the parent watch (for one still loading)."""
    configure_openmp()  # before torch loads
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [{config.engine_id} tp{rank}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # A terminal's Ctrl-C reaches the whole process group: the engine core drains and then stops its
    # workers itself, so they must not die first (the engine would take that for a lost rank).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    try:
        _serve(config, rank, port, pipe)
    except EOFError:
        os._exit(0)  # rank 0 is gone
    except Exception:
        logger.exception("tensor-parallel rank %d failed", rank)
        os._exit(1)


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # waits on the parent's sentinel: returns when the engine core is gone
        os._exit(0)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


def _serve(config: EngineConfig, rank: int, port: int, pipe: Connection) -> None:
    import torch

    from engine.distributed.channel import Command, CommandChannel
    from engine.distributed.group import join_group, propose_num_blocks, rank_device, threads_per_rank
    from engine.distributed.shard import TensorParallel
    from engine.engine_setup import kv_cache_dtype, load_engine_model, local_num_kv_blocks, pick_device
    from engine.kv_copy import apply_block_copies

    size = config.tensor_parallel_size
    torch.set_num_threads(threads_per_rank(config.num_threads, size))
    device = rank_device(pick_device(config.device), rank)
    join_group(rank, size, port, device, config.tensor_parallel_timeout_s)
    tp = TensorParallel(rank, size)
    loaded = load_engine_model(config, device, tp)
    model, arch = loaded.model, loaded.arch
    num_kv_heads = model.num_kv_heads
    kv_dtype = kv_cache_dtype(config, loaded, device)
    num_blocks = propose_num_blocks(pipe, local_num_kv_blocks(config, arch, num_kv_heads, kv_dtype, device))
    kv_shape = (2, num_blocks, config.block_size, num_kv_heads, arch.head_dim)
    kv_caches = [torch.zeros(kv_shape, dtype=kv_dtype, device=device) for _ in range(arch.num_hidden_layers)]
    logger.info("rank %d of %d ready: %d KV heads, %d KV blocks", rank, size, num_kv_heads, num_blocks)
    channel = CommandChannel(device, loaded.dtype, arch.hidden_size, [pipe])
    with torch.inference_mode():
        while True:
            header = channel.receive_header()
            command = Command(header[0])
            if command == Command.STEP:
                input_ids, positions, meta, embeds = channel.receive_step(header)
                model(input_ids, positions, kv_caches, meta, inputs_embeds=embeds)
            elif command == Command.LOGITS:
                model.compute_logits(channel.receive_rows(header))
            elif command == Command.EMBED:
                model.embed_input_ids(channel.receive_ids(header))
            elif command == Command.COPY:
                apply_block_copies(kv_caches, channel.receive_copies(header).tolist())
            else:
                break
    torch.distributed.destroy_process_group()
