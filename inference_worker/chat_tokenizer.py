"""A model's tokenizer and chat template without transformers: `tokenizer.json` through the `tokenizers` library, and
the chat template rendered by jinja2 in the sandbox transformers uses (the same options, filters and globals).

It offers the part of transformers' tokenizer API the worker calls: `apply_chat_template(turns,
add_generation_prompt=True, tokenize=False)`, `tokenizer(text, add_special_tokens=False)["input_ids"]`,
`eos_token_id`, `decode` and `backend_tokenizer`. Tools, documents and assistant masks are not part of llmbus's
wire contract, so they are not rendered. `tests/test_checkpoint.py` checks it gives transformers' ids.

The special tokens (`bos_token`, `eos_token`, ...) are read as transformers 5 reads them: from tokenizer_config.json,
and from the legacy special_tokens_map.json where tokenizer_config.json has no `added_tokens_decoder` (its values
then replace tokenizer_config.json's). Where no end token is found, or the template uses a special token that
neither file defines (a transformers tokenizer class may have a default for it), `load` raises `Unsupported`, so
that transformers' tokenizer decides. A damaged tokenizer file raises `Unreadable`, naming it. A model without any
chat template is refused where it is loaded (`require_chat_template`): llmbus serves chat only.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokenizers import Tokenizer

from inference_worker.checkpoint import Unreadable, Unsupported, read_json

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
        """Raises `Unsupported` where transformers' tokenizer classes are needed (no tokenizer.json, no template, no
        end token, a special token the template uses that no file defines), `Unreadable` for a damaged file."""
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise Unsupported("no tokenizer.json")
        config_file = directory / "tokenizer_config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        template = _template(directory, config)
        special = _special_tokens(directory, config)
        if undefined := sorted(_used_tokens(template) - special.keys()):
            raise Unsupported(f"the chat template uses {', '.join(undefined)}, which no tokenizer file defines")
        tokenizer = cls(_backend(file), template, special)
        if tokenizer.eos_token_id is None:
            raise Unsupported(f"no end token in the vocabulary (eos_token {special.get('eos_token')!r})")
        return tokenizer

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


class NoChatTemplate(RuntimeError):
    """A model directory without a chat template: llmbus serves chat only, so such a model is refused at load."""


def require_chat_template(directory: Path, template: str | dict[str, str] | None) -> None:
    """Raises `NoChatTemplate`, naming `directory`, unless `template` (a transformers tokenizer's `chat_template`:
    one template, or named ones) gives a default template."""
    if (isinstance(template, str) and template) or (isinstance(template, dict) and template.get("default")):
        return
    raise NoChatTemplate(
        f"{directory} has no chat template: a chat model needs `chat_template` in tokenizer_config.json or a"
        " chat_template.jinja file"
    )


def _backend(file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise Unreadable(f"{file} is not a readable tokenizer file, damaged or cut short ({exc})") from exc


def _special_tokens(directory: Path, config: dict[str, Any]) -> dict[str, str]:
    """The named special tokens, as transformers 5 reads them (`_from_pretrained`): tokenizer_config.json's, then,
    where it has no `added_tokens_decoder`, special_tokens_map.json's over them (a null there removes one)."""
    found = {name: config[name] for name in SPECIAL_TOKENS if config.get(name) is not None}
    legacy = directory / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.is_file():
        mapped = read_json(legacy)
        for name in SPECIAL_TOKENS:
            if name in mapped:
                found[name] = mapped[name]
    return {name: _content(value) for name, value in found.items() if value is not None}


def _used_tokens(template: str) -> set[str]:
    """The special-token variables the template reads."""
    return meta.find_undeclared_variables(_environment().parse(template)) & set(SPECIAL_TOKENS)


def _template(directory: Path, config: dict[str, Any]) -> str:
    """The chat template: `chat_template.jinja` (transformers 5 saves it there) or tokenizer_config.json's."""
    if (file := directory / "chat_template.jinja").is_file():
        try:
            return file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise Unreadable(f"{file} is not UTF-8 text, damaged ({exc})") from exc
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
