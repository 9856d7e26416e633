"""The FastAPI app: typed requests and responses, API keys with scopes and a rate limit, JSON errors,
Prometheus metrics, a demo page.

Every error is a 4xx with a JSON body naming the problem: a bad request must never become a 500 or
hang. Predictions go through the micro-batcher, which scores concurrent requests together on one
inference thread, so health checks and metrics answer while a batch is scored.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CollectorRegistry, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from forgeml.config import ServeConfig
from forgeml.errors import ForgeError
from forgeml.serve.batching import MicroBatcher
from forgeml.serve.common import install_basics, scope_checker
from forgeml.serve.demo import demo_page
from forgeml.serve.keys import KeyStore
from forgeml.serve.records import RecordStore
from forgeml.serve.runtime import ModelRuntime, record_values

# Explanations cost `explain_steps` forward and backward passes per record: fewer per request.
MAX_EXPLAIN_INPUTS = 16


class PredictRequest(BaseModel):
    """`inputs`: one record or a list of them; a record is a text, a [premise, hypothesis] pair, or a
    mapping of input columns."""

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
    version: str
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


def _records(request: PredictRequest, limits: ServeConfig, max_inputs: int | None = None) -> list[Any]:
    inputs = request.inputs
    records = [inputs] if isinstance(inputs, (str, dict)) else list(inputs)
    if not records:
        raise HTTPException(422, "inputs: empty; send at least one record")
    max_inputs = max_inputs or limits.max_inputs
    if len(records) > max_inputs:
        raise HTTPException(413, f"inputs: {len(records)} records; at most {max_inputs} per request")
    for index, record in enumerate(records):
        for value in record_values(record):
            if isinstance(value, str) and len(value) > limits.max_chars:
                raise HTTPException(413, f"inputs[{index}]: {len(value):,} characters; at most {limits.max_chars:,}")
    return records


def create_app(
    runtime: ModelRuntime,
    keys: KeyStore | None,
    settings: ServeConfig | None = None,
    records: RecordStore | None = None,
) -> FastAPI:
    """The service for one model; `keys=None` turns authentication off (the CLI allows that on loopback only).

    With `records`, predictions are stored and `/v1/feedback` accepts corrections. `settings` gives the
    batching, the request limits and the per-key rate limit (the run's `serve:` section by default).
    """
    limits = settings or runtime.predictor.config.serve
    registry = CollectorRegistry()
    batch_sizes = Histogram(
        "forgeml_batch_size",
        "Records per model call (requests coalesced by the micro-batcher)",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        registry=registry,
    )
    info = Gauge("forgeml_model_info", "The model being served", ["name", "version", "engine"], registry=registry)
    info.labels(runtime.name, runtime.version, runtime.engine).set(1)

    def score(rows: list[Any], requests_in_batch: list[tuple[Any, int]]) -> list[dict[str, Any]]:
        """One model call for several requests; their predictions are stored in one transaction."""
        answers = runtime.predict(rows, batch_size=limits.max_batch)
        if records is not None:
            stored, start = runtime.storable(rows), 0
            batch = []
            for request_id, count in requests_in_batch:
                batch.append((request_id, stored[start : start + count], answers[start : start + count]))
                start += count
            records.add_predictions(runtime.name, runtime.version, batch)
        return answers

    batcher = MicroBatcher(
        score, limits.max_batch, limits.max_wait_ms, on_batch=batch_sizes.observe, workers=runtime.workers
    )
    # An explanation takes seconds: on its own thread it does not hold up the predictions queued behind it,
    # unless the model that predicts is the one explained (Captum hooks it while attributing).
    explainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgeml-explain")

    async def explaining(function: Any, *args: Any) -> Any:
        if runtime.explains_with_the_predicting_model:
            return await batcher.run_alone(function, *args)
        return await asyncio.get_running_loop().run_in_executor(explainer, function, *args)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.warm_up()
        # The model, tokenizer and libraries are millions of long-lived objects: left to the collector, every
        # full collection walks them all and stalls a whole batch for a third of a second. Frozen, it skips them.
        gc.collect()
        gc.freeze()
        await batcher.start()
        app.state.ready = True
        yield
        # uvicorn stops accepting and lets in-flight requests finish before this runs (graceful SIGTERM)
        app.state.ready = False
        await batcher.stop()
        explainer.shutdown(wait=True)
        if records is not None:
            records.close()
        gc.unfreeze()  # when the app was embedded in a longer-lived process, its objects may go again

    app = FastAPI(title=f"forgeml: {runtime.name}", version=runtime.version, lifespan=lifespan)
    app.state.ready = False

    install_basics(app, limits, registry)
    require = scope_checker(keys, limits)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def demo() -> HTMLResponse:
        return HTMLResponse(demo_page(runtime.describe(), auth=keys is not None))

    @app.get("/v1/models")
    def models(_: str | None = Depends(require("predict"))) -> dict[str, Any]:
        return {"models": [runtime.describe()]}

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True)
    async def predict(body: PredictRequest, _: str | None = Depends(require("predict"))) -> JSONResponse:
        rows = _records(body, limits)
        request_id = uuid.uuid4().hex
        try:
            answers = await batcher.submit(rows, request_id)
        except ForgeError as error:  # a record missing a column, a value of the wrong kind, ...
            raise HTTPException(422, str(error)) from None
        # The answers are already plain JSON values in PredictResponse's shape (the documented schema):
        # validating them again would cost every request more than its share of the model call.
        return JSONResponse(
            {"model": runtime.name, "version": runtime.version, "request_id": request_id, "predictions": answers}
        )

    @app.post("/v1/explain", response_model=ExplainResponse, response_model_exclude_none=True)
    async def explain(body: PredictRequest, _: str | None = Depends(require("predict"))) -> ExplainResponse:
        """Word attributions (integrated gradients) for text models: which words pushed the prediction."""
        if not runtime.explainable:
            raise HTTPException(404, "explanations: word attributions are for text models; this one is tabular")
        rows = _records(body, limits, min(limits.max_inputs, MAX_EXPLAIN_INPUTS))
        try:
            explained = await explaining(runtime.explain, rows, limits.explain_steps)
        except ForgeError as error:
            raise HTTPException(422, str(error)) from None
        return ExplainResponse(model=runtime.name, version=runtime.version, explanations=explained)

    @app.post("/v1/feedback", status_code=201)
    def feedback(body: FeedbackRequest, key_id: str | None = Depends(require("feedback"))) -> dict[str, Any]:
        if records is None:
            raise HTTPException(404, "feedback is not recorded by this server")
        if (body.request_id is None) == (body.inputs is None):
            raise HTTPException(422, "feedback: give either request_id (of an earlier prediction) or inputs")
        if runtime.classes and body.label not in runtime.classes:
            raise HTTPException(422, f"label: {body.label!r} is not a class; classes: {', '.join(runtime.classes)}")
        predicted = None
        inputs: Any = None if body.inputs is None else runtime.storable([body.inputs])[0]
        if body.request_id is not None:
            earlier = records.prediction(body.request_id, body.position)
            if earlier is None:
                raise HTTPException(404, f"no prediction {body.request_id!r} at position {body.position}")
            inputs, predicted = earlier.inputs, earlier.answer.get("label")
        feedback_id = records.add_feedback(
            request_id=body.request_id,
            position=body.position if body.request_id else None,
            model=runtime.name,
            version=runtime.version,
            inputs=inputs,
            predicted=predicted,
            label=body.label,
            comment=body.comment,
            key_id=key_id,
        )
        return {"feedback_id": feedback_id, "label": body.label, "predicted": predicted}

    return app
