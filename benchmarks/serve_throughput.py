"""Serving throughput: `forgeml serve` against two hand-written FastAPI servers of the same model.

Three servers answer POST /v1/predict on 127.0.0.1, each in its own process (one uvicorn worker), with the
same fine-tuned weights and the same function (encoder -> mean pooling over the attention mask -> linear head):

- ``forgeml``: ``forgeml serve RUN_DIR --engine onnx --no-auth`` as a user starts it (micro-batching; with
  ``--engine onnx``, the default of ``--engine`` here, it serves the run's ``export/model.int8.onnx``; the
  engine it reports at /v1/models is recorded);
- ``ort``: what a user who knows onnxruntime writes (about 25 lines, `ort_app`): a FastAPI app with a plain
  ``def`` endpoint, the run's ``export/tokenizer`` loaded with ``transformers.AutoTokenizer`` and ONE
  ``onnxruntime.InferenceSession`` (default session options) on the same ``export/model.int8.onnx`` file;
  per request it tokenizes (padding, truncation to the run's ``max_length``, ``return_tensors="np"``), calls
  ``session.run`` once and answers softmax probabilities under the run's class names
  (``export/task.json``: ``target.classes``). With ``--engine`` other than onnx, forgeml serves another
  file but this peer still serves the int8 one;
- ``pipeline``: what a typical user writes without an export: a FastAPI app with a plain ``def`` endpoint
  calling ``transformers.pipeline("text-classification")`` once per request (PyTorch fp32). Hugging Face's
  ``BertForSequenceClassification`` pools with the CLS token and a pooler layer, a different function, so
  the peer model is a small `PreTrainedModel` subclass of the encoder's own base class (e.g.
  ``BertPreTrainedModel``) whose forward is mean pooling + the run's head, returning
  ``SequenceClassifierOutput``. The run's weights are copied into it, it is saved with ``save_pretrained``
  (plus the run's tokenizer and its class names as ``id2label``), and the peer process loads it back with
  ``from_pretrained`` and truncates to the run's ``max_length``. Before any load, that reloaded model's
  logits are compared with the run's `TextModel` on a few sentences (they must agree to 1e-4).

Each request carries one SST-2 validation sentence (the realistic serving case), in a fixed seeded order
(request i sends sentence i mod their number, 872), the same sequence for every server. The load is
closed-loop: ``--concurrency`` clients, each sending its next request when the last is answered, for
``--seconds``, with one of two clients (``--client threads|httpx|both``, default both):

- ``threads``: `forgeml.serve.loadgen.closed_loop`, one thread and one keep-alive ``http.client``
  connection per client;
- ``httpx``: an asyncio closed loop, ``--concurrency`` tasks sharing one ``AsyncClient`` (keep-alive,
  limits allowing that many connections). This venv has no module ``httpx``; it has ``httpx2`` (a fork
  with the same API, a dependency of ``huggingface_hub``), used when ``import httpx`` fails; the module
  used is recorded in the JSON.

After an untimed warm-up load for each (client, server), the timed runs alternate within each round
(for each client: forgeml, ort, pipeline; ``--rounds`` rounds) because the shared 2-core VM's speed drifts.
For each (client, peer) pair the report gives forgeml's and the peer's req/s and p99, the ratios
forgeml/peer (req/s) and peer/forgeml (p99), per round (paired, less noisy) and of the medians across
rounds. Beside each run, from /proc: CPU steal (% of machine CPU time taken by the hypervisor), the shares
used by the server processes, by this process (the load generator runs here, on the same cores as the
servers, for every contender alike, so its CPU is CPU the server under test did not get) and by other
processes. A run with high steal or other processes' share (flagged above 10 %) is slow because of its
neighbours, not its code.

Batch invariance: before any load, every one of the 872 sentences is sent to forgeml alone (one request at a
time, so each is scored in a batch of one); every forgeml answer under the concurrent loads (warm-ups
included), where micro-batching scores it with other requests, is compared with that sentence's answer
alone. The number of sentences that got a different label at least once must be 0 for a batch-invariant
engine (the largest probability difference is reported beside it).

Agreement: the labels forgeml and each peer gave for the same request index (same sentence) must agree on at
least 99 % (int8 against the pipeline's fp32 flips a few borderline sentences; forgeml normalises text, the
peers do not). Any non-200 answer, lower agreement or a sentence whose label changes when batched makes the
script exit with status 1. The targets (forgeml >= 1.5x the ort peer's req/s and >= 4x the pipeline peer's,
p99 below both, for each client) are reported, not enforced.

Model FLOPs utilisation (MFU, a column for all): useful forward FLOPs of the sentences answered, one
sentence unpadded at a time (`TextModel.training_flops` / 3: 2 per non-embedding weight per token plus
attention), per second, over the machine's measured fp32 matmul peak (`matmul_peak_flops`). It counts the
fp32 model's useful work whatever the engine does: padding is not credited, and int8 matmuls run faster
than the fp32 peak, so an int8 engine's MFU overstates hardware use (it can even pass 100 %).

Run from the repository root on a trained run with its ONNX export (takes about clients x rounds x 3 x
seconds plus warm-ups, the 872 single requests and model loading: 5+ minutes with the defaults)::

    forgeml run examples/sst2.yaml && forgeml compress runs/sst2/<id>
    python benchmarks/serve_throughput.py --run runs/sst2/<id>
    python benchmarks/serve_throughput.py --run runs/sst2/<id> --seconds 3 --rounds 1 --warmup-seconds 1 \
        --out /tmp/st.json  # smoke

Results: a Markdown table on stdout and JSON in ``benchmarks/out/serve_throughput.json``. The script also
runs itself as the peer servers (``serve_throughput.py ort-server EXPORT_FOLDER --port P --max-length N``
and ``serve_throughput.py pipeline-server FOLDER --port P --max-length N``).
"""

from __future__ import annotations

import os

# Before any Hugging Face import: no progress bars, no hub access, errors only.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import asyncio
import contextlib
import copy
import csv
import gc
import itertools
import json
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from fastapi import FastAPI
from machine import cpu_jiffies, cpu_model
from pydantic import BaseModel
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

import forgeml
from forgeml.serve.loadgen import Exchange, LoadResult, closed_loop
from forgeml.train.peak import matmul_peak_flops

try:
    import httpx
except ImportError:  # this venv has the fork `httpx2` (same API), a dependency of huggingface_hub
    import httpx2 as httpx

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
DEFAULT_OUT = REPO / "benchmarks" / "out" / "serve_throughput.json"
SEED = 42
CONTENDERS = ("forgeml", "ort", "pipeline")  # the order of the runs within a round, for each client
PEERS = CONTENDERS[1:]
CLIENTS = ("threads", "httpx")
# Smallest share of requests where a peer gives forgeml's label: the ort peer runs the very same int8 file;
# the pipeline peer runs PyTorch fp32, which the int8 file matches on 99.1 % of SST-2 validation sentences,
# so a few hundred requests can dip below 99 % by chance.
MIN_AGREEMENT = {"ort": 0.99, "pipeline": 0.98}
TARGET_SPEEDUP = {"ort": 1.5, "pipeline": 4.0}  # forgeml req/s over the peer's
TARGET_P99_RATIO = 1.0  # peer p99 over forgeml's: above it, forgeml's p99 is below the peer's
ORT_FILE = "model.int8.onnx"  # in the run's export/ folder: what `forgeml serve --engine onnx` serves
PARITY_TOLERANCE = 1e-4  # max |logit difference| between the peer model and the run's TextModel
READY_TIMEOUT_S = 300.0  # loading a model on a busy 2-core VM can take a minute or two
PARITY_SENTENCES = 5
# Above this share of machine CPU used by other processes a run's timing is unreliable (as in
# train_throughput.py): on 2 cores a neighbour's busy thread takes a large part of what the server gets.
OTHERS_PERCENT = 10.0


# ----------------------------------------------------------------------------- the peer model and server


def peer_model_class(encoder_class: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """A sequence classifier computing what `TextModel` computes: encoder -> masked mean (or CLS) pooling
    -> dropout -> linear `head`, on the encoder's own `PreTrainedModel` base (e.g. `BertPreTrainedModel`),
    so `save_pretrained`, `from_pretrained` and `pipeline` treat it like any Hugging Face model."""
    base = next(c for c in encoder_class.__mro__[1:] if issubclass(c, PreTrainedModel))

    class MeanPoolingForSequenceClassification(base):
        def __init__(self, config: transformers.PretrainedConfig):
            super().__init__(config)
            try:
                encoder = encoder_class(config, add_pooling_layer=False)
            except TypeError:  # encoders without a pooler do not take the argument
                encoder = encoder_class(config)
            # Under the base model prefix (e.g. `bert`), as Hugging Face's own task models keep their encoder.
            setattr(self, self.base_model_prefix, encoder)
            self.pooling = getattr(config, "classifier_pooling", "mean")
            self.dropout = nn.Dropout(config.classifier_dropout or 0.0)
            self.head = nn.Linear(config.hidden_size, config.num_labels)
            self.post_init()

        def forward(
            self,
            input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            token_type_ids: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> SequenceClassifierOutput:
            extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            encoder = getattr(self, self.base_model_prefix)
            hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            return SequenceClassifierOutput(logits=self.head(self.dropout(pooled)))

    return MeanPoolingForSequenceClassification


def load_peer_model(folder: Path) -> PreTrainedModel:
    """The peer model as saved by `write_peer_model`, through `from_pretrained` (eval mode)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    encoder_class = MODEL_MAPPING[type(AutoConfig.from_pretrained(folder))]  # e.g. BertConfig -> BertModel
    return peer_model_class(encoder_class).from_pretrained(folder)


class PeerRequest(BaseModel):
    inputs: list[str]


def peer_app(folder: Path, max_length: int) -> FastAPI:
    """The peer: FastAPI, a plain `def` endpoint (run in FastAPI's thread pool), one pipeline call a request."""
    from transformers import AutoTokenizer, pipeline
    from transformers.utils import logging as hf_logging

    model = load_peer_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # The pipeline logs an error naming every model class it knows when it does not know this one's name; it
    # only calls `model(**inputs).logits`, so the check is silenced rather than the model registered.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(hf_logging.CRITICAL)
    try:
        classifier = pipeline(
            "text-classification",
            model=model,
            tokenizer=tokenizer,
            device="cpu",
            truncation=True,
            max_length=max_length,
        )
    finally:
        hf_logging.set_verbosity(verbosity)

    app = FastAPI(title="peer: transformers pipeline")

    @app.get("/readyz")
    def readyz() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/predict")
    def predict(body: PeerRequest) -> dict[str, Any]:
        return {"predictions": classifier(body.inputs)}

    return app


def ort_app(export: Path, max_length: int) -> FastAPI:
    """The ort peer: FastAPI, a plain `def` endpoint, one onnxruntime session (default options) on the run's
    int8 export, one tokenizer call and one `session.run` a request."""
    import numpy as np
    import onnxruntime
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export / "tokenizer")
    session = onnxruntime.InferenceSession(str(export / ORT_FILE))
    input_names = {node.name for node in session.get_inputs()}
    classes = json.loads((export / "task.json").read_text(encoding="utf-8"))["target"]["classes"]
    app = FastAPI(title="peer: onnxruntime")

    @app.get("/readyz")
    def readyz() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/predict")
    def predict(body: PeerRequest) -> dict[str, Any]:
        batch = tokenizer(body.inputs, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        logits = session.run(None, {name: value for name, value in batch.items() if name in input_names})[0]
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        return {
            "predictions": [
                {"label": classes[int(p.argmax())], "probabilities": dict(zip(classes, p.tolist(), strict=True))}
                for p in probabilities
            ]
        }

    return app


def serve_peer(argv: list[str], kind: str) -> None:
    """Run one peer server (`kind`: ort or pipeline) until terminated."""
    parser = argparse.ArgumentParser(prog=f"serve_throughput.py {kind}-server")
    what = "the run's export/ folder" if kind == "ort" else "the peer model written by the benchmark"
    parser.add_argument("folder", type=Path, help=what)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    args = parser.parse_args(argv)
    import uvicorn

    transformers.logging.disable_progress_bar()
    app = (ort_app if kind == "ort" else peer_app)(args.folder, args.max_length)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


# ----------------------------------------------------------------------------- preparing the model and data


def load_sentences(path: Path, seed: int) -> list[str]:
    """The file's sentences (column `sentence` or `text`) in a fixed seeded order."""
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    name = "sentence" if rows and "sentence" in rows[0] else "text"
    sentences = [row[name] for row in rows]
    random.Random(seed).shuffle(sentences)
    return sentences


@dataclass
class PreparedModel:
    """What the benchmark needs from the run besides the servers."""

    classes: list[str]
    max_length: int
    parity_max_abs_diff: float
    sentence_flops: list[float]  # useful forward FLOPs of each sentence, unpadded
    sentence_tokens: list[int]
    normalized_changes: int  # sentences our server's text normalisation changes (the peer does not normalise)
    parameters: int


def write_peer_model(run_dir: Path, folder: Path, sentences: list[str]) -> PreparedModel:
    """Copy the run's weights into the peer model class, save it with its tokenizer into `folder`, reload
    it as the peer server will and check its logits against the run's TextModel."""
    from forgeml.data.clean import normalize_text

    predictor = forgeml.load(run_dir)
    ours = predictor.torch_model  # the PyTorch TextModel, whatever engine the predictor would use
    task = predictor.task
    classes = list(task.target.classes)
    options = task.model_options
    max_length = int(options["max_length"])

    config = copy.deepcopy(ours.encoder.config)
    config.id2label = dict(enumerate(classes))  # the pipeline answers these names, as our server does
    config.label2id = {name: i for i, name in enumerate(classes)}
    config.classifier_pooling = options.get("pooling", "mean")
    config.classifier_dropout = options.get("dropout", 0.1)
    peer = peer_model_class(type(ours.encoder))(config)
    prefix = peer.base_model_prefix
    state = {
        (prefix + name[len("encoder") :] if name.startswith("encoder.") else name): value
        for name, value in ours.state_dict().items()
    }
    peer.load_state_dict(state, strict=True)
    peer.save_pretrained(folder)
    task.tokenizer.save_pretrained(folder)

    reloaded = load_peer_model(folder).eval()
    tokenizer = task.tokenizer
    sample = sentences[:PARITY_SENTENCES]
    with torch.no_grad():
        # Ours as the server scores them (padded together), the peer's as the pipeline does (one at a time).
        batch = tokenizer(sample, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        our_logits = ours(batch["input_ids"], batch["attention_mask"])
        peer_logits = torch.cat(
            [
                reloaded(**tokenizer([s], truncation=True, max_length=max_length, return_tensors="pt")).logits
                for s in sample
            ]
        )
    parity = float((our_logits - peer_logits).abs().max())

    tokens = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]]
    flops = [ours.training_flops([n], n) / 3.0 for n in tokens]  # forward only: training_flops counts 3x
    return PreparedModel(
        classes=classes,
        max_length=max_length,
        parity_max_abs_diff=parity,
        sentence_flops=flops,
        sentence_tokens=tokens,
        normalized_changes=sum(normalize_text(s) != s for s in sentences),
        parameters=sum(p.numel() for p in ours.parameters()),
    )


# ----------------------------------------------------------------------------- server processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen
    log: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def running(name: str, command: list[str], port: int, log: Path) -> Iterator[Server]:
    """Start a server process; whatever happens, terminate it (SIGTERM: uvicorn shuts down gracefully) and
    wait for it, killing it if it does not stop."""
    with open(log, "w", encoding="utf-8") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    server = Server(name, port, process, log)
    try:
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_ready(server: Server, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll GET /readyz until it answers 200 (our server: after its warm-up call; the peer: once listening,
    its model loads before uvicorn starts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} server exited with status {server.process.returncode}:\n{server.tail()}")
        with contextlib.suppress(OSError):
            if get_json(server.port, "/readyz")[0] == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} server not ready after {timeout_s:.0f} s:\n{server.tail()}")


# ----------------------------------------------------------------------------- measurements


def process_jiffies(pid: int) -> int:
    """CPU time (user + system, all threads) a process used since it started, in clock ticks; 0 once gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)


@dataclass(frozen=True)
class CpuShares:
    """Shares (%) of the machine's CPU time over one run: stolen by the hypervisor, used by the server
    processes, by this process (the load generator), and by everything else (neighbours)."""

    steal: float
    busy: float
    servers: float
    client: float
    others: float


@dataclass(frozen=True)
class CpuTimes:
    """Machine-wide jiffies since boot from the `cpu ` line of /proc/stat (as train_throughput.py reads it),
    plus the jiffies of this process and of the server processes."""

    steal: int
    idle: int
    total: int
    client: float
    servers: int

    @classmethod
    def now(cls, server_pids: list[int]) -> CpuTimes:
        own = os.times()
        client = (own.user + own.system) * os.sysconf("SC_CLK_TCK")
        servers = sum(process_jiffies(pid) for pid in server_pids)
        return cls(*cpu_jiffies(), client, servers)

    def shares_since(self, before: CpuTimes) -> CpuShares:
        total = max(self.total - before.total, 1)
        steal = self.steal - before.steal
        busy = total - (self.idle - before.idle) - steal
        servers = self.servers - before.servers
        client = self.client - before.client
        # What neither server nor the load generator used: a neighbour taking cores from the run.
        others = max(busy - servers - client, 0.0)
        return CpuShares(*(100.0 * v / total for v in (steal, busy, servers, client, others)))


@dataclass
class RunRecord:
    round: int  # 0: the untimed warm-up
    client: str  # threads or httpx
    contender: str
    seconds: float
    requests: int
    requests_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    statuses: dict[int, int]
    steal_percent: float
    busy_percent: float  # machine CPU time used by anything: servers + client + others
    servers_cpu_percent: float  # all server processes (the idle ones use next to nothing)
    client_cpu_percent: float  # the load generator, competing with the server for the 2 cores
    others_percent: float  # neighbours: above OTHERS_PERCENT the run's timing is unreliable
    mean_tokens: float
    mfu: float
    lost: int = 0  # requests whose client thread died before recording them (see `client_failures`)
    errors: list[str] = field(default_factory=list)


Request = tuple[str, str, dict[str, Any], dict[str, str]]  # method, path, JSON body, headers


def request_for(sentences: list[str]) -> Callable[[int], Request]:
    """Request i sends sentence i mod n: the same sequence for every server and run."""

    def request(index: int) -> Request:
        return "POST", "/v1/predict", {"inputs": [sentences[index % len(sentences)]]}, {}

    return request


def httpx_closed_loop(
    port: int,
    request: Callable[[int], Request],
    concurrency: int,
    duration_s: float,
    keep_bodies: bool = False,
    host: str = "127.0.0.1",
) -> LoadResult:
    """`closed_loop`'s load from asyncio: `concurrency` tasks sharing one `httpx.AsyncClient` (keep-alive, as
    many connections as tasks), each sending `request(i)` for the next i when its last one is answered,
    until `duration_s` passed. Every exchange is recorded, failed connections with status 0."""

    async def load() -> LoadResult:
        counter = itertools.count()
        result = LoadResult()
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=f"http://{host}:{port}", limits=limits, timeout=httpx.Timeout(120.0)
        ) as client:
            started = time.perf_counter()
            deadline = started + duration_s

            async def task() -> None:
                while time.perf_counter() < deadline:
                    index = next(counter)
                    method, path, body, headers = request(index)
                    sent = time.perf_counter()
                    try:
                        response = await client.request(method, path, json=body, headers=headers)
                    except (httpx.HTTPError, OSError) as error:
                        seconds = time.perf_counter() - sent
                        result.exchanges.append(Exchange(index, 0, seconds, error=f"{type(error).__name__}: {error}"))
                        continue
                    seconds = time.perf_counter() - sent
                    try:
                        answer = response.json() if keep_bodies and response.content else None
                    except ValueError:  # not JSON (a plain-text error page): keep the text
                        answer = response.text
                    result.exchanges.append(Exchange(index, response.status_code, seconds, answer))

            await asyncio.gather(*(task() for _ in range(concurrency)))
            result.seconds = time.perf_counter() - started
        result.exchanges.sort(key=lambda e: e.index)
        return result

    return asyncio.run(load())


@contextlib.contextmanager
def client_failures() -> Iterator[list[str]]:
    """Collect exceptions that end a load-generator thread. `closed_loop` records connection errors, but an
    answer that is not JSON (e.g. a plain-text 500) raises in its client thread with keep_bodies: the thread
    dies, its request goes unrecorded and the concurrency drops by one. Counted here, they fail the run."""
    failures: list[str] = []
    previous = threading.excepthook

    def record(hook: threading.ExceptHookArgs) -> None:
        failures.append(f"{hook.exc_type.__name__}: {hook.exc_value}"[:300])

    threading.excepthook = record
    try:
        yield failures
    finally:
        threading.excepthook = previous


def measure(
    round_index: int,
    client: str,
    server: Server,
    sentences: list[str],
    prepared: PreparedModel,
    concurrency: int,
    seconds: float,
    peak: float,
    server_pids: list[int],
) -> tuple[RunRecord, LoadResult]:
    """One closed-loop load on one server from one client, with the machine's CPU steal over the same
    interval."""
    gc.collect()
    before = CpuTimes.now(server_pids)
    with client_failures() as failures:
        if client == "httpx":
            result = httpx_closed_loop(server.port, request_for(sentences), concurrency, seconds, keep_bodies=True)
        else:
            result = closed_loop(server.port, request_for(sentences), concurrency, duration_s=seconds, keep_bodies=True)
    cpu = CpuTimes.now(server_pids).shares_since(before)
    answered = [e.index % len(sentences) for e in result.exchanges if e.status == 200]
    flops = sum(prepared.sentence_flops[i] for i in answered)
    tokens = [prepared.sentence_tokens[i] for i in answered]
    summary = result.summary()
    record = RunRecord(
        round=round_index,
        client=client,
        contender=server.name,
        seconds=result.seconds,
        requests=len(result.exchanges),
        requests_per_second=result.requests_per_second,
        p50_ms=result.latency_ms(50),
        p95_ms=result.latency_ms(95),
        p99_ms=result.latency_ms(99),
        statuses=summary["statuses"],
        steal_percent=cpu.steal,
        busy_percent=cpu.busy,
        servers_cpu_percent=cpu.servers,
        client_cpu_percent=cpu.client,
        others_percent=cpu.others,
        mean_tokens=statistics.fmean(tokens) if tokens else 0.0,
        mfu=flops / result.seconds / peak if result.seconds else 0.0,
        # The first few failures, to say why without flooding the report.
        lost=len(failures),
        errors=[f"#{e.index}: {e.status} {e.error or e.body}"[:300] for e in result.exchanges if e.status != 200][:5]
        + [f"client thread died: {failure}" for failure in failures[:5]],
    )
    return record, result


def first_prediction(body: Any) -> dict[str, Any] | None:
    try:
        prediction = body["predictions"][0]
    except (KeyError, IndexError, TypeError):
        return None
    return prediction if isinstance(prediction, dict) else None


def label_of(body: Any) -> str | None:
    prediction = first_prediction(body)
    return None if prediction is None else prediction.get("label")


def agreement(pairs: list[tuple[LoadResult, LoadResult]], sentences: list[str], peer_name: str) -> dict[str, Any]:
    """Share of request indices, within each (round, client), where forgeml and the peer answered 200 with the
    same label."""
    compared = agreed = 0
    disagreements: list[dict[str, Any]] = []
    for ours, peer in pairs:
        theirs = {e.index: label_of(e.body) for e in peer.exchanges if e.status == 200}
        for exchange in ours.exchanges:
            if exchange.status != 200 or exchange.index not in theirs:
                continue
            compared += 1
            mine, other = label_of(exchange.body), theirs[exchange.index]
            if mine is not None and mine == other:
                agreed += 1
            elif len(disagreements) < 10:
                text = sentences[exchange.index % len(sentences)]
                disagreements.append({"index": exchange.index, "sentence": text, "forgeml": mine, peer_name: other})
    return {
        "compared": compared,
        "agreed": agreed,
        "share": agreed / compared if compared else 0.0,
        "first_disagreements": disagreements,
    }


def batch_invariance(alone: LoadResult, loads: list[LoadResult], sentences: list[str]) -> dict[str, Any]:
    """Compare forgeml's answer to each sentence sent alone (a batch of one) with every answer it gave the same
    sentence under concurrent load (micro-batched with other requests): sentences whose label differed at
    least once, and the largest probability difference."""
    n = len(sentences)
    reference = {e.index % n: first_prediction(e.body) for e in alone.exchanges if e.status == 200}
    reference = {i: p for i, p in reference.items() if p is not None and "label" in p}
    compared = 0
    covered: set[int] = set()
    differing: dict[int, dict[str, Any]] = {}
    max_diff = 0.0
    for result in loads:
        for exchange in result.exchanges:
            i = exchange.index % n
            batched = first_prediction(exchange.body) if exchange.status == 200 else None
            if batched is None or i not in reference:
                continue
            compared += 1
            covered.add(i)
            single = reference[i]
            probabilities = single.get("probabilities") or {}
            for name, p in probabilities.items():
                other = (batched.get("probabilities") or {}).get(name)
                if other is not None:
                    max_diff = max(max_diff, abs(float(other) - float(p)))
            if batched.get("label") != single["label"] and i not in differing:
                differing[i] = {
                    "sentence": sentences[i],
                    "alone": single,
                    "batched": batched,
                    "request": exchange.index,
                }
    return {
        "sentences": n,
        "answered_alone": len(reference),
        "alone_statuses": alone.statuses(),
        "alone_seconds": alone.seconds,
        "alone_p50_ms": alone.latency_ms(50),
        "answers_compared": compared,
        "sentences_compared": len(covered),
        "sentences_with_different_label": len(differing),
        "max_abs_probability_diff": max_diff,
        "first_differences": list(differing.values())[:10],
    }


# ----------------------------------------------------------------------------- report

METRICS = (
    "requests_per_second",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "mfu",
    "steal_percent",
    "busy_percent",
    "servers_cpu_percent",
    "client_cpu_percent",
    "others_percent",
)


def paired(ours_rps: float, peer_rps: float, ours_p99: float, peer_p99: float) -> dict[str, float]:
    return {
        "forgeml_requests_per_second": ours_rps,
        "peer_requests_per_second": peer_rps,
        "requests_per_second_forgeml_over_peer": ours_rps / max(peer_rps, 1e-9),
        "forgeml_p99_ms": ours_p99,
        "peer_p99_ms": peer_p99,
        "p99_peer_over_forgeml": peer_p99 / max(ours_p99, 1e-9),
    }


def summarise(records: list[RunRecord], clients: tuple[str, ...]) -> dict[str, Any]:
    """Medians of the timed runs per (client, contender), and for each (client, peer) pair forgeml's and the
    peer's req/s and p99 with their ratios, per round and of the medians."""
    timed = [r for r in records if r.round > 0]
    medians = {
        client: {
            contender: {
                name: statistics.median(
                    getattr(r, name) for r in timed if r.contender == contender and r.client == client
                )
                for name in METRICS
            }
            for contender in CONTENDERS
        }
        for client in clients
    }
    comparisons = []
    for client in clients:
        by_round: dict[int, dict[str, RunRecord]] = {}
        for record in timed:
            if record.client == client:
                by_round.setdefault(record.round, {})[record.contender] = record
        ours = medians[client]["forgeml"]
        for peer in PEERS:
            theirs = medians[client][peer]
            median = paired(
                ours["requests_per_second"], theirs["requests_per_second"], ours["p99_ms"], theirs["p99_ms"]
            )
            rounds = [
                {
                    "round": index,
                    **paired(
                        runs["forgeml"].requests_per_second,
                        runs[peer].requests_per_second,
                        runs["forgeml"].p99_ms,
                        runs[peer].p99_ms,
                    ),
                }
                for index, runs in sorted(by_round.items())
            ]
            ratio_names = ("requests_per_second_forgeml_over_peer", "p99_peer_over_forgeml")
            comparisons.append(
                {
                    "client": client,
                    "peer": peer,
                    "median": median,
                    "rounds": rounds,
                    "median_of_round_ratios": {
                        name: statistics.median(r[name] for r in rounds) for name in ratio_names
                    },
                    "targets": {
                        f"req/s >= {TARGET_SPEEDUP[peer]:g}x {peer}": median["requests_per_second_forgeml_over_peer"]
                        >= TARGET_SPEEDUP[peer],
                        f"p99 below {peer}'s": median["p99_peer_over_forgeml"] > TARGET_P99_RATIO,
                    },
                }
            )
    return {"medians": medians, "comparisons": comparisons}


def markdown(
    records: list[RunRecord],
    summary: dict[str, Any],
    agreed: dict[str, dict[str, Any]],
    invariance: dict[str, Any],
    engine: str,
) -> str:
    lines = [
        "| round | client | server | seconds | requests | req/s | p50 ms | p95 ms | p99 ms | MFU | tokens | steal "
        "| servers CPU | client CPU | other procs | statuses |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        statuses = ", ".join(f"{code}: {count}" for code, count in r.statuses.items())
        statuses += f", lost: {r.lost}" if r.lost else ""
        busy = " *" if r.others_percent > OTHERS_PERCENT else ""
        lines.append(
            f"| {r.round or 'warm-up'} | {r.client} | {r.contender} | {r.seconds:.1f} | {r.requests} | "
            f"{r.requests_per_second:.1f} | {r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.p99_ms:.1f} | {r.mfu:.2%} | "
            f"{r.mean_tokens:.1f} | {r.steal_percent:.1f} % | {r.servers_cpu_percent:.0f} % | "
            f"{r.client_cpu_percent:.0f} % | {r.others_percent:.0f} %{busy} | "
            f"{statuses} |"
        )
    if any(r.others_percent > OTHERS_PERCENT for r in records):
        lines.append(
            f"\n\\* other processes used over {OTHERS_PERCENT:.0f} % of the CPU: this run's timing is unreliable"
        )
    lines += [
        "",
        "| client | server (median) | req/s | p50 ms | p95 ms | p99 ms | MFU | steal | other procs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for client, by_contender in summary["medians"].items():
        for contender, m in by_contender.items():
            lines.append(
                f"| {client} | {contender} | {m['requests_per_second']:.1f} | {m['p50_ms']:.1f} | "
                f"{m['p95_ms']:.1f} | {m['p99_ms']:.1f} | {m['mfu']:.2%} | {m['steal_percent']:.1f} % | "
                f"{m['others_percent']:.0f} % |"
            )
    lines += [
        "",
        "| client | peer | round | forgeml req/s | peer req/s | req/s forgeml / peer | forgeml p99 ms | peer p99 ms "
        "| p99 peer / forgeml |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in summary["comparisons"]:
        for label, v in [*((str(r["round"]), r) for r in c["rounds"]), ("median", c["median"])]:
            bold = "**" if label == "median" else ""
            lines.append(
                f"| {c['client']} | {c['peer']} | {label} | {v['forgeml_requests_per_second']:.1f} | "
                f"{v['peer_requests_per_second']:.1f} | "
                f"{bold}{v['requests_per_second_forgeml_over_peer']:.2f}x{bold} | "
                f"{v['forgeml_p99_ms']:.1f} | {v['peer_p99_ms']:.1f} | "
                f"{bold}{v['p99_peer_over_forgeml']:.2f}x{bold} |"
            )
    lines += [
        "",
        f"forgeml engine: {engine}",
        f"batch invariance: {invariance['sentences_with_different_label']} of {invariance['sentences_compared']} "
        f"sentences got a different label batched under load than alone ({invariance['answers_compared']} "
        f"answers compared with {invariance['answered_alone']} of {invariance['sentences']} sentences sent alone; "
        f"max |probability difference| {invariance['max_abs_probability_diff']:.2e}; must be 0)",
    ]
    for peer, a in agreed.items():
        lines.append(
            f"label agreement with {peer}: {a['share']:.2%} of {a['compared']} requests "
            f"(minimum {MIN_AGREEMENT[peer]:.0%})"
        )
    for c in summary["comparisons"]:
        for target, met in c["targets"].items():
            lines.append(f"target ({c['client']} client) {target}: {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def machine_info(peak: float) -> dict[str, Any]:
    import fastapi
    import onnxruntime
    import uvicorn

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "matmul_peak_flops": peak,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "httpx_module": f"{httpx.__name__} {httpx.__version__}",
        "forgeml": forgeml.__version__,
    }


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory with export/ (model.int8.onnx)")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed load per server per client per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each times forgeml, ort, pipeline per client")
    parser.add_argument("--warmup-seconds", type=float, default=5.0, help="untimed load per server and client first")
    parser.add_argument("--client", choices=("threads", "httpx", "both"), default="both", help="load generator")
    parser.add_argument(
        "--engine", choices=("onnx", "onnx_fp32", "auto", "pytorch"), default="onnx", help="passed to forgeml serve"
    )
    parser.add_argument("--max-batch", type=int, default=None, help="passed to forgeml serve (default: the run's)")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="passed to forgeml serve")
    parser.add_argument("--data", type=Path, default=DATASETS / "sst2" / "validation.csv", help="sentences to send")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    return parser.parse_args(argv)


def our_command(args: argparse.Namespace, port: int, workspace: Path) -> list[str]:
    command = [sys.executable, "-m", "forgeml.cli", "serve", str(args.run.resolve()), "--port", str(port)]
    command += ["--engine", args.engine, "--no-auth"]
    command += ["--workspace", str(workspace)]  # its prediction log goes to a throw-away database
    if args.max_batch is not None:
        command += ["--max-batch", str(args.max_batch)]
    if args.max_wait_ms is not None:
        command += ["--max-wait-ms", str(args.max_wait_ms)]
    return command


def peer_command(kind: str, folder: Path, port: int, max_length: int) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), f"{kind}-server", str(folder.resolve())]
    return [*command, "--port", str(port), "--max-length", str(max_length)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["pipeline-server"], ["peer-server"]):  # peer-server: the name it had before the ort peer
        serve_peer(argv[1:], "pipeline")
        return 0
    if argv[:1] == ["ort-server"]:
        serve_peer(argv[1:], "ort")
        return 0
    args = parse_args(argv)
    clients = CLIENTS if args.client == "both" else (args.client,)
    export = args.run / "export"
    missing = [name for name in (ORT_FILE, "tokenizer", "task.json") if not (export / name).exists()]
    if missing:
        raise SystemExit(f"{export}: no {', '.join(missing)} (the ort peer serves the run's int8 export)")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    peak = matmul_peak_flops("cpu")  # measured once and cached, before any server runs
    sentences = load_sentences(args.data, SEED)
    records: list[RunRecord] = []
    pairs: dict[str, list[tuple[LoadResult, LoadResult]]] = {peer: [] for peer in PEERS}
    forgeml_loads: list[LoadResult] = []  # every concurrent load on forgeml, for the batch-invariance check
    with tempfile.TemporaryDirectory(prefix="serve-throughput-") as folder:
        tmp = Path(folder)
        prepared = write_peer_model(args.run, tmp / "peer-model", sentences)
        gc.collect()  # the run's model stays in memory here; nothing runs on it during the load
        print(
            f"pipeline peer model: max |logit difference| from the run's TextModel "
            f"{prepared.parity_max_abs_diff:.2e} on {PARITY_SENTENCES} sentences",
            file=sys.stderr,
        )
        if prepared.parity_max_abs_diff > PARITY_TOLERANCE:
            raise SystemExit(f"the peer model does not compute the run's function (> {PARITY_TOLERANCE:g})")
        (tmp / "workspace").mkdir()
        ports = {name: free_port() for name in CONTENDERS}
        commands = {
            "forgeml": our_command(args, ports["forgeml"], tmp / "workspace"),
            "ort": peer_command("ort", export, ports["ort"], prepared.max_length),
            "pipeline": peer_command("pipeline", tmp / "peer-model", ports["pipeline"], prepared.max_length),
        }
        with contextlib.ExitStack() as stack:
            servers = {
                name: stack.enter_context(running(name, commands[name], ports[name], tmp / f"{name}.log"))
                for name in CONTENDERS
            }
            for server in servers.values():
                wait_ready(server)
            engine = get_json(servers["forgeml"].port, "/v1/models")[1]["models"][0]["engine"]
            print(f"all servers ready; forgeml engine: {engine}", file=sys.stderr)
            pids = [server.process.pid for server in servers.values()]

            # Every sentence to forgeml alone (one request in flight: a batch of one), before any load.
            with client_failures() as alone_failures:
                alone = closed_loop(
                    servers["forgeml"].port, request_for(sentences), 1, total=len(sentences), keep_bodies=True
                )
            print(
                f"forgeml alone: {len(sentences)} sentences in {alone.seconds:.1f} s, p50 {alone.latency_ms(50):.1f} "
                f"ms, statuses {alone.statuses()}",
                file=sys.stderr,
            )

            # Warm-up: thread pools, allocator and kernel caches; recorded (statuses count) but not in medians.
            for client in clients:
                for name in CONTENDERS:
                    record, result = measure(
                        0, client, servers[name], sentences, prepared, args.concurrency, args.warmup_seconds, peak, pids
                    )
                    records.append(record)
                    if name == "forgeml":
                        forgeml_loads.append(result)
            for round_index in range(1, args.rounds + 1):
                for client in clients:
                    results = {}
                    for name in CONTENDERS:
                        record, results[name] = measure(
                            round_index,
                            client,
                            servers[name],
                            sentences,
                            prepared,
                            args.concurrency,
                            args.seconds,
                            peak,
                            pids,
                        )
                        records.append(record)
                        print(
                            f"round {round_index} {client} {name}: {record.requests_per_second:.1f} req/s, p99 "
                            f"{record.p99_ms:.0f} ms, steal {record.steal_percent:.1f} %, other processes "
                            f"{record.others_percent:.0f} %, statuses {record.statuses}"
                            + (f", lost {record.lost}" if record.lost else ""),
                            file=sys.stderr,
                        )
                    forgeml_loads.append(results["forgeml"])
                    for peer in PEERS:
                        pairs[peer].append((results["forgeml"], results[peer]))
            for server in servers.values():
                if server.process.poll() is not None:
                    raise RuntimeError(f"{server.name} server died during the load:\n{server.tail()}")

    summary = summarise(records, clients)
    agreed = {peer: agreement(pairs[peer], sentences, peer) for peer in PEERS}
    invariance = batch_invariance(alone, forgeml_loads, sentences)
    non_200 = {
        f"{r.client} {r.contender} round {r.round}": {
            **{str(code): n for code, n in r.statuses.items() if code != 200},
            **({"lost": r.lost} if r.lost else {}),
        }
        for r in records
        if r.lost or any(code != 200 for code in r.statuses)
    }
    alone_bad = {str(code): n for code, n in alone.statuses().items() if code != 200}
    alone_lost = len(sentences) - len(alone.exchanges)
    if alone_bad or alone_lost or alone_failures:
        non_200["forgeml alone (batch invariance)"] = {**alone_bad, **({"lost": alone_lost} if alone_lost else {})}
    invariant = invariance["sentences_with_different_label"] == 0
    agreeing = all(a["share"] >= MIN_AGREEMENT[peer] for peer, a in agreed.items())
    ok = agreeing and invariant and not non_200
    print(markdown(records, summary, agreed, invariance, engine))
    if non_200:
        print(f"\nnon-200 answers (lost: no answer recorded): {non_200}")
        for r in records:
            for error in r.errors:
                print(f"  {r.client} {r.contender} round {r.round} {error}")
        for e in [e for e in alone.exchanges if e.status != 200][:5]:
            print(f"  forgeml alone #{e.index}: {e.status} {e.error or e.body}"[:300])
        for failure in alone_failures[:5]:
            print(f"  forgeml alone: client thread died: {failure}")
    for peer, a in agreed.items():
        if a["share"] < MIN_AGREEMENT[peer]:
            print(
                f"\nlabel agreement with {peer} below {MIN_AGREEMENT[peer]:.0%}: "
                f"first disagreements {a['first_disagreements']}"
            )
    if not invariant:
        print(f"\nlabels that change when batched: first differences {invariance['first_differences']}")
    result = {
        "benchmark": "serve_throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "setup": {
            "run": str(args.run),
            "forgeml_engine": engine,
            "forgeml_server": f"forgeml serve --engine {args.engine} --no-auth (micro-batching), one uvicorn process",
            "ort_server": f"FastAPI plain def endpoint + AutoTokenizer + one onnxruntime.InferenceSession (default "
            f"options) on export/{ORT_FILE}, one session.run per request, one uvicorn process",
            "pipeline_server": "FastAPI plain def endpoint + transformers.pipeline('text-classification'), "
            "one pipeline call per request, one uvicorn process",
            "pipeline_model": "PreTrainedModel subclass: encoder -> mean pooling -> head, the run's weights",
            "pipeline_parity_max_abs_logit_diff": prepared.parity_max_abs_diff,
            "clients": list(clients),
            "httpx_module": httpx.__name__,
            "classes": prepared.classes,
            "max_length": prepared.max_length,
            "parameters": prepared.parameters,
            "sentences": len(sentences),
            "sentences_changed_by_forgeml_normalization": prepared.normalized_changes,
            "inputs_per_request": 1,
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup_seconds,
            "rounds": args.rounds,
            "seed": SEED,
            "targets": {
                **{f"req/s >= {v:g}x {peer}": "forgeml over peer, median" for peer, v in TARGET_SPEEDUP.items()},
                "p99 below every peer's": "reported, not enforced",
            },
            "mfu": "useful forward FLOPs (TextModel.training_flops / 3 per sentence, unpadded) / s / fp32 matmul peak",
        },
        "machine": machine_info(peak),
        "runs": [asdict(r) for r in records],
        **summary,
        "batch_invariance": invariance,
        "agreement": agreed,
        "non_200": non_200,
        "ok": ok,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
