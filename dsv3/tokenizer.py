"""Text <-> token ids for the CLI and the server (the engine itself only sees ids).

Notable features:
- Loads a model folder (`tokenizer.json` + `tokenizer_config.json`, optionally `chat_template.jinja`, as HF writes
  them) or a bare `tokenizer.json`. BOS/EOS come from the config, where they may be plain strings or
  `{"content": ...}` dicts; a token the config names but the vocabulary lacks is an error, not a silent None.
- `encode` never inserts special tokens on its own: chat prompts already carry BOS in their text (the template writes
  it) and control tokens written in the text are matched as single ids, exactly as HF's `apply_chat_template` encodes.
- `StreamDecoder` turns a stream of ids into text pieces that are safe to print: it never emits half a UTF-8
  character or an unfinished byte-level fragment, and the pieces concatenate to `decode(all ids)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
REPLACEMENT_CHAR = "\ufffd"  # what decoding puts where a UTF-8 sequence is incomplete


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, chat_template: str | None = None):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        # every added token (BOS/EOS and the chat/tool control tokens): content -> id
        self.special_tokens = {tok.content: i for i, tok in backend.get_added_tokens_decoder().items()}
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """A model folder holding tokenizer.json (+ tokenizer_config.json), or the path of a tokenizer.json."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path {path} does not exist")
        if path.is_file():
            return cls(_load_backend(path))
        tokenizer_json = path / TOKENIZER_JSON
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"{path} has no {TOKENIZER_JSON}: a tokenizer folder needs {TOKENIZER_JSON} "
                                    f"and usually {TOKENIZER_CONFIG}")
        backend = _load_backend(tokenizer_json)
        config_file = path / TOKENIZER_CONFIG
        config = _read_json(config_file) if config_file.is_file() else {}
        template_file = path / CHAT_TEMPLATE_FILE
        template = template_file.read_text() if template_file.is_file() else _config_chat_template(config, config_file)
        return cls(backend, bos_token=_token_content(config, "bos_token", config_file),
                   eos_token=_token_content(config, "eos_token", config_file), chat_template=template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        if self.bos_token is None:
            raise ValueError(f"this tokenizer has no BOS token (no bos_token in {TOKENIZER_CONFIG})")
        return self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        if self.eos_token is None:
            raise ValueError(f"this tokenizer has no EOS token (no eos_token in {TOKENIZER_CONFIG})")
        return self.backend.token_to_id(self.eos_token)

    def token_id(self, token: str) -> int:
        """The id of one token given by its text, e.g. '<｜tool▁calls▁begin｜>'."""
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"{token!r} is not a token of this tokenizer")
        return i

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)


class StreamDecoder:
    """Incremental detokenizer: `feed` one id at a time and print what it returns, then print `finish()`.

    Byte-level BPE tokens can end inside a UTF-8 character, so a piece is only released once the decoded text no
    longer ends in U+FFFD. Decoding is done over a short window that starts at the previous release point (a
    character boundary) plus the tokens since, so context-dependent decoders (leading-space rules) see the token
    before the new ones, and the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0  # window start: the release point before the last one
        self.read = 0  # ids[:read] have been released as text

    def feed(self, token_id: int) -> str:
        self.ids.append(token_id)
        seen = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(seen) or text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or the last character is still incomplete
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(seen):]

    def finish(self) -> str:
        """The held-back rest (an incomplete character at the very end decodes to U+FFFD, as `decode` gives)."""
        seen = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(seen):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special) if ids else ""


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side reports parse errors as a bare Exception
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(config: dict[str, Any], key: str, source: Path) -> str | None:
    # HF writes special tokens either as plain strings or as serialized AddedToken dicts
    value = config.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: {key} must be a string or an object with a string 'content', got {value!r}")


def _config_chat_template(config: dict[str, Any], source: Path) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    # several named templates: [{"name": ..., "template": ...}]; the one for plain chat is "default"
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{source}: chat_template must be a string or a list of named templates with a 'default' one")
