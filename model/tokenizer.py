"""Tokenizer, special tokens, stop ids and the sandboxed chat template of a model folder.

Everything here reads untrusted files: ``tokenizer.json`` goes to the Rust ``tokenizers`` library
(``Tokenizer.from_file``, no Python code); the chat template is a Jinja template rendered in a
hardened :class:`jinja2.sandbox.ImmutableSandboxedEnvironment` where any access to an unsafe
attribute (``__class__``, ``__globals__``, mutating methods, ...) raises at once instead of
rendering as an empty string, the output size is capped and only a tiny set of helpers is exposed;
it is parsed and rendered in a child process bounded in time, memory and recursion (``template.py``).
Special tokens and stop ids come from ``tokenizer_config.json``, ``special_tokens_map.json`` and
``generation_config.json``; each special token must be a single token of the vocabulary.

    >>> from secure_run.model.demo import demo_model_dir
    >>> tok = ModelTokenizer.from_dir(demo_model_dir())
    >>> tok.decode(tok.encode("Hello, world!"))
    'Hello, world!'
    >>> tok.render_chat([{"role": "user", "content": "Hi"}], enable_thinking=False)
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n<think></think>'
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from secure_run.errors import ModelError, UsageError
from secure_run.manifests._jsoncheck import JsonProblem, loads_strict
from secure_run.manifests.folder import FolderReader, UnverifiedFolder
from secure_run.model.template import (  # noqa: F401  (re-exported limits)
    MAX_RENDER_CHARS,
    MAX_TEMPLATE_CHARS,
    check_chat_template,
    render_chat_template,
)

__all__ = [
    "ChatTemplate",
    "IncrementalDecoder",
    "ModelTokenizer",
]

#: Message roles a chat may contain.
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _refuse(message: str, *, rule: str, path: str, hint: str | None = None,
            details: tuple[str, ...] = ()) -> ModelError:
    return ModelError(message, rule=rule, path=path, hint=hint, details=details)


def _read_json(source: FolderReader, name: str, *, required: bool) -> dict[str, Any] | None:
    if not source.exists(name):
        if required:
            raise _refuse(f"{name} is missing", rule="tokenizer.missing", path=name,
                          hint="the model folder must ship it")
        return None

    try:  # the one strict JSON loader: no duplicate keys, no NaN, no BOM
        raw = loads_strict(source.read_bytes(name))
    except JsonProblem as err:
        what = f"repeats a key ({err.message})" if err.rule == "JSON-DUPKEY" else f"is not valid JSON: {err.message}"
        raise _refuse(f"{name} {what} [{err.rule}]", rule="tokenizer.json", path=name) from None
    if not isinstance(raw, dict):
        raise _refuse(f"{name} must be a JSON object", rule="tokenizer.json", path=name)
    return raw


def _token_text(value: Any, *, where: str, key: str) -> str | None:
    """A special token given as "text" or {"content": "text", ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise _refuse(f"{where}: {key} must be a string or an object with 'content'", rule="tokenizer.special",
                  path=where)


def _ids(value: Any, *, where: str, key: str) -> list[int]:
    if value is None:
        return []
    vals = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(vals, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
        raise _refuse(f"{where}: {key} must be a token id or a list of token ids, got {value!r}",
                      rule="tokenizer.stop-ids", path=where)
    return list(vals)


# --- chat template ------------------------------------------------------------------------------


class ChatTemplate:
    """A chat template, checked and rendered only in a bounded child process (:mod:`.template`).

    Args:
        source: the template text (untrusted).
        path: file name used in error messages.

    Parsing and compiling happen in the child too: Jinja's compiler folds constants, so
    ``{{ 10 ** (10 ** 9) }}`` would hang the host at construction.
    """

    def __init__(self, source: str, *, path: str = "chat_template.jinja") -> None:
        self.path = path
        self.source = source
        check_chat_template(source, path=path)

    def reads_variable(self, name: str) -> bool:
        """Whether the template's code (not its literal text or comments) names the variable ``name``.

        Only Jinja's lexer runs here (linear, no parse or compile; the source was already checked in
        the bounded child); a ``name`` token inside ``{{ }}``/``{% %}`` counts.
        """
        return name in _template_names(self.source)

    def render(self, **variables: Any) -> str:
        """Render with ``variables``; refuses unsafe access, template errors, limits and oversized output."""
        messages = variables.pop("messages", [])
        return render_chat_template(self.source, messages, path=self.path, **variables)


@functools.lru_cache(maxsize=8)
def _template_names(source: str) -> frozenset[str]:
    from jinja2 import Environment, TemplateSyntaxError

    try:
        return frozenset(value for _line, kind, value in Environment().lex(source) if kind == "name")
    except TemplateSyntaxError:  # unreachable for a checked template; no switch then
        return frozenset()


# --- tokenizer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelTokenizer:
    """The tokenizer of one model folder, with its special tokens, stop ids and chat template."""

    tokenizer: Tokenizer
    special_tokens: Mapping[str, str]
    stop_ids: frozenset[int]
    bos_token_id: int | None
    chat_template: ChatTemplate | None
    generation_defaults: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelTokenizer:
        """Read the tokenizer files of a plain folder (tools and tests; nothing is proved).

        Files are opened below the folder's descriptor without following links. The runner and the
        worker use :meth:`from_folder` with the verified folder instead.
        """
        with UnverifiedFolder(model_dir) as folder:
            return cls.from_folder(folder)

    @classmethod
    def from_folder(cls, folder: FolderReader) -> ModelTokenizer:
        """Read ``tokenizer.json``, the token configs and the chat template through ``folder``.

        With a :class:`~secure_run.manifests.folder.VerifiedFolder` every byte used is the verified
        byte: each file is opened below the verified root (no link followed), its identity checked
        before and after reading and its sha256 compared with the verified digest.
        """
        if not folder.exists("tokenizer.json"):
            raise _refuse("tokenizer.json is missing", rule="tokenizer.missing", path="tokenizer.json")
        data = folder.read_bytes("tokenizer.json")
        try:
            tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:
            raise _refuse(f"tokenizer.json cannot be loaded: {err}", rule="tokenizer.invalid",
                          path="tokenizer.json") from None
        tcfg = _read_json(folder, "tokenizer_config.json", required=False) or {}
        smap = _read_json(folder, "special_tokens_map.json", required=False) or {}
        gcfg = _read_json(folder, "generation_config.json", required=False) or {}

        special: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            a = _token_text(tcfg.get(key), where="tokenizer_config.json", key=key)
            b = _token_text(smap.get(key), where="special_tokens_map.json", key=key)
            if a is not None and b is not None and a != b:
                raise _refuse(f"{key} is {a!r} in tokenizer_config.json but {b!r} in special_tokens_map.json",
                              rule="tokenizer.special", path="special_tokens_map.json")
            if (a or b) is not None:
                special[key] = str(a if a is not None else b)
        ids: dict[str, int] = {}
        for key, text in special.items():
            tid = tok.token_to_id(text)
            if tid is None:
                raise _refuse(f"{key} {text!r} is not a single token of tokenizer.json", rule="tokenizer.special",
                              path="tokenizer.json", hint="special tokens must be in the vocabulary")
            ids[key] = tid

        stops = set(_ids(gcfg.get("eos_token_id"), where="generation_config.json", key="eos_token_id"))
        if "eos_token" in ids:
            stops.add(ids["eos_token"])
        vocab = tok.get_vocab_size(with_added_tokens=True)
        out_of_vocab = sorted(i for i in stops if i >= vocab)
        if out_of_vocab:
            raise _refuse(f"stop ids {out_of_vocab} are outside the vocabulary ({vocab} tokens)",
                          rule="tokenizer.stop-ids", path="generation_config.json")
        bos = _ids(gcfg.get("bos_token_id"), where="generation_config.json", key="bos_token_id")
        bos_id = bos[0] if bos else ids.get("bos_token")

        template = cls._template(folder, tcfg)
        defaults: dict[str, Any] = {k: gcfg[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens", "do_sample") if k in gcfg}
        return cls(tokenizer=tok, special_tokens=special, stop_ids=frozenset(stops), bos_token_id=bos_id,
                   chat_template=template, generation_defaults=defaults)

    @staticmethod
    def _template(folder: FolderReader, tcfg: Mapping[str, Any]) -> ChatTemplate | None:
        file_src = None
        if folder.exists("chat_template.jinja"):
            try:
                file_src = folder.read_bytes("chat_template.jinja").decode("utf-8")
            except UnicodeDecodeError as err:
                raise _refuse(f"chat_template.jinja is not UTF-8 text (byte {err.start})",
                              rule="chat-template.invalid", path="chat_template.jinja") from None
        cfg_src = tcfg.get("chat_template")
        if cfg_src is not None and not isinstance(cfg_src, str):
            raise _refuse("tokenizer_config.json: chat_template must be a string", rule="chat-template.invalid",
                          path="tokenizer_config.json", hint="named template lists are not supported")
        if file_src is not None and cfg_src is not None and file_src != cfg_src:
            raise _refuse("two different chat templates (chat_template.jinja and tokenizer_config.json)",
                          rule="chat-template.ambiguous", path="tokenizer_config.json",
                          hint="keep exactly one chat template")
        if file_src is not None:
            return ChatTemplate(file_src, path="chat_template.jinja")
        if cfg_src is not None:
            return ChatTemplate(cfg_src, path="tokenizer_config.json")
        return None

    # --- text <-> ids ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of tokens including added (special) tokens."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings in ``text`` become special tokens)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_id(self, text: str) -> int | None:
        """Id of a single token, or None."""
        tid = self.tokenizer.token_to_id(text)
        return None if tid is None else int(tid)

    # --- chat ------------------------------------------------------------------------------------
    @property
    def thinking_switch(self) -> bool:
        """Whether the chat template has a thinking switch (reads ``enable_thinking``, as the
        Superlinear/Nemotron template does): only then may ``--thinking/--no-thinking`` be given."""
        return self.chat_template is not None and self.chat_template.reads_variable("enable_thinking")

    def _special_strings(self) -> list[str]:
        added = self.tokenizer.get_added_tokens_decoder()
        return sorted({t.content for t in added.values() if t.special} | set(self.special_tokens.values()))

    def check_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
        """Validate chat messages: allowed roles, string contents, no special-token text inside.

        A content that spells a special token (e.g. ``<|im_end|>``) would be tokenized as that
        token and could forge a turn boundary, so it is refused.
        """
        if not messages:
            raise UsageError("a chat needs at least one message", rule="chat.empty")
        specials = self._special_strings()
        out: list[dict[str, str]] = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or set(m) - {"role", "content"} or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise UsageError(f"message {i} must be {{'role': str, 'content': str}}", rule="chat.message")
            if m["role"] not in CHAT_ROLES:
                raise UsageError(f"message {i} has role {m['role']!r}", rule="chat.role",
                                 hint=f"roles: {', '.join(sorted(CHAT_ROLES))}")
            hits = [s for s in specials if s in m["content"]]
            if hits:
                raise UsageError(f"message {i} contains special-token text {hits}", rule="chat.special-token",
                                 hint="special tokens cannot appear inside message text")
            out.append({"role": m["role"], "content": m["content"]})
        return out

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    enable_thinking: bool = True) -> str:
        """Render ``messages`` with the model's chat template (sandboxed)."""
        if self.chat_template is None:
            raise _refuse("the model folder has no chat template", rule="chat-template.missing",
                          path="chat_template.jinja", hint="use a plain prompt instead of a chat")
        msgs = self.check_messages(messages)
        variables: dict[str, Any] = {"messages": msgs, "add_generation_prompt": add_generation_prompt,
                                     "enable_thinking": enable_thinking, "tools": None}
        variables.update(self.special_tokens)
        return self.chat_template.render(**variables)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, never splitting a multi-byte character.

    Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding them alone gives
    U+FFFD. The decoder keeps a small window of recent ids and only emits text once the window
    decodes to something that does not end in an incomplete character.

        >>> from secure_run.model.demo import demo_model_dir
        >>> tok = ModelTokenizer.from_dir(demo_model_dir())
        >>> ids = tok.encode("naïve café ☕")
        >>> "".join(IncrementalDecoder(tok).feed_all(ids))
        'naïve café ☕'
    """

    def __init__(self, tokenizer: ModelTokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids whose text has been emitted

    def feed(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        dec = self._tok.decode
        prefix_text = dec(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        full_text = dec(self._ids[self._prefix:], skip_special_tokens=self._skip)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            piece = full_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is left at the end of the stream (possibly with U+FFFD for a truncated character)."""
        dec = self._tok.decode
        prefix_text = dec(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        full_text = dec(self._ids[self._prefix:], skip_special_tokens=self._skip)
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text):]

    def feed_all(self, ids: Iterable[int]) -> Iterator[str]:
        """Feed every id, yielding non-empty pieces, then the flushed rest."""
        for i in ids:
            piece = self.feed(i)
            if piece:
                yield piece
        rest = self.flush()
        if rest:
            yield rest
