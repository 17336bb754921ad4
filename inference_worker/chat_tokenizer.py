"""A model's tokenizer and chat template without transformers: `tokenizer.json` through the `tokenizers` library, and
the chat template rendered by jinja2 in the sandbox transformers uses (the same options, filters and globals).

It offers the part of transformers' tokenizer API the worker calls: `apply_chat_template(turns,
add_generation_prompt=True, tokenize=False)`, `tokenizer(text, add_special_tokens=False)["input_ids"]`,
`eos_token_id`, `decode` and `backend_tokenizer`. Tools, documents and assistant masks are not part of llmbus's
wire contract, so they are not rendered. `tests/test_checkpoint.py` checks it gives transformers' ids.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokenizers import Tokenizer

from inference_worker.checkpoint import Unsupported

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTokenizer:
    def __init__(self, backend: Tokenizer, template: str, special_tokens: dict[str, str]) -> None:
        self.backend_tokenizer = backend
        self.special_tokens = special_tokens
        self.template = _environment().from_string(template)
        eos = special_tokens.get("eos_token")
        self.eos_token_id = None if eos is None else backend.token_to_id(eos)

    @classmethod
    def load(cls, directory: Path) -> ChatTokenizer:
        """Raises `Unsupported` where transformers' tokenizer classes are needed (no tokenizer.json, no template)."""
        if not (directory / "tokenizer.json").is_file():
            raise Unsupported("no tokenizer.json")
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template = _template(directory, config)
        special = {name: _content(config[name]) for name in SPECIAL_TOKENS if config.get(name) is not None}
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), template, special)

    def apply_chat_template(
        self, turns: list[dict[str, Any]], add_generation_prompt: bool = False, tokenize: bool = False
    ) -> str:
        if tokenize:
            raise ValueError("ChatTokenizer renders text only: call it on the text for the ids")
        return self.template.render(
            messages=turns, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )  # fmt: skip

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)


def _template(directory: Path, config: dict[str, Any]) -> str:
    """The chat template: `chat_template.jinja` (transformers 5 saves it there) or tokenizer_config.json's."""
    if (file := directory / "chat_template.jinja").is_file():
        return file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise Unsupported("no chat template")
    return template


def _content(token: str | dict[str, Any]) -> str:
    return token["content"] if isinstance(token, dict) else token


def _environment() -> ImmutableSandboxedEnvironment:
    """transformers' chat template environment: the sandbox, trimmed blocks, loop controls, its `tojson` (no HTML
    escaping), `raise_exception`, `strftime_now`, and a `namespace` that refuses underscore-prefixed names (a
    template is code from the model's directory)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    environment.globals["namespace"] = _Namespace
    return environment


class _Namespace(Namespace):
    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja2's own signature: `self` may be a keyword
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        Namespace.__setitem__(self, name, value)


def _check_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)
