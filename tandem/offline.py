"""The offline batch API: `LLM` runs prompts through an in-process engine, no server or sockets.

It drives the same `EngineStepper` as the ZeroMQ engine core and post-processes with the same frontend
code as the HTTP server (tokenizer, chat template, sampling-parameter checks, detokenizer, stop
strings), so at temperature 0 it answers exactly what `tandem serve` answers for the same prompt.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from frontend.errors import APIError
from frontend.sampling_params import check_prompt_token_ids
from frontend.serving.chat_template import ChatTemplateError, normalize_messages
from frontend.serving.detokenizer import token_text
from frontend.serving.input_processor import ChoiceJob, PreparedPrompt
from frontend.serving.model_context import ModelContext
from frontend.serving.output import output_factory
from frontend.serving.tool_parsers import TOOL_PARSERS
from frontend.serving.tools import ToolPlan, ToolSettings, parse_tool_output, plan_tool_choice
from protocol.messages import AddRequest, RequestDelta, StructuredSpec, TokenLogprob, WireSamplingParams
from tandem.offline_params import (
    CompletionOutput,
    EmbeddingOutput,
    Logprob,
    PositionLogprobs,
    RequestOutput,
    SamplingParams,
)

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.step_protocol import Stepper

_CLIENT = b"offline"
Prompt = str | list[int]
Conversation = list[dict[str, Any]]


class LLM:
    """A model loaded in this process. `LLM()` loads the default model (SmolLM2-135M-Instruct).

    Engine options are `EngineConfig` fields, as on the command line: `dtype`, `max_model_len`,
    `max_num_seqs`, `max_num_batched_tokens`, `enable_prefix_caching`, `kv_cache_memory` (bytes, or a
    string such as "512M"), `seed`, `task` ("generate" or "embed"), `device`, `num_threads`, ...
    `tool_call_parser` ("hermes" or "json") is the server's `--tool-call-parser` (with
    `--enable-auto-tool-choice`): `chat` with tool_choice "auto" parses the model's calls with it.
    """

    def __init__(
        self, model: str | None = None, *, tool_call_parser: str | None = None, **engine_options: Any
    ) -> None:
        if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
            raise ValueError(
                f"unknown tool_call_parser {tool_call_parser!r}; known: {', '.join(sorted(TOOL_PARSERS))}"
            )
        self.tool_call_parser = tool_call_parser
        self.config = engine_config(model, engine_options)
        # torch and the engine are imported only when a model is loaded; the same choice as EngineCore's.
        if self.config.task == "embed":
            from engine.embedding_runner import EmbeddingStepper, build_embedding_parts

            embed_parts = build_embedding_parts(self.config)
            self.stepper: Stepper = EmbeddingStepper(embed_parts)
            ready = embed_parts.ready
        else:
            from engine.engine_setup import build_engine_parts
            from engine.stepper import EngineStepper

            parts = build_engine_parts(self.config)
            self.stepper = EngineStepper(parts)
            ready = parts.ready
        self.ctx = ModelContext.from_ready(ready)
        self._ids = itertools.count()

    @property
    def model_name(self) -> str:
        return self.ctx.model_name

    def get_tokenizer(self):  # noqa: ANN201 - a tokenizers.Tokenizer
        return self.ctx.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate/chat use when given no sampling_params: SamplingParams' defaults, with the model's
        generation_config.json values over them (see `generation_config`, as on the server)."""
        params = SamplingParams()
        for name, value in self.ctx.ready.default_sampling.items():
            if name == "max_tokens":
                params.max_tokens = None  # all the room, which the model's max_new_tokens then caps
            else:
                setattr(params, name, int(value) if name == "top_k" else value)
        return params

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Completes each prompt (text, or token ids); outputs come back in input order."""
        items = _prompt_list(prompts)
        prepared = [self._prepare_prompt(p) for p in items]
        params = _params_list(sampling_params, len(prepared), self.get_default_sampling_params)
        return self._run(prepared, params, use_tqdm, "Generating")

    def chat(
        self,
        conversations: Conversation | list[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Renders each conversation with the model's chat template and completes it; with `tools`,
        `tool_choice` works as on /v1/chat/completions (each output's `content` and `tool_calls`)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        plan = self._tool_plan(tools, tool_choice, parallel_tool_calls)
        prepared = []
        for conversation in conversations:
            text = self._render_chat(
                conversation,  # type: ignore[arg-type]
                tools,
                add_generation_prompt,
                continue_final_message,
                chat_template_kwargs or {},
            )
            prepared.append(PreparedPrompt(self.ctx.encode(text, add_special_tokens=False), text))
        params = _params_list(sampling_params, len(prepared), self.get_default_sampling_params)
        outputs = self._run(prepared, params, use_tqdm, "Chatting", plan.structured if plan else None)
        for record in outputs:
            for out in record.outputs:
                parsed = parse_tool_output(out.text, out.finish_reason, plan)
                out.content, out.tool_calls = parsed.content, parsed.tool_calls
                out.finish_reason = parsed.finish_reason
        return outputs

    def embed(self, texts: str | list[str], use_tqdm: bool = True) -> list[EmbeddingOutput]:
        """Pooled, normalized embeddings; needs an embedding model loaded with `task="embed"`
        (`LLM(task="embed")` loads the default one, all-MiniLM-L6-v2)."""
        if self.ctx.ready.task != "embed":
            raise ValueError(
                "this LLM generates text; load an embedding model with LLM(MODEL, task='embed') to embed"
            )
        items = [texts] if isinstance(texts, str) else list(texts)
        outputs: list[EmbeddingOutput] = []
        jobs: dict[str, tuple[int, PreparedPrompt]] = {}
        for i, text in enumerate(items):
            # As /v1/embeddings does: the tokenizer's own special tokens ([CLS] ... [SEP] for BERT).
            prompt = PreparedPrompt(self.ctx.tokenizer.encode(text, add_special_tokens=True).ids, text)
            if len(prompt.token_ids) > self.ctx.max_model_len:
                raise ValueError(
                    f"input {i} has {len(prompt.token_ids)} tokens; this model takes at most {self.ctx.max_model_len}"
                )
            rid = str(next(self._ids))
            add = AddRequest(
                rid, prompt.token_ids, WireSamplingParams(max_tokens=1), time.time(), embed_task=True
            )
            self._add(add, [])
            jobs[rid] = (i, prompt)
            outputs.append(EmbeddingOutput(rid, prompt.text, prompt.token_ids))
        with self._progress(len(jobs), use_tqdm, "Embedding") as bar:
            for delta in self._deltas(list(jobs)):
                self._raise_if_error(delta, list(jobs))
                if delta.finish_reason is None:
                    continue
                i, _ = jobs.pop(delta.request_id)
                if delta.embedding is None:
                    raise RuntimeError("the engine finished an embedding request without an embedding")
                outputs[i].embedding = list(delta.embedding)
                bar.update(1)
        return outputs

    # -- internals -----------------------------------------------------------------------------------

    def _tool_plan(
        self,
        tools: list[dict[str, Any]] | None,
        tool_choice: str | dict[str, Any] | None,
        parallel_tool_calls: bool | None,
    ) -> ToolPlan | None:
        """The server's tool planning. Unlike the server, tools without a tool_choice and without a
        parser only go to the template (raw text back, as vLLM's offline chat does)."""
        if tool_choice is None:
            tool_choice = "auto" if tools and self.tool_call_parser else "none"
        if tool_choice == "auto" and self.tool_call_parser is None:
            known = " or ".join(repr(name) for name in sorted(TOOL_PARSERS))
            raise ValueError(
                f'tool_choice "auto" needs a tool-call parser: LLM(..., tool_call_parser={known}), '
                "as the server needs --enable-auto-tool-choice --tool-call-parser"
            )
        settings = ToolSettings(enable_auto_tool_choice=True, tool_call_parser=self.tool_call_parser)
        try:
            return plan_tool_choice(
                tools, tool_choice, parallel_tool_calls=parallel_tool_calls, settings=settings
            )
        except APIError as exc:
            raise ValueError(exc.message) from None

    def _prepare_prompt(self, prompt: Prompt) -> PreparedPrompt:
        if isinstance(prompt, str):
            return PreparedPrompt(self.ctx.encode(prompt, add_special_tokens=True), prompt)
        return PreparedPrompt(list(prompt), None)

    def _render_chat(
        self,
        conversation: Conversation,
        tools: list[dict[str, Any]] | None,
        add_generation_prompt: bool,
        continue_final_message: bool,
        kwargs: dict[str, Any],
    ) -> str:
        if self.ctx.chat_template is None:
            raise ValueError("this model has no chat template; use LLM.generate with a text prompt")
        messages, embeds = normalize_messages(conversation)
        if embeds:
            raise ValueError("prompt_embeds content parts are only supported by the HTTP server")
        try:
            return self.ctx.chat_template.render(
                messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                **kwargs,
            )
        except ChatTemplateError as exc:
            raise ValueError(str(exc)) from None

    def _run(
        self,
        prompts: list[PreparedPrompt],
        params: list[SamplingParams],
        use_tqdm: bool,
        desc: str,
        structured_override: StructuredSpec | None = None,
    ) -> list[RequestOutput]:
        inputs = self.ctx.inputs
        groups: list[tuple[RequestOutput, list[ChoiceJob], SamplingParams]] = []
        for prompt, sp in zip(prompts, params, strict=True):
            settings = sp.to_request()
            try:
                check_prompt_token_ids(prompt.token_ids, vocab_size=self.ctx.ready.vocab_size)
                wire = inputs.sampling(
                    settings, len(prompt.token_ids), structured_override=structured_override
                )
            except APIError as exc:
                raise ValueError(exc.message) from None
            rid = str(next(self._ids))
            jobs = inputs.jobs(rid, [prompt], [wire], sp.n, output_factory(self.ctx.tokenizer, settings))
            record = RequestOutput(rid, prompt.text, prompt.token_ids, [], finished=False)
            groups.append((record, jobs, sp))
        job_of = {job.add.request_id: (g, job) for g, (_, jobs, _) in enumerate(groups) for job in jobs}
        raw_logprobs: dict[str, list[PositionLogprobs]] = {rid: [] for rid in job_of}
        num_left = [len(jobs) for _, jobs, _ in groups]
        for _, jobs, _ in groups:
            for job in jobs:
                self._add(job.add, job.buffers)
        with self._progress(len(groups), use_tqdm, desc) as bar:
            for delta in self._deltas(list(job_of)):
                self._raise_if_error(delta, list(job_of))
                g, job = job_of[delta.request_id]
                record = groups[g][0]
                if delta.prompt_logprobs is not None:
                    record.prompt_logprobs = [
                        self._position(lp) if lp else None for lp in delta.prompt_logprobs
                    ]
                if job.output.finished:
                    continue  # a stop string already ended it; the abort is on its way
                job.output.process(delta)
                if delta.logprobs:
                    raw_logprobs[delta.request_id].extend(self._position(lp) for lp in delta.logprobs)
                if not job.output.finished:
                    continue
                if delta.finish_reason is None:
                    self.stepper.abort([delta.request_id])  # stopped by a string: free its KV blocks now
                num_left[g] -= 1
                if num_left[g] == 0:
                    bar.update(1)
        outputs = []
        for record, jobs, sp in groups:
            record.outputs = [self._completion(job, raw_logprobs, sp) for job in jobs]
            record.num_cached_tokens = jobs[0].output.num_cached_tokens
            record.finished = True
            outputs.append(record)
        return outputs

    def _completion(
        self, job: ChoiceJob, raw_logprobs: dict[str, list[PositionLogprobs]], sp: SamplingParams
    ) -> CompletionOutput:
        out = job.output
        logprobs = raw_logprobs[job.add.request_id][: len(out.token_ids)] if sp.logprobs is not None else None
        return CompletionOutput(
            job.index, out.text, list(out.token_ids), logprobs, out.finish_reason, out.stop_reason, out.text
        )

    def _position(self, lp: TokenLogprob) -> PositionLogprobs:
        tok = self.ctx.tokenizer
        position = {lp.token_id: Logprob(lp.logprob, lp.rank, token_text(tok, lp.token_id))}
        for rank, (token_id, value) in enumerate(zip(lp.top_ids, lp.top_logprobs, strict=False), start=1):
            position.setdefault(token_id, Logprob(value, rank, token_text(tok, token_id)))
        return position

    def _add(self, add: AddRequest, buffers: list[bytes]) -> None:
        rejection = self.stepper.add(add, _CLIENT, buffers)
        if rejection is not None:
            self.stepper.abort_client(_CLIENT)
            raise ValueError(rejection.error or "the engine refused the request")

    def _deltas(self, request_ids: list[str]):  # noqa: ANN202 - Iterator[RequestDelta]
        """Steps the engine until it has no work; aborts whatever is left if the caller stops early."""
        wanted = set(request_ids)
        try:
            while self.stepper.has_work:
                for _client, delta in self.stepper.step():
                    if delta.request_id in wanted:
                        yield delta
        finally:
            self.stepper.abort_client(_CLIENT)  # after an error or Ctrl-C, leave the engine empty

    def _raise_if_error(self, delta: RequestDelta, request_ids: list[str]) -> None:
        if delta.error is not None:
            self.stepper.abort(request_ids)
            raise RuntimeError(f"request {delta.request_id} failed in the engine: {delta.error}")

    @staticmethod
    def _progress(total: int, use_tqdm: bool, desc: str):  # noqa: ANN205
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="req", disable=not use_tqdm, dynamic_ncols=True)


def engine_config(model: str | None, options: dict[str, Any]) -> EngineConfig:
    """An EngineConfig from keyword options, with a clear error for a misspelt one."""
    from engine.config import EngineConfig
    from tandem.args import _size

    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if isinstance(options.get("kv_cache_memory"), str):
        options = {**options, "kv_cache_memory": _size(options["kv_cache_memory"])}
    if isinstance(options.get("served_model_names"), list):
        options = {**options, "served_model_names": tuple(options["served_model_names"])}
    return EngineConfig(model=model, **options)


def _prompt_list(prompts: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, list | tuple) or not prompts:
        raise ValueError(
            "prompts must be a string, a list of strings, token ids, or a list of token-id lists"
        )
    if all(type(x) is int for x in prompts):
        return [list(prompts)]  # type: ignore[arg-type]
    for item in prompts:
        if not (
            isinstance(item, str) or (isinstance(item, list) and item and all(type(x) is int for x in item))
        ):
            raise ValueError(
                f"each prompt must be a string or a non-empty list of token ids, got {item!r:.80}"
            )
    return list(prompts)  # type: ignore[arg-type]


def _params_list(
    params: SamplingParams | Sequence[SamplingParams] | None,
    num_prompts: int,
    default: Callable[[], SamplingParams],
) -> list[SamplingParams]:
    if params is None:
        return [default()] * num_prompts
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    params = list(params)
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} sampling params for {num_prompts} prompts")
    return params
