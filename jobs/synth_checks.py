"""``--json-schema``: each completion must be JSON that the schema accepts.

``JsonSchemaCheck`` is the check a worker runs on every finished sample
(``actors.validation``): the completion is parsed as JSON (surrounding
whitespace allowed) and validated with ``jsonschema``, under the draft the
schema's ``$schema`` names (2020-12 when it names none). It travels to workers
as the schema's JSON text, and compiles its validator once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any

import fsspec
import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from griffin_batch.jobs import config as config_lib

MESSAGE_CHARS = 300
"""Longest reason recorded in a row's ``validation_error``."""


@functools.lru_cache(maxsize=8)
def _validator(schema_json: str) -> Any:
    schema = json.loads(schema_json)
    return jsonschema.validators.validator_for(schema)(schema)


def _not_json(name: str) -> Any:
    # Python's json reads NaN and Infinity; JSON has neither.
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


@dataclasses.dataclass(frozen=True)
class JsonSchemaCheck:
    """Passes a completion that is JSON valid under a schema.

    Attributes:
      schema_json: The schema, as JSON text.
    """

    schema_json: str

    def __call__(self, text: str) -> str | None:
        """None when ``text`` passes, else why not (one line)."""
        try:
            value = json.loads(text, parse_constant=_not_json)
        except json.JSONDecodeError as e:
            return f"not JSON: {e.msg} (line {e.lineno} column {e.colno})"
        except RecursionError:
            return "not JSON: nested too deeply"
        error = jsonschema.exceptions.best_match(_validator(self.schema_json).iter_errors(value))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path)
        message = f"{where or 'the value'}: {error.message}"
        return message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS - 3] + "..."


def load(url: str) -> tuple[JsonSchemaCheck, str]:
    """The check of the schema file ``url`` (any fsspec URL), and the file's SHA-256.

    Raises:
      JobInputError: The file cannot be read, is not JSON, or is not a valid
        schema of its draft (named).
    """
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
        schema = json.loads(data)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise config_lib.JobInputError(f"--json-schema {url}: cannot read it as JSON: {e}") from None
    if not isinstance(schema, dict | bool):
        raise config_lib.JobInputError(
            f"--json-schema {url}: a schema is an object (or true/false), got "
            f"{type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        raise config_lib.JobInputError(
            f"--json-schema {url} is not a valid JSON Schema: {e.message}") from None
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    return JsonSchemaCheck(text), hashlib.sha256(data).hexdigest()
