"""Token sampling for one step: logit processors, then greedy or random sampling per row; logprobs.

The processors give what users of vLLM expect: allowed-token mask, logit bias, penalties, the
structured-output mask and min_tokens (stop ids masked; applied last, which changes nothing since -inf
commutes with the others, except that it yields where it would forbid every token); then, for random
rows only, temperature, min_p, top_k and top_p on the temperature-scaled distribution. Logprobs are the model's raw distribution
(log_softmax of the logits before any processor), as vLLM's default `raw_logprobs` mode returns.

Random sampling uses the exponential-noise trick (argmax of probs / Exp(1) noise), per-request values
reach the device through pinned memory, and the chosen ids and logprobs are registered with the step's
DeviceReadback: nothing here waits for the device; the step reads everything back once. Seeded
requests draw their noise from their own torch.Generator, so a seed gives the same tokens whatever
else shares the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from engine.readback import DeviceReadback, tensor_to_device, to_device
from engine.request import Request
from engine.step_output import LogprobRow

# Host list (+ dtype, default int64) -> device tensor, without waiting for the device.
_ToDevice = Callable[..., torch.Tensor]

# Temperatures below this are greedy (vLLM's epsilon): dividing by them only overflows.
_SAMPLING_EPS = 1e-5


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[LogprobRow | None]  # per row, when the request asked for logprobs


@dataclass
class TokenBitmask:
    """Allowed tokens of the constrained requests of a step: bit t of row i = token t allowed."""

    request_ids: list[str]
    words: np.ndarray  # int32 [len(request_ids), ceil(V / 32)]


@dataclass
class PendingSample:
    """A step's sampling, queued on the device; its values arrive with the step's one readback."""

    requests: list[Request]
    ids_slot: int
    table_slot: int | None  # [N, 2 + 2k] logprob table, when a request asked for logprobs
    k: int


@dataclass
class PendingPromptLogprobs:
    """Prompt logprobs queued on the device: rows for positions start + 1 .. start + n."""

    start: int
    slot: int
    k: int


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        # Unseeded requests draw from the sampler's own generator (--seed), never torch's global one,
        # which model loading and anything else in the process may reseed or consume.
        self.unseeded_generator = torch.Generator(device=device)
        self.unseeded_generator.manual_seed(seed)
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drops the generators of requests that ended (the plan lists them); the only state kept
        across steps, since a seeded request's noise must continue its own sequence."""
        for request_id in request_ids:
            self.generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling.seed
        if seed is None:
            return None
        gen = self.generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self.generators[request.request_id] = gen
        return gen

    def _tensor(self, values: list[int] | list[float], dtype: torch.dtype = torch.long) -> torch.Tensor:
        return to_device(values, dtype, self.device)

    def sample(
        self, logits: torch.Tensor, requests: list[Request], bitmask: TokenBitmask | None = None
    ) -> SampleResult:
        """enqueue + the readback + result, for callers that sample on their own."""
        readback = DeviceReadback()
        pending = self.enqueue(logits, requests, readback, bitmask)
        readback.fetch()
        return self.result(pending, readback)

    def enqueue(
        self,
        logits: torch.Tensor,
        requests: list[Request],
        readback: DeviceReadback,
        bitmask: TokenBitmask | None = None,
    ) -> PendingSample:
        """Queues the sampling of logits [N, V] (one row per request) without reading anything back."""
        logits = logits[:, : self.vocab_size].float()
        raw_logprobs = None
        if any(r.sampling.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_processors(logits.clone(), requests)
        if bitmask is not None:
            self._apply_bitmask(logits, requests, bitmask)
        logits = self._ban_early_stops(logits, requests)
        token_ids = self._choose(logits, requests)
        pending = PendingSample(requests, readback.add(token_ids), None, 0)
        if raw_logprobs is not None:
            # The frontend bounds requests by --max-logprobs (up to the whole vocabulary); only the
            # vocabulary bounds topk here.
            pending.k = min(max((r.sampling.logprobs or 0) for r in requests), self.vocab_size)
            pending.table_slot = readback.add(_logprob_table(raw_logprobs, token_ids, pending.k))
        return pending

    def result(self, pending: PendingSample, readback: DeviceReadback) -> SampleResult:
        """The sampled ids and logprobs, once the readback has been fetched."""
        chosen = readback.get(pending.ids_slot).astype(np.int64).tolist()
        logprob_rows: list[LogprobRow | None] = [None] * len(pending.requests)
        if pending.table_slot is not None:
            table = _rows_from_table(readback.get(pending.table_slot), pending.k)
            logprob_rows = [
                _cut(row, r.sampling.logprobs) if r.sampling.logprobs is not None else None
                for row, r in zip(table, pending.requests, strict=True)
            ]
        return SampleResult(chosen, logprob_rows)

    def _apply_bitmask(self, logits: torch.Tensor, requests: list[Request], bitmask: TokenBitmask) -> None:
        row_of = {r.request_id: i for i, r in enumerate(requests)}
        rows = [row_of[rid] for rid in bitmask.request_ids]
        words = tensor_to_device(torch.from_numpy(bitmask.words), self.device)  # [B, W]
        allowed = ((words.unsqueeze(-1) >> self._shifts) & 1).bool().view(len(rows), -1)  # [B, 32 W]
        vocab = logits.shape[1]
        if allowed.shape[1] < vocab:  # tokens the grammar's tokenizer does not know are never allowed
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
        index = self._tensor(rows)
        logits[index] = logits[index].masked_fill(~allowed[:, :vocab], float("-inf"))

    def _apply_processors(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        for row, request in enumerate(requests):
            s = request.sampling
            if s.allowed_token_ids:
                keep = torch.full_like(logits[row], float("-inf"))
                keep[self._tensor(list(s.allowed_token_ids))] = 0.0
                logits[row] += keep
            if s.logit_bias:
                ids = self._tensor(list(s.logit_bias.keys()))
                vals = self._tensor(list(s.logit_bias.values()), logits.dtype)
                logits[row].index_add_(0, ids, vals)
            if s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
                _apply_penalties(logits[row], request, self._tensor)
        return logits

    def _ban_early_stops(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """min_tokens: neither EOS nor a stop token id may end the output early. Applied last (the -inf
        commutes with every other processor) so it can yield where it would leave no token at all: a
        grammar that is complete allows only EOS, and then the grammar wins, without a host check."""
        rows: list[int] = []
        ids: list[int] = []
        for row, request in enumerate(requests):
            s = request.sampling
            if request.num_output_tokens < s.min_tokens:
                stop_ids = list(s.stop_token_ids) + ([] if s.ignore_eos else list(request.eos_token_ids))
                stop_ids = [t for t in set(stop_ids) if t < self.vocab_size]
                rows += [row] * len(stop_ids)
                ids += stop_ids
        if not ids:
            return logits
        minus_inf = torch.full((len(ids),), float("-inf"), device=logits.device)
        banned = logits.index_put((self._tensor(rows), self._tensor(ids)), minus_inf)
        nothing_left = torch.isneginf(banned).all(dim=-1, keepdim=True)
        return torch.where(nothing_left, logits, banned)

    def _choose(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(requests) if _is_random(r)]
        if not random_rows:
            return greedy
        rows = self._tensor(random_rows)
        sub = logits[rows]
        temps = self._tensor([requests[i].sampling.temperature for i in random_rows], logits.dtype)
        sub = sub / temps.unsqueeze(1)
        sub = _min_p_top_k_top_p(sub, [requests[i] for i in random_rows], self._tensor)
        probs = torch.softmax(sub, dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(random_rows) if requests[i].sampling.seed is None]
        if unseeded:
            noise[self._tensor(unseeded)] = torch.empty(
                len(unseeded), probs.shape[1], device=self.device
            ).exponential_(generator=self.unseeded_generator)
        for j, i in enumerate(random_rows):
            gen = self._generator(requests[i])
            if gen is not None:
                # One full-vocabulary draw per step from the request's own generator: the same
                # noise whatever batch the request shares.
                noise[j].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        result = greedy.clone()
        result[rows] = sampled
        return result

    # -- prompt logprobs -------------------------------------------------------------------------------
    def enqueue_prompt_logprobs(
        self, request: Request, logits: torch.Tensor, start: int, readback: DeviceReadback
    ) -> PendingPromptLogprobs:
        """Queues the logprobs of logits [n, V], computed at prompt positions start..start+n-1, each
        predicting the next prompt token; prompt_logprob_rows() reads them after the readback."""
        k = min(request.sampling.prompt_logprobs or 0, self.vocab_size)
        num = logits.shape[0]
        targets = self._tensor(request.prompt_token_ids[start + 1 : start + 1 + num])
        logprobs = torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)
        return PendingPromptLogprobs(start, readback.add(_logprob_table(logprobs, targets, k)), k)

    @staticmethod
    def prompt_logprob_rows(pending: PendingPromptLogprobs, readback: DeviceReadback) -> list[LogprobRow]:
        return _rows_from_table(readback.get(pending.slot), pending.k)


def _is_random(request: Request) -> bool:
    s = request.sampling
    return s.temperature >= _SAMPLING_EPS and s.top_k != 1


def _logprob_table(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of logprobs [N, V], on the device: [logprob of token_ids[row], its rank, top k ids, top k
    logprobs] as float32 [N, 2 + 2k] (ids and ranks stay exact: vocabularies are far below 2**24)."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [N, 1]
    ranks = (logprobs > chosen).sum(dim=1, keepdim=True) + 1  # [N, 1]
    parts = [chosen, ranks.to(logprobs.dtype)]
    if k > 0:
        top_vals, top_ids = logprobs.topk(k, dim=-1)
        parts += [top_ids.to(logprobs.dtype), top_vals]
    return torch.cat(parts, dim=1)


def _rows_from_table(table: np.ndarray, k: int) -> list[LogprobRow]:
    """Host rows from a read-back _logprob_table."""
    rows: list[LogprobRow] = []
    for line in table:
        top_ids = line[2 : 2 + k].astype(np.int64).tolist()
        top_vals = line[2 + k : 2 + 2 * k].astype(np.float32).tolist()
        rows.append((float(line[0]), int(line[1]), top_ids, top_vals))
    return rows


def _cut(row: LogprobRow, k: int) -> LogprobRow:
    return (row[0], row[1], row[2][:k], row[3][:k])


def _apply_penalties(row: torch.Tensor, request: Request, as_tensor: _ToDevice) -> None:
    """Repetition penalty over prompt and output tokens; presence and frequency over output tokens only."""
    s = request.sampling
    vocab = row.shape[0]
    if s.repetition_penalty != 1.0:
        seen_ids = sorted(t for t in set(request.all_token_ids) if t < vocab)
        if seen_ids:
            seen = as_tensor(seen_ids)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    output_ids = [t for t in request.output_token_ids if t < vocab]
    if (s.presence_penalty or s.frequency_penalty) and output_ids:
        ids = as_tensor(output_ids)
        # index_add_ rather than bincount: bincount sizes its output from the data, a host read on a GPU.
        counts = torch.zeros_like(row).index_add_(0, ids, torch.ones(len(output_ids), device=row.device))
        row -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(row.dtype)


def _min_p_top_k_top_p(logits: torch.Tensor, requests: list[Request], as_tensor: _ToDevice) -> torch.Tensor:
    """logits [N, V] already divided by temperature; cuts each row to its kept set.

    min_p is relative to the most likely token's probability; top_k keeps the k most likely; top_p
    keeps the smallest set whose mass reaches p, measured after the min_p and top_k cuts (vLLM's order).
    """
    top_ks = [r.sampling.top_k for r in requests]
    top_ps = [r.sampling.top_p for r in requests]
    min_ps = [r.sampling.min_p for r in requests]
    if all(k is None for k in top_ks) and all(p >= 1.0 for p in top_ps) and all(m <= 0 for m in min_ps):
        return logits
    vocab = logits.shape[1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mps = as_tensor(min_ps, probs.dtype).unsqueeze(1)
    remove = probs < mps * probs[:, :1]
    ks = as_tensor([min(k, vocab) if k else vocab for k in top_ks])
    remove |= torch.arange(vocab, device=logits.device).unsqueeze(0) >= ks.unsqueeze(1)
    kept = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    ps = as_tensor(top_ps, probs.dtype).unsqueeze(1)
    # Drop a token when the mass before it already reaches top_p (the top token always stays).
    remove |= (kept.cumsum(dim=-1) - kept) >= ps
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)
