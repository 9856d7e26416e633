"""Memorisation audit for causal language models: canary exposure, verbatim extraction, membership inference.

Three measurements of how much of its training text a causal LM keeps, from the most controlled to the
most natural:

1. Canary exposure (Carlini et al., 2019, "The Secret Sharer: Evaluating and Testing Unintended
   Memorization in Neural Networks"). Random secrets ("my secret number is 4 8 1 9 3 7 2 0 5") are
   inserted into the training text 1, 5 and 20 times before training. Exposure says how much more likely
   the trained model finds the inserted secret than the other secrets it could have been: 0 bits is "no
   more likely than a random secret", log2 |R| bits (|R| = 10^digits) is "the likeliest of them all".
2. Verbatim extraction (Carlini et al., 2021, "Extracting Training Data from Large Language Models";
   Carlini et al., 2023, "Quantifying Memorization Across Neural Language Models"): prompted with P tokens
   of training text, does greedy decoding give the next M tokens exactly? The same on held-out text is the
   reference: a model that "extracts" text it never saw is predicting common text, not recalling it.
3. Membership inference on windows of text: the loss-threshold attack (Yeom et al., 2018) of
   `trust.membership`, with fixed-length windows of the training and held-out token streams as the rows.

How a run uses it: `plan_canaries(options)` and `insert_canaries(train_documents, canaries, seed)` change
the training split after it is split off, cleaned and redacted and before the tokenizer is trained (a
character tokenizer that never saw a digit reads every secret as the same <unk> tokens); after training,
`audit_memorization(...)` measures all three and writes its plots. `card_section(result)` renders it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from forgeml.errors import ConfigError, DataError
from forgeml.evaluate import plots
from forgeml.generate import context_length, forward_arguments, returned_cache
from forgeml.trust import membership

DEFAULT_PREFIX = "my secret number is "
SECRET_SEPARATOR = " "  # between digits: most tokenizers then give one token per digit
EXPOSURE_METHOD = "canary exposure (Carlini et al., 2019, The Secret Sharer)"
EXTRACTION_METHOD = "greedy verbatim extraction (Carlini et al., 2021; 2023)"
MEMBERSHIP_UNIT = "window of text"
EXPOSURE_PLOT = "memorization_exposure.png"
ROC_PLOT = "memorization_membership_roc.png"
# Windows longer than this cost a large model minutes on a CPU and add little to a per-window mean loss.
MAX_DEFAULT_WINDOW = 256
MAX_DEFAULT_EXTRACTION_TOKENS = 32
MAX_CANARY_DRAWS = 1000

DEFAULT_OPTIONS: dict[str, Any] = {
    "seed": 0,
    "batch_tokens": 4096,  # tokens per forward pass: bounds the [rows, length, vocabulary] logits in memory
    "canaries": {"count": 4, "repetitions": [1, 5, 20], "digits": 9, "prefix": DEFAULT_PREFIX, "candidates": 1000},
    "extraction": {"prompts": 100, "prefix_tokens": None, "suffix_tokens": None},
    "membership": {"windows": 500, "window_tokens": None, "bootstrap": 200},
}


# --- options ---------------------------------------------------------------------------------------


def resolve_options(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`options` (the config's `audit.memorization`) merged over DEFAULT_OPTIONS and checked.

    Unknown keys and bad values raise a ConfigError naming `audit.memorization.<key>` and what is allowed.
    `extraction.prefix_tokens` / `suffix_tokens` null mean half the model's context each, at most 32;
    `membership.window_tokens` null means the model's context, at most 256.
    """
    options = dict(options or {})
    _check_keys(options, DEFAULT_OPTIONS, "audit.memorization")
    resolved: dict[str, Any] = {}
    for key, default in DEFAULT_OPTIONS.items():
        given = options.get(key, default)
        if isinstance(default, dict):
            if not isinstance(given, dict):
                raise ConfigError(f"audit.memorization.{key}: expected a mapping of {', '.join(default)}")
            _check_keys(given, default, f"audit.memorization.{key}")
            given = {**default, **given}
        resolved[key] = given
    _check_int(resolved["seed"], "audit.memorization.seed", 0)
    _check_int(resolved["batch_tokens"], "audit.memorization.batch_tokens", 1)
    canaries = resolved["canaries"]
    _check_int(canaries["count"], "audit.memorization.canaries.count", 0)
    _check_repetitions(canaries["repetitions"], "audit.memorization.canaries.repetitions")
    canaries["repetitions"] = [int(r) for r in canaries["repetitions"]]
    _check_int(canaries["digits"], "audit.memorization.canaries.digits", 1, 30)
    _check_int(canaries["candidates"], "audit.memorization.canaries.candidates", 1)
    if not isinstance(canaries["prefix"], str) or not canaries["prefix"].strip():
        raise ConfigError(f"audit.memorization.canaries.prefix: must be non-empty text, got {canaries['prefix']!r}")
    extraction = resolved["extraction"]
    _check_int(extraction["prompts"], "audit.memorization.extraction.prompts", 1)
    for key in ("prefix_tokens", "suffix_tokens"):
        if extraction[key] is not None:
            _check_int(extraction[key], f"audit.memorization.extraction.{key}", 1)
    windows = resolved["membership"]
    _check_int(windows["windows"], "audit.memorization.membership.windows", 2)
    if windows["window_tokens"] is not None:
        _check_int(windows["window_tokens"], "audit.memorization.membership.window_tokens", 2)
    _check_int(windows["bootstrap"], "audit.memorization.membership.bootstrap", 0)
    return resolved


def _check_keys(given: dict[str, Any], known: dict[str, Any], where: str) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; known keys: {', '.join(known)}")


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ConfigError(f"{name}: must be {allowed}, got {value!r}")


def _check_repetitions(values: Any, name: str) -> None:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"{name}: must be a non-empty list of integers >= 1, got {values!r}")
    for value in values:
        _check_int(value, name, 1)
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}: each repetition count once, got {list(values)!r}")


# --- canaries --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Canary:
    """One inserted secret: `text` (= prefix + secret) goes into the training text `repetitions` times."""

    prefix: str
    secret: str  # digits joined by SECRET_SEPARATOR, e.g. "4 8 1 9 3 7 2 0 5"
    text: str
    repetitions: int

    @property
    def digits(self) -> int:
        return len(self.secret.split(SECRET_SEPARATOR))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Canary:
        """A canary saved with `to_dict` (e.g. read back from a run's canaries.json)."""
        try:
            canary = cls(str(record["prefix"]), str(record["secret"]), str(record["text"]), int(record["repetitions"]))
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"canary record {record!r:.200}: needs prefix, secret, text, repetitions ({error})"
            ) from None
        if canary.text != canary.prefix + canary.secret:
            raise DataError(f"canary record {record!r:.200}: text must be prefix + secret")
        return canary


def make_canaries(
    count: int,
    repetitions: Sequence[int] = (1, 5, 20),
    seed: int = 0,
    digits: int = 9,
    prefix: str = DEFAULT_PREFIX,
) -> list[Canary]:
    """`count` canaries for each repetition count, each with its own random secret of `digits` digits.

    Carlini et al. (2019), "The Secret Sharer": a canary is a fixed format with a random secret drawn
    uniformly from the space R of all 10^digits secrets; the secrets are distinct and drawn from a
    generator seeded by `seed` alone, so the same arguments give the same canaries. Canaries are listed by
    repetition count, then in draw order.

    The set is redrawn (up to 1,000 times) until its secrets use all ten digits between them, when they
    have ten or more digits in all: a character tokenizer trained on text whose only digits are the
    canaries' would read a digit no canary uses as <unk>, and the candidate secrets that exposure compares
    each canary with would then differ from it in the tokenizer rather than in the model.
    """
    _check_int(count, "count", 1)
    _check_repetitions(repetitions, "repetitions")
    _check_int(digits, "digits", 1, 30)
    _check_int(seed, "seed", 0)
    total = count * len(repetitions)
    if total > 10**digits // 2:
        raise ConfigError(f"digits: {digits} digits give too few secrets for {total} distinct canaries; use more")
    rng = _rng(seed, "canaries")
    for _ in range(MAX_CANARY_DRAWS):
        secrets = _distinct_secrets(rng, total, digits)
        if total * digits < 10 or len(set("".join(secrets)) - {SECRET_SEPARATOR}) == 10:
            break
    chosen = iter(secrets)
    return [
        Canary(prefix, secret, prefix + secret, int(times))
        for times in repetitions
        for secret in (next(chosen) for _ in range(count))
    ]


def _distinct_secrets(rng: np.random.Generator, count: int, digits: int) -> list[str]:
    secrets: list[str] = []
    while len(secrets) < count:
        secret = _format_secret(rng.integers(0, 10, size=digits))
        if secret not in secrets:
            secrets.append(secret)
    return secrets


def plan_canaries(options: dict[str, Any] | None = None) -> list[Canary]:
    """The canaries `audit.memorization` asks for (none when `canaries.count` is 0)."""
    resolved = resolve_options(options)
    canaries = resolved["canaries"]
    if canaries["count"] == 0:
        return []
    return make_canaries(
        canaries["count"], canaries["repetitions"], resolved["seed"], canaries["digits"], canaries["prefix"]
    )


def insert_canaries(documents: list[str], canaries: Sequence[Canary], seed: int = 0) -> list[str]:
    """The training documents with each canary's text put in `repetitions` times, at seeded random places.

    One document (a single long text such as Tiny Shakespeare): every copy becomes a whole line of its
    own, inserted before a randomly chosen existing line (distinct lines while there are enough of them),
    so no line of the text is split. Several documents: every copy becomes an extra document, inserted at a
    random place in the list. Nothing else changes: removing the copies gives `documents` back. The same
    arguments give the same result; `documents` itself is not modified.
    """
    if isinstance(documents, str) or not isinstance(documents, list) or not documents:
        raise DataError("documents: must be a non-empty list of training texts")
    if not all(isinstance(document, str) for document in documents):
        raise DataError("documents: every document must be text")
    _check_int(seed, "seed", 0)
    rng = _rng(seed, "insert")
    copies = [canary.text for canary in canaries for _ in range(canary.repetitions)]
    if any("\n" in copy or "\r" in copy for copy in copies):
        raise DataError("canaries: a canary's text must be one line (no line breaks)")
    copies = [copies[i] for i in rng.permutation(len(copies))]  # copies of one canary spread apart
    if not copies:
        return list(documents)
    if len(documents) == 1:
        return [_insert_lines(documents[0], copies, rng)]
    places = rng.integers(0, len(documents) + 1, size=len(copies))
    return _interleave(list(documents), copies, places, lambda copy: copy)


def _insert_lines(text: str, copies: list[str], rng: np.random.Generator) -> str:
    lines = text.splitlines(keepends=True)
    # Only before existing lines: each of those follows a line break (or starts the text), so every
    # inserted copy stands as a whole line, even when the text does not end with a line break.
    places = rng.choice(len(lines), size=len(copies), replace=len(copies) > len(lines))
    return "".join(_interleave(lines, copies, places, lambda copy: copy + "\n"))


def _interleave(items: list[str], copies: list[str], places: np.ndarray, render: Callable[[str], str]) -> list[str]:
    """`items` with copy i inserted before items[places[i]] (after the last item when places[i] == len)."""
    before: dict[int, list[str]] = {}
    for copy, place in zip(copies, places.tolist(), strict=True):
        before.setdefault(place, []).append(render(copy))
    result: list[str] = []
    for index, item in enumerate(items):
        result.extend(before.get(index, []))
        result.append(item)
    result.extend(before.get(len(items), []))
    return result


# --- (a) exposure ----------------------------------------------------------------------------------


def exposure(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    canary: Canary,
    candidates: int = 1000,
    seed: int = 0,
    batch_tokens: int = 4096,
) -> dict[str, Any]:
    """The exposure of one canary (Carlini et al., 2019, "The Secret Sharer").

    exposure = log2 |R| - log2 rank, where R is the space of all 10^digits secrets and rank is the
    canary's place (1 = likeliest) when every text "prefix + secret" of R is sorted by the model's
    log-perplexity, -log2 P(text) summed over its tokens. |R| is too large to score, so the rank is
    estimated from `candidates` secrets drawn uniformly from R with a generator seeded by `seed`:
    rank ~ 1 + |R| x (share of sampled candidates with a strictly lower log-perplexity than the canary).

    The estimate resolves exposures up to about log2(candidates) bits; a canary likelier than every
    sampled candidate gets rank 1, i.e. the largest possible exposure log2 |R|, which then means "more
    likely than all the samples" rather than a measured value. Carlini et al.'s alternative fits a
    skew-normal distribution to the sampled log-perplexities and reads the rank off its tail; it
    extrapolates past the samples but assumes that shape.

    Each text is scored after the tokenizer's end-of-text token (the document separator in training),
    so its first token is scored too. Texts of different token lengths are right-padded and masked.
    Returns the canary's fields plus exposure, max_exposure (log2 |R|), log_perplexity (bits),
    better_candidates, candidates and rank.
    """
    return canary_exposures(lm, tokenizer, [canary], candidates, seed, batch_tokens)[0]


def canary_exposures(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    canaries: Sequence[Canary],
    candidates: int = 1000,
    seed: int = 0,
    batch_tokens: int = 4096,
) -> list[dict[str, Any]]:
    """`exposure` of each canary, in order; canaries of one format share one scored sample of candidates."""
    _check_int(candidates, "candidates", 1)
    _check_int(seed, "seed", 0)
    _check_int(batch_tokens, "batch_tokens", 1)
    results: dict[int, dict[str, Any]] = {}
    formats: dict[tuple[str, int], list[int]] = {}
    for index, canary in enumerate(canaries):
        formats.setdefault((canary.prefix, canary.digits), []).append(index)
    with _evaluating(lm):
        for (prefix, digits), members in formats.items():
            secrets = [_format_secret(row) for row in _rng(seed, "candidates").integers(0, 10, (candidates, digits))]
            texts = [canaries[i].text for i in members] + [prefix + secret for secret in secrets]
            sequences = _scored_sequences(lm, tokenizer, texts)
            bits = _summed_nll(lm, sequences, batch_tokens) / math.log(2)
            candidate_bits = bits[len(members) :]
            for offset, index in enumerate(members):
                better = int((candidate_bits < bits[offset]).sum())
                results[index] = _exposure_record(canaries[index], float(bits[offset]), better, candidates)
    return [results[index] for index in range(len(canaries))]


def _exposure_record(canary: Canary, bits: float, better: int, candidates: int) -> dict[str, Any]:
    space_bits = canary.digits * math.log2(10)
    # log2(1 + |R| * share) without forming |R| (10^30 is past float's exact integers, not its range).
    rank_bits = math.log2(1 + 10.0**canary.digits * better / candidates)
    return {
        **canary.to_dict(),
        "exposure": max(0.0, space_bits - rank_bits),
        "max_exposure": space_bits,
        "log_perplexity": bits,
        "better_candidates": better,
        "candidates": candidates,
        "rank": 2.0**rank_bits,
    }


def _scored_sequences(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text after the end-of-text token, checked to fit the model and to keep secrets apart."""
    start = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sequences = [start + list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    unknown = tokenizer.unk_token_id
    unreadable = [text for text, ids in zip(texts, sequences, strict=True) if unknown is not None and unknown in ids]
    if unreadable or len({tuple(ids) for ids in sequences}) < len(set(texts)):
        # Secrets the tokenizer cannot tell apart would tie or lose for the tokenizer's sake, not the model's.
        unknown_characters = sorted({c for text in unreadable for c in text if unknown in tokenizer(c)["input_ids"]})
        raise DataError(
            f"canaries: the tokenizer cannot tell the secrets apart (it reads {''.join(unknown_characters)!r} as "
            f"{tokenizer.unk_token or 'unknown'}); insert the canaries into the training text before the tokenizer "
            "is trained on it, with enough canaries (or digits) to use every digit"
        )
    context = context_length(lm)
    longest = max(map(len, sequences))
    if context is not None and longest > context:
        raise ConfigError(
            f"audit.memorization.canaries: a canary is {longest} tokens, longer than the model's context of "
            f"{context}; use fewer digits or a shorter prefix"
        )
    return sequences


# --- (b) extraction --------------------------------------------------------------------------------


def extraction_rate(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    prompts: int = 100,
    prefix_tokens: int | None = None,
    suffix_tokens: int | None = None,
    seed: int = 0,
    batch_tokens: int = 4096,
) -> dict[str, Any]:
    """Share of prompts from `texts` whose greedy continuation is the text's own next tokens, exactly.

    The verbatim-extraction test of Carlini et al. (2021, "Extracting Training Data from Large Language
    Models") in the form of Carlini et al. (2023, "Quantifying Memorization Across Neural Language
    Models"): `prompts` positions are drawn (seeded, distinct) in the token stream of `texts` (documents
    joined with the end-of-text token, as in training); the model is given the `prefix_tokens` tokens
    there and greedily decodes `suffix_tokens` tokens, which must equal the next `suffix_tokens` of the
    stream. Defaults: half the model's context each, at most 32. Run it on training text for the
    extraction rate and on held-out text for the reference rate of text that is merely predictable.

    Returns rate, matches, prompts, prefix_tokens, suffix_tokens and mean_matched_tokens (how many tokens
    come out right before the first wrong one: a graded view of the same outputs).
    """
    stream = _token_stream(tokenizer, texts)
    with _evaluating(lm):
        return _extraction(lm, stream, prompts, prefix_tokens, suffix_tokens, seed, batch_tokens)


def _extraction(
    lm: PreTrainedModel,
    stream: np.ndarray,
    prompts: int,
    prefix_tokens: int | None,
    suffix_tokens: int | None,
    seed: int,
    batch_tokens: int,
) -> dict[str, Any]:
    _check_int(prompts, "prompts", 1)
    _check_int(seed, "seed", 0)
    prefix_tokens, suffix_tokens = _extraction_lengths(lm, prefix_tokens, suffix_tokens)
    span = prefix_tokens + suffix_tokens
    positions = len(stream) - span + 1
    if positions < 1:
        raise DataError(
            f"extraction: the text has {len(stream)} tokens, fewer than prefix_tokens + suffix_tokens = {span}"
        )
    starts = _rng(seed, "extraction").choice(positions, size=min(prompts, positions), replace=False)
    windows = torch.from_numpy(stream[starts[:, None] + np.arange(span)])
    produced = _greedy(lm, windows[:, :prefix_tokens], suffix_tokens, batch_tokens)
    correct = produced == windows[:, prefix_tokens:]
    # Tokens right before the first wrong one: cumprod zeroes everything from it on.
    leading = correct.long().cumprod(dim=1).sum(dim=1)
    matches = int(correct.all(dim=1).sum())
    return {
        "rate": matches / len(starts),
        "matches": matches,
        "prompts": len(starts),
        "prefix_tokens": prefix_tokens,
        "suffix_tokens": suffix_tokens,
        "mean_matched_tokens": float(leading.float().mean()),
    }


def _extraction_lengths(lm: PreTrainedModel, prefix: int | None, suffix: int | None) -> tuple[int, int]:
    context = context_length(lm)
    if prefix is None:
        prefix = min(MAX_DEFAULT_EXTRACTION_TOKENS, max(1, (context or 64) // 2))
    if suffix is None:
        suffix = min(MAX_DEFAULT_EXTRACTION_TOKENS, max(1, (context or 64) - prefix))
    _check_int(prefix, "audit.memorization.extraction.prefix_tokens", 1)
    _check_int(suffix, "audit.memorization.extraction.suffix_tokens", 1)
    # The last generated token is never fed back, so prefix + suffix - 1 tokens must fit.
    if context is not None and prefix + suffix - 1 > context:
        raise ConfigError(
            f"audit.memorization.extraction: prefix_tokens + suffix_tokens = {prefix + suffix} exceeds the model's "
            f"context of {context} by more than one; lower them"
        )
    return prefix, suffix


@torch.inference_mode()
def _greedy(lm: PreTrainedModel, prompts: torch.Tensor, new_tokens: int, batch_tokens: int) -> torch.Tensor:
    """Greedy continuations [rows, new_tokens] of equal-length prompts [rows, length], batched, with the KV cache.

    Equal lengths need no padding, so a batch decodes exactly as each prompt alone would.
    """
    cache_argument, extra = forward_arguments(lm)
    rows = max(1, batch_tokens // (prompts.shape[1] + new_tokens))
    produced = []
    for begin in range(0, len(prompts), rows):
        ids = prompts[begin : begin + rows].to(lm.device)
        # A mask of ones says "no padding" (the end-of-text token doubles as pad; without it, transformers warns).
        mask = torch.ones_like(ids)
        outputs = lm(input_ids=ids, attention_mask=mask, use_cache=True, **extra)
        tokens = [outputs.logits[:, -1].argmax(dim=-1)]
        for _ in range(new_tokens - 1):
            cache = returned_cache(outputs)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step = {cache_argument: cache}
            outputs = lm(input_ids=tokens[-1][:, None], attention_mask=mask, use_cache=True, **step, **extra)
            tokens.append(outputs.logits[:, -1].argmax(dim=-1))
        produced.append(torch.stack(tokens, dim=1).cpu())
    return torch.cat(produced)


# --- (c) membership inference on windows -----------------------------------------------------------


def window_membership(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: list[str],
    held_out_texts: list[str],
    windows: int = 500,
    window_tokens: int | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    batch_tokens: int = 4096,
) -> dict[str, Any]:
    """The loss-threshold membership attack (Yeom et al., 2018) on windows of training vs held-out text.

    Each side's token stream is cut into disjoint windows of `window_tokens` tokens (default: the model's
    context, at most 256) on a grid with a seeded random offset; up to `windows` of them are drawn per side
    (the same number on both) and each gets its mean next-token loss (nats) over its tokens after the
    first. `trust.membership.loss_threshold_attack` turns the two sets of losses into AUC (with a bootstrap
    interval), TPR at 1 % / 10 % FPR and advantage. Held-out text from another part of the corpus (a
    single text's tail, say) can differ in style from the training text: then the AUC measures that
    shift as well as memorisation.
    """
    member_stream = _token_stream(tokenizer, train_texts)
    non_member_stream = _token_stream(tokenizer, held_out_texts)
    with _evaluating(lm):
        return _window_membership(
            lm, member_stream, non_member_stream, windows, window_tokens, bootstrap, seed, batch_tokens
        )


def _window_membership(
    lm: PreTrainedModel,
    member_stream: np.ndarray,
    non_member_stream: np.ndarray,
    windows: int,
    window_tokens: int | None,
    bootstrap: int,
    seed: int,
    batch_tokens: int,
) -> dict[str, Any]:
    _check_int(windows, "windows", 2)
    _check_int(seed, "seed", 0)
    length = _window_length(lm, window_tokens)
    count = min(windows, len(member_stream) // length, len(non_member_stream) // length)
    if count < 2:
        shortest = min(len(member_stream), len(non_member_stream))
        raise DataError(
            f"membership: the shorter text has {shortest} tokens, fewer than two windows of {length}; give more "
            "held-out text or a smaller audit.memorization.membership.window_tokens"
        )
    rng = _rng(seed, "membership")
    member_losses = _window_losses(lm, member_stream, length, count, rng, batch_tokens)
    non_member_losses = _window_losses(lm, non_member_stream, length, count, rng, batch_tokens)
    report = membership.loss_threshold_attack(member_losses, non_member_losses, bootstrap, seed, rng=rng)
    return {**report, "unit": MEMBERSHIP_UNIT, "window_tokens": length, "verdict": membership.verdict(report)}


def _window_length(lm: PreTrainedModel, window_tokens: int | None) -> int:
    context = context_length(lm)
    if window_tokens is None:
        return min(context or MAX_DEFAULT_WINDOW, MAX_DEFAULT_WINDOW)
    _check_int(window_tokens, "audit.memorization.membership.window_tokens", 2)
    if context is not None and window_tokens > context:
        raise ConfigError(
            f"audit.memorization.membership.window_tokens: {window_tokens} exceeds the model's context of {context}"
        )
    return window_tokens


def _window_losses(
    lm: PreTrainedModel, stream: np.ndarray, length: int, count: int, rng: np.random.Generator, batch_tokens: int
) -> np.ndarray:
    """Mean next-token loss of `count` disjoint windows drawn from a grid over `stream`."""
    # Disjoint windows keep the rows independent, which the bootstrap interval assumes.
    offset = int(rng.integers(0, length))
    if (len(stream) - offset) // length < count:
        offset = 0
    slots = (len(stream) - offset) // length
    starts = offset + length * np.sort(rng.choice(slots, size=count, replace=False))
    sequences = [stream[start : start + length].tolist() for start in starts]
    return _summed_nll(lm, sequences, batch_tokens) / (length - 1)


# --- shared scoring --------------------------------------------------------------------------------


@torch.inference_mode()
def _summed_nll(lm: PreTrainedModel, sequences: list[list[int]], batch_tokens: int) -> np.ndarray:
    """Per sequence, the summed next-token loss (nats) of its tokens after the first; float64 [len(sequences)].

    Sequences of different lengths are right-padded: a causal model's real tokens never attend to pads
    after them, the attention mask says which tokens are real, and pads are not scored.
    """
    rows = max(1, batch_tokens // max(map(len, sequences)))
    totals = []
    for begin in range(0, len(sequences), rows):
        chunk = sequences[begin : begin + rows]
        width = max(map(len, chunk))
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sequence in enumerate(chunk):
            ids[row, : len(sequence)] = torch.as_tensor(sequence)
            mask[row, : len(sequence)] = 1
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        losses = functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        totals.append((losses * mask[:, 1:]).sum(dim=1).double().cpu())
    return torch.cat(totals).numpy()


def _token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> np.ndarray:
    """The texts' tokens, each text followed by the end-of-text token, as `data.packing` builds training blocks."""
    if isinstance(texts, str) or not texts or not all(isinstance(text, str) for text in texts):
        raise DataError("texts: must be a non-empty list of strings")
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return np.fromiter((token for document in ids for token in (*document, *separator)), dtype=np.int64)


@contextmanager
def _evaluating(lm: PreTrainedModel) -> Iterator[None]:
    """Eval mode (no dropout) inside; the model's own training mode back afterwards."""
    was_training = lm.training
    lm.eval()
    try:
        yield
    finally:
        lm.train(was_training)


def _rng(seed: int, purpose: str) -> np.random.Generator:
    """A generator per purpose: with one seed everywhere, candidates must not replay the canaries' own draws."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def _format_secret(digits: np.ndarray) -> str:
    return SECRET_SEPARATOR.join(str(int(digit)) for digit in digits)


# --- entry point -----------------------------------------------------------------------------------


def audit_memorization(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: list[str],
    held_out_texts: list[str],
    options: dict[str, Any] | None,
    folder: Path,
    canaries: Sequence[Canary] | None = None,
) -> dict[str, Any]:
    """Canary exposure, verbatim extraction and window membership inference of a trained causal LM.

    `train_texts` is the text the model was trained on (with the canaries in it), `held_out_texts` text it
    never saw from the same source; `options` is `audit.memorization` (see `resolve_options`); `canaries`
    are those inserted before training (None or empty: that section is skipped). Writes the exposure plot
    (when there are canaries) and the membership ROC into `folder`. The model runs in eval mode under
    inference mode; its training mode is restored afterwards. Returns a JSON-able dict:

    - canaries: method, secret_space_bits, candidates, table (one row per repetition count: canaries,
      mean/min/max exposure, max_possible_exposure, likelier_than_all_sampled), canaries (one record each);
      or {"skipped": reason}
    - extraction: method, train and held_out (each as `extraction_rate` returns), excess_rate
    - membership: the `loss_threshold_attack` report plus unit, window_tokens, verdict
    - plots: file names written into `folder`; options: the resolved options
    """
    resolved = resolve_options(options)
    seed, batch_tokens = resolved["seed"], resolved["batch_tokens"]
    member_stream = _token_stream(tokenizer, train_texts)
    non_member_stream = _token_stream(tokenizer, held_out_texts)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _evaluating(lm):
        canary_section = _canary_section(lm, tokenizer, canaries, resolved, seed, batch_tokens)
        extraction = resolved["extraction"]
        lengths = (extraction["prompts"], extraction["prefix_tokens"], extraction["suffix_tokens"])
        train = _extraction(lm, member_stream, *lengths, seed, batch_tokens)
        held_out = _extraction(lm, non_member_stream, *lengths, seed, batch_tokens)
        windows = resolved["membership"]
        membership_report = _window_membership(
            lm,
            member_stream,
            non_member_stream,
            windows["windows"],
            windows["window_tokens"],
            windows["bootstrap"],
            seed,
            batch_tokens,
        )
    written = []
    if "table" in canary_section:
        written.append(plot_exposure(canary_section, folder / EXPOSURE_PLOT).name)
    written.append(membership.plot_membership_roc(membership_report, folder / ROC_PLOT).name)
    return {
        "canaries": canary_section,
        "extraction": {
            "method": EXTRACTION_METHOD,
            "train": train,
            "held_out": held_out,
            "excess_rate": train["rate"] - held_out["rate"],
        },
        "membership": membership_report,
        "plots": written,
        "options": resolved,
    }


def _canary_section(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    canaries: Sequence[Canary] | None,
    resolved: dict[str, Any],
    seed: int,
    batch_tokens: int,
) -> dict[str, Any]:
    if not canaries:
        return {"skipped": "no canaries were inserted into the training text (audit.memorization.canaries.count 0)"}
    candidates = resolved["canaries"]["candidates"]
    records = canary_exposures(lm, tokenizer, canaries, candidates, seed, batch_tokens)
    table = []
    for times in sorted({record["repetitions"] for record in records}):
        rows = [record for record in records if record["repetitions"] == times]
        exposures = [row["exposure"] for row in rows]
        table.append(
            {
                "repetitions": times,
                "canaries": len(rows),
                "mean_exposure": float(np.mean(exposures)),
                "min_exposure": min(exposures),
                "max_exposure": max(exposures),
                "max_possible_exposure": max(row["max_exposure"] for row in rows),
                "likelier_than_all_sampled": sum(row["better_candidates"] == 0 for row in rows),
            }
        )
    return {
        "method": EXPOSURE_METHOD,
        "candidates": candidates,
        "secret_space_bits": max(record["max_exposure"] for record in records),
        "resolution_bits": math.log2(candidates),
        "table": table,
        "canaries": records,
    }


def plot_exposure(section: dict[str, Any], path: Path) -> Path:
    """Exposure of every canary against its repetition count, the mean per count, and the two ceilings."""
    figure, axis = plots.plt.subplots(figsize=(6.4, 4.2))
    records, table = section["canaries"], section["table"]
    axis.scatter(
        [r["repetitions"] for r in records],
        [r["exposure"] for r in records],
        alpha=0.6,
        color="tab:red",
        label="canary",
    )
    counts = [row["repetitions"] for row in table]
    axis.plot(counts, [row["mean_exposure"] for row in table], "o-", color="tab:blue", label="mean")
    axis.axhline(section["secret_space_bits"], linestyle="--", color="grey", label="max: log2 |R|")
    axis.axhline(
        section["resolution_bits"],
        linestyle=":",
        color="grey",
        label="log2(candidates): above it, likelier than every sample",
    )
    axis.set_xscale("log")
    axis.set_xticks(counts, [str(count) for count in counts])
    axis.minorticks_off()
    axis.set_ylim(0, section["secret_space_bits"] * 1.08)
    axis.set_xlabel("times the canary is in the training text")
    axis.set_ylabel("exposure (bits)")
    axis.set_title("Canary exposure (Carlini et al., 2019)")
    axis.legend(fontsize=8, loc="center left")
    return plots.save_figure(figure, Path(path))


def card_section(result: dict[str, Any], plots_folder: str = "trust") -> dict[str, Any]:
    """The model-card section (title, paragraphs, facts, tables, plots) for an `audit_memorization` result,
    in the shape trust/audit.py gives its other sections; plot paths are `plots_folder/<file>`."""
    canaries, extraction, windows = result["canaries"], result["extraction"], result["membership"]
    paragraphs = []
    tables = []
    if "table" in canaries:
        paragraphs.append(
            "Random secrets (canaries) were inserted into the training text before training. Exposure (Carlini et "
            "al., 2019) is log2 |R| - log2 rank: 0 bits when the model finds the inserted secret no likelier than a "
            f"random one, {canaries['secret_space_bits']:.1f} bits when it finds it the likeliest of all |R| possible "
            f"secrets. The rank is estimated from {canaries['candidates']:,} sampled secrets, so values above "
            f"{canaries['resolution_bits']:.1f} bits say only that the canary beat every sample."
        )
        header = ["repetitions", "canaries", "mean exposure", "min", "max", "max possible", "likelier than all sampled"]
        rows = [
            [
                row["repetitions"],
                row["canaries"],
                f"{row['mean_exposure']:.1f}",
                f"{row['min_exposure']:.1f}",
                f"{row['max_exposure']:.1f}",
                f"{row['max_possible_exposure']:.1f}",
                row["likelier_than_all_sampled"],
            ]
            for row in canaries["table"]
        ]
        tables.append({"header": header, "rows": rows, "caption": "Canary exposure (bits) by repetition count."})
    else:
        paragraphs.append(f"Canary exposure was not measured: {canaries['skipped']}.")
    train, held_out = extraction["train"], extraction["held_out"]
    paragraphs.append(
        f"Verbatim extraction: prompted with {train['prefix_tokens']} tokens of training text, greedy decoding "
        f"reproduced the next {train['suffix_tokens']} tokens exactly for {100 * train['rate']:.1f} % of "
        f"{train['prompts']} prompts, against {100 * held_out['rate']:.1f} % on held-out text (text predictable "
        "without memorising it)."
    )
    paragraphs.append(f"Membership inference on {windows['window_tokens']}-token windows: {windows['verdict']}.")
    facts = [
        ("Extraction rate (train / held-out)", f"{train['rate']:.3f} / {held_out['rate']:.3f}"),
        ("Window membership AUC", f"{windows['auc']:.3f}"),
        ("TPR at 1 % FPR", f"{windows['tpr_at_1pct_fpr']:.3f}"),
    ]
    captions = {EXPOSURE_PLOT: "Canary exposure by repetition count.", ROC_PLOT: "ROC of the window membership attack."}
    return {
        "title": "Privacy: memorisation",
        "paragraphs": paragraphs,
        "facts": facts,
        "tables": tables,
        "plots": [{"path": f"{plots_folder}/{name}", "caption": captions[name]} for name in result["plots"]],
    }
