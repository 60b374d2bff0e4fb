"""The engine for `--task embed`: batches whole prompts under the token budget, encodes them with a
BERT encoder in one step each (no KV cache), pools and normalizes, and answers with the vectors.

`EmbeddingStepper` implements the same `Stepper` protocol as `EngineStepper`, so EngineCore drives either.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.config import EngineConfig
from engine.loader.encoder_folder import LoadedEncoder, PoolingConfig, load_encoder
from engine.request_intake import MAX_REQUEST_ID_CHARS
from engine.step_protocol import Stepper, error_delta
from protocol.messages import AddRequest, FinishReason, Ready, RequestDelta, SchedulerStats

logger = logging.getLogger(__name__)


@dataclass
class EmbeddingParts:
    encoder: LoadedEncoder
    ready: Ready
    device: torch.device
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int


def build_embedding_parts(config: EngineConfig) -> EmbeddingParts:
    from engine.engine_setup import pick_device, ready_message

    if config.tensor_parallel_size > 1:  # the encoder has no sharded layers
        raise ValueError("--tensor-parallel-size applies to text generation only, not --task embed")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = pick_device(config.device)
    encoder = load_encoder(config.model, dtype=config.dtype, device=str(device))
    cfg, tok = encoder.config, encoder.tokenizer
    limits = [cfg.max_position_embeddings, encoder.pooling.max_seq_length, config.max_model_len]
    max_model_len = min(n for n in limits if n)
    ready = ready_message(
        config,
        tok,
        default_served_name=encoder.served_name,
        max_model_len=max_model_len,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        dtype=encoder.dtype,
        num_kv_blocks=0,
        embedding_dimensions=cfg.hidden_size,
        matryoshka_dimensions=encoder.pooling.matryoshka_dimensions,
    )
    logger.info(
        "embedding model %s: %d layers, hidden %d, %s pooling%s, max_model_len %d",
        encoder.served_name,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        encoder.pooling.mode,
        " + normalize" if encoder.pooling.normalize else "",
        max_model_len,
    )
    return EmbeddingParts(
        encoder=encoder,
        ready=ready,
        device=device,
        max_model_len=max_model_len,
        max_num_batched_tokens=max(config.max_num_batched_tokens, max_model_len),
        max_num_seqs=config.max_num_seqs,
    )


def pool(hidden: torch.Tensor, seq_lens: list[int], pooling: PoolingConfig) -> torch.Tensor:
    """Last hidden states of a flat batch [T, H] -> one float32 vector per sequence [B, H]."""
    hidden = hidden.float()
    lens = torch.tensor(seq_lens, device=hidden.device)
    ends = lens.cumsum(0)
    starts = ends - lens
    if pooling.mode == "cls":
        pooled = hidden[starts]
    elif pooling.mode == "lasttoken":
        pooled = hidden[ends - 1]
    elif pooling.mode == "max":
        pooled = torch.stack([chunk.max(dim=0).values for chunk in hidden.split(seq_lens)])
    else:
        seq_index = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), lens)
        sums = torch.zeros(len(seq_lens), hidden.shape[1], device=hidden.device).index_add_(
            0, seq_index, hidden
        )
        divisor = lens.float().sqrt() if pooling.mode == "mean_sqrt_len" else lens.float()
        pooled = sums / divisor[:, None]
    if pooling.normalize:
        pooled = F.normalize(pooled, p=2.0, dim=-1)
    return pooled


@dataclass
class _Pending:
    request_id: str
    client_id: bytes
    token_ids: list[int]


class EmbeddingStepper(Stepper):
    def __init__(self, parts: EmbeddingParts, *, max_waiting_requests: int | None = None) -> None:
        self.parts = parts
        self.max_waiting_requests = max_waiting_requests
        self.waiting: deque[_Pending] = deque()
        self.owner: dict[str, bytes] = {}
        self.step_count = 0
        self.max_step_num_seqs = 0
        self.last_step_num_seqs = 0
        self.last_step_num_tokens = 0
        self.last_step_had_work = False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting)

    def _rejection(self, message: AddRequest) -> str | None:
        ids = message.prompt_token_ids
        vocab_size = self.parts.encoder.config.vocab_size
        if not message.request_id or len(message.request_id) > MAX_REQUEST_ID_CHARS:
            return f"the request id must have 1 to {MAX_REQUEST_ID_CHARS} characters"
        if not message.embed_task:
            return "this engine serves an embedding model (--task embed); it cannot generate text"
        if message.embeds:
            return "prompt embeddings are not supported by embedding models"
        if not ids:
            return "the prompt is empty"
        if min(ids) < 0 or max(ids) >= vocab_size:
            return f"prompt token ids must be in [0, {vocab_size})"
        if len(ids) > self.parts.max_model_len:
            return f"the input has {len(ids)} tokens; this model takes at most {self.parts.max_model_len}"
        return None

    def add(self, message: AddRequest, client_id: bytes, frames: list[bytes]) -> RequestDelta | None:
        limit = self.max_waiting_requests
        if limit is not None and len(self.waiting) >= limit:
            return error_delta(message.request_id, "the engine's waiting queue is full", 503)
        if message.request_id in self.owner:
            return error_delta(
                message.request_id, f"request id {message.request_id!r} is already running", 400
            )
        reason = self._rejection(message)
        if reason is not None:
            return error_delta(message.request_id, reason, 400)
        self.owner[message.request_id] = client_id
        self.waiting.append(_Pending(message.request_id, client_id, list(message.prompt_token_ids)))
        return None

    def abort(self, request_ids: Iterable[str]) -> None:
        gone = set(request_ids)
        self.waiting = deque(p for p in self.waiting if p.request_id not in gone)
        for request_id in gone:
            self.owner.pop(request_id, None)

    def abort_client(self, client_id: bytes) -> int:
        orphans = [rid for rid, owner in self.owner.items() if owner == client_id]
        self.abort(orphans)
        return len(orphans)

    def _take_batch(self) -> list[_Pending]:
        """FCFS under the token budget and the sequence cap; the first request always fits."""
        batch: list[_Pending] = []
        num_tokens = 0
        while self.waiting and len(batch) < self.parts.max_num_seqs:
            n = len(self.waiting[0].token_ids)
            if batch and num_tokens + n > self.parts.max_num_batched_tokens:
                break
            batch.append(self.waiting.popleft())
            num_tokens += n
        return batch

    def step(self) -> list[tuple[bytes, RequestDelta]]:
        batch = self._take_batch()
        self.last_step_had_work = bool(batch)
        if not batch:
            return []
        seq_lens = [len(p.token_ids) for p in batch]
        self.step_count += 1
        self.last_step_num_seqs = len(batch)
        self.last_step_num_tokens = sum(seq_lens)
        self.max_step_num_seqs = max(self.max_step_num_seqs, len(batch))
        try:
            vectors = self._encode(batch, seq_lens)
        except Exception:
            logger.exception("embedding step failed; failing the %d requests in it", len(batch))
            return self._finish_all(batch, None, "The engine failed while embedding this input.")
        return self._finish_all(batch, vectors, None)

    def fail_all(self) -> list[tuple[bytes, RequestDelta]]:
        """Last resort after an engine bug outside the model call: the queued inputs end with an error."""
        batch, self.waiting = list(self.waiting), deque()
        return self._finish_all(batch, None, "The engine failed while embedding this input.")

    @torch.inference_mode()
    def _encode(self, batch: list[_Pending], seq_lens: list[int]) -> list[list[float]]:
        flat = [t for p in batch for t in p.token_ids]
        input_ids = torch.tensor(flat, dtype=torch.int64, device=self.parts.device)  # [T]
        hidden = self.parts.encoder.model(input_ids, seq_lens)  # [T, H]
        return pool(hidden, seq_lens, self.parts.encoder.pooling).cpu().tolist()

    def _finish_all(
        self, batch: list[_Pending], vectors: list[list[float]] | None, error: str | None
    ) -> list[tuple[bytes, RequestDelta]]:
        deltas = []
        for index, pending in enumerate(batch):
            self.owner.pop(pending.request_id, None)
            if vectors is None:
                delta = error_delta(pending.request_id, error or "embedding failed", 500)
            else:
                delta = RequestDelta(
                    pending.request_id,
                    [],
                    finish_reason=FinishReason.STOP,
                    embedding=vectors[index],
                    num_prompt_tokens=len(pending.token_ids),
                )
            deltas.append((pending.client_id, delta))
        return deltas

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=0,
            num_waiting=len(self.waiting),
            kv_cache_usage=0.0,
            step=self.step_count,
            num_scheduled_seqs=self.last_step_num_seqs,
            num_scheduled_tokens=self.last_step_num_tokens,
            max_step_num_seqs=self.max_step_num_seqs,
        )
