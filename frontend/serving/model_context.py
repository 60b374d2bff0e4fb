"""What the API process knows about the served model, all of it from the engine's READY handshake."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer

from frontend.errors import model_not_found
from frontend.limits import InputLimits
from frontend.offload import OFFLOAD_MIN_SIZE
from frontend.serving.chat_template import ChatTemplate
from frontend.serving.input_processor import InputProcessor
from frontend.structured_check import GrammarDryRun
from protocol.messages import Ready


@dataclass
class ModelContext:
    ready: Ready
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    served_model_names: list[str]
    limits: InputLimits = field(default_factory=InputLimits)
    grammar_dry_run: GrammarDryRun | None = None  # None: structured specs are only compiled, not tried
    # The engines that serve this model announce this first name (EngineConnection.group).
    group: str | None = None
    # Set on the view of a LoRA adapter: requests run under it on the base model's engines.
    lora_name: str | None = None

    @classmethod
    def from_ready(
        cls, ready: Ready, served_model_names: tuple[str, ...] = (), limits: InputLimits | None = None
    ) -> ModelContext:
        tokenizer = Tokenizer.from_str(ready.tokenizer_json)
        template = None
        if ready.chat_template:
            template = ChatTemplate(
                ready.chat_template,
                bos_token=ready.bos_token,
                eos_token=ready.eos_token,
                special_tokens=ready.special_tokens,
            )
        names = list(served_model_names) or list(ready.served_model_names)
        dry_run = GrammarDryRun(ready.tokenizer_json, ready.vocab_size, list(ready.eos_token_ids))
        group = ready.served_model_names[0] if ready.served_model_names else None
        return cls(ready, tokenizer, template, names, limits or InputLimits(), dry_run, group)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def max_model_len(self) -> int:
        return self.ready.max_model_len

    def check_model(self, name: str | None) -> str:
        """The served name to answer with; 404 for a name this server does not serve."""
        if name is None or name == "":
            return self.model_name
        if name != self.lora_name and name not in self.served_model_names:
            raise model_not_found(name)
        return name

    @property
    def inputs(self) -> InputProcessor:
        """The input processor for requests to this model (or, on an adapter's view, this adapter)."""
        return InputProcessor(self.ready, self.grammar_dry_run, self.lora_name)

    def decode_prompt(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def tokenize_text(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """The tokenizer's own ids for `text`. A long text goes through encode_batch, which releases
        the GIL (encode does not), so tokenizing it on a worker thread leaves the event loop free."""
        if len(text) < OFFLOAD_MIN_SIZE:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids = self.tokenize_text(text, add_special_tokens=False)
        bos = self.ready.bos_token
        if add_special_tokens and self.ready.add_bos_token and bos is not None:
            bos_id = self.tokenizer.token_to_id(bos)
            if bos_id is not None and (not ids or ids[0] != bos_id):
                ids = [bos_id, *ids]
        return ids
