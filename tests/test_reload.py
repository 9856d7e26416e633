"""Serving NAME@ALIAS: hot reload under load, a broken version refused, canary and shadow traffic."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

import forgeml
from forgeml.config import ServeConfig
from forgeml.registry import Registry
from forgeml.serve.app import create_app
from forgeml.serve.deployments import RegistryFollower, bucket
from forgeml.serve.keys import KeyStore
from forgeml.serve.records import RecordStore
from forgeml.store import database_url

from conftest import sentiment_rows, write_csv
from serving import serving

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["a great film", "a dull plot", "lovely acting and a superb cast", "the story was awful"]


@pytest.fixture(scope="module")
def two_versions(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """tiny@1 and tiny@2 (two seeds of the same tiny model) in one workspace; champion -> 1."""
    root = tmp_path_factory.mktemp("reload")
    write_csv(root / "reviews.csv", sentiment_rows(240))
    workspace = root / "ws"
    workspace.mkdir()
    registry = Registry(database_url(workspace))
    runs = []
    for seed in (1, 2):
        config = {
            "name": "tiny",
            "task": "text-classification",
            "data": {"train": str(root / "reviews.csv"), "split": {"validation": 0.2, "test": 0.2}},
            "model": {"backbone": str(tiny_backbone), "max_length": 32},
            "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "seed": seed, "threads": 1},
        }
        runs.append(forgeml.run(config, workspace=workspace).run_dir)
        registry.register("tiny", runs[-1])
    registry.set_alias("tiny", "champion", 1)
    return {"workspace": workspace, "runs": runs, "registry": registry, "url": database_url(workspace)}


def _app(two_versions: dict, keys: KeyStore | None = None, poll: float = 0.1, **routes):
    registry = two_versions["registry"]
    follower = RegistryFollower(registry)
    runtime, _ = follower.load("tiny@champion")
    settings = ServeConfig(reload_poll_s=poll, max_wait_ms=1.0)
    records = RecordStore(two_versions["url"])
    return create_app(runtime, keys, settings, records, follower, "tiny@champion", **routes)


def _load(client, stop: threading.Event, answers: list, failures: list, key: str | None = None) -> None:
    while not stop.is_set():
        try:
            status, body = client.call("POST", "/v1/predict", {"inputs": TEXTS[:2]}, key)
        except OSError as error:
            failures.append(repr(error))
            continue
        if status != 200:
            failures.append((status, body))
        else:
            answers.append((time.monotonic(), body["version"], body["request_id"]))


def test_alias_move_switches_under_load_with_no_failed_request(two_versions: dict) -> None:
    registry, (first, second) = two_versions["registry"], two_versions["runs"]
    registry.set_alias("tiny", "champion", 1)
    with serving(_app(two_versions)) as client:
        stop, answers, failures = threading.Event(), [], []
        threads = [threading.Thread(target=_load, args=(client, stop, answers, failures)) for _ in range(16)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(answers) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)  # letting load build up before the move, not timing anything
        registry.set_alias("tiny", "champion", 2, reason="test")
        moved_at = time.monotonic()
        while time.monotonic() < deadline and not any(v == second.name and t > moved_at for t, v, _ in answers):
            time.sleep(0.05)
        settle = len(answers)
        while len(answers) < settle + 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join()
        models = client.call("GET", "/v1/models")[1]
    registry.set_alias("tiny", "champion", 1, reason="back")
    assert failures == []
    versions = [version for _, version, _ in answers]
    assert versions[0] == first.name and versions[-1] == second.name
    switched = versions.index(second.name)
    assert all(version == second.name for version in versions[switched + 50 :])  # no going back
    assert models["models"][0]["registry_version"] == 2 and models["reload_failures"] == []
    # Every stored prediction names the version that answered it.
    answered = {request_id: version for _, version, request_id in answers}
    store = RecordStore(two_versions["url"])
    with store.engine.connect() as connection:
        rows = connection.execute(text("SELECT request_id, version FROM predictions")).all()
    stored = {request_id: version for request_id, version in rows if request_id in answered}
    assert stored == answered


def test_a_broken_version_is_not_swapped_in(two_versions: dict, tmp_path: Path) -> None:
    registry, first = two_versions["registry"], two_versions["runs"][0]
    broken = two_versions["workspace"] / "runs" / "tiny" / "broken-copy"
    shutil.copytree(first, broken)
    weights = next((broken / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated: its hash no longer matches
    version = registry.register("tiny", broken)["version"]
    registry.set_alias("tiny", "champion", 1)
    with serving(_app(two_versions)) as client:
        stop, answers, failures = threading.Event(), [], []
        threads = [threading.Thread(target=_load, args=(client, stop, answers, failures)) for _ in range(4)]
        for thread in threads:
            thread.start()
        registry.set_alias("tiny", "champion", version, reason="a broken file")
        deadline = time.monotonic() + 60
        models: dict = {"reload_failures": []}
        while not models["reload_failures"] and time.monotonic() < deadline:
            time.sleep(0.1)  # waiting for the watcher to try the move, not timing anything
            models = client.call("GET", "/v1/models")[1]
        before = len(answers)
        while len(answers) < before + 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join()
        metrics = client.call("GET", "/metrics")[1]
    registry.set_alias("tiny", "champion", 1, reason="back")
    assert failures == []
    assert {v for _, v, _ in answers} == {first.name}  # the old version kept answering
    failure = models["reload_failures"][0]
    assert failure["version"] == version and "SHA-256" in failure["error"]
    assert models["models"][0]["registry_version"] == 1
    assert 'forgeml_reloads_total{outcome="failed",role="primary"} 1.0' in metrics


def test_canary_share_is_sticky_per_caller(two_versions: dict) -> None:
    registry, (first, second) = two_versions["registry"], two_versions["runs"]
    registry.set_alias("tiny", "champion", 1)
    registry.set_alias("tiny", "challenger", 2)
    share = sum(bucket(f"caller-{i}") < 10 for i in range(5000)) / 5000  # the routing function itself
    assert 0.08 <= share <= 0.12
    with serving(_app(two_versions, canary=("tiny@challenger", 10.0))) as client:
        seen: dict[str, set[str]] = {}
        for _ in range(3):
            for caller in range(100):
                headers = {"X-Forgeml-Route": f"caller-{caller}"}
                status, body = client.call("POST", "/v1/predict", {"inputs": "a great film"}, headers=headers)
                assert status == 200
                seen.setdefault(str(caller), set()).add(body["version"])
        models = client.call("GET", "/v1/models")[1]
    assert all(len(versions) == 1 for versions in seen.values())  # sticky
    canaried = sum(versions == {second.name} for versions in seen.values())
    assert canaried == sum(bucket(f"caller-{i}") < 10 for i in range(100)) and 0 < canaried < 30
    roles = {model["role"]: model for model in models["models"]}
    assert roles["canary"]["requests"] == 3 * canaried and roles["primary"]["requests"] == 3 * (100 - canaried)
    assert roles["canary"]["version"] == second.name and roles["primary"]["version"] == first.name


def test_shadow_scores_every_request_off_the_answer_path(two_versions: dict) -> None:
    registry, (first, second) = two_versions["registry"], two_versions["runs"]
    registry.set_alias("tiny", "champion", 1)
    registry.set_alias("tiny", "candidate", 2)
    store = RecordStore(two_versions["url"])
    with store.engine.connect() as connection:
        before = connection.execute(text("SELECT count(*) FROM shadow_predictions")).scalar_one()
    with serving(_app(two_versions, shadow=("tiny@candidate", 100.0))) as client:
        request_ids = []
        for index in range(40):
            status, body = client.call("POST", "/v1/predict", {"inputs": [TEXTS[index % 4], TEXTS[(index + 1) % 4]]})
            assert status == 200 and body["version"] == first.name  # the caller always gets the primary's answer
            request_ids.append(body["request_id"])
        deadline = time.monotonic() + 30
        models = client.call("GET", "/v1/models")[1]
        while time.monotonic() < deadline:
            roles = {model["role"]: model for model in models["models"]}
            if roles["shadow"]["requests"] == 40:
                break
            time.sleep(0.05)  # waiting for the shadow to catch up, not timing anything
            models = client.call("GET", "/v1/models")[1]
    roles = {model["role"]: model for model in models["models"]}
    assert roles["shadow"]["version"] == second.name and roles["shadow"]["requests"] == 40
    assert 0.0 <= roles["shadow"]["agreement_with_primary"] <= 1.0
    with store.engine.connect() as connection:
        rows = connection.execute(text("SELECT request_id, answered_by, agrees FROM shadow_predictions")).all()
    assert len(rows) - before == 80  # two records per request
    assert {row.request_id for row in rows} >= set(request_ids)
    assert {row.answered_by for row in rows[before:]} == {first.name}
    agreed = sum(row.agrees for row in rows[before:]) / 80
    assert roles["shadow"]["agreement_with_primary"] == pytest.approx(agreed, abs=1e-4)


def test_admin_reload_needs_the_admin_scope(two_versions: dict) -> None:
    registry, second = two_versions["registry"], two_versions["runs"][1]
    registry.set_alias("tiny", "champion", 1)
    keys = KeyStore(two_versions["url"])
    predict_key, admin_key = keys.create(["predict"]), keys.create(["admin"])
    with serving(_app(two_versions, keys=keys, poll=0.0)) as client:  # no polling: only the endpoint reloads
        registry.set_alias("tiny", "champion", 2)
        assert client.call("POST", "/v1/admin/reload", key=predict_key)[0] == 403
        assert client.call("POST", "/v1/predict", {"inputs": "fine"}, predict_key)[1]["registry_version"] == 1
        status, body = client.call("POST", "/v1/admin/reload", key=admin_key)
        assert status == 200 and body["changes"][0]["switched"] and body["changes"][0]["version"] == 2
        assert client.call("POST", "/v1/predict", {"inputs": "fine"}, predict_key)[1]["version"] == second.name
    registry.set_alias("tiny", "champion", 1)
    served = Counter(v["role"] for v in body["models"])
    assert served == {"primary": 1}


def test_serve_refuses_a_bad_canary_option(two_versions: dict) -> None:
    from test_cli import forgeml_cli

    workspace = str(two_versions["workspace"])
    result = forgeml_cli("serve", "tiny@champion", "--canary", "tiny@challenger", "--no-auth", "--workspace", workspace)
    assert result.returncode == 2 and "--canary" in result.stderr and "NAME@ALIAS:PCT" in result.stderr
    result = forgeml_cli("serve", str(two_versions["runs"][0]), "--shadow", "tiny@2", "--no-auth", "-w", workspace)
    assert result.returncode == 2 and "need the model registry" in result.stderr


def test_a_shadow_that_falls_behind_skips_requests_instead_of_queueing() -> None:
    import asyncio

    from forgeml.serve.batching import MicroBatcher
    from forgeml.serve.deployments import Deployment, Deployments

    release = threading.Event()

    def slow(records: list, contexts: list) -> list:
        release.wait(timeout=30)  # holds the shadow's first call: what arrives meanwhile waits
        return records

    async def scenario() -> tuple[list[bool], int]:
        primary = Deployment("primary", None, MicroBatcher(lambda r, c: r))  # type: ignore[arg-type]
        shadow = Deployment("shadow", None, MicroBatcher(slow, max_wait_ms=0), share=100.0)  # type: ignore[arg-type]
        deployments = Deployments(primary, shadow=shadow)
        await deployments.start()
        decisions, pending = [], []
        for index in range(12):
            wanted = deployments.wants_shadow(f"request-{index}", backlog=4)
            decisions.append(wanted)
            if wanted:
                pending.append(asyncio.create_task(shadow.batcher.submit([index])))
            await asyncio.sleep(0)  # lets the batcher take what it can
        release.set()
        await asyncio.gather(*pending)
        await deployments.stop()
        return decisions, shadow.stats.skipped

    decisions, skipped = asyncio.run(scenario())
    assert decisions[:4] == [True] * 4 and not all(decisions)  # scored while it kept up, then sampled
    assert skipped == decisions.count(False) and skipped >= 6


def test_forgeml_serve_follows_a_registry_reference(two_versions: dict) -> None:
    from serving import server_process

    registry, first = two_versions["registry"], two_versions["runs"][0]
    registry.set_alias("tiny", "champion", 1)
    with server_process("tiny@champion", two_versions["workspace"], "--no-auth") as (_, client):
        status, body = client.call("POST", "/v1/predict", {"inputs": "a great film"})
        models = client.call("GET", "/v1/models")[1]["models"]
    assert status == 200 and body["version"] == first.name and body["registry_version"] == 1
    assert models[0]["follows"] == "tiny@champion" and models[0]["name"] == "tiny"
