"""Token sampling for one step: penalties, biases and masks, then greedy or random sampling per row.

Random sampling uses the exponential-noise trick (argmax of probs / Exp(1) noise) so no host sync is
needed until the caller reads the chosen ids. Seeded requests draw their noise from their own
torch.Generator, so a seed gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request

_MAX_TOP_LOGPROBS = 20


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: (sampled logprob, rank, top ids, top logprobs) when the request asked for logprobs.
    logprobs: list[tuple[float, int, list[int], list[float]] | None]


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
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

    def sample(self, logits: torch.Tensor, requests: list[Request], masks: torch.Tensor | None = None) -> SampleResult:
        """logits [N, V] float32, one row per request; masks [N, V] bool of allowed tokens (structured output)."""
        logits = logits[:, : self.vocab_size]
        raw_logprobs = None
        if any(r.sampling.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_processors(logits.clone(), requests)
        if masks is not None:
            logits = logits.masked_fill(~masks, float("-inf"))
        token_ids = self._choose(logits, requests)
        chosen = token_ids.tolist()
        logprob_rows: list[tuple[float, int, list[int], list[float]] | None] = [None] * len(requests)
        if raw_logprobs is not None:
            logprob_rows = self._gather_logprobs(raw_logprobs, token_ids, requests)
        return SampleResult(chosen, logprob_rows)

    def _apply_processors(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        for row, request in enumerate(requests):
            s = request.sampling
            if s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
                _apply_penalties(logits[row], request, self.device)
            if s.logit_bias:
                ids = torch.tensor(list(s.logit_bias.keys()), device=self.device)
                vals = torch.tensor(list(s.logit_bias.values()), dtype=logits.dtype, device=self.device)
                logits[row].index_add_(0, ids, vals)
            if s.allowed_token_ids:
                keep = torch.full_like(logits[row], float("-inf"))
                ids = torch.tensor(s.allowed_token_ids, device=self.device)
                keep[ids] = 0.0
                logits[row] += keep
            if request.num_output_tokens < s.min_tokens:
                stop_ids = list(s.stop_token_ids) + ([] if s.ignore_eos else list(request.eos_token_ids))
                if stop_ids:
                    logits[row, torch.tensor(stop_ids, device=self.device)] = float("-inf")
        return logits

    def _choose(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(requests) if r.sampling.temperature > 0 and r.sampling.top_k != 1]
        if not random_rows:
            return greedy
        rows = torch.tensor(random_rows, device=self.device)
        sub = logits[rows]
        temps = torch.tensor([requests[i].sampling.temperature for i in random_rows], device=self.device)
        sub = sub / temps.unsqueeze(1)
        sub = _top_k_top_p_min_p(sub, [requests[i] for i in random_rows])
        probs = torch.softmax(sub, dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(random_rows) if requests[i].sampling.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=self.device).exponential_()
        for j, i in enumerate(random_rows):
            gen = self._generator(requests[i])
            if gen is not None:
                noise[j].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        result = greedy.clone()
        result[rows] = sampled
        return result

    def _gather_logprobs(
        self, logprobs: torch.Tensor, token_ids: torch.Tensor, requests: list[Request]
    ) -> list[tuple[float, int, list[int], list[float]] | None]:
        k = max((r.sampling.logprobs or 0) for r in requests)
        k = min(k, _MAX_TOP_LOGPROBS)
        chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
        top_vals, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (None, None)
        chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
        top_vals_l = top_vals.tolist() if top_vals is not None else None
        top_ids_l = top_ids.tolist() if top_ids is not None else None
        rows: list[tuple[float, int, list[int], list[float]] | None] = []
        for i, request in enumerate(requests):
            n = request.sampling.logprobs
            if n is None:
                rows.append(None)
                continue
            ids = top_ids_l[i][:n] if top_ids_l else []
            vals = top_vals_l[i][:n] if top_vals_l else []
            rows.append((chosen_l[i], ranks_l[i], ids, vals))
        return rows


def _apply_penalties(row: torch.Tensor, request: Request, device: torch.device) -> None:
    s = request.sampling
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.all_token_ids)), device=device, dtype=torch.long)
        if seen.numel():
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if (s.presence_penalty or s.frequency_penalty) and request.output_token_ids:
        ids = torch.tensor(request.output_token_ids, device=device, dtype=torch.long)
        counts = torch.bincount(ids, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
        row -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(row.dtype)


def _top_k_top_p_min_p(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """logits [N, V] already divided by temperature; cuts to the kept set per row."""
    top_ks = [r.sampling.top_k for r in requests]
    top_ps = [r.sampling.top_p for r in requests]
    min_ps = [r.sampling.min_p for r in requests]
    if all(k is None for k in top_ks) and all(p >= 1.0 for p in top_ps) and all(m <= 0 for m in min_ps):
        return logits
    vocab = logits.shape[1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ks = torch.tensor([min(k, vocab) if k else vocab for k in top_ks], device=logits.device)
    positions = torch.arange(vocab, device=logits.device).unsqueeze(0)
    remove = positions >= ks.unsqueeze(1)
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    ps = torch.tensor(top_ps, device=logits.device, dtype=probs.dtype).unsqueeze(1)
    # Drop a token when the mass before it already reaches top_p (the top token always stays).
    remove |= (probs.cumsum(dim=-1) - probs) >= ps
    mps = torch.tensor(min_ps, device=logits.device, dtype=probs.dtype).unsqueeze(1)
    remove |= probs < mps * probs[:, :1]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)
