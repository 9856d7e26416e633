"""Text generation and perplexity for any Hugging Face causal LM: one path for the CLI, the API and the server.

We run our own decoding loop instead of `model.generate` because the server needs text pieces as they
are produced, stop strings that never leak into what was already sent, a private random generator
(the same seed gives the same text, whatever else the process samples) and one place that applies the
context-length rules; transformers' streamers would need `generate` in a second thread to get the first.
The loop is the usual one: a forward pass over the prompt fills the KV cache, then one token per step.
Its logits processing follows transformers' (float32; repetition penalty, temperature, top-k, top-p in
that order), so greedy decoding gives the same tokens as `model.generate(do_sample=False)`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from forgeml.errors import ConfigError, DataError

FINISH_STOP = "stop"  # an end-of-sequence token or a stop string
FINISH_LENGTH = "length"  # max_new_tokens reached, or the model's context is full (without `slide`)
TRUNCATE_CHOICES = ("refuse", "left")
# Text that ends in the replacement character is an incomplete multi-byte character: the next
# token may complete it, so it is not sent yet.
INCOMPLETE_CHARACTER = "\ufffd"


@dataclass(frozen=True)
class GenerationOptions:
    """How to pick tokens and when to stop; validated when built, so a bad value fails before any work.

    `temperature` 0 means greedy; `top_k` None or 0 and `top_p` 1 turn those filters off;
    `repetition_penalty` 1 is off (CTRL's definition: the logits of tokens already in the prompt or
    the output are divided by it when positive and multiplied by it when negative); `stop` strings end
    the text before their first occurrence (a single string is taken as a list of one); `seed` None
    draws a fresh seed; `truncate` says what to do with a prompt that does not fit the model's context:
    "refuse" it, or drop tokens from its "left" until max_new_tokens fit after it (at most half the
    context is given to the output). When the text reaches the end of the context, `slide` (the default)
    keeps generating from the last `context` tokens, as nanoGPT's `generate` crops its input (each such
    step recomputes that window: the cache cannot drop its first token); without it, generation ends there.
    """

    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    truncate: str = "refuse"
    slide: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise ConfigError(f"temperature: must be >= 0 (0 means greedy), got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise ConfigError(f"top_k: must be an integer >= 0 or null (0 and null turn it off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty: must be > 0 (1 turns it off), got {self.repetition_penalty!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"stop: must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))  # a tuple keeps the frozen options hashable
        if self.seed is not None and not _is_int(self.seed):
            raise ConfigError(f"seed: must be an integer or null, got {self.seed!r}")
        if not isinstance(self.slide, bool):
            raise ConfigError(f"slide: must be true or false, got {self.slide!r}")
        if self.truncate not in TRUNCATE_CHOICES:
            raise ConfigError(f"truncate: must be one of {', '.join(TRUNCATE_CHOICES)}, got {self.truncate!r}")


@dataclass
class Generation:
    """A finished generation: the text, why it ended ("stop" or "length") and the token counts.

    `completion_tokens` counts the tokens the model produced, those of a stop string included and the
    end-of-sequence token not.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def stream(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[int],
    options: GenerationOptions | None = None,
) -> Iterator[str]:
    """Return an iterator over the continuation of `prompt`, yielding text pieces as tokens are produced.

    `prompt` is text (tokenized with the tokenizer's special tokens) or token ids already made, e.g. a
    conversation rendered with a chat template.
    The prompt is checked here, before the iterator is returned, so a server can refuse a bad request
    before it starts a streamed answer. The pieces joined are exactly `generate(...).text` for the same
    options and seed. The model is in eval mode while the iterator runs; its training mode comes back
    when the iterator finishes or is closed.
    """
    options = options or GenerationOptions()
    prompt_ids = _prompt_ids(tokenizer, prompt, options, context_length(model))
    return _decode(model, tokenizer, prompt_ids, options, _Progress(prompt_tokens=len(prompt_ids)))


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[int],
    options: GenerationOptions | None = None,
) -> Generation:
    """Generate the continuation of `prompt` (text or token ids); return it with its finish reason and token counts."""
    options = options or GenerationOptions()
    prompt_ids = _prompt_ids(tokenizer, prompt, options, context_length(model))
    progress = _Progress(prompt_tokens=len(prompt_ids))
    text = "".join(_decode(model, tokenizer, prompt_ids, options, progress))
    return Generation(text, progress.finish_reason, progress.prompt_tokens, progress.completion_tokens)


def context_length(model: PreTrainedModel) -> int | None:
    """The most tokens the model can attend to (prompt plus output), or None when its config sets no limit."""
    # Multimodal configs nest the language model's settings; get_text_config returns the config itself otherwise.
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


class OutputText:
    """The text of generated tokens, released in pieces that are safe to send.

    A piece never ends inside a multi-byte character or with what may be the start of a stop string, and
    nothing from a stop string on is ever released. Decoding the whole output each step (not token by
    token) keeps characters that span tokens intact; it costs microseconds against a forward pass's
    milliseconds.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.tokens: list[int] = []
        self.sent = ""  # the text released so far

    def add(self, token: int) -> tuple[str, bool]:
        """Append `token`; return the new text that may be sent now and whether a stop string was reached."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        stop_at = _first_stop(text, self.stop)
        if stop_at is not None:
            piece = text[len(self.sent) : stop_at] if stop_at > len(self.sent) else ""
            self.sent += piece
            return piece, True
        releasable = _releasable_length(text, self.stop)
        if releasable <= len(self.sent):
            return "", False
        piece = text[len(self.sent) : releasable]
        self.sent = text[:releasable]
        return piece, False

    def flush(self) -> str:
        """What was held back, once generation has ended without a stop string (it is final now)."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        piece = text[len(self.sent) :]
        self.sent = text
        return piece


@dataclass
class _Progress:
    """What the caller of the decoding loop learns besides the text (filled in as the loop runs)."""

    finish_reason: str = FINISH_LENGTH
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _decode(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    options: GenerationOptions,
    progress: _Progress,
) -> Iterator[str]:
    """The one decoding loop behind `stream` and `generate`: yields text pieces, records the rest in `progress`."""
    context = context_length(model)
    end_ids = end_of_sequence_ids(model, tokenizer)
    generator = torch.Generator(device=model.device)
    if options.seed is None:
        generator.seed()
    else:
        generator.manual_seed(options.seed)
    was_training = model.training
    model.eval()
    arguments = forward_arguments(model)  # read from the signature once, not at every token
    try:
        seen = torch.tensor([prompt_ids], device=model.device)
        logits, cache = _forward(model, seen, None, arguments)
        output = OutputText(tokenizer, options.stop)
        while True:
            full = context is not None and seen.shape[1] >= context
            if len(output.tokens) == options.max_new_tokens or (full and not options.slide):
                progress.finish_reason = FINISH_LENGTH
                break
            if output.tokens and context is not None and seen.shape[1] > context:
                # The window slides: positions shift by one, so the cached keys and values no longer apply.
                logits, cache = _forward(model, seen[:, -context:], None, arguments)
            elif output.tokens:
                logits, cache = _forward(model, seen[:, -1:], cache, arguments)
            token = next_token(logits, seen[0], options, generator)
            if token in end_ids:
                progress.finish_reason = FINISH_STOP
                break
            seen = torch.cat([seen, torch.tensor([[token]], device=seen.device)], dim=1)
            piece, stopped = output.add(token)
            progress.completion_tokens = len(output.tokens)
            if piece:
                yield piece
            if stopped:
                progress.finish_reason = FINISH_STOP
                return
        # The text held back (a possible stop-string start, an incomplete character) is final now.
        rest = output.flush()
        if rest:
            yield rest
    finally:
        model.train(was_training)


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[int], options: GenerationOptions, context: int | None
) -> list[int]:
    """The prompt's token ids (text gets the tokenizer's special tokens), cut or refused when it does not fit."""
    if isinstance(prompt, str):
        if not prompt:
            raise ConfigError("prompt: empty; give at least one character")
        ids = list(tokenizer(prompt)["input_ids"])
    elif isinstance(prompt, Sequence) and prompt and all(_is_int(i) and 0 <= i < len(tokenizer) for i in prompt):
        ids = [int(i) for i in prompt]
    else:
        raise ConfigError(f"prompt: expected text or a non-empty list of token ids, got {prompt!r:.80}")
    if not ids:
        raise ConfigError(f"prompt: {prompt!r} gives no tokens; give some text the tokenizer knows")
    if context is None or len(ids) + 1 <= context:
        return ids
    if options.truncate == "refuse":
        raise ConfigError(
            f"prompt: {len(ids)} tokens do not fit the model's context of {context} tokens "
            f"(at most {context - 1} leave room for one new token); shorten it or set truncate to left"
        )
    # Keeping just context - 1 tokens would leave room for one new token; reserving room for the
    # requested output, but never more than half the context, keeps most of the prompt and still
    # lets the generation run.
    room = min(options.max_new_tokens, context // 2)
    return ids[-(context - room) :]


def end_of_sequence_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokenizer's end-of-sequence token plus the model's (chat models list several, e.g. end-of-turn)."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


@torch.inference_mode()
def _forward(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: Any, arguments: tuple[str, dict[str, Any]]
) -> tuple[torch.Tensor, Any]:
    """The float32 next-token logits after `input_ids` (appended to `cache`), and the updated cache.

    `arguments` is `forward_arguments(model)`. Inference mode is entered here rather than around the
    decoding loop, which yields: a `with` block held across a `yield` would leave the caller's own code
    in inference mode between pieces.
    """
    cache_argument, extra = arguments
    outputs = model(input_ids=input_ids, use_cache=True, **{cache_argument: cache}, **extra)
    return outputs.logits[0, -1].float(), returned_cache(outputs)


def returned_cache(outputs: Any) -> Any:
    """The key/value cache a forward pass returned (transformers 5.x renamed the output `past_key_values` to
    `cache`; the old name warns)."""
    return outputs["cache"] if "cache" in outputs else outputs["past_key_values"]


def forward_arguments(model: PreTrainedModel) -> tuple[str, dict[str, Any]]:
    """The name of the cache argument (`cache` in recent transformers 5.x; `past_key_values` before and in
    models not yet renamed), and `logits_to_keep=1` where the model takes it (only the last position's
    logits are needed)."""
    cache_argument = "cache" if _accepts(model, "cache") else "past_key_values"
    return cache_argument, ({"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {})


def _accepts(model: PreTrainedModel, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


@torch.inference_mode()
def next_token(logits: torch.Tensor, seen: torch.Tensor, options: GenerationOptions, generator: torch.Generator) -> int:
    """Pick the next token from float32 `logits` (1-D over the vocabulary) after the ids `seen` (1-D)."""
    if options.repetition_penalty != 1.0:
        previous = seen
        scores = logits.gather(0, previous)
        penalised = torch.where(scores < 0, scores * options.repetition_penalty, scores / options.repetition_penalty)
        logits = logits.scatter(0, previous, penalised)
    if options.temperature == 0:
        return int(logits.argmax())
    logits = logits / options.temperature
    if options.top_k:
        kth_best = torch.topk(logits, min(options.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth_best, -math.inf)
    if options.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, stable=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the tokens ranked above it already hold top_p of the mass (the best one stays).
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = torch.zeros_like(mass_above, dtype=torch.bool).scatter(0, order, mass_above >= options.top_p)
        logits = logits.masked_fill(drop, -math.inf)
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def _releasable_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be sent now: all but an incomplete last character and a possible stop-string start."""
    text = text.rstrip(INCOMPLETE_CHARACTER)
    held = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:length]):
                held = length
                break
    return len(text) - held


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    stride: int | None = None,
    context: int | None = None,
) -> dict[str, Any]:
    """Mean next-token cross-entropy (nats) and its exponential, per text and over all texts.

    Returns {"loss", "perplexity", "tokens", "texts": [{"loss", "perplexity", "tokens"}, ...]}; the
    overall loss is weighted by tokens. Each text is tokenized with the tokenizer's defaults (a BOS token
    where it adds one) and every token after the first is predicted. A text longer than `context`
    (default: the model's) is scored with Hugging Face's sliding window ("Perplexity of fixed-length
    models"): windows of `context` tokens start every `stride` tokens (default context // 2) and each
    scores only the tokens the previous window did not, so every token is scored once with as much left
    context as the window allows. With stride == context the windows do not overlap and, as in that
    recipe, the first token of each window has no context and is not scored. A text with fewer than two
    tokens scores nothing (its loss and perplexity are None).
    """
    if isinstance(texts, str) or not texts or not all(isinstance(text, str) for text in texts):
        raise DataError("texts: must be a non-empty list of strings")
    window = _perplexity_window(model, context)
    if stride is not None and (not _is_int(stride) or stride < 1 or (window is not None and stride > window)):
        limit = f"[1, {window}] (the context)" if window is not None else ">= 1"
        raise ConfigError(f"stride: must be an integer in {limit}, got {stride!r}")
    was_training = model.training
    model.eval()
    try:
        per_text = []
        for text in texts:
            ids = torch.tensor(tokenizer(text)["input_ids"], device=model.device)
            text_window = window or len(ids)
            nll, tokens = _sliding_window_nll(model, ids, text_window, stride or max(1, text_window // 2))
            per_text.append((nll, tokens))
    finally:
        model.train(was_training)
    total_nll, total_tokens = sum(nll for nll, _ in per_text), sum(tokens for _, tokens in per_text)
    if total_tokens == 0:
        raise DataError("texts: nothing to score; each text needs at least two tokens")
    return {**_summary(total_nll, total_tokens), "texts": [_summary(nll, tokens) for nll, tokens in per_text]}


def _perplexity_window(model: PreTrainedModel, context: int | None) -> int | None:
    model_context = context_length(model)
    if context is None:
        return model_context
    if not _is_int(context) or context < 2 or (model_context is not None and context > model_context):
        limit = f"[2, {model_context}] (the model's context)" if model_context is not None else ">= 2"
        raise ConfigError(f"context: must be an integer in {limit}, got {context!r}")
    return context


@torch.inference_mode()
def _sliding_window_nll(model: PreTrainedModel, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ids[1:] scored window by window, and how many tokens it covers."""
    total_nll, scored, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        first_target = max(previous_end, begin + 1)  # tokens before it were scored by an earlier window
        if first_target < end:
            logits = model(input_ids=ids[None, begin:end], use_cache=False).logits[0].float()
            # The logits at window position j predict token begin + j + 1.
            predictions = logits[first_target - begin - 1 : end - begin - 1]
            total_nll += F.cross_entropy(predictions, ids[first_target:end], reduction="sum").item()
            scored += end - first_target
        previous_end = end
        if end == len(ids):
            break
    return total_nll, scored


def _summary(nll: float, tokens: int) -> dict[str, Any]:
    if tokens == 0:
        return {"loss": None, "perplexity": None, "tokens": 0}
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
