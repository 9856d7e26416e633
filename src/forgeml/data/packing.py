"""Documents to fixed-length training blocks for language-model pre-training, with no padding.

As nanoGPT and Hugging Face's `run_clm.py` (`group_texts`) do: all documents become one token
stream, cut into equal blocks; plus nanoGPT's two helpers for a single-file corpus (a held-out
tail for validation, random window offsets for batches).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from forgeml.errors import ConfigError, DataError

# How far back (as a share of the text) held_out_tail looks for a line break to cut at.
NEWLINE_SEARCH_FRACTION = 0.01


@dataclass(frozen=True)
class PackedBlocks:
    """Training blocks cut from one token stream.

    `blocks` has shape [n_blocks, block_size + 1] (int64): each row holds the inputs `row[:-1]` and
    the next-token targets `row[1:]`. `total_tokens` is the stream's length (separators included);
    `dropped_tokens` are the stream's final tokens that fit no whole block and so are never trained on.
    """

    blocks: np.ndarray
    dropped_tokens: int
    total_tokens: int


def pack_documents(token_ids: Iterable[Sequence[int]], block_size: int, separator_id: int | None) -> PackedBlocks:
    """Concatenate the documents and cut the stream into blocks of `block_size + 1` tokens.

    Each document is followed by `separator_id` (the end-of-text id) when given, so the model learns
    where documents end and never reads two documents as one text. Consecutive blocks overlap by one
    token (block i is stream[i * block_size : (i + 1) * block_size + 1]), so every token after the
    first is a target exactly once, including those at block boundaries, which `run_clm.py`'s
    non-overlapping blocks never predict.

    The tail that does not fill a whole block is dropped, as in `run_clm.py`, and counted in
    `dropped_tokens`. A stream shorter than `block_size + 1` gives zero blocks (shape [0, block_size + 1])
    and `dropped_tokens == total_tokens`; the caller, who knows which data and setting those are,
    turns that into an error the user can act on.

    With a Hugging Face causal LM, which shifts `labels` itself, feed `input_ids=row[:-1]` and
    compute the loss on `row[1:]` yourself, or pass `labels=row[1:], shift_labels=row[1:]`.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    separator = [] if separator_id is None else [separator_id]
    pieces = [np.asarray([*document, *separator], dtype=np.int64) for document in token_ids]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    n_blocks = max(0, (len(stream) - 1) // block_size)
    if n_blocks == 0:
        return PackedBlocks(np.zeros((0, block_size + 1), dtype=np.int64), len(stream), len(stream))
    windows = np.lib.stride_tricks.sliding_window_view(stream, block_size + 1)
    blocks = np.ascontiguousarray(windows[: n_blocks * block_size : block_size])
    used = n_blocks * block_size + 1
    return PackedBlocks(blocks, len(stream) - used, len(stream))


def held_out_tail(text: str, fraction: float) -> tuple[str, str]:
    """Split one long text into (training head, held-out tail), nanoGPT's split of a single file.

    The tail holds about `fraction` of the characters. The cut moves back to just after the nearest
    line break when one lies within the last 1 % of the text before the cut, so no line is split
    between training and validation; otherwise it falls exactly at the fraction. `head + tail == text`.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ConfigError(f"data.split.validation must be a fraction in (0, 1), got {fraction!r}")
    cut = int(len(text) * (1 - fraction))
    search_from = max(0, cut - max(1, int(len(text) * NEWLINE_SEARCH_FRACTION)))
    newline = text.rfind("\n", search_from, cut)
    if newline != -1:
        cut = newline + 1
    head, tail = text[:cut], text[cut:]
    if not head or not tail:
        raise DataError(
            f"the text has {len(text)} characters: too few to hold out a validation tail of "
            f"data.split.validation={fraction} and keep some text for training"
        )
    return head, tail


def random_windows(n_tokens: int, block_size: int, count: int, generator: np.random.Generator) -> np.ndarray:
    """`count` random start offsets for nanoGPT-style batches from a stream of `n_tokens` tokens.

    Offsets lie in [0, n_tokens - block_size - 1], so the inputs stream[i : i + block_size] and the
    targets stream[i + 1 : i + 1 + block_size] both fit. Returns int64 of shape [count].
    """
    if n_tokens < block_size + 1:
        raise ValueError(f"a stream of {n_tokens} tokens holds no window of block_size + 1 = {block_size + 1} tokens")
    return generator.integers(0, n_tokens - block_size, size=count, dtype=np.int64)
