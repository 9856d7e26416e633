"""The service for a language model: OpenAI's `/v1/completions` and `/v1/chat/completions` (whole answers or
Server-Sent Events), `/v1/models`, `/v1/feedback` on generations, and what every forgeml service has
(API keys with scopes, rate limits, metrics, health and readiness).

Requests are checked before anything is queued: a bad one gets a 4xx in OpenAI's error shape naming
the field. Accepted ones go to the `DecodingEngine`, whose thread decodes every running sequence in
one batch step by step; the event loop only moves text from the engine to the clients. A client that
goes away (or a request that runs past `serve.request_timeout_s`) is cancelled, which frees its slot
before the next step. Every generation is stored, complete, with token counts and timings.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from forgeml.config import ServeConfig
from forgeml.errors import ForgeError
from forgeml.generate import FINISH_LENGTH, GenerationOptions
from forgeml.serve.common import install_basics, scope_checker
from forgeml.serve.completions import ChatRequest, CompletionRequest, CompletionWriter, openai_error, usage
from forgeml.serve.decoding import FINISH_CANCELLED, Busy, DecodingEngine, EngineObserver, Job, Piece
from forgeml.serve.demo import demo_page
from forgeml.serve.generations import GenerationStore
from forgeml.serve.keys import KeyStore
from forgeml.serve.ratelimit import RateLimiter
from forgeml.serve.runtime import GenerativeRuntime

# Histogram buckets for time to first token and between tokens (seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# How often a non-streaming request looks whether its client is still there.
DISCONNECT_POLL_S = 0.5


class GenerationFeedback(BaseModel):
    """A rating of one choice of an earlier generation, and/or the answer it should have given."""

    model_config = ConfigDict(extra="forbid")
    generation_id: str = Field(..., min_length=1, max_length=64)
    choice: int = Field(0, ge=0, le=1_000)
    rating: Literal["up", "down"] | None = None
    correction: str | None = Field(None, max_length=100_000)
    comment: str = Field("", max_length=2_000)


class _Metrics(EngineObserver):
    def __init__(self, registry: CollectorRegistry, max_batch: int):
        self.max_batch = max_batch
        self.ttft = Histogram(
            "forgeml_time_to_first_token_seconds",
            "From a request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.gap = Histogram(
            "forgeml_inter_token_seconds",
            "Between two tokens of a sequence",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter("forgeml_generated_tokens", "Tokens generated", registry=registry)
        self.queue = Gauge("forgeml_queue_length", "Requests waiting for a decoding slot", registry=registry)
        self.rows = Gauge("forgeml_batch_rows", "Sequences decoding in the batch", registry=registry)
        self.occupancy = Gauge("forgeml_batch_occupancy", "Share of the batch's slots in use", registry=registry)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.gap.observe(seconds)

    def generated(self, tokens: int) -> None:
        self.tokens.inc(tokens)

    def step(self, rows: int, waiting: int) -> None:
        self.rows.set(rows)
        self.occupancy.set(rows / self.max_batch)
        self.queue.set(waiting)


@dataclass
class _Request:
    """One accepted request: its prompts, jobs, and what has come back so far."""

    chat: bool
    prompts: list[list[int]]
    n: int
    options: list[GenerationOptions]
    stored_prompt: Any
    key_id: str | None
    jobs: list[Job] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    # Per choice (prompt-major): the pieces received, the finish reason once ended, the tokens generated.
    texts: list[list[str]] = field(init=False)
    finishes: list[str | None] = field(init=False)
    tokens: list[int] = field(init=False)

    def __post_init__(self) -> None:
        choices = len(self.prompts) * self.n
        self.texts, self.finishes, self.tokens = [[] for _ in range(choices)], [None] * choices, [0] * choices

    def index(self, prompt: int, piece: Piece) -> int:
        return prompt * self.n + piece.choice

    @property
    def done(self) -> bool:
        return all(finish is not None for finish in self.finishes)


def create_generation_app(
    runtime: GenerativeRuntime,
    keys: KeyStore | None,
    settings: ServeConfig | None = None,
    store: GenerationStore | None = None,
) -> FastAPI:
    """The OpenAI-compatible service for a language-modeling or instruction-tuning run.

    `keys=None` turns authentication off (the CLI allows that on loopback only). With `store`,
    generations are kept and `/v1/feedback` takes ratings and corrections. `settings`: the run's
    `serve:` section by default (batch size, queue, limits, timeouts, rate limits).
    """
    limits = settings or runtime.predictor.config.serve
    registry = CollectorRegistry()
    metrics = _Metrics(registry, limits.max_batch)
    info = Gauge("forgeml_model_info", "The model being served", ["name", "version", "engine"], registry=registry)
    info.labels(runtime.name, runtime.version, runtime.engine).set(1)
    engine = DecodingEngine(runtime.model, runtime.tokenizer, limits.max_batch, limits.max_queue, metrics)
    token_limiter = (
        RateLimiter(limits.token_rate_limit, int(limits.token_rate_limit)) if limits.token_rate_limit else None
    )
    served_names = {runtime.name, f"{runtime.name}/{runtime.version}", runtime.version}
    writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgeml-store")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        await _warm_up(engine, runtime)
        gc.collect()
        gc.freeze()  # see app.py: the model's millions of objects would stall every full collection
        app.state.ready = True
        yield
        app.state.ready = False
        await run_in_threadpool(engine.stop, limits.drain_s)
        await run_in_threadpool(writes.shutdown, True)  # every generation stored before the store closes
        if store is not None:
            store.close()
        gc.unfreeze()

    app = FastAPI(title=f"forgeml: {runtime.name}", version=runtime.version, lifespan=lifespan)
    app.state.ready = False
    # Called by the CLI's server when a shutdown begins: running generations get `drain_s` to finish.
    app.state.begin_drain = lambda: engine.begin_drain(limits.drain_s)
    install_basics(app, limits, registry, invalid=_invalid_body)
    require = scope_checker(keys, limits)

    @app.exception_handler(StarletteHTTPException)
    async def openai_shaped(request: Request, error: StarletteHTTPException) -> JSONResponse:
        param = getattr(error, "param", None)
        kind = "rate_limit_error" if error.status_code == 429 else "invalid_request_error"
        if error.status_code in (401, 403):
            kind = "authentication_error" if error.status_code == 401 else "permission_error"
        return JSONResponse(
            openai_error(str(error.detail), param, kind), status_code=error.status_code, headers=error.headers
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def demo() -> HTMLResponse:
        model = {**runtime.describe(), "max_tokens": limits.max_tokens}
        return HTMLResponse(demo_page(model, auth=keys is not None, generates=True))

    @app.get("/v1/models")
    def models(_: str | None = Depends(require("predict"))) -> dict[str, Any]:
        entry = {"id": runtime.name, "object": "model", "created": 0, "owned_by": "forgeml", **runtime.describe()}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/completions")
    async def completions(
        body: CompletionRequest, request: Request, key_id: str | None = Depends(require("predict"))
    ) -> Any:
        """Continue a prompt (text, token ids, or a list of either)."""
        return await answer(body, request, key_id, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(
        body: ChatRequest, request: Request, key_id: str | None = Depends(require("predict"))
    ) -> Any:
        """Answer a conversation, rendered with the run's chat template."""
        return await answer(body, request, key_id, chat=True)

    @app.post("/v1/feedback", status_code=201)
    def feedback(body: GenerationFeedback, key_id: str | None = Depends(require("feedback"))) -> dict[str, Any]:
        """Rate a generation (up or down) and/or give the answer it should have been."""
        if store is None:
            raise HTTPException(404, "feedback is not recorded by this server")
        if body.rating is None and body.correction is None:
            raise _Refusal(422, "feedback: give a rating (up or down), a correction, or both", "rating")
        generation = store.get(body.generation_id)
        if generation is None:
            raise _Refusal(404, f"no generation {body.generation_id!r}", "generation_id")
        if body.choice >= len(generation.choices):
            raise _Refusal(422, f"choice: generation has {len(generation.choices)} choices", "choice")
        correction = None if body.correction is None else runtime.storable(body.correction)
        feedback_id = store.add_feedback(
            generation_id=body.generation_id,
            choice=body.choice,
            rating=body.rating,
            correction=correction,
            comment=body.comment,
            key_id=key_id,
        )
        return {"feedback_id": feedback_id, "generation_id": body.generation_id, "rating": body.rating}

    async def answer(body: CompletionRequest | ChatRequest, request: Request, key_id: str | None, chat: bool) -> Any:
        if body.model not in served_names:
            raise _Refusal(
                404, f"model {body.model!r} is not served here; this server serves {runtime.name!r}", "model"
            )
        accepted = _accept(body, chat, runtime, limits, engine.context, key_id)
        if token_limiter is not None and key_id is not None:
            cost = sum(len(p) for p in accepted.prompts) + sum(o.max_new_tokens for o in accepted.options) * len(
                accepted.prompts
            )
            wait = token_limiter.acquire(key_id, cost)
            if wait:
                raise HTTPException(
                    429,
                    f"token rate limit: at most {limits.token_rate_limit:g} tokens (prompt + max_tokens) a minute "
                    f"for this key; retry in {wait:.1f} s",
                    headers={"Retry-After": str(max(1, round(wait + 0.5)))},
                )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Piece]] = asyncio.Queue()
        for index, prompt in enumerate(accepted.prompts):
            job = Job(prompt, accepted.options, _deliverer(loop, events, index))
            accepted.jobs.append(job)
        try:
            for job in accepted.jobs:
                engine.submit(job)
        except Busy as busy:
            for job in accepted.jobs:
                engine.cancel(job)
            raise HTTPException(429, str(busy), headers={"Retry-After": str(round(busy.retry_after + 0.5))}) from None
        except ForgeError as error:  # shutting down
            for job in accepted.jobs:
                engine.cancel(job)
            raise HTTPException(503, str(error)) from None
        response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        writer = CompletionWriter(chat, response_id, runtime.name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(accepted, events, writer, include_usage, response_id),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        stored = None
        try:
            while not accepted.done:
                await _next_event(accepted, events, request)
        finally:
            stored = finish(accepted, response_id)
        if stored is not None:  # the row is in the database before the client hears of its id
            await asyncio.wrap_future(stored)
        if any(finish == "error" for finish in accepted.finishes):
            raise HTTPException(500, "the model failed on this request")
        return JSONResponse(writer.response(["".join(t) for t in accepted.texts], accepted.finishes, _usage(accepted)))

    async def _stream(
        accepted: _Request, events: asyncio.Queue, writer: CompletionWriter, include_usage: bool, response_id: str
    ) -> AsyncIterator[str]:
        try:
            for chunk in writer.first_chunks(len(accepted.finishes)):
                yield chunk
            while not accepted.done:
                for index, piece in await _next_event(accepted, events, None):
                    yield writer.chunk(Piece(index, piece.text, _public(piece.finish_reason)))
            if include_usage:
                yield writer.usage_chunk(_usage(accepted))
            yield writer.done()
        finally:  # also when the client went away: the generator is cancelled, its jobs with it
            finish(accepted, response_id)

    async def _next_event(
        accepted: _Request, events: asyncio.Queue, request: Request | None
    ) -> list[tuple[int, Piece]]:
        """Wait for the next piece(s) (all that are ready), within the request's time; record them."""
        remaining = limits.request_timeout_s - (time.perf_counter() - accepted.started)
        wait = min(remaining, DISCONNECT_POLL_S) if request is not None else remaining
        try:
            first = await asyncio.wait_for(events.get(), timeout=max(wait, 0.0))
        except TimeoutError:
            if remaining <= wait:  # the request's time is up: cut it where it is
                for job in accepted.jobs:
                    engine.cancel(job)
                return _cut(accepted, FINISH_LENGTH)
            if request is not None and await request.is_disconnected():
                for job in accepted.jobs:
                    engine.cancel(job)
                return _cut(accepted, FINISH_CANCELLED)
            return []
        ready = [first]
        while not events.empty():
            ready.append(events.get_nowait())
        pieces = []
        for prompt_index, piece in ready:
            index = accepted.index(prompt_index, piece)
            if accepted.finishes[index] is not None:
                continue
            accepted.texts[index].append(piece.text)
            accepted.tokens[index] = max(accepted.tokens[index], piece.completion_tokens)
            accepted.finishes[index] = _public(piece.finish_reason)
            pieces.append((index, piece))
        return pieces

    def finish(accepted: _Request, response_id: str) -> Future | None:
        """Cancel what is still running (the client left) and store the generation.

        Not async: it runs in `finally` blocks of cancelled tasks, where an await would be cancelled too.
        The row is written on the store's own thread (one writer, as SQLite wants); the write's future is
        returned for a caller that may wait for it."""
        if not accepted.done:
            for job in accepted.jobs:
                engine.cancel(job)
            _cut(accepted, FINISH_CANCELLED)
        if store is None:
            return None
        choices = [
            {"text": runtime.storable("".join(texts)), "finish_reason": finish, "completion_tokens": tokens}
            for texts, finish, tokens in zip(accepted.texts, accepted.finishes, accepted.tokens, strict=True)
        ]
        first_tokens = [job.first_token_at for job in accepted.jobs if job.first_token_at is not None]
        options = accepted.options[0]
        record = {
            "id": response_id,
            "model": runtime.name,
            "version": runtime.version,
            "kind": "chat" if accepted.chat else "completion",
            "prompt": accepted.stored_prompt,
            "choices": choices,
            "settings": {
                "max_tokens": options.max_new_tokens,
                "temperature": options.temperature,
                "top_p": options.top_p,
                "stop": list(options.stop),
                "seed": options.seed,
                "n": accepted.n,
            },
            "prompt_tokens": sum(len(p) for p in accepted.prompts),
            "completion_tokens": sum(accepted.tokens),
            "first_token_s": (min(first_tokens) - accepted.started) if first_tokens else None,
            "seconds": time.perf_counter() - accepted.started,
            "key_id": accepted.key_id,
        }
        return writes.submit(store.add, **record)

    return app


class _Refusal(HTTPException):
    """An HTTP error that names the request field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(status, message)
        self.param = param


def _accept(
    body: CompletionRequest | ChatRequest,
    chat: bool,
    runtime: GenerativeRuntime,
    limits: ServeConfig,
    context: int | None,
    key_id: str | None,
) -> _Request:
    """Check a request against what we honour and the server's limits; its prompts as token ids."""
    for name, why in body.refused_fields():
        raise _Refusal(422, f"{name}: {why} by this server; leave it out", name)
    if body.n > limits.max_n:
        raise _Refusal(422, f"n: at most {limits.max_n} choices per request, got {body.n}", "n")
    if len(body.stop) > limits.max_stop:
        raise _Refusal(422, f"stop: at most {limits.max_stop} stop strings, got {len(body.stop)}", "stop")
    try:
        if chat:
            if body.response_format not in (None, {"type": "text"}):
                raise _Refusal(422, "response_format: only {'type': 'text'} is supported", "response_format")
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompts, stored = [runtime.chat_prompt(messages)], runtime.storable(messages)
            max_tokens = body.max_completion_tokens or body.max_tokens
        else:
            if body.best_of not in (None, body.n):
                raise _Refusal(422, "best_of: only best_of equal to n (or absent) is supported", "best_of")
            raw = _prompts(body.prompt)
            if len(raw) > limits.max_inputs:
                raise _Refusal(
                    413, f"prompt: at most {limits.max_inputs} prompts per request, got {len(raw)}", "prompt"
                )
            prompts = [runtime.completion_prompt(p) for p in raw]
            stored_prompts = [runtime.storable(p) if isinstance(p, str) else p for p in raw]
            stored = stored_prompts[0] if len(stored_prompts) == 1 else stored_prompts
            max_tokens = body.max_tokens
    except ValueError as error:  # a content part that is not text
        raise _Refusal(422, f"messages: {error}", "messages") from None
    except ForgeError as error:
        raise _Refusal(422, str(error), "messages" if chat else "prompt") from None
    if len(prompts) * body.n > limits.max_batch:
        raise _Refusal(
            422, f"n: {len(prompts)} prompts x n={body.n} choices exceed the batch of {limits.max_batch}", "n"
        )
    for ids in prompts:
        if not ids:
            raise _Refusal(422, "prompt: gives no tokens; send some text", "messages" if chat else "prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise _Refusal(413, f"prompt: {len(ids):,} tokens; at most {limits.max_prompt_tokens:,}", "prompt")
        if context is not None and len(ids) >= context:
            raise _Refusal(
                422,
                f"prompt: {len(ids)} tokens leave no room in the model's context of {context} tokens",
                "messages" if chat else "prompt",
            )
    longest = max(len(ids) for ids in prompts)
    if max_tokens is None:  # chat's default: whatever fits the context, within the server's cap
        max_tokens = min(limits.max_tokens, context - longest) if context else limits.max_tokens
    if max_tokens > limits.max_tokens:
        raise _Refusal(422, f"max_tokens: at most {limits.max_tokens}, got {max_tokens}", "max_tokens")
    options = [
        GenerationOptions(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop,
            seed=body.seed,
        )
        for _ in range(body.n)
    ]
    return _Request(chat, prompts, body.n, options, stored, key_id)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if not prompt:
        raise ForgeError("prompt: empty list")
    return list(prompt)


def _deliverer(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, prompt_index: int):
    def deliver(piece: Piece) -> None:  # on the engine's thread
        loop.call_soon_threadsafe(events.put_nowait, (prompt_index, piece))

    return deliver


def _cut(accepted: _Request, reason: str) -> list[tuple[int, Piece]]:
    """End every unfinished choice with `reason` (stored as it is: "cancelled" when the client never saw an
    end); the pieces to send carry the reason as the client knows it (`_public`)."""
    pieces = []
    for index, finish in enumerate(accepted.finishes):
        if finish is None:
            accepted.finishes[index] = reason
            pieces.append((index, Piece(index, "", _public(reason), accepted.tokens[index])))
    return pieces


def _public(reason: str | None) -> str | None:
    """A finish reason as OpenAI clients know them: "stop" or "length" ("error" for a failed model call)."""
    if reason is None:
        return None
    if reason.startswith("error"):
        return "error"
    return FINISH_LENGTH if reason == FINISH_CANCELLED else reason


def _usage(accepted: _Request) -> dict[str, int]:
    return usage(sum(len(p) for p in accepted.prompts), sum(accepted.tokens))


def _invalid_body(problems: list[dict[str, str]]) -> dict[str, Any]:
    first = problems[0] if problems else {"field": None, "problem": "invalid request"}
    message = "; ".join(f"{p['field']}: {p['problem']}" for p in problems) or "invalid request"
    return {**openai_error(message, first["field"]), "problems": problems}


async def _warm_up(engine: DecodingEngine, runtime: GenerativeRuntime) -> None:
    """One short generation through the engine before the server reports ready."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def deliver(piece: Piece) -> None:
        if piece.finish_reason is not None:
            loop.call_soon_threadsafe(done.set)

    prompt = runtime.completion_prompt("Hello") or [runtime.tokenizer.eos_token_id or 0]
    engine.submit(Job(prompt, [GenerationOptions(max_new_tokens=2, temperature=0)], deliver))
    await done.wait()
