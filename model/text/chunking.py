"""Text to injections: tokenized as a stream, in bounded memory, and cut into chunks on token boundaries.

`token_stream` gives exactly the ids that tokenizing the whole text at once gives, without ever holding
more than a few blocks of it: the text is cut between blocks only where tokenizing the two sides apart
gives the same ids as tokenizing them together (checked on a window around the cut).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .tokenizer import encode

MIN_CHUNK_TOKENS = 16  # the authors' models need at least 16 tokens per injection
BLOCK_CHARS = 1 << 16  # characters tokenized per step
MARGIN_CHARS = 512  # context on each side of a cut that must tokenize the same apart as together
CUT_TRIES = 8  # cut positions tried per block before taking more text


def cut_candidates(text: str, around: int, count: int) -> list[int]:
    """Up to `count` positions before `around` (back to around / 2) where a whitespace run starts after a
    non-space character (nearest first): the usual word boundaries of pre-tokenizers."""
    found = []
    for p in range(around, max(around // 2, 1), -1):
        if text[p].isspace() and not text[p - 1].isspace():
            found.append(p)
            if len(found) == count:
                break
    return found


def safe_cut(tokenizer, text: str, around: int) -> tuple[int, list[int]] | None:
    """(p, ids of text[:p]) for a cut p near `around` that tokenizes text[:p] and text[p:] as the whole
    text does, judged on MARGIN_CHARS on each side; None if no tried position qualifies."""
    for p in cut_candidates(text, around, CUT_TRIES):
        lo, hi = max(0, p - MARGIN_CHARS), p + MARGIN_CHARS
        left, right, whole = (
            encode(tokenizer, text[lo:p]),
            encode(tokenizer, text[p:hi]),
            encode(tokenizer, text[lo:hi]),
        )
        if left + right == whole:
            return p, encode(tokenizer, text[:p])
    return None


def token_stream(tokenizer, texts: Iterable[str], block_chars: int = BLOCK_CHARS) -> Iterator[list[int]]:
    """The token ids of the concatenated `texts`, in pieces, as encode(tokenizer, whole text) gives them."""
    buffer = ""
    for text in texts:
        buffer += text
        while len(buffer) >= block_chars + 2 * MARGIN_CHARS:
            cut = safe_cut(tokenizer, buffer, block_chars)
            if cut is None:  # no clean word boundary here: wait for more text (rare: one very long "word")
                if len(buffer) < 64 * block_chars:
                    break
                cut = len(buffer), encode(tokenizer, buffer)
            p, ids = cut
            buffer = buffer[p:]
            if ids:
                yield ids
    if buffer:
        yield encode(tokenizer, buffer)


def chunked(pieces: Iterable[list[int]], chunk_tokens: int, min_tokens: int = MIN_CHUNK_TOKENS) -> Iterator[list[int]]:
    """Chunks of at most `chunk_tokens` ids from a stream of id pieces; a final piece under `min_tokens`
    is merged into the previous chunk (which can then exceed `chunk_tokens` by up to min_tokens - 1). A
    stream under `min_tokens` ids gives one short chunk: the caller refuses it (see `count_chunks`)."""
    if chunk_tokens < min_tokens:
        raise ValueError(f"chunks need at least {min_tokens} tokens, not {chunk_tokens}")
    held: list[int] = []  # what has not made a chunk yet
    for piece in pieces:
        held += piece
        start = 0
        while len(held) - start >= chunk_tokens + min_tokens:  # the next chunk can no longer absorb a short tail
            yield held[start : start + chunk_tokens]
            start += chunk_tokens
        held = held[start:]
    if held:  # under chunk_tokens + min_tokens: one chunk, or a full one with a short tail merged in
        yield held


def chunk_sizes(
    tokens: int, chunk_tokens: int, min_tokens: int = MIN_CHUNK_TOKENS, within_limit: bool = False
) -> list[int]:
    """The chunk lengths `chunked` gives for `tokens` ids: a last chunk under `min_tokens` joins the one
    before it. With `within_limit` it takes what it lacks from that one instead, so that no chunk exceeds
    `chunk_tokens` (a retention sweep's distances stay exact)."""
    sizes = [chunk_tokens] * (tokens // chunk_tokens) + ([tokens % chunk_tokens] if tokens % chunk_tokens else [])
    if len(sizes) > 1 and sizes[-1] < min_tokens:
        short = min_tokens - sizes[-1]
        sizes[-2:] = [sizes[-2] - short, min_tokens] if within_limit else [sizes[-2] + sizes[-1]]
    return sizes
