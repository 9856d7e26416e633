"""The FastAPI app: typed requests and responses, API keys with scopes and a rate limit, JSON errors,
Prometheus metrics, a demo page.

Every error is a 4xx with a JSON body naming the problem: a bad request must never become a 500 or
hang. Predictions go through the micro-batcher, which scores concurrent requests together on one
inference thread, so health checks and metrics answer while a batch is scored.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from forgeml.config import ServeConfig
from forgeml.data.images import ImageTooLarge
from forgeml.errors import ForgeError
from forgeml.serve.batching import MicroBatcher
from forgeml.serve.common import install_basics, scope_checker
from forgeml.serve.demo import demo_page
from forgeml.serve.deployments import Deployment, Deployments, RegistryFollower
from forgeml.serve.drift import DriftGauges
from forgeml.serve.images import request_images
from forgeml.serve.keys import KeyStore
from forgeml.serve.records import RecordStore
from forgeml.serve.runtime import ModelRuntime, record_values

# A caller's stable identity for the canary split when it has no API key (or wants its own bucket).
ROUTE_HEADER = "x-forgeml-route"
# Explanations cost `explain_steps` forward and backward passes per record: fewer per request.
MAX_EXPLAIN_INPUTS = 16


class PredictRequest(BaseModel):
    """`inputs`: one record or a list of them; a record is a text, a [premise, hypothesis] pair, or a
    mapping of input columns; for an image model, an image file base64-encoded (or {"image": that})."""

    model_config = ConfigDict(extra="forbid")
    inputs: str | list[str] | dict[str, Any] | list[dict[str, Any]] | list[list[str]]


class Prediction(BaseModel):
    label: str | None = None
    probabilities: dict[str, float] | None = None
    value: float | None = None


class FeedbackRequest(BaseModel):
    """A correction: the right `label` for a record, named by the `request_id` (and `position` in that
    request) of an earlier prediction, or given as `inputs`."""

    model_config = ConfigDict(extra="forbid")
    request_id: str | None = Field(None, max_length=32)
    position: int = Field(0, ge=0, le=10_000)
    inputs: str | dict[str, Any] | list[str] | None = None
    label: str = Field(..., min_length=1, max_length=200)
    comment: str = Field("", max_length=2_000)


class PredictResponse(BaseModel):
    model: str
    version: str  # the run that answered
    registry_version: int | None = None  # its version number, when served by NAME@ALIAS
    request_id: str
    predictions: list[Prediction]


class WordScore(BaseModel):
    word: str
    score: float
    segment: int = 0
    start: int | None = None
    end: int | None = None


class Explanation(BaseModel):
    """Each word's contribution (log-odds of `target`) to the prediction; they sum to the output minus the
    all-padding baseline's, up to `delta`."""

    text: str
    text_pair: str | None = None
    label: str
    probability: float | None = None
    target: str
    delta: float
    words: list[WordScore]


class ExplainResponse(BaseModel):
    model: str
    version: str
    explanations: list[Explanation]


def _records(
    request: PredictRequest, limits: ServeConfig, max_inputs: int | None = None, texts: bool = True
) -> list[Any]:
    """The request's records, within the limits; `texts`: strings are texts (max_chars), not base64 images."""
    inputs = request.inputs
    records = [inputs] if isinstance(inputs, (str, dict)) else list(inputs)
    _check_count(len(records), max_inputs or limits.max_inputs)
    for index, record in enumerate(records if texts else ()):
        for value in record_values(record):
            if isinstance(value, str) and len(value) > limits.max_chars:
                raise HTTPException(413, f"inputs[{index}]: {len(value):,} characters; at most {limits.max_chars:,}")
    return records


def _check_count(count: int, max_inputs: int) -> None:
    if not count:
        raise HTTPException(422, "inputs: empty; send at least one record")
    if count > max_inputs:
        raise HTTPException(413, f"inputs: {count} records; at most {max_inputs} per request")


async def _decoded_images(records: list[Any], model: ModelRuntime, limits: ServeConfig) -> list[Any]:
    """An image model's records decoded off the event loop: 413 for an image too large, 422 for a bad one."""
    assert model.image_shape is not None
    try:
        return await run_in_threadpool(request_images, records, model.image_shape, limits.max_image_pixels)
    except ImageTooLarge as error:
        raise HTTPException(413, str(error)) from None
    except ForgeError as error:
        raise HTTPException(422, str(error)) from None


class _ServiceMetrics:
    """What /metrics reports beyond the basics (install_basics): batches, versions, shadow, feedback, reloads."""

    def __init__(self, registry: CollectorRegistry):
        self.batch_sizes = Histogram(
            "forgeml_batch_size",
            "Records per model call (requests coalesced by the micro-batcher)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.info = Gauge(
            "forgeml_model_info", "The models being served", ["name", "version", "engine", "role"], registry=registry
        )
        self.served = Counter(
            "forgeml_version_requests", "Requests answered per version", ["version", "role"], registry=registry
        )
        self.served_latency = Histogram(
            "forgeml_version_latency_seconds", "Model latency per version", ["version", "role"], registry=registry
        )
        self.compared = Counter(
            "forgeml_shadow_comparisons",
            "Shadow answers compared with the served one",
            ["version", "agrees"],
            registry=registry,
        )
        self.corrected = Counter(
            "forgeml_feedback_by_version",
            "Corrections of a version's predictions",
            ["version", "correct"],
            registry=registry,
        )
        self.reloads = Counter("forgeml_reloads", "Alias moves acted on", ["role", "outcome"], registry=registry)
        self.shadow_errors = Counter(
            "forgeml_shadow_errors", "Shadow scorings that failed (never seen by callers)", registry=registry
        )


def create_app(
    runtime: ModelRuntime,
    keys: KeyStore | None,
    settings: ServeConfig | None = None,
    records: RecordStore | None = None,
    follower: RegistryFollower | None = None,
    reference: str | None = None,
    canary: tuple[str, float] | None = None,
    shadow: tuple[str, float] | None = None,
) -> FastAPI:
    """The service for one model; `keys=None` turns authentication off (the CLI allows that on loopback only).

    With `records`, predictions are stored and `/v1/feedback` accepts corrections. `settings` gives the
    batching, the request limits and the per-key rate limit (the run's `serve:` section by default).
    With a registry `follower`: `reference` is the NAME@ALIAS `runtime` was loaded from (the server
    switches when the alias moves), `canary` = (NAME@ALIAS, percent of callers) answers that share of
    callers, and `shadow` = (NAME@ALIAS, percent of requests) scores requests off the answer path.
    """
    limits = settings or runtime.predictor.config.serve
    registry = CollectorRegistry()
    metrics = _ServiceMetrics(registry)

    def make_batcher(model: ModelRuntime, role: str) -> MicroBatcher:
        if role == "shadow":
            return MicroBatcher(
                lambda rows, contexts: score_shadow(model, rows, contexts),
                limits.max_batch,
                limits.max_wait_ms,
                workers=1,
                background=True,  # nobody waits for a shadow's answer: it gets the CPU the answers leave
            )
        return MicroBatcher(
            lambda rows, contexts: score(model, rows, contexts),
            limits.max_batch,
            limits.max_wait_ms,
            on_batch=metrics.batch_sizes.observe,
            workers=model.workers,
        )

    def score(model: ModelRuntime, rows: list[Any], requests_in_batch: list[tuple[Any, int]]) -> list[dict[str, Any]]:
        """One model call for several requests; their predictions are stored in one transaction."""
        answers = model.predict(rows, batch_size=limits.max_batch)
        if records is not None:
            stored, start = model.storable(rows), 0
            batch = []
            for request_id, count in requests_in_batch:
                batch.append((request_id, stored[start : start + count], answers[start : start + count]))
                start += count
            records.add_predictions(model.name, model.version, batch)
        return answers

    def score_shadow(model: ModelRuntime, rows: list[Any], contexts: list[tuple[Any, int]]) -> list[dict[str, Any]]:
        """The shadow's answers for requests already answered; compared and stored, never sent."""
        answers = model.predict(rows, batch_size=limits.max_batch)
        stored, start = [], 0
        for (request_id, answered_by, served_answers), count in contexts:
            for position, (mine, theirs) in enumerate(zip(answers[start : start + count], served_answers, strict=True)):
                agrees = _same_answer(mine, theirs)
                stored.append((request_id, position, answered_by, mine, theirs, agrees))
                metrics.compared.labels(model.version, str(agrees).lower()).inc()
            start += count
        stats = deployments.shadow.stats if deployments.shadow is not None else None
        if stats is not None:
            stats.compared += len(stored)
            stats.agreed += sum(row[-1] for row in stored)
        if records is not None:
            records.add_shadow(model.name, model.version, stored)
        return answers

    def on_reload(deployment: Deployment, switched: bool) -> None:
        metrics.reloads.labels(deployment.role, "switched" if switched else "failed").inc()
        if switched:
            metrics.info.clear()
            for active in deployments.active:
                metrics.info.labels(
                    active.runtime.name, active.runtime.version, active.runtime.engine, active.role
                ).set(1)

    def deployment(model: ModelRuntime, role: str, followed: str | None, share: float = 100.0) -> Deployment:
        version = follower.lookup(followed) if follower is not None and followed else None
        return Deployment(role, model, make_batcher(model, role), followed, version, share)

    extra: dict[str, Deployment | None] = {"canary": None, "shadow": None}
    for role, wanted in (("canary", canary), ("shadow", shadow)):
        if wanted is not None:
            if follower is None:
                raise ForgeError(f"{role}: needs the model registry (serve NAME@ALIAS)")
            model, version = follower.load(wanted[0])
            extra[role] = Deployment(role, model, make_batcher(model, role), wanted[0], version, wanted[1])
    deployments = Deployments(
        deployment(runtime, "primary", reference),
        extra["canary"],
        extra["shadow"],
        loader=follower.load if follower is not None else None,
        lookup=follower.lookup if follower is not None else None,
        make_batcher=make_batcher,
        on_reload=on_reload,
    )
    for active in deployments.active:
        metrics.info.labels(active.runtime.name, active.runtime.version, active.runtime.engine, active.role).set(1)
    # An explanation takes seconds: on its own thread it does not hold up the predictions queued behind it,
    # unless the model that predicts is the one explained (Captum hooks it while attributing).
    explainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgeml-explain")
    shadow_tasks: set[asyncio.Task] = set()

    async def explaining(chosen: Deployment, function: Any, *args: Any) -> Any:
        if chosen.runtime.explains_with_the_predicting_model:
            return await chosen.batcher.run_alone(function, *args)
        return await asyncio.get_running_loop().run_in_executor(explainer, function, *args)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for active in deployments.active:
            active.runtime.warm_up()
        # The model, tokenizer and libraries are millions of long-lived objects: left to the collector, every
        # full collection walks them all and stalls a whole batch for a third of a second. Frozen, it skips them.
        gc.collect()
        gc.freeze()
        await deployments.start()
        following = any(d.reference for d in deployments.active) and limits.reload_poll_s > 0
        watcher = asyncio.create_task(deployments.watch(limits.reload_poll_s)) if following else None
        drifting = None
        if limits.drift_every_s and records is not None:  # the primary version's served inputs, in the background
            url = records.engine.url.render_as_string(hide_password=False)
            gauges = DriftGauges(registry, url, limits.drift_window)
            drifting = asyncio.create_task(gauges.watch(lambda: deployments.primary.runtime, limits.drift_every_s))
        app.state.ready = True
        yield
        # uvicorn stops accepting and lets in-flight requests finish before this runs (graceful SIGTERM)
        app.state.ready = False
        for task in (watcher, drifting):
            if task is not None:
                task.cancel()
        if shadow_tasks:
            await asyncio.gather(*shadow_tasks, return_exceptions=True)
        await deployments.stop()
        explainer.shutdown(wait=True)
        if records is not None:
            records.close()
        gc.unfreeze()  # when the app was embedded in a longer-lived process, its objects may go again

    app = FastAPI(title=f"forgeml: {runtime.name}", version=runtime.version, lifespan=lifespan)
    app.state.ready = False
    app.state.deployments = deployments

    install_basics(app, limits, registry)
    require = scope_checker(keys, limits)

    def caller(request: Request, key_id: str | None) -> str | None:
        """Who is asking, for a sticky canary: the route header, else the API key, else the client address."""
        header = request.headers.get(ROUTE_HEADER)
        if header:
            return header[:200]
        if key_id:
            return key_id
        return request.client.host if request.client else None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def demo() -> HTMLResponse:
        return HTMLResponse(demo_page(deployments.primary.runtime.describe(), auth=keys is not None))

    @app.get("/v1/models")
    def models(_: str | None = Depends(require("predict"))) -> dict[str, Any]:
        failures = [vars(failure) for failure in deployments.failures[-20:]]
        return {"models": [d.describe() for d in deployments.active], "reload_failures": failures}

    @app.post("/v1/admin/reload")
    async def reload(_: str | None = Depends(require("admin"))) -> dict[str, Any]:
        """Switch every deployment that follows an alias to the version it points at now."""
        if follower is None:
            raise HTTPException(404, "reload: this server serves a run folder, not a registry alias (NAME@ALIAS)")
        changes = await deployments.reload()
        return {"changes": changes, "models": [d.describe() for d in deployments.active]}

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True)
    async def predict(
        body: PredictRequest, request: Request, key_id: str | None = Depends(require("predict"))
    ) -> JSONResponse:
        """Answers for a list of records: texts, text pairs, rows of columns, or base64 images."""
        images = runtime.image_shape is not None
        rows = _records(body, limits, texts=not images)
        if images:
            rows = await _decoded_images(rows, runtime, limits)
        return await answer(rows, request, key_id)

    @app.post("/v1/predict/upload", response_model=PredictResponse, response_model_exclude_none=True)
    async def predict_upload(
        request: Request,
        file: Annotated[list[UploadFile], File(description="one or more image files (multipart/form-data)")],
        key_id: str | None = Depends(require("predict")),
    ) -> JSONResponse:
        """Answers for uploaded image files (an image model), in the order they were sent."""
        if runtime.image_shape is None:
            raise HTTPException(404, "uploads are for image models; send this model's records to /v1/predict")
        _check_count(len(file), limits.max_inputs)
        rows = await _decoded_images([await upload.read() for upload in file], runtime, limits)
        return await answer(rows, request, key_id)

    async def answer(rows: list[Any], request: Request, key_id: str | None) -> JSONResponse:
        """Score `rows` on the caller's deployment (through its micro-batcher) and answer in PredictResponse's shape."""
        request_id = uuid.uuid4().hex
        chosen = deployments.route(caller(request, key_id))
        started = time.perf_counter()
        try:
            answers = await chosen.batcher.submit(rows, request_id)
        except ForgeError as error:  # a record missing a column, a value of the wrong kind, ...
            raise HTTPException(422, str(error)) from None
        seconds = time.perf_counter() - started
        model = chosen.runtime
        count(chosen, rows, seconds)
        if deployments.wants_shadow(request_id, backlog=limits.max_batch):  # scored off the answer path
            shadow_deployment = deployments.shadow
            assert shadow_deployment is not None
            task = asyncio.create_task(_shadow(shadow_deployment, rows, (request_id, model.version, answers)))
            shadow_tasks.add(task)
            task.add_done_callback(shadow_tasks.discard)
        # The answers are already plain JSON values in PredictResponse's shape (the documented schema):
        # validating them again would cost every request more than its share of the model call.
        response = {"model": model.name, "version": model.version, "request_id": request_id, "predictions": answers}
        if chosen.registry_version is not None:
            response["registry_version"] = chosen.registry_version
        return JSONResponse(response)

    async def _shadow(shadow_deployment: Deployment, rows: list[Any], context: tuple) -> None:
        started = time.perf_counter()
        try:
            await shadow_deployment.batcher.submit(rows, context)
        except Exception:  # the caller has its answer; a failing shadow is counted, never raised
            metrics.shadow_errors.inc()
            return
        count(shadow_deployment, rows, time.perf_counter() - started)

    def count(deployment: Deployment, rows: list[Any], seconds: float) -> None:
        """A request a version answered: its stats at /v1/models and its metrics."""
        deployment.stats.requests += 1
        deployment.stats.records += len(rows)
        deployment.stats.seconds += seconds
        metrics.served.labels(deployment.runtime.version, deployment.role).inc()
        metrics.served_latency.labels(deployment.runtime.version, deployment.role).observe(seconds)

    @app.post("/v1/explain", response_model=ExplainResponse, response_model_exclude_none=True)
    async def explain(
        body: PredictRequest, request: Request, key_id: str | None = Depends(require("predict"))
    ) -> ExplainResponse:
        """Word attributions (integrated gradients) for text models: which words pushed the prediction."""
        chosen = deployments.route(caller(request, key_id))
        model = chosen.runtime
        if not model.explainable:
            kind = (
                "an image model"
                if model.image_shape
                else "an ensemble (explain a member)"
                if model.input_columns and getattr(model.predictor.task, "text_columns", None)
                else "a tabular model"
            )
            raise HTTPException(404, f"explanations: word attributions are for text models; this one is {kind}")
        rows = _records(body, limits, min(limits.max_inputs, MAX_EXPLAIN_INPUTS))
        try:
            explained = await explaining(chosen, model.explain, rows, limits.explain_steps)
        except ForgeError as error:
            raise HTTPException(422, str(error)) from None
        return ExplainResponse(model=model.name, version=model.version, explanations=explained)

    @app.post("/v1/feedback", status_code=201)
    def feedback(body: FeedbackRequest, key_id: str | None = Depends(require("feedback"))) -> dict[str, Any]:
        if records is None:
            raise HTTPException(404, "feedback is not recorded by this server")
        if (body.request_id is None) == (body.inputs is None):
            raise HTTPException(422, "feedback: give either request_id (of an earlier prediction) or inputs")
        primary = deployments.primary.runtime
        if primary.classes and body.label not in primary.classes:
            raise HTTPException(422, f"label: {body.label!r} is not a class; classes: {', '.join(primary.classes)}")
        predicted, version = None, primary.version
        inputs: Any = None if body.inputs is None else primary.storable([body.inputs])[0]
        if body.request_id is not None:
            earlier = records.prediction(body.request_id, body.position)
            if earlier is None:
                raise HTTPException(404, f"no prediction {body.request_id!r} at position {body.position}")
            inputs, predicted, version = earlier.inputs, earlier.answer.get("label"), earlier.version
            stats = deployments.by_version(version)
            if stats is not None and predicted is not None:  # accuracy per version, from what users report
                stats.feedback += 1
                stats.feedback_correct += predicted == body.label
            if predicted is not None:
                metrics.corrected.labels(version, str(predicted == body.label).lower()).inc()
        feedback_id = records.add_feedback(
            request_id=body.request_id,
            position=body.position if body.request_id else None,
            model=primary.name,
            version=version,
            inputs=inputs,
            predicted=predicted,
            label=body.label,
            comment=body.comment,
            key_id=key_id,
        )
        return {"feedback_id": feedback_id, "label": body.label, "predicted": predicted}

    return app


def _same_answer(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Whether two answers agree: the same label, or values within 1e-6 relative."""
    if "label" in first:
        return first["label"] == second.get("label")
    return abs(first["value"] - second["value"]) <= 1e-6 * max(1.0, abs(second["value"]))
