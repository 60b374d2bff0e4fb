"""TokenizerInfo: everything an API process needs to tokenize and render chats, without model files.

The tokenizer travels as a serialized `tokenizers.Tokenizer`. API processes should encode prompts with
`add_special_tokens=False` and prepend BOS themselves when `add_bos_token` is set, so the policy
is the same for every source format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer

from contract.chat_template_syntax import TEMPLATE_EXTENSIONS


@dataclass(frozen=True)
class TokenizerInfo:
    tokenizer_json: str  # Tokenizer.to_str(); rebuild with Tokenizer.from_str
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: list[int]  # every id that ends generation
    add_bos_token: bool  # whether plain-prompt encoding should prepend BOS
    special_tokens: dict[str, str]  # other named special tokens (pad_token, unk_token, ...)


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json spells special tokens as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {entry.get("name"): entry.get("template") for entry in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


def load_chat_template(value: str) -> str:
    """--chat-template: a Jinja file's path, or (as vLLM accepts) the template itself. Raises ValueError
    at start-up for an unreadable path or a template that does not parse, not at the first chat request."""
    try:
        text = Path(value).expanduser().read_text(encoding="utf-8")
        source = f"chat template file {value!r}"
    except UnicodeDecodeError as exc:
        raise ValueError(f"chat template file {value!r} is not UTF-8 text: {exc}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the "path"
        # A value with no Jinja characters was meant as a path (vLLM's rule).
        if not any(char in value for char in "{}\n"):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(
                f"--chat-template {value!r} looks like a file path, but it cannot be read ({reason}); "
                "pass a Jinja file or the template itself"
            ) from None
        # As vLLM: escapes in an inline template are interpreted, so a shell-typed `\n` is a newline.
        text = value.encode("latin-1", "backslashreplace").decode("unicode_escape")
        source = "the --chat-template given inline"
    if not text.strip():
        raise ValueError(f"{source} is empty")
    _check_template_syntax(text, source)
    return text


def _check_template_syntax(text: str, source: str) -> None:
    # The syntax the API process compiles templates with (frontend/serving/chat_template.py).
    env = jinja2.Environment(extensions=list(TEMPLATE_EXTENSIONS))
    try:
        env.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"{source} does not parse as Jinja: {exc.message} (line {exc.lineno})") from None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def unique_ids(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))


def tokenizer_info_from_folder(folder: Path, model_config: dict[str, Any]) -> TokenizerInfo:
    """From tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json."""
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(f"{folder} has no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    config = _read_json(folder / "tokenizer_config.json")
    generation = _read_json(folder / "generation_config.json")
    bos_token = _token_text(config.get("bos_token"))
    eos_token = _token_text(config.get("eos_token"))

    eos_ids: list[int] = []
    eos_id = None if eos_token is None else tokenizer.token_to_id(eos_token)
    if eos_id is not None:
        eos_ids.append(eos_id)
    eos_ids += _as_id_list(generation.get("eos_token_id")) + _as_id_list(model_config.get("eos_token_id"))

    add_bos = config.get("add_bos_token")
    if add_bos is None:
        # No explicit flag: follow what the tokenizer's own post-processor does.
        encoded = tokenizer.encode("a", add_special_tokens=True).ids
        add_bos = bos_token is not None and bool(encoded) and encoded[0] == tokenizer.token_to_id(bos_token)
    special = {
        key: text
        for key in ("pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
        if (text := _token_text(config.get(key))) is not None
    }
    return TokenizerInfo(
        tokenizer_json=tokenizer.to_str(),
        chat_template=_chat_template(folder, config),
        bos_token=bos_token,
        eos_token=eos_token,
        eos_token_ids=unique_ids(eos_ids),
        add_bos_token=bool(add_bos),
        special_tokens=special,
    )
