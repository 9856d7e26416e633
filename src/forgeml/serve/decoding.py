"""Continuous batching: the sequences of concurrent requests decode together, one token each per model call.

Decoding one token costs a forward pass whose time barely grows with the number of sequences in it (a
small model on a CPU is bound by per-call overhead and weight reads, not arithmetic), so a server that
decodes requests one at a time, or in threads that fight over the cores, wastes most of its machine.
Here one thread owns the model. Between steps, waiting requests join (their prompts are run alone, so
the first token comes as soon as a slot is free) and finished, cancelled or timed-out sequences leave,
so nobody waits for the longest answer of a batch.

The batch keeps one key/value cache: each sequence's past is right-aligned, padded on the left and
masked, with its own positions, so a sequence's tokens do not depend on what else is in the batch (the
padded keys get exactly zero attention). Every sequence has its own sampling settings, random
generator, stop strings and token budget; its text goes out through `generate.OutputText`, the same
release rules as `forgeml generate`, so the pieces never split a character or leak a stop string.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from forgeml.errors import ForgeError
from forgeml.generate import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationOptions,
    OutputText,
    context_length,
    end_of_sequence_ids,
    forward_arguments,
    next_token,
    returned_cache,
)

FINISH_CANCELLED = "cancelled"  # the client went away or the request timed out: nothing more is sent


class Busy(ForgeError):
    """The queue of waiting requests is full; the caller should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Piece:
    """What a request hears from the engine: new text for one of its choices, and at the end why it stopped."""

    choice: int
    text: str
    finish_reason: str | None = None  # set on the last piece of that choice
    completion_tokens: int = 0


@dataclass(eq=False)
class Job:
    """One request: a prompt decoded `len(options)` times (OpenAI's `n`), each with its own settings.

    `deliver` is called from the engine's thread with each `Piece`; it must not block.
    """

    prompt_ids: list[int]
    options: Sequence[GenerationOptions]
    deliver: Callable[[Piece], None]
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    cancelled: bool = False


@dataclass(eq=False)
class _Row:
    """One sequence being decoded: a choice of a job."""

    job: Job
    choice: int
    options: GenerationOptions
    output: OutputText
    generator: torch.Generator
    position: int  # tokens in the cache so far (the next token's position)
    last_token: int = -1
    last_time: float = 0.0


class EngineObserver:
    """Hooks for metrics; the engine calls them from its thread. The defaults do nothing."""

    def first_token(self, seconds: float) -> None: ...

    def token_gap(self, seconds: float) -> None: ...

    def generated(self, tokens: int) -> None: ...

    def step(self, rows: int, waiting: int) -> None: ...


class DecodingEngine:
    """Decodes submitted jobs with continuous batching on its own thread (`start`, `submit`, `cancel`, `stop`)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_batch: int = 16,
        max_queue: int = 64,
        observer: EngineObserver | None = None,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.observer = observer or EngineObserver()
        self.context = context_length(model)
        self.end_ids = end_of_sequence_ids(model, tokenizer)
        self._cache_argument, self._extra = forward_arguments(model)
        self._waiting: deque[Job] = deque()
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, cached length]: 1 where a row has a real token
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._cut_at: float | None = None  # while stopping: when the sequences still running are cut short
        self.seconds_per_step = 0.05  # a running estimate, for Retry-After

    # --- the caller's side ---------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        self._accepting, self._cut_at = True, None
        self._thread = threading.Thread(target=self._run, name="forgeml-decoding", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; raises `Busy` when `max_queue` jobs are already waiting, ForgeError when stopping."""
        if not job.options:
            raise ForgeError("a job needs at least one choice")
        if len(job.options) > self.max_batch:
            raise ForgeError(f"n: {len(job.options)} choices do not fit a batch of {self.max_batch}")
        with self._wake:
            if not self._accepting:
                raise ForgeError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                # Roughly when a slot frees up: the queue ahead drains one batch per answer length.
                retry = max(1.0, self.seconds_per_step * 16 * (1 + len(self._waiting) // self.max_batch))
                raise Busy(f"{len(self._waiting)} requests are waiting already; retry later", retry)
            self._waiting.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Stop `job` (a client went away): its rows leave the batch before the next step."""
        with self._wake:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
            self._wake.notify()

    def begin_drain(self, drain_seconds: float = 0.0) -> None:
        """Refuse new jobs; running and waiting ones may finish for up to `drain_seconds`, then the rest end
        with finish reason "length" (what they produced so far is delivered). Returns at once."""
        with self._wake:
            if self._accepting or self._cut_at is None:
                self._accepting = False
                self._cut_at = time.perf_counter() + drain_seconds
            self._wake.notify()

    def stop(self, drain_seconds: float = 0.0) -> None:
        """`begin_drain` (unless a drain has begun already), then wait for the engine's thread to end."""
        self.begin_drain(drain_seconds)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # --- the engine's thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._rows or self._waiting or self._cut_at is not None):
                        self._wake.wait()
                    if self._cut_at is not None and (
                        time.perf_counter() >= self._cut_at or not (self._rows or self._waiting)
                    ):
                        break
                    joining = self._admit()
                for job in joining:
                    self._start_job(job)
                self._drop_cancelled()
                if self._rows:
                    started = time.perf_counter()
                    try:
                        self._step()
                    except Exception as error:
                        self._fail_running(error)
                    self.seconds_per_step = 0.9 * self.seconds_per_step + 0.1 * (time.perf_counter() - started)
                self.observer.step(len(self._rows), len(self._waiting))
            self._cut_everything()
        self.observer.step(0, 0)

    def _admit(self) -> list[Job]:
        """Waiting jobs that fit the free slots, oldest first (a job never overtakes an older one)."""
        joining = []
        free = self.max_batch - len(self._rows)
        while self._waiting and len(self._waiting[0].options) <= free:
            job = self._waiting.popleft()
            free -= len(job.options)
            joining.append(job)
        return joining

    def _start_job(self, job: Job) -> None:
        """Run the prompt alone, pick each choice's first token, and add the choices still going to the batch."""
        try:
            ids = torch.tensor([job.prompt_ids], device=self.model.device)
            logits, cache = self._forward(ids, None, None, None)
        except Exception as error:
            for choice in range(len(job.options)):
                job.deliver(Piece(choice, "", f"error: {error}"))
            return
        now = time.perf_counter()
        job.first_token_at = now
        self.observer.first_token(now - job.submitted)
        self.observer.generated(len(job.options))
        rows = []
        for choice, options in enumerate(job.options):
            generator = torch.Generator(device=self.model.device)
            if options.seed is None:
                generator.seed()
            else:
                generator.manual_seed(options.seed + choice)  # n choices from one seed still differ
            row = _Row(job, choice, options, OutputText(self.tokenizer, options.stop), generator, len(job.prompt_ids))
            row.last_time = now
            if not self._advance(row, logits[0]):
                rows.append(row)
        if rows:
            copies = torch.zeros(len(rows), dtype=torch.long, device=self.model.device)  # the prompt's cache, per row
            self._join(rows, [(k.index_select(0, copies), v.index_select(0, copies)) for k, v in _layers(cache)])

    def _step(self) -> None:
        """One token for every row: one forward pass over the batch."""
        rows = self._rows
        device = self.model.device
        ids = torch.tensor([[row.last_token] for row in rows], device=device)
        positions = torch.tensor([[row.position] for row in rows], device=device)
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=self._mask.dtype, device=device)], dim=1)
        logits, self._cache = self._forward(ids, self._cache, mask, positions)
        self._mask = mask
        now = time.perf_counter()
        self.observer.generated(len(rows))
        finished = []
        for index, row in enumerate(rows):
            row.position += 1
            self.observer.token_gap(now - row.last_time)
            row.last_time = now
            if self._advance(row, logits[index]):
                finished.append(index)
        if finished:
            self._leave(finished)

    def _advance(self, row: _Row, logits: torch.Tensor) -> bool:
        """Pick `row`'s next token from its logits and send what it adds; True when the row is finished."""
        options = row.options
        seen = torch.tensor(row.job.prompt_ids + row.output.tokens) if options.repetition_penalty != 1 else None
        token = next_token(logits.float(), seen, options, row.generator)
        if token in self.end_ids:
            return self._finish(row, FINISH_STOP)
        piece, stopped = row.output.add(token)
        row.last_token = token
        if stopped:
            return self._finish(row, FINISH_STOP, piece)
        if piece:
            row.job.deliver(Piece(row.choice, piece, completion_tokens=len(row.output.tokens)))
        full = self.context is not None and row.position + 1 >= self.context
        if len(row.output.tokens) >= options.max_new_tokens or full:
            return self._finish(row, FINISH_LENGTH, row.output.flush())
        return False

    def _finish(self, row: _Row, reason: str, piece: str = "") -> bool:
        row.job.deliver(Piece(row.choice, piece, reason, len(row.output.tokens)))
        return True

    def _forward(self, ids: torch.Tensor, cache: Any, mask: torch.Tensor | None, positions: torch.Tensor | None):
        arguments: dict[str, Any] = {"input_ids": ids, "use_cache": True, self._cache_argument: cache, **self._extra}
        if mask is not None:
            arguments.update(attention_mask=mask, position_ids=positions)
        outputs = self.model(**arguments)
        return outputs.logits[:, -1], returned_cache(outputs)

    # --- the shared cache ------------------------------------------------------------------------------------

    def _join(self, rows: list[_Row], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add `rows` (their caches in `layers`, [rows, heads, length, dim]) to the batch, left-padded to one length."""
        length = layers[0][0].shape[-2]
        device = self.model.device
        new_mask = torch.ones(len(rows), length, dtype=torch.long, device=device)
        if self._cache is None:
            self._cache = _new_cache(self.model, layers)
            self._mask, self._rows = new_mask, rows
            return
        current = self._mask.shape[1]
        width = max(current, length)
        for layer, (keys, values) in zip(_cache_layers(self._cache), layers, strict=True):
            layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(keys, width)])
            layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(values, width)])
        self._mask = torch.cat([F.pad(self._mask, (width - current, 0)), F.pad(new_mask, (width - length, 0))])
        self._rows = self._rows + rows

    def _leave(self, indices: list[int]) -> None:
        """Remove the rows at `indices` and the padding columns nobody needs any more."""
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        mask = self._mask[keep]
        # Columns before the longest remaining past are padding for everyone: cut them.
        start = int((mask.sum(dim=0) > 0).nonzero()[0])
        index = torch.tensor(keep, device=mask.device)
        for layer in _cache_layers(self._cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._mask = mask[:, start:]

    def _fail_running(self, error: Exception) -> None:
        """A model call failed: every running sequence ends with an error (reported to its client), the batch
        starts afresh, and the jobs still waiting are served as usual."""
        for row in self._rows:
            self._finish(row, f"error: {error}")
        self._rows, self._cache, self._mask = [], None, None

    def _drop_cancelled(self) -> None:
        gone = [i for i, row in enumerate(self._rows) if row.job.cancelled]
        for i in gone:
            self._rows[i].job.deliver(
                Piece(self._rows[i].choice, "", FINISH_CANCELLED, len(self._rows[i].output.tokens))
            )
        if gone:
            self._leave(gone)

    def _cut_everything(self) -> None:
        """At the end of a drain: running rows end with what they have, waiting jobs with nothing."""
        for row in self._rows:
            self._finish(row, FINISH_LENGTH, row.output.flush())
        self._rows, self._cache, self._mask = [], None, None
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            for choice in range(len(job.options)):
                job.deliver(Piece(choice, "", FINISH_LENGTH))


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in _cache_layers(cache)]


def _cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(getattr(layer, "is_sliding", False) for layer in layers):
        raise ForgeError(
            "continuous batching needs a full-attention key/value cache (transformers' DynamicCache); "
            f"this model gives {type(cache).__name__}"
        )
    return layers


def _new_cache(model: PreTrainedModel, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[-2]
    return F.pad(tensor, (0, 0, missing, 0)) if missing else tensor
