"""The service for a language model: OpenAI's `/v1/completions` and `/v1/chat/completions` (whole answers or
Server-Sent Events), `/v1/models`, `/v1/feedback` on generations, and what every forgeml service has
(API keys with scopes, rate limits, metrics, health and readiness).

Requests are checked before anything is queued: a bad one gets a 4xx in OpenAI's error shape naming
the field. Accepted ones go to the `DecodingEngine`, whose thread decodes every running sequence in
one batch step by step; the event loop only moves text from the engine to the clients. A client that
goes away (or a request that runs past `serve.request_timeout_s`) is cancelled, which frees its slot
before the next step. Every generation is stored, complete, with token counts and timings.

Served as NAME@ALIAS, the server follows the alias as the predictive one does (deployments.py): when it
moves, the new version is loaded on a worker thread, given its own engine, warmed and smoke-tested beside
the old one, then swapped in between two requests. Requests the old version took (open streams too)
finish on it; then its engine stops and its model is freed. A version that fails any step is not swapped
in: the old keeps serving, and the failure is logged, counted in /metrics and shown at /v1/models.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
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
from forgeml.serve.deployments import RegistryFollower, ReloadFailure, poll_registry
from forgeml.serve.generations import GenerationStore
from forgeml.serve.keys import KeyStore
from forgeml.serve.ratelimit import RateLimiter
from forgeml.serve.runtime import GenerativeRuntime

# Histogram buckets for time to first token and between tokens (seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# How often a non-streaming request looks whether its client is still there.
DISCONNECT_POLL_S = 0.5
# The run that answered a request (the version changes underneath a model name when its alias moves).
VERSION_HEADER = "X-Forgeml-Version"
# A new version's smoke test before it is swapped in: a few greedy tokens, within this many seconds.
SMOKE_TOKENS = 4
SMOKE_TIMEOUT_S = 60.0

logger = logging.getLogger(__name__)


class GenerationFeedback(BaseModel):
    """A rating of one choice of an earlier generation, and/or the answer it should have given."""

    model_config = ConfigDict(extra="forbid")
    generation_id: str = Field(..., min_length=1, max_length=64)
    choice: int = Field(0, ge=0, le=1_000)
    rating: Literal["up", "down"] | None = None
    correction: str | None = Field(None, max_length=100_000)
    comment: str = Field("", max_length=2_000)


class _Metrics:
    """The service's model metrics. Each engine reports through its own `observer()`: while an old version
    finishes its requests beside the new one, the batch and queue gauges show both engines together."""

    def __init__(self, registry: CollectorRegistry, max_batch: int):
        self.max_batch = max_batch
        self._loads: dict[EngineObserver, tuple[int, int]] = {}  # per engine: (rows decoding, jobs waiting)
        self._lock = threading.Lock()  # engines report from their own threads
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
        self.info = Gauge(
            "forgeml_model_info", "The model being served", ["name", "version", "engine"], registry=registry
        )
        self.reloads = Counter("forgeml_reloads", "Alias moves acted on", ["role", "outcome"], registry=registry)

    def observer(self) -> EngineObserver:
        """Hooks for one more engine."""
        return _EngineMetrics(self)

    def load(self, engine: EngineObserver, rows: int, waiting: int) -> None:
        with self._lock:
            self._loads[engine] = (rows, waiting)
            self._publish()

    def forget(self, engine: EngineObserver) -> None:
        """An engine that has stopped: its last numbers no longer count."""
        with self._lock:
            self._loads.pop(engine, None)
            self._publish()

    def serving(self, runtime: GenerativeRuntime) -> None:
        self.info.clear()
        self.info.labels(runtime.name, runtime.version, runtime.engine).set(1)

    def _publish(self) -> None:
        rows = sum(load[0] for load in self._loads.values())
        self.rows.set(rows)
        self.occupancy.set(rows / self.max_batch)
        self.queue.set(sum(load[1] for load in self._loads.values()))


class _EngineMetrics(EngineObserver):
    """One engine's hooks into the shared `_Metrics` (called from that engine's thread)."""

    def __init__(self, metrics: _Metrics):
        self.metrics = metrics

    def first_token(self, seconds: float) -> None:
        self.metrics.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.metrics.gap.observe(seconds)

    def generated(self, tokens: int) -> None:
        self.metrics.tokens.inc(tokens)

    def step(self, rows: int, waiting: int) -> None:
        self.metrics.load(self, rows, waiting)


@dataclass(eq=False)
class _Served:
    """One version of the model being served: its runtime, its own decoding engine, and how many of the
    requests it took are not finished yet (an old version is stopped only once they are)."""

    runtime: GenerativeRuntime
    engine: DecodingEngine
    observer: EngineObserver
    registry_version: int | None = None
    open_requests: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever open_requests drops to 0

    @property
    def names(self) -> set[str]:
        """What a request's `model` may say to be answered by this version."""
        name, version = self.runtime.name, self.runtime.version
        return {name, f"{name}/{version}", version}

    def took(self) -> None:
        self.open_requests += 1
        self.idle.clear()

    def released(self) -> None:
        self.open_requests -= 1
        if self.open_requests == 0:
            self.idle.set()


@dataclass
class _Request:
    """One accepted request: its prompts, jobs, and what has come back so far."""

    served: _Served  # the version that took it answers all of it, even if another is swapped in meanwhile
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


class _Versions:
    """The version answering requests, kept on the one its registry alias points at when following one."""

    def __init__(
        self,
        current: _Served,
        limits: ServeConfig,
        metrics: _Metrics,
        follower: RegistryFollower | None = None,
        reference: str | None = None,
    ):
        self.current, self.limits, self.metrics = current, limits, metrics
        self.follower, self.reference = follower, reference
        self.failures: list[ReloadFailure] = []
        self._failed_version: int | None = None  # not retried until the alias moves again
        self._retiring: dict[_Served, asyncio.Task] = {}  # old versions finishing what they took
        self._lock = asyncio.Lock()  # the watcher and POST /v1/admin/reload never load the same version twice
        self._closing = False

    @property
    def following(self) -> bool:
        return self.follower is not None and self.reference is not None

    @property
    def engines(self) -> list[DecodingEngine]:
        return [self.current.engine, *(old.engine for old in self._retiring)]

    def describe(self) -> dict[str, Any]:
        """What /v1/models adds to the model's entry when following an alias."""
        if not self.following:
            return {}
        failure = vars(self.failures[-1]) if self._failed_version is not None and self.failures else None
        return {
            "follows": self.reference,
            "registry_version": self.current.registry_version,
            "reload_failure": failure,  # the alias names a version that could not be served
            "draining": [old.runtime.version for old in self._retiring],
        }

    async def watch(self, interval_s: float) -> None:
        """Check the alias every `interval_s` seconds until cancelled."""
        await poll_registry(self.reload, interval_s)

    async def reload(self) -> list[dict[str, Any]]:
        """Switch to the version the alias points at now, if it moved: the change made (or refused), if any."""
        if not self.following or self._closing:
            return []
        assert self.follower is not None and self.reference is not None
        async with self._lock:
            target = await asyncio.to_thread(self.follower.lookup, self.reference)
            if target is None or target == self._failed_version:
                return []
            if target == self.current.registry_version:
                self._failed_version = None  # moved back: the failed version may be tried again later
                return []
            return [await self._switch(target)]

    async def _switch(self, target: int) -> dict[str, Any]:
        started = time.perf_counter()
        change: dict[str, Any] = {"role": "primary", "follows": self.reference, "version": target}
        try:
            new = await self._ready()
        except Exception as error:
            failure = ReloadFailure(str(self.reference), target, f"{type(error).__name__}: {error}")
            self.failures = [*self.failures[-19:], failure]
            self._failed_version = target
            self.metrics.reloads.labels("primary", "failed").inc()
            logger.error("not switching %s to version %s: %s", self.reference, target, failure.error)
            return {**change, "switched": False, "error": failure.error}
        # No await between a request choosing `current` and submitting to its engine: this assignment falls
        # between two requests, and every later one goes to the new version.
        old, self.current = self.current, new
        self._failed_version = None
        self.metrics.serving(new.runtime)
        self.metrics.reloads.labels("primary", "switched").inc()
        self._retiring[old] = asyncio.create_task(self._retire(old))
        logger.warning("%s now serves %s (version %s)", self.reference, new.runtime.version, new.registry_version)
        seconds = round(time.perf_counter() - started, 2)
        return {
            **change,
            "version": new.registry_version,
            "run": new.runtime.version,
            "switched": True,
            "seconds": seconds,
        }

    async def _ready(self) -> _Served:
        """The version the alias names now, loaded on a worker thread, on its own running engine, and answering
        a smoke test; raises when any step fails, leaving nothing of it running."""
        assert self.follower is not None and self.reference is not None
        runtime, version = await asyncio.to_thread(self.follower.load_generative, self.reference)
        served = _serve(runtime, self.limits, self.metrics, version)
        served.engine.start()
        try:
            await _smoke_test(served.engine, runtime)
        except BaseException:  # also when cancelled at shutdown: its engine must not outlive the app
            served.engine.begin_drain(0.0)  # its thread ends after the step it is in (returns at once)
            self.metrics.forget(served.observer)
            raise
        return served

    async def _retire(self, old: _Served) -> None:
        """Let `old` finish the requests it took, then stop its engine and let its model be freed.

        Every request ends within `request_timeout_s` of its start (it cuts itself), so the wait is bounded;
        what still runs after it (a stream nobody reads) gets `drain_s` more, then is cut."""
        version = old.runtime.version
        try:
            if old.open_requests:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(old.idle.wait(), self.limits.request_timeout_s + self.limits.drain_s)
        finally:  # at shutdown too (cancelled by `stop`), so its thread never outlives the app
            await asyncio.to_thread(old.engine.stop, self.limits.drain_s)
            self.metrics.forget(old.observer)
            del self._retiring[old]
        del old  # the last reference to its model: the collector below may free it
        # The old model's objects were frozen out of the collector's sight at start-up: let it see them again.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        logger.info("%s: the old version %s finished its requests and was freed", self.reference, version)

    def begin_drain(self) -> None:
        """A shutdown begins: no more switches; every engine's running generations get `drain_s` to finish."""
        self._closing = True
        for engine in self.engines:
            engine.begin_drain(self.limits.drain_s)

    async def stop(self) -> None:
        """Stop every engine (each gets `drain_s` to finish what runs), old versions' too."""
        self.begin_drain()  # every engine's drain time starts now
        retiring = list(self._retiring.values())
        for task in retiring:  # no more waiting for their requests: the drain ends them
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)  # each stops its engine on the way out
        unstarted = [old.engine for old in self._retiring]  # cancelled before their first step
        for engine in (self.current.engine, *unstarted):
            await asyncio.to_thread(engine.stop, self.limits.drain_s)


def _serve(
    runtime: GenerativeRuntime, limits: ServeConfig, metrics: _Metrics, registry_version: int | None = None
) -> _Served:
    """A version ready to start: `runtime` on its own decoding engine, reporting to the shared metrics."""
    observer = metrics.observer()
    engine = DecodingEngine(runtime.model, runtime.tokenizer, limits.max_batch, limits.max_queue, observer)
    return _Served(runtime, engine, observer, registry_version)


def create_generation_app(
    runtime: GenerativeRuntime,
    keys: KeyStore | None,
    settings: ServeConfig | None = None,
    store: GenerationStore | None = None,
    follower: RegistryFollower | None = None,
    reference: str | None = None,
) -> FastAPI:
    """The OpenAI-compatible service for a language-modeling or instruction-tuning run.

    `keys=None` turns authentication off (the CLI allows that on loopback only). With `store`,
    generations are kept and `/v1/feedback` takes ratings and corrections. `settings`: the run's
    `serve:` section by default (batch size, queue, limits, timeouts, rate limits). With `follower` and
    `reference` (NAME@ALIAS, which `runtime` was loaded from), the server switches to the version the alias
    points at when it moves (checked every `serve.reload_poll_s` seconds and on POST /v1/admin/reload).
    """
    limits = settings or runtime.predictor.config.serve
    registry = CollectorRegistry()
    metrics = _Metrics(registry, limits.max_batch)
    metrics.serving(runtime)
    following = follower is not None and reference is not None
    version = follower.lookup(reference) if follower is not None and reference is not None else None
    versions = _Versions(_serve(runtime, limits, metrics, version), limits, metrics, follower, reference)
    token_limiter = (
        RateLimiter(limits.token_rate_limit, int(limits.token_rate_limit)) if limits.token_rate_limit else None
    )
    writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgeml-store")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        first = versions.current
        first.engine.start()
        await _warm_up(first.engine, first.runtime)
        del first  # the version may change: nothing here may keep the first one's model alive
        gc.collect()
        gc.freeze()  # see app.py: the model's millions of objects would stall every full collection
        watching = following and limits.reload_poll_s > 0
        watcher = asyncio.create_task(versions.watch(limits.reload_poll_s)) if watching else None
        app.state.ready = True
        yield
        app.state.ready = False
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)  # a switch it was making is undone
        await versions.stop()
        await run_in_threadpool(writes.shutdown, True)  # every generation stored before the store closes
        if store is not None:
            store.close()
        gc.unfreeze()

    app = FastAPI(title=f"forgeml: {runtime.name}", version=runtime.version, lifespan=lifespan)
    app.state.ready = False
    # Called by the CLI's server when a shutdown begins: running generations get `drain_s` to finish.
    app.state.begin_drain = versions.begin_drain
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
        model = {**versions.current.runtime.describe(), "max_tokens": limits.max_tokens}
        return HTMLResponse(demo_page(model, auth=keys is not None, generates=True))

    def listing() -> dict[str, Any]:
        served = versions.current.runtime
        entry = {"id": served.name, "object": "model", "created": 0, "owned_by": "forgeml", **served.describe()}
        listed: dict[str, Any] = {"object": "list", "data": [{**entry, **versions.describe()}]}
        if following:  # as the predictive server reports them
            listed["reload_failures"] = [vars(failure) for failure in versions.failures]
        return listed

    @app.get("/v1/models")
    async def models(_: str | None = Depends(require("predict"))) -> dict[str, Any]:
        return listing()  # async: read on the event loop, never while a switch changes what it reads

    @app.post("/v1/admin/reload")
    async def reload(_: str | None = Depends(require("admin"))) -> dict[str, Any]:
        """Switch to the version the followed alias points at now (without waiting for the next poll)."""
        if not following:
            raise HTTPException(404, "reload: this server serves a run folder, not a registry alias (NAME@ALIAS)")
        changes = await versions.reload()
        return {"changes": changes, "models": listing()["data"]}

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
        correction = None if body.correction is None else versions.current.runtime.storable(body.correction)
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
        # From here to the submission below nothing awaits: no switch can come between (see _Versions._switch).
        served = versions.current
        if body.model not in served.names:
            raise _Refusal(
                404, f"model {body.model!r} is not served here; this server serves {served.runtime.name!r}", "model"
            )
        accepted = _accept(body, chat, served, limits, key_id)
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
        engine = served.engine
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
        served.took()  # released in `finish`
        response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        writer = CompletionWriter(chat, response_id, served.runtime.name)
        answered_by = {VERSION_HEADER: served.runtime.version}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(accepted, events, writer, include_usage, response_id),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **answered_by},
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
        texts = ["".join(t) for t in accepted.texts]
        return JSONResponse(writer.response(texts, accepted.finishes, _usage(accepted)), headers=answered_by)

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
                    accepted.served.engine.cancel(job)
                return _cut(accepted, FINISH_LENGTH)
            if request is not None and await request.is_disconnected():
                for job in accepted.jobs:
                    accepted.served.engine.cancel(job)
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
        served = accepted.served
        if not accepted.done:
            for job in accepted.jobs:
                served.engine.cancel(job)
            _cut(accepted, FINISH_CANCELLED)
        served.released()
        if store is None:
            return None
        choices = [
            {"text": served.runtime.storable("".join(texts)), "finish_reason": finish, "completion_tokens": tokens}
            for texts, finish, tokens in zip(accepted.texts, accepted.finishes, accepted.tokens, strict=True)
        ]
        first_tokens = [job.first_token_at for job in accepted.jobs if job.first_token_at is not None]
        options = accepted.options[0]
        record = {
            "id": response_id,
            "model": served.runtime.name,
            "version": served.runtime.version,  # the version that answered, whichever serves now
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
    body: CompletionRequest | ChatRequest, chat: bool, served: _Served, limits: ServeConfig, key_id: str | None
) -> _Request:
    """Check a request against what we honour, the server's limits and the version that takes it (`served`);
    its prompts as token ids."""
    runtime, context = served.runtime, served.engine.context
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
    return _Request(served, chat, prompts, body.n, options, stored, key_id)


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
    await _generate_once(engine, runtime, 2)


async def _smoke_test(engine: DecodingEngine, runtime: GenerativeRuntime) -> None:
    """A few tokens from a new version before it is swapped in; raises when its model fails or hangs."""
    try:
        pieces = await asyncio.wait_for(_generate_once(engine, runtime, SMOKE_TOKENS), SMOKE_TIMEOUT_S)
    except TimeoutError:
        raise ForgeError(
            f"smoke test: no answer to a {SMOKE_TOKENS}-token generation in {SMOKE_TIMEOUT_S:g} s"
        ) from None
    finish = pieces[-1].finish_reason or ""
    if finish.startswith("error"):
        raise ForgeError(f"smoke test: {finish}")


async def _generate_once(engine: DecodingEngine, runtime: GenerativeRuntime, max_tokens: int) -> list[Piece]:
    """One short greedy generation of a fixed prompt through `engine`: the pieces it delivered."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    pieces: list[Piece] = []

    def deliver(piece: Piece) -> None:  # on the engine's thread; `pieces` is read once `done` is set
        pieces.append(piece)
        if piece.finish_reason is not None:
            loop.call_soon_threadsafe(done.set)

    prompt = runtime.completion_prompt("Hello") or [runtime.tokenizer.eos_token_id or 0]
    engine.submit(Job(prompt, [GenerationOptions(max_new_tokens=max_tokens, temperature=0)], deliver))
    await done.wait()
    return pieces
