"""Serving a language model as NAME@ALIAS: when the alias moves, the server switches to the new version
without dropping a request (open streams finish on the old one), refuses a broken version, and stores each
generation under the version that answered it."""

from __future__ import annotations

import gc
import http.client
import json
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

import forgeml
from forgeml.config import ServeConfig
from forgeml.registry import Registry
from forgeml.serve.deployments import RegistryFollower
from forgeml.serve.generation_app import VERSION_HEADER, create_generation_app
from forgeml.serve.generations import GenerationStore
from forgeml.serve.keys import KeyStore
from forgeml.store import database_url

from serving import Client, server_process, serving
from test_language_modeling import corpus, lm_config

pytestmark = pytest.mark.usefixtures("one_thread")
REFERENCE = "writer@champion"
PROMPT = "the cat"


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """writer@1 and writer@2 (two seeds of a tiny character GPT, trained a few steps) in one workspace."""
    root = tmp_path_factory.mktemp("lm_reload")
    text = root / "corpus.txt"
    text.write_text(corpus(300), encoding="utf-8")
    workspace = root / "ws"
    workspace.mkdir()
    registry = Registry(database_url(workspace))
    runs = []
    for seed in (1, 2):
        config = lm_config(text, max_steps=20, eval_every=20, batch_size=8, seed=seed)
        config["model"]["architecture"]["context"] = 64
        runs.append(forgeml.run(config, workspace=workspace).run_dir)
        registry.register("writer", runs[-1])
    return {"workspace": workspace, "runs": runs, "registry": registry, "url": database_url(workspace)}


@pytest.fixture
def champion_is_one(two_versions: dict):
    """Every test starts (and leaves the workspace) with writer@champion -> 1."""
    two_versions["registry"].set_alias("writer", "champion", 1)
    yield two_versions
    two_versions["registry"].set_alias("writer", "champion", 1, reason="back")


def _app(two_versions: dict, poll: float, keys: KeyStore | None = None, gate: threading.Event | None = None):
    """The server of writer@champion; with `gate`, the version it starts on decodes only while the gate is set."""
    follower = RegistryFollower(two_versions["registry"])
    runtime, _ = follower.load_any(REFERENCE)
    if gate is not None:
        _held(runtime.model, gate)
    settings = ServeConfig(reload_poll_s=poll, max_tokens=32)
    store = GenerationStore(two_versions["url"])
    return create_generation_app(runtime, keys, settings, store, follower, REFERENCE), weakref.ref(runtime.model)


def _held(model, gate: threading.Event) -> None:
    """Each forward pass of `model` waits for `gate`: a generation stays running for as long as a test wants."""
    forward = model.forward

    def waiting(*args, **kwargs):
        assert gate.wait(timeout=30), "the test never opened the gate"
        return forward(*args, **kwargs)

    model.forward = waiting


def _complete(client: Client, model: str = "writer", key: str | None = None) -> tuple[int, dict, str | None]:
    """(status, body, the run that answered) of a short greedy completion."""
    request = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    status, body = client.call("POST", "/v1/completions", request, key)
    return status, body, client.headers.get(VERSION_HEADER.lower())


def _models_when(client: Client, ready: Callable[[dict], bool], key: str | None = None) -> dict:
    """/v1/models once `ready(listing)` holds (or after 30 s): polling a state, not timing anything."""
    deadline = time.monotonic() + 30
    while True:
        listing = client.call("GET", "/v1/models", key=key)[1]
        if ready(listing) or time.monotonic() > deadline:
            return listing
        time.sleep(0.05)


def _serving_version(run: Path) -> Callable[[dict], bool]:
    return lambda listing: listing["data"][0]["version"] == run.name


def test_moving_the_alias_switches_the_served_version(champion_is_one: dict) -> None:
    registry, (first, second) = champion_is_one["registry"], champion_is_one["runs"]
    app, _ = _app(champion_is_one, poll=0.1)
    with serving(app) as client:
        before = _complete(client)
        registry.set_alias("writer", "champion", 2, reason="test")
        listing = _models_when(client, _serving_version(second))
        after = _complete(client)  # the same model name, another version underneath
        old_by_id = _complete(client, model=first.name)
        metrics = client.call("GET", "/metrics")[1]
    assert before[0] == 200 and before[2] == first.name
    assert after[0] == 200 and after[2] == second.name and after[1]["model"] == "writer"
    model = listing["data"][0]
    assert model["id"] == "writer" and model["registry_version"] == 2 and model["follows"] == REFERENCE
    assert model["reload_failure"] is None and listing["reload_failures"] == []
    assert old_by_id[0] == 404 and old_by_id[1]["error"]["param"] == "model"
    assert 'forgeml_reloads_total{outcome="switched",role="primary"} 1.0' in metrics
    assert f'version="{second.name}"' in metrics and f'version="{first.name}"' not in metrics  # forgeml_model_info
    store = GenerationStore(champion_is_one["url"])
    assert store.get(before[1]["id"]).version == first.name
    assert store.get(after[1]["id"]).version == second.name


def test_a_stream_started_before_a_switch_finishes_on_the_old_version(champion_is_one: dict) -> None:
    registry, (first, second) = champion_is_one["registry"], champion_is_one["runs"]
    gate = threading.Event()
    gate.set()  # open for the warm-up
    app, old_model = _app(champion_is_one, poll=0.0, gate=gate)  # no polling: the endpoint switches
    with serving(app) as client:
        gate.clear()  # from now on the first version's generations wait, mid-stream
        connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
        stream = {"model": "writer", "prompt": PROMPT, "max_tokens": 20, "stream": True, "temperature": 0}
        connection.request("POST", "/v1/completions", json.dumps(stream), {"Content-Type": "application/json"})
        response = connection.getresponse()  # accepted: its job is on the first version's engine
        assert response.status == 200 and response.getheader(VERSION_HEADER) == first.name
        registry.set_alias("writer", "champion", 2, reason="test")
        status, reloaded = client.call("POST", "/v1/admin/reload")
        during = client.call("GET", "/v1/models")[1]["data"][0]
        answered_meanwhile = _complete(client)
        gate.set()
        events = [e.removeprefix("data: ") for e in response.read().decode().split("\n\n") if e.startswith("data: ")]
        connection.close()
        after = _models_when(client, lambda listing: not listing["data"][0]["draining"])["data"][0]
    assert status == 200 and reloaded["changes"][0]["switched"] and reloaded["changes"][0]["run"] == second.name
    assert during["version"] == second.name and during["draining"] == [first.name]
    assert answered_meanwhile[0] == 200 and answered_meanwhile[2] == second.name
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])
    expected = forgeml.load(first).generate(PROMPT, max_new_tokens=20, temperature=0)
    assert text == expected  # the whole answer of the first version: not cut by the switch
    assert after["draining"] == []
    gc.collect()
    assert old_model() is None  # the old version's model was freed once its stream ended
    stored = GenerationStore(champion_is_one["url"]).get(json.loads(events[0])["id"])
    assert stored.version == first.name  # stored after the switch, under the version that answered


def test_a_broken_version_is_not_swapped_in(champion_is_one: dict) -> None:
    registry, first = champion_is_one["registry"], champion_is_one["runs"][0]
    broken = champion_is_one["workspace"] / "runs" / "tiny_lm" / "broken-copy"
    shutil.copytree(first, broken)
    weights = next((broken / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated: its hash no longer matches
    version = registry.register("writer", broken)["version"]
    app, _ = _app(champion_is_one, poll=0.1)
    with serving(app) as client:
        registry.set_alias("writer", "champion", version, reason="a broken file")
        listing = _models_when(client, lambda listing: listing["data"][0]["reload_failure"] is not None)
        still = _complete(client)
        metrics = client.call("GET", "/metrics")[1]
        registry.set_alias("writer", "champion", 1, reason="back")
        cleared = _models_when(client, lambda listing: listing["data"][0]["reload_failure"] is None)
    model = listing["data"][0]
    assert model["version"] == first.name and model["registry_version"] == 1
    failure = model["reload_failure"]
    assert failure["version"] == version and "SHA-256" in failure["error"]
    assert listing["reload_failures"] == [failure]
    assert still[0] == 200 and still[2] == first.name  # the old version kept answering
    assert 'forgeml_reloads_total{outcome="failed",role="primary"} 1.0' in metrics
    assert 'forgeml_reloads_total{outcome="switched",role="primary"}' not in metrics
    assert cleared["data"][0]["reload_failure"] is None  # the alias points at what is served again


def test_admin_reload_needs_the_admin_scope(champion_is_one: dict) -> None:
    registry, second = champion_is_one["registry"], champion_is_one["runs"][1]
    keys = KeyStore(champion_is_one["url"])
    predict_key, admin_key = keys.create(["predict"]), keys.create(["admin"])
    app, _ = _app(champion_is_one, poll=0.0, keys=keys)  # no polling: only the endpoint reloads
    with serving(app) as client:
        registry.set_alias("writer", "champion", 2)
        anonymous = client.call("POST", "/v1/admin/reload")
        predict_only = client.call("POST", "/v1/admin/reload", key=predict_key)
        before = _complete(client, key=predict_key)
        status, body = client.call("POST", "/v1/admin/reload", key=admin_key)
        again = client.call("POST", "/v1/admin/reload", key=admin_key)[1]
        after = _complete(client, key=predict_key)
    assert anonymous[0] == 401 and anonymous[1]["error"]["type"] == "authentication_error"
    assert predict_only[0] == 403 and predict_only[1]["error"]["type"] == "permission_error"
    assert before[2] == champion_is_one["runs"][0].name  # nothing moved without the admin
    change = body["changes"][0]
    assert status == 200 and change["switched"] and change["version"] == 2 and change["run"] == second.name
    assert body["models"][0]["version"] == second.name and again["changes"] == []
    assert after[0] == 200 and after[2] == second.name


def test_forgeml_serve_follows_a_language_models_alias(champion_is_one: dict) -> None:
    registry, second = champion_is_one["registry"], champion_is_one["runs"][1]
    with server_process(REFERENCE, champion_is_one["workspace"], "--no-auth") as (process, client):
        registry.set_alias("writer", "champion", 2, reason="test")
        listing = _models_when(client, _serving_version(second))  # polled every serve.reload_poll_s (2 s)
        answered = _complete(client)
    assert listing["data"][0]["version"] == second.name and answered[2] == second.name
    assert f"following {REFERENCE}" in process.stdout.read()
