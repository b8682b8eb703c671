"""The prompt template of ``griffin-batch synthesize``: Jinja2, sandboxed, strict.

Templates are user input, so they render in Jinja2's immutable sandbox (no
attribute access to Python internals, no mutation of the variables), and with
``StrictUndefined``: a variable that a combination does not define is an error
naming the variable and the combination, never an empty string. As in Jinja2,
one trailing newline of the template is dropped (a template file's last line
end is not part of the prompt).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import fsspec
import jinja2
import jinja2.sandbox

from griffin_batch.jobs import config as config_lib

INLINE = "--template-text"
"""The ``source`` of a template given inline."""


@dataclasses.dataclass(frozen=True)
class Template:
    """A template's text and where it came from.

    Attributes:
      text: The template.
      source: Its file URL, or ``INLINE``.
      sha256: Hex SHA-256 of its UTF-8 bytes (a ``--resume`` refuses a changed one).
      size: Bytes of its file (of the text when inline).
    """

    text: str
    source: str
    sha256: str
    size: int

    @property
    def is_file(self) -> bool:
        """Whether it came from ``--template FILE``."""
        return self.source != INLINE

    def compile(self) -> jinja2.Template:
        """The compiled template.

        Raises:
          JobInputError: It does not parse (names the line).
        """
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined,
                                                          autoescape=False)
        try:
            return env.from_string(self.text)
        except jinja2.TemplateSyntaxError as e:
            raise config_lib.JobInputError(
                f"{self._named()}: line {e.lineno}: {e.message}") from None

    def render(self, compiled: jinja2.Template, variables: Mapping[str, Any], where: str) -> str:
        """The prompt of one combination.

        Args:
          compiled: ``compile()``'s result.
          variables: The combination.
          where: Names the combination in errors (its id and row).

        Raises:
          JobInputError: A variable is undefined there, or the template fails on
            its values (a sandbox refusal, a filter's error); names both.
        """
        try:
            return compiled.render(variables)
        except jinja2.UndefinedError as e:
            raise config_lib.JobInputError(
                f"{self._named()}: {e.message} in {where}; its variables are "
                f"{sorted(variables)}") from None
        except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as e:
            raise config_lib.JobInputError(
                f"{self._named()}: cannot render {where}: {type(e).__name__}: {e}") from None

    def _named(self) -> str:
        return f"--template {self.source}" if self.is_file else INLINE


def load(path: str | None, text: str | None) -> Template:
    """The template of ``--template FILE`` or ``--template-text TEXT`` (exactly one given).

    Raises:
      JobInputError: Neither or both given; the file cannot be read or is not UTF-8.
    """
    if (path is None) == (text is None):
        raise config_lib.JobInputError("give exactly one of --template FILE and --template-text")
    if text is not None:
        data = text.encode("utf-8", errors="surrogatepass")
        return Template(text=text, source=INLINE, sha256=hashlib.sha256(data).hexdigest(),
                        size=len(data))
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8")
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise config_lib.JobInputError(f"--template {path}: cannot read it: {e}") from None
    return Template(text=text, source=path, sha256=hashlib.sha256(data).hexdigest(),
                    size=len(data))
