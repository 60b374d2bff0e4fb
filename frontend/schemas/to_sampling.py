"""An OpenAI body's sampling fields as the transport-neutral `SamplingRequest` the input processor takes."""

from __future__ import annotations

from typing import Any

import msgspec

from frontend.sampling_params import SamplingRequest
from frontend.schemas.requests import ChatCompletionRequest, SamplingFields, StructuredOutputs
from protocol.messages import StructuredSpec

_json_encoder = msgspec.json.Encoder()


def from_openai(req: SamplingFields, *, with_structured: bool = True) -> SamplingRequest:
    """The settings of a chat or completion body (or a body shaped like one). `with_structured=False`
    leaves the output constraint out, for the range checks that run before its shape is checked."""
    if isinstance(req, ChatCompletionRequest):
        use_new_name = req.max_completion_tokens is not None  # OpenAI's newer name wins
        max_tokens = req.max_completion_tokens if use_new_name else req.max_tokens
        max_tokens_param = "max_completion_tokens" if use_new_name else "max_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        logprobs_param, prompt_param = "top_logprobs", "messages"
    else:
        max_tokens, max_tokens_param = req.max_tokens, "max_tokens"
        logprobs, logprobs_param, prompt_param = getattr(req, "logprobs", None), "logprobs", "prompt"
    stop = req.stop
    return SamplingRequest(
        n=req.n,
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        min_tokens=req.min_tokens,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        stop_token_ids=req.stop_token_ids,
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        ignore_eos=bool(req.ignore_eos),
        skip_special_tokens=req.skip_special_tokens is not False,
        logprobs=logprobs,
        prompt_logprobs=req.prompt_logprobs,
        # Keys are checked as token ids (ASCII digits) by the schema checks before this runs.
        logit_bias={int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
        allowed_token_ids=req.allowed_token_ids,
        structured=structured_spec(req) if with_structured else None,
        max_tokens_param=max_tokens_param,
        logprobs_param=logprobs_param,
        structured_param=_structured_param(req),
        prompt_param=prompt_param,
    )


def structured_spec(req: SamplingFields) -> StructuredSpec | None:
    """The output constraint the body asks for, from whichever of its three spellings it used."""
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        return StructuredSpec(any_json_object=True)
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        if fmt.json_schema.schema is None:
            return StructuredSpec(any_json_object=True)
        return StructuredSpec(json_schema=schema_text(fmt.json_schema.schema))
    if req.structured_outputs is not None:
        return from_structured_outputs(req.structured_outputs)
    return _constraint(req.guided_json, req.guided_regex, req.guided_choice, req.guided_grammar)


def from_structured_outputs(so: StructuredOutputs) -> StructuredSpec:
    """A checked `structured_outputs` object (exactly one field set) as the engine's constraint."""
    spec = _constraint(so.json, so.regex, so.choice, so.grammar)
    # None: json_object, the checks allow nothing else
    return spec if spec is not None else StructuredSpec(any_json_object=True)


def _constraint(
    json_schema: str | dict[str, Any] | None,
    regex: str | None,
    choice: list[str] | None,
    grammar: str | None,
) -> StructuredSpec | None:
    """The first of the four constraint kinds that is set (the `guided_*` fields and `structured_outputs`
    spell the same four)."""
    if json_schema is not None:
        return StructuredSpec(json_schema=schema_text(json_schema))
    if regex is not None:
        return StructuredSpec(regex=regex)
    if choice is not None:
        return StructuredSpec(choice=list(choice))
    if grammar is not None:
        return StructuredSpec(grammar=grammar)
    return None


def schema_text(schema: str | dict[str, Any] | bool) -> str:
    return schema if isinstance(schema, str) else _json_encoder.encode(schema).decode()


def _structured_param(req: SamplingFields) -> str:
    """The body field that carried the constraint, for the error's `param`."""
    if req.response_format is not None and req.response_format.type != "text":
        return "response_format"
    if req.structured_outputs is not None:
        return "structured_outputs"
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(req, name) is not None:
            return name
    return "tool_choice"  # a constraint derived from tools
