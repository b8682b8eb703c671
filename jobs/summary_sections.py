"""Splitting a long document into sections of at most a token budget, on paragraph boundaries.

Paragraphs (text between blank lines) are packed greedily into sections of at
most ``budget`` tokens. A paragraph longer than the budget is cut on sentence
ends and line breaks, and a sentence longer than the budget is cut hard, on
token boundaries. Token counts are the tokenizer's own (no BOS), checked once
more on each finished section: a section whose text counts more than its
pieces did (pieces can tokenize differently when joined) is cut hard too, so
no section is ever over the budget.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
PARAGRAPH_JOIN = "\n\n"
SENTENCE_JOIN = " "


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` without BOS (what a document's ``document_tokens`` counts)."""
    return len(tokenizer.encode(text, add_bos=False))


def split(text: str, budget: int, tokenizer) -> list[str]:
    """``text`` as sections of at most ``budget`` tokens each, in order.

    Args:
      text: The document.
      budget: Most tokens per section (``--section-tokens``).
      tokenizer: Counts tokens (``encode``) and cuts hard (``decode``).

    Returns:
      The sections; one (the text itself) when it fits the budget.
    """
    if budget <= 0:
        raise ValueError(f"the section budget must be positive, got {budget}")
    sections: list[str] = []
    current: list[str] = []
    used = 0
    join_cost = count_tokens(tokenizer, PARAGRAPH_JOIN)
    for joiner, piece, n in _pieces(text, budget, tokenizer):
        cost = n + (join_cost if current else 0)
        if current and used + cost > budget:
            sections.extend(_fit("".join(current), budget, tokenizer))
            current, used, cost = [], 0, n
        current.append(piece if not current else joiner + piece)
        used += cost
    if current:
        sections.extend(_fit("".join(current), budget, tokenizer))
    return sections


def _pieces(text: str, budget: int, tokenizer) -> Iterator[tuple[str, str, int]]:
    """(joiner, text, tokens) of each paragraph, or of each sentence of a paragraph over budget."""
    for paragraph in _PARAGRAPH.split(text.strip()):
        if not paragraph.strip():
            continue
        n = count_tokens(tokenizer, paragraph)
        if n <= budget:
            yield PARAGRAPH_JOIN, paragraph, n
            continue
        joiner = PARAGRAPH_JOIN
        for sentence in _SENTENCE.split(paragraph):
            if not sentence.strip():
                continue
            for piece in _fit(sentence, budget, tokenizer):
                yield joiner, piece, count_tokens(tokenizer, piece)
                joiner = SENTENCE_JOIN


def _fit(text: str, budget: int, tokenizer) -> list[str]:
    """``text`` itself when it fits ``budget``, else cut hard into pieces of ``budget`` tokens."""
    ids = tokenizer.encode(text, add_bos=False)
    if len(ids) <= budget:
        return [text]
    pieces = [tokenizer.decode(ids[i:i + budget]) for i in range(0, len(ids), budget)]
    # Decoded pieces re-encode to at most their ids (a rare merge shortens them); never more.
    return [p for p in pieces if p.strip()]
