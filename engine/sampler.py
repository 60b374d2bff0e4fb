"""Token sampling for one step: logit processors, then greedy or random sampling per row; logprobs.

The order follows vLLM's sampler, so a request gives what users of vLLM expect: allowed-token mask,
min_tokens (stop ids masked), logit bias, penalties; then, for random rows only, temperature, min_p,
top_k and top_p on the temperature-scaled distribution. Logprobs are the model's raw distribution
(log_softmax of the logits before any processor), as vLLM's default `raw_logprobs` mode returns.

Random sampling uses the exponential-noise trick (argmax of probs / Exp(1) noise) so no host sync is
needed until the caller reads the chosen ids. Seeded requests draw their noise from their own
torch.Generator, so a seed gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request

_MAX_TOP_LOGPROBS = 20
# Temperatures below this are greedy (vLLM's epsilon): dividing by them only overflows.
_SAMPLING_EPS = 1e-5

# (logprob of the token, its rank in the distribution (1 = most likely), top ids, top logprobs)
LogprobRow = tuple[float, int, list[int], list[float]]


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[LogprobRow | None]  # per row, when the request asked for logprobs


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        # request_id -> prompt logprobs gathered so far (index = prompt position; position 0 is None)
        self.prompt_logprobs: dict[str, list[LogprobRow | None]] = {}

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        self.prompt_logprobs.pop(request_id, None)

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

    def sample(
        self, logits: torch.Tensor, requests: list[Request], masks: torch.Tensor | None = None
    ) -> SampleResult:
        """logits [N, V] float32, one row per request; masks [N, V] bool of allowed tokens (structured output)."""
        logits = logits[:, : self.vocab_size].float()
        raw_logprobs = None
        if any(r.sampling.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_processors(logits.clone(), requests)
        if masks is not None:
            logits = logits.masked_fill(~masks[:, : self.vocab_size], float("-inf"))
        token_ids = self._choose(logits, requests)
        chosen = token_ids.tolist()
        logprob_rows: list[LogprobRow | None] = [None] * len(requests)
        if raw_logprobs is not None:
            logprob_rows = self._gather_logprobs(raw_logprobs, token_ids, requests)
        return SampleResult(chosen, logprob_rows)

    def _apply_processors(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        for row, request in enumerate(requests):
            s = request.sampling
            if s.allowed_token_ids:
                keep = torch.full_like(logits[row], float("-inf"))
                keep[torch.tensor(s.allowed_token_ids, device=self.device)] = 0.0
                logits[row] += keep
            if request.num_output_tokens < s.min_tokens:
                # Neither EOS nor a stop token id may end the output before min_tokens.
                stop_ids = list(s.stop_token_ids) + ([] if s.ignore_eos else list(request.eos_token_ids))
                stop_ids = [t for t in stop_ids if t < self.vocab_size]
                if stop_ids:
                    logits[row, torch.tensor(stop_ids, device=self.device)] = float("-inf")
            if s.logit_bias:
                ids = torch.tensor(list(s.logit_bias.keys()), device=self.device)
                vals = torch.tensor(list(s.logit_bias.values()), dtype=logits.dtype, device=self.device)
                logits[row].index_add_(0, ids, vals)
            if s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
                _apply_penalties(logits[row], request, self.device)
        return logits

    def _choose(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(requests) if _is_random(r)]
        if not random_rows:
            return greedy
        rows = torch.tensor(random_rows, device=self.device)
        sub = logits[rows]
        temps = torch.tensor([requests[i].sampling.temperature for i in random_rows], device=self.device)
        sub = sub / temps.unsqueeze(1)
        sub = _min_p_top_k_top_p(sub, [requests[i] for i in random_rows])
        probs = torch.softmax(sub, dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(random_rows) if requests[i].sampling.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=self.device).exponential_()
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

    def _gather_logprobs(
        self, logprobs: torch.Tensor, token_ids: torch.Tensor, requests: list[Request]
    ) -> list[LogprobRow | None]:
        k = min(max((r.sampling.logprobs or 0) for r in requests), _MAX_TOP_LOGPROBS)
        table = _logprob_table(logprobs, token_ids, k)
        return [
            _cut(row, request.sampling.logprobs) if request.sampling.logprobs is not None else None
            for row, request in zip(table, requests, strict=True)
        ]

    # -- prompt logprobs -------------------------------------------------------------------------------
    def add_prompt_logprobs(self, request: Request, logits: torch.Tensor, start: int) -> None:
        """logits [n, V] computed at prompt positions start..start+n-1, each predicting the next prompt token.

        A request recomputed from position 0 (preempted mid-prompt) starts its list again.
        """
        k = min(request.sampling.prompt_logprobs or 0, _MAX_TOP_LOGPROBS)
        rows = self.prompt_logprobs.get(request.request_id)
        if rows is None or start == 0:
            rows = self.prompt_logprobs[request.request_id] = [None]
        num = logits.shape[0]
        targets = torch.tensor(
            request.prompt_token_ids[start + 1 : start + 1 + num], dtype=torch.long, device=logits.device
        )
        logprobs = torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)
        del rows[start + 1 :]
        rows.extend(_logprob_table(logprobs, targets, k))

    def take_prompt_logprobs(self, request_id: str) -> list[LogprobRow | None] | None:
        return self.prompt_logprobs.pop(request_id, None)


def _is_random(request: Request) -> bool:
    s = request.sampling
    return s.temperature >= _SAMPLING_EPS and s.top_k != 1


def _logprob_table(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[LogprobRow]:
    """Per row of logprobs [N, V]: the logprob and rank of token_ids[row], and the top k."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
    chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
    if k > 0:
        top_vals, top_ids = logprobs.topk(k, dim=-1)
        vals_l, ids_l = top_vals.tolist(), top_ids.tolist()
    else:
        vals_l = ids_l = [[] for _ in chosen_l]
    return [(c, r, i, v) for c, r, i, v in zip(chosen_l, ranks_l, ids_l, vals_l, strict=True)]


def _cut(row: LogprobRow, k: int) -> LogprobRow:
    return (row[0], row[1], row[2][:k], row[3][:k])


def _apply_penalties(row: torch.Tensor, request: Request, device: torch.device) -> None:
    """Repetition penalty over prompt and output tokens; presence and frequency over output tokens only."""
    s = request.sampling
    vocab = row.shape[0]
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(
            sorted(t for t in set(request.all_token_ids) if t < vocab), device=device, dtype=torch.long
        )
        if seen.numel():
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if (s.presence_penalty or s.frequency_penalty) and request.output_token_ids:
        ids = torch.tensor(request.output_token_ids, device=device, dtype=torch.long)
        counts = torch.bincount(ids, minlength=vocab)[:vocab].to(row.dtype)
        row -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(row.dtype)


def _min_p_top_k_top_p(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
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
    mps = torch.tensor(min_ps, device=logits.device, dtype=probs.dtype).unsqueeze(1)
    remove = probs < mps * probs[:, :1]
    ks = torch.tensor([min(k, vocab) if k else vocab for k in top_ks], device=logits.device)
    remove |= torch.arange(vocab, device=logits.device).unsqueeze(0) >= ks.unsqueeze(1)
    kept = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    ps = torch.tensor(top_ps, device=logits.device, dtype=probs.dtype).unsqueeze(1)
    # Drop a token when the mass before it already reaches top_p (the top token always stays).
    remove |= (kept.cumsum(dim=-1) - kept) >= ps
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)
