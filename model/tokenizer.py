"""SentencePiece tokenizer with the reference sampler's conventions and streaming decode.

``Tokenizer.encode`` prepends BOS exactly as the reference sampler does
(``[bos_id] + sp.EncodeAsIds(text)``) and ``decode`` is SentencePiece's own
``DecodeIds``. ``StreamDecoder`` turns a growing token stream into text pieces
whose concatenation equals ``decode`` of the whole stream.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Iterable, Mapping, Sequence

import fsspec
import sentencepiece as spm

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a SentencePiece model from a local path or any fsspec URL.

    Args:
      path: ``tokenizer.model`` file, e.g. ``/data/tokenizer.model`` or
        ``gs://bucket/tokenizer.model``.

    Returns:
      The tokenizer.

    Raises:
      FileNotFoundError: Nothing exists at ``path``.
      ValueError: The file is not a SentencePiece model.
    """
    try:
        with fsspec.open(path, "rb") as f:
            proto = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(
            f"tokenizer path {path} is a directory, expected a SentencePiece .model file"
        ) from None
    return Tokenizer(proto, source=path)


CHAT_ROLES = ("user", "model")
"""The turn roles of the instruction-tuned format (Gemma has no system role)."""


def chat_transcript(turns: Sequence[tuple[str, str]]) -> str:
    """A conversation in the instruction-tuned format, ending with an open model turn.

    Args:
      turns: (role, text) pairs in order; roles from ``CHAT_ROLES``.

    Returns:
      Each turn as ``<start_of_turn>ROLE\nTEXT<end_of_turn>\n``, then
      ``<start_of_turn>model\n`` for the model to continue.

    Raises:
      ValueError: A role outside ``CHAT_ROLES``.
    """
    pieces = []
    for role, text in turns:
        if role not in CHAT_ROLES:
            raise ValueError(f"chat role {role!r} is not one of {CHAT_ROLES}")
        pieces.append(f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n")
    return "".join(pieces) + f"{START_OF_TURN}model\n"


class Tokenizer:
    """A SentencePiece model plus the ids and prompt format generation needs.

    Picklable (the serialized model travels), so it can be shipped to workers.

    Attributes:
      bos_id: Beginning-of-sequence id, prepended by ``encode``.
      eos_id: End-of-sequence id.
      pad_id: Padding id.
      vocab_size: Number of pieces.
      end_of_turn_id: Id of ``<end_of_turn>`` or None when the vocabulary lacks it.
      stop_token_ids: Ids that end generation: EOS and ``<end_of_turn>`` when present.
    """

    def __init__(self, model_proto: bytes, *, source: str = "<bytes>"):
        self._proto = bytes(model_proto)
        self._source = source
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError or OSError by version
            raise ValueError(f"{source} is not a valid SentencePiece model: {e}") from None
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.vocab_size: int = self._sp.vocab_size()
        self.end_of_turn_id: int | None = self._piece_id(END_OF_TURN)
        self.stop_token_ids: tuple[int, ...] = tuple(
            t for t in (self.eos_id, self.end_of_turn_id) if t is not None and t >= 0
        )

    def _piece_id(self, piece: str) -> int | None:
        i = self._sp.PieceToId(piece)
        # PieceToId answers unk_id for pieces outside the vocabulary.
        return None if i == self._sp.unk_id() and piece != self._sp.IdToPiece(i) else i

    def __getstate__(self):
        return {"model_proto": self._proto, "source": self._source}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], source=state["source"])

    def __repr__(self) -> str:
        return f"Tokenizer({self._source!r}, vocab_size={self.vocab_size})"

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model."""
        return self._proto

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The underlying SentencePieceProcessor."""
        return self._sp

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, BOS first (as the reference sampler encodes prompts)."""
        ids = self._sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if add_bos else list(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """SentencePiece's decoding of ``ids`` (control tokens such as BOS/EOS decode to "")."""
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))

    def chat_prompt(self, user_text: str) -> str:
        """Wraps one user turn in the instruction-tuned format (reference ``apply_it_formatter``)."""
        return chat_transcript([("user", user_text)])

    @functools.cached_property
    def decode_constants(self) -> DecodeConstants:
        """What every ``StreamDecoder`` of this tokenizer needs, found once.

        Finding it scans the whole vocabulary (256k pieces for Gemma): done per
        sample, it would stall the engine for a good part of a second each time.
        """
        return DecodeConstants.of(self)

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental detokenizer for one token stream."""
        return StreamDecoder(self)


@dataclasses.dataclass(frozen=True)
class DecodeConstants:
    """A tokenizer's facts that incremental decoding relies on (see ``StreamDecoder``).

    Attributes:
      byte_value: Byte-fallback piece id -> the byte it stands for.
      anchor: An ordinary piece decoded in front of each window once text has started.
      anchor_text: Its text.
      probe: A piece starting with "▁" (None if there is none).
      probe_at_start: The probe's text at the start of a text.
      probe_after_text: The probe's text after other text.
    """

    byte_value: Mapping[int, int]
    anchor: int
    anchor_text: str
    probe: int | None
    probe_at_start: str
    probe_after_text: str

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> DecodeConstants:
        sp = tokenizer.processor
        byte_value = {i: int(sp.IdToPiece(i)[3:5], 16)
                      for i in range(sp.GetPieceSize()) if sp.IsByte(i)}
        anchor = _find_piece(sp, lambda p: p.isalnum())
        if anchor is None:  # an ASCII byte is a complete UTF-8 character too
            anchor = next((i for i, b in byte_value.items() if b == ord("a")), None)
        if anchor is None:
            raise ValueError("tokenizer has neither an alphanumeric piece nor byte fallback")
        anchor_text = tokenizer.decode([anchor])
        probe = _find_piece(sp, lambda p: p.startswith("\u2581"))
        at_start = after_text = ""
        if probe is not None:
            at_start = tokenizer.decode([probe])
            after_text = tokenizer.decode([anchor, probe])[len(anchor_text) :]
        return cls(types.MappingProxyType(byte_value), anchor, anchor_text, probe, at_start,
                   after_text)


class StreamDecoder:
    """Incremental detokenizer: ``"".join(pushes) + flush() == tokenizer.decode(all_ids)``.

    SentencePiece decodes each piece on its own except for two couplings, and
    the decoder keeps exactly the state they need:

    * Byte-fallback pieces (``<0xE2>``) are grouped into UTF-8 characters, so a
      trailing, still incomplete character (at most 3 byte pieces) is held back.
    * At the start of the text, the leading "▁" of a piece is dropped (the
      dummy prefix; all leading ones when the model removes extra whitespace).
      While that can still happen, windows are decoded on their own and a
      probe piece tells whether it still can; afterwards, windows are decoded
      behind a fixed anchor piece, whose text is then cut off again.

    State is bounded: the held-back ids (<= 3) and one flag.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        c = tokenizer.decode_constants
        self._byte_value, self._anchor, self._anchor_text = c.byte_value, c.anchor, c.anchor_text
        self._probe, self._probe_at_start = c.probe, c.probe_at_start
        # True while a leading "▁" would still be dropped (nothing visible decoded yet).
        self._at_start = c.probe_at_start != c.probe_after_text
        self._pending: list[int] = []

    def state(self) -> dict:
        """The decoder's variable state as JSON-able data (no tokenizer in it)."""
        return {"pending": list(self._pending), "at_start": self._at_start}

    def load_state(self, state: Mapping[str, object]) -> None:
        """Restores ``state()`` output, checking it first.

        Raises:
          ValueError: ``state`` is not what ``state()`` returns for this tokenizer.
        """
        pending, at_start = state.get("pending"), state.get("at_start")
        vocab = self._tok.vocab_size
        if (not isinstance(pending, list) or len(pending) > 3 or not isinstance(at_start, bool)
                or any(type(t) is not int or not 0 <= t < vocab for t in pending)):
            raise ValueError(f"not a stream decoder state: {state!r}")
        self._pending, self._at_start = list(pending), at_start

    @property
    def num_held(self) -> int:
        """Ids pushed but not yet decoded: the bytes of an unfinished character (<= 3)."""
        return len(self._pending)

    def push(self, token_ids: int | Sequence[int]) -> str:
        """Adds tokens; returns the text they complete (may be "")."""
        if isinstance(token_ids, int):
            self._pending.append(token_ids)
        else:
            self._pending.extend(int(t) for t in token_ids)
        hold = self._incomplete_tail()
        ready = self._pending[: len(self._pending) - hold]
        if not ready:
            return ""
        self._pending = self._pending[len(ready) :]
        return self._decode_window(ready)

    def flush(self) -> str:
        """Returns whatever is held back (an unfinished character decodes as U+FFFD)."""
        ready, self._pending = self._pending, []
        return self._decode_window(ready) if ready else ""

    def _decode_window(self, ids: list[int]) -> str:
        if not self._at_start:
            text = self._tok.decode([self._anchor, *ids])
            if not text.startswith(self._anchor_text):  # would mean pieces couple unexpectedly
                raise RuntimeError(f"anchor {self._anchor_text!r} changed when decoding {ids}")
            return text[len(self._anchor_text) :]
        text = self._tok.decode(ids)
        probed = self._tok.decode([*ids, self._probe])
        self._at_start = probed == text + self._probe_at_start
        return text

    def _incomplete_tail(self) -> int:
        """Number of trailing byte pieces that start a UTF-8 character not yet complete."""
        tail = []
        for t in reversed(self._pending[-4:]):
            b = self._byte_value.get(t)
            if b is None:
                break
            tail.append(b)
        # tail holds the trailing bytes, last first. Find the last lead byte.
        for k, b in enumerate(tail):  # k = number of continuation bytes after it
            if b & 0xC0 == 0x80:  # continuation byte
                continue
            need = (
                1 if b & 0xE0 == 0xC0 else 2 if b & 0xF0 == 0xE0 else 3 if b & 0xF8 == 0xF0 else 0
            )
            return k + 1 if k < need else 0
        return 0


def _find_piece(sp: spm.SentencePieceProcessor, accept) -> int | None:
    """The first ordinary piece (not control, unknown, unused or byte) whose text ``accept``s."""
    for i in range(sp.GetPieceSize()):
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i) or sp.IsByte(i):
            continue
        piece = sp.IdToPiece(i)
        if len(piece) > 1 and accept(piece) and "\u2581" not in piece[1:]:
            return i
    return None
