"""One line of an OpenAI Batch API input file as one row of this tool's Parquet input.

A line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body":
{"model", "messages", "max_tokens" | "max_completion_tokens", "temperature", "top_p",
"n", "seed", "stop"}}`` (``/v1/completions`` with a ``prompt`` too). ``parse_line``
turns it into a ``StagedRow``: the prompt, rendered in the instruction-tuned chat
format (``model.tokenizer.chat_transcript``; Gemma has no system role, so system
text opens the first user turn), and the sampling fields as text, left for the
worker's own per-row checks (``actors.columns.apply_overrides``, through the
``body`` struct column) so a value out of range fails exactly as a Parquet
column's does. What only the JSON can get wrong (not JSON, no ``custom_id``, an
unsupported ``url`` or body field, messages of the wrong shape) becomes the row's
``error``, naming the line and the field: the rest of the file goes on.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from griffin_batch.model import tokenizer

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
_PROMPT_KEY = {CHAT_URL: "messages", COMPLETIONS_URL: "prompt"}

SAMPLING_KEYS: Mapping[str, str] = {
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "n": "n",
    "seed": "seed",
    "stop": "stop",
}
"""Body fields that set sampling, and the sampling field each sets."""

ECHOED_KEYS = frozenset({"model"})
"""Body fields accepted without effect on generation (echoed in the output)."""

BODY_COLUMN = "body"
"""The staged struct column of sampling fields: errors read ``body.temperature: ...``."""
ERROR_COLUMN = "request_error"
"""The staged column holding a line's error (``error`` is an output column)."""

_SCALAR_FIELDS = ("max_tokens", "temperature", "top_p", "n", "seed")

STAGED_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string()),
    # Scalars as their JSON text: the worker's checks parse them, naming the field, so a
    # wrong kind ("hot", true) fails as in a Parquet text column, not here.
    pa.field(BODY_COLUMN, pa.struct([*(pa.field(f, pa.string()) for f in _SCALAR_FIELDS),
                                     pa.field("stop", pa.list_(pa.string()))])),
    pa.field(ERROR_COLUMN, pa.string()),
    pa.field("custom_id", pa.string()),
    pa.field("model", pa.string()),
    pa.field("url", pa.string()),
    pa.field("line", pa.int64(), nullable=False),
])
"""The Parquet schema every OpenAI batch input is staged as."""

KEPT_COLUMNS = ("custom_id", "model", "url")
"""Staged columns carried to the output rows (``jobs.openai_results`` reads them)."""


class FieldError(ValueError):
    """A request field this tool cannot serve; the message starts with the field's name."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagedRow:
    """One request as a row of ``STAGED_SCHEMA``.

    Attributes:
      id: The row id: ``custom_id``, else ``<file key>#line<line>``.
      prompt: The text the model continues (None when ``error``).
      body: Sampling fields as set by the request (scalars as JSON text, stop as a list).
      error: Why the line is not a request the engine can run, or None.
      custom_id: The request's ``custom_id`` (None when missing).
      model: The request's ``body.model``, echoed in its output.
      url: The request's endpoint.
      line: 1-based line number in its file.
    """

    id: str
    prompt: str | None
    body: dict[str, Any] | None
    error: str | None
    custom_id: str | None
    model: str | None
    url: str | None
    line: int

    def to_row(self) -> dict[str, Any]:
        """As a ``STAGED_SCHEMA`` row (``request_error`` for ``error``)."""
        row = dataclasses.asdict(self)
        row[ERROR_COLUMN] = row.pop("error")
        return row


def parse_line(text: str | bytes, line: int, file_key: str) -> StagedRow:
    """Turns one line of a batch input file into a staged row; never raises.

    Args:
      text: The line, without its newline.
      line: Its 1-based number (named in errors).
      file_key: The file's name, for the id of a line without ``custom_id``.

    Returns:
      The row; a line that is not a request this tool can run has ``error`` set
      (``line 7: body.tools is not supported ...``).
    """
    fallback_id = f"{file_key}#line{line}"
    try:
        request = _load(text)
    except FieldError as e:
        return StagedRow(id=fallback_id, prompt=None, body=None, error=f"line {line}: {e}",
                         custom_id=None, model=None, url=None, line=line)
    custom_id = request.get("custom_id")
    body = request.get("body")
    body = body if isinstance(body, dict) else {}
    model = body.get("model") if isinstance(body.get("model"), str) else None
    url = request.get("url") if isinstance(request.get("url"), str) else None
    ok_id = isinstance(custom_id, str) and custom_id != ""
    row = StagedRow(id=custom_id if ok_id else fallback_id, prompt=None, body=None, error=None,
                    custom_id=custom_id if ok_id else None, model=model, url=url, line=line)
    try:
        _check_envelope(request, custom_id)
        prompt = _prompt(url, request["body"])
        fields = _sampling(request["body"])
    except FieldError as e:
        return dataclasses.replace(row, error=f"line {line}: {e}")
    return dataclasses.replace(row, prompt=prompt, body=fields)


_UNPARSED = ("not JSON", "not a JSON object", "not UTF-8")


def is_unparsed(error: str) -> bool:
    """Whether a row's ``error`` says its line is no JSON object at all (vs. a bad request)."""
    return error.partition(": ")[2].startswith(_UNPARSED)


def _load(text: str | bytes) -> dict[str, Any]:
    try:
        request = json.loads(text)
    except UnicodeDecodeError as e:
        raise FieldError(f"{_UNPARSED[2]} (byte {e.start})") from None
    except ValueError as e:
        raise FieldError(f"{_UNPARSED[0]} ({e})") from None
    if not isinstance(request, dict):
        raise FieldError(f"{_UNPARSED[1]} (got {type(request).__name__})")
    # JSON may escape half of a surrogate pair ("\ud800"): json.loads accepts it, and the
    # string then cannot be written as UTF-8, which failed the whole staging step.
    if _SURROGATE_ESCAPE.search(text if isinstance(text, str) else text.decode("utf-8")):
        try:
            json.dumps(request, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise FieldError(f"{_UNPARSED[2]} (an escaped lone surrogate, "
                             f"{e.object[e.start]!r})") from None
    return request


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_envelope(request: Mapping[str, Any], custom_id: Any) -> None:
    if custom_id is None:
        raise FieldError("custom_id is missing")
    if not isinstance(custom_id, str) or not custom_id:
        raise FieldError(f"custom_id must be a non-empty string, got {_short(custom_id)}")
    method = request.get("method", "POST")
    if method != "POST":
        raise FieldError(f"method must be POST, got {_short(method)}")
    url = request.get("url")
    if url not in _PROMPT_KEY:
        raise FieldError(f"url {_short(url)} is not supported; the urls are "
                         f"{', '.join(_PROMPT_KEY)}")
    if not isinstance(request.get("body"), dict):
        raise FieldError(f"body must be a JSON object, got {_short(request.get('body'))}")
    unknown = sorted(set(request) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise FieldError(f"{unknown[0]} is not a field of a batch request line")


def _prompt(url: str, body: Mapping[str, Any]) -> str:
    """The prompt text; also rejects body fields this tool does not serve."""
    key = _PROMPT_KEY[url]
    for name, value in body.items():  # sorted would hide which one came first; order is the line's
        if value is None or name in SAMPLING_KEYS or name in ECHOED_KEYS or name == key:
            continue  # a null value asks for the default, which needs no support
        raise FieldError(f"body.{name} is not supported; the supported fields are "
                         f"{', '.join([key, *SAMPLING_KEYS, *sorted(ECHOED_KEYS)])}")
    if "max_tokens" in body and "max_completion_tokens" in body and None not in (
            body["max_tokens"], body["max_completion_tokens"]):
        raise FieldError("body.max_tokens and body.max_completion_tokens are both set; set one")
    if key == "prompt":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise FieldError(f"body.prompt must be a string, got {_short(prompt)}")
        return prompt
    return render_messages(body.get("messages"))


def render_messages(messages: Any) -> str:
    """Chat messages in the instruction-tuned format, ending with the model's turn.

    System (and ``developer``) text opens the first user turn, separated by a
    blank line: Gemma's format has no system role.

    Raises:
      FieldError: The messages are not a list of {role, content} with a user turn,
        naming the offending field (``body.messages[2].role``).
    """
    if not isinstance(messages, list) or not messages:
        raise FieldError(f"body.messages must be a non-empty list, got {_short(messages)}")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        where = f"body.messages[{i}]"
        if not isinstance(message, dict):
            raise FieldError(f"{where} must be an object, got {_short(message)}")
        role, content = message.get("role"), _content(message.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            system.append(content)
        elif role in ("user", "assistant"):
            turns.append(("user" if role == "user" else "model", content))
        else:
            raise FieldError(f"{where}.role {_short(role)} is not supported; the roles are "
                             "system, developer, user, assistant")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise FieldError(f"{where}.{extra[0]} is not supported")
    first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
    if first_user is None:
        raise FieldError("body.messages has no user message")
    if system:
        role, text = turns[first_user]
        turns[first_user] = (role, "\n\n".join([*system, text]))
    return tokenizer.chat_transcript(turns)


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError(f"{where} must be a string or a list of text parts, got "
                         f"{_short(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else part
            raise FieldError(f"{where}[{j}].type {_short(kind)} is not supported; only text "
                             "parts are")
        if not isinstance(part.get("text"), str):
            raise FieldError(f"{where}[{j}].text must be a string, got {_short(part.get('text'))}")
        texts.append(part["text"])
    return "".join(texts)


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields the body sets, in ``STAGED_SCHEMA``'s ``body`` struct's form."""
    fields: dict[str, Any] = {f: None for f in (*_SCALAR_FIELDS, "stop")}
    for key, field in SAMPLING_KEYS.items():
        value = body.get(key)
        if value is None:
            continue
        if field == "stop":
            fields["stop"] = _stop(value, f"body.{key}")
        else:  # JSON text; "hot", true, 1e999 fail the worker's check, named body.<field>
            fields[field] = value if isinstance(value, str) else json.dumps(value)
    return fields


def _stop(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise FieldError(f"{where} must be a string or a list of strings, got {_short(value)}")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def rows_table(rows: Sequence[StagedRow]) -> pa.Table:
    """Staged rows as a table of ``STAGED_SCHEMA``."""
    return pa.Table.from_pylist([r.to_row() for r in rows], schema=STAGED_SCHEMA)
