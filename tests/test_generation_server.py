"""`forgeml serve` on language models, on a real uvicorn server on 127.0.0.1 with the official `openai` client:
completions and chat, streamed and whole, n, stop strings and usage counts; concurrent requests decode
together yet answer as if alone; bad requests get OpenAI-shaped 4xx naming the field; a client that leaves
frees its slot; generations and their feedback are stored and export as the next run's training data; and
SIGTERM ends running streams cleanly."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI
from typer.testing import CliRunner

import forgeml
from forgeml.cli import app as cli_app
from forgeml.config import ForgeConfig, ServeConfig
from forgeml.data.instructions import read_examples
from forgeml.errors import ForgeError
from forgeml.serve.generation_app import create_generation_app
from forgeml.serve.generations import GenerationStore
from forgeml.serve.keys import KeyStore
from forgeml.serve.runtime import load_runtime
from forgeml.store import database_url

from conftest import write_csv
from serving import Client, server_process, serving
from test_instruction_tuning import PROMPT, reviews, save_base, sft_config
from test_language_modeling import corpus, lm_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 instruction-tuned to answer "Review: ...\\nSentiment:" with " positive" or " negative"."""
    folder = tmp_path_factory.mktemp("served_sft")
    save_base(folder / "base")
    train = write_csv(folder / "reviews.csv", reviews(500))
    config = sft_config(train, folder / "base", evaluate={"generation": {"max_new_tokens": 4, "max_examples": 10}})
    return forgeml.run(config, workspace=folder).run_dir


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A character GPT trained a little: it writes on and on (its only end-of-text is the corpus's end)."""
    folder = tmp_path_factory.mktemp("served_lm")
    text = folder / "corpus.txt"
    text.write_text(corpus(1500), encoding="utf-8")
    config = lm_config(text, max_steps=150, eval_every=150, batch_size=8)
    config["model"]["architecture"]["context"] = 512  # greedy decoding runs for hundreds of tokens
    config["serve"] = {"drain_s": 0.2, "max_tokens": 2_000}
    config["data"]["pii"] = {"redact": True}  # the corpus has none; stored prompts must be redacted
    return forgeml.run(config, workspace=folder).run_dir


@pytest.fixture(scope="module")
def sft_server(sft_run: Path):
    """The SFT run served with keys and a store; yields (client for raw HTTP, openai client, key, store, runtime)."""
    workspace = sft_run.parents[2]
    url = database_url(workspace)
    keys = KeyStore(url)
    key = keys.create(["predict", "feedback"], "tests")
    predict_only = keys.create(["predict"], "predict only")
    store = GenerationStore(url)
    runtime = load_runtime(sft_run)
    settings = ServeConfig(max_batch=8, max_n=3, max_tokens=64, max_prompt_tokens=60, max_body_bytes=4_096)
    with serving(create_generation_app(runtime, keys, settings, store)) as client:
        openai = OpenAI(base_url=f"http://127.0.0.1:{client.port}/v1", api_key=key, max_retries=0)
        yield {
            "client": client,
            "openai": openai,
            "key": key,
            "predict_only": predict_only,
            "store": store,
            "runtime": runtime,
            "workspace": workspace,
        }


def sentiment_prompt(text: str) -> str:
    return PROMPT.format(text=text)


# --- the OpenAI API, through the official client ------------------------------------------------------------


def test_completions_answer_with_usage_equal_to_the_tokenizers_counts(sft_server):
    openai, tokenizer = sft_server["openai"], sft_server["runtime"].tokenizer
    prompt = sentiment_prompt("film 8 was superb")
    answer = openai.completions.create(model="tiny_sft", prompt=prompt, max_tokens=8, temperature=0)
    choice = answer.choices[0]
    assert choice.text == " positive" and choice.finish_reason == "stop"
    assert answer.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert answer.usage.completion_tokens == len(tokenizer(choice.text, add_special_tokens=False)["input_ids"])
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.id.startswith("cmpl-") and answer.object == "text_completion" and answer.model == "tiny_sft"
    short = openai.completions.create(
        model="tiny_sft", prompt=sentiment_prompt("film 3 was dull"), max_tokens=1, temperature=0
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1


def test_streamed_completions_join_to_the_whole_answer(sft_server):
    openai = sft_server["openai"]
    prompt = sentiment_prompt("film 8 was tedious")
    whole = openai.completions.create(model="tiny_sft", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    chunks = list(
        openai.completions.create(
            model="tiny_sft",
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == whole == " negative"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_chat_whole_and_streamed_with_two_seeded_choices(sft_server):
    openai = sft_server["openai"]
    messages = [{"role": "user", "content": sentiment_prompt("film 5 was witty")}]
    answer = openai.chat.completions.create(model="tiny_sft", messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == " positive" and answer.object == "chat.completion"
    sampled = dict(model="tiny_sft", messages=messages, max_tokens=8, temperature=1.5, n=2, seed=3)
    first = openai.chat.completions.create(**sampled)
    again = openai.chat.completions.create(**sampled)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]  # seeded
    texts = {0: "", 1: ""}
    for chunk in openai.chat.completions.create(**sampled, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in first.choices]


def test_stop_strings_cut_the_answer_before_them(sft_server):
    openai = sft_server["openai"]
    prompt = sentiment_prompt("film 2 was charming")
    answer = openai.completions.create(model="tiny_sft", prompt=prompt, max_tokens=8, temperature=0, stop=["sit"])
    assert answer.choices[0].text == " po" and answer.choices[0].finish_reason == "stop"


def test_greedy_answers_do_not_depend_on_concurrent_requests(sft_server):
    openai = sft_server["openai"]
    prompts = [
        sentiment_prompt(f"film {i} was {word}") for i, word in enumerate(["great", "awful", "dull", "lovely"] * 2)
    ]

    def ask(prompt: str) -> str:
        return openai.completions.create(model="tiny_sft", prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    alone = [ask(prompt) for prompt in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert set(alone) == {" positive", " negative"}


def test_models_lists_the_served_model(sft_server):
    listed = sft_server["openai"].models.list()
    assert [m.id for m in listed.data] == ["tiny_sft"]


# --- bad requests -------------------------------------------------------------------------------------------

GOOD_COMPLETION = {"model": "tiny_sft", "prompt": "Review: x\nSentiment:", "max_tokens": 4}
GOOD_CHAT = {"model": "tiny_sft", "messages": [{"role": "user", "content": "hi"}]}
BAD_REQUESTS = [
    ("/v1/completions", {**GOOD_COMPLETION, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {**GOOD_COMPLETION, "logprobs": 3}, 422, "logprobs"),
    ("/v1/completions", {**GOOD_COMPLETION, "echo": True}, 422, "echo"),
    ("/v1/completions", {**GOOD_COMPLETION, "best_of": 3}, 422, "best_of"),
    ("/v1/completions", {**GOOD_COMPLETION, "presence_penalty": 0.5}, 422, "presence_penalty"),
    ("/v1/completions", {**GOOD_COMPLETION, "logit_bias": {"5": 10}}, 422, "logit_bias"),
    ("/v1/completions", {**GOOD_COMPLETION, "n": 4}, 422, "n"),
    ("/v1/completions", {**GOOD_COMPLETION, "n": 0}, 422, "n"),
    ("/v1/completions", {**GOOD_COMPLETION, "max_tokens": 65}, 422, "max_tokens"),
    ("/v1/completions", {**GOOD_COMPLETION, "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {**GOOD_COMPLETION, "temperature": 3}, 422, "temperature"),
    ("/v1/completions", {**GOOD_COMPLETION, "top_p": 0}, 422, "top_p"),
    ("/v1/completions", {**GOOD_COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ("/v1/completions", {**GOOD_COMPLETION, "stop": [""]}, 422, "stop"),
    ("/v1/completions", {**GOOD_COMPLETION, "prompt": "film " * 70}, 413, "prompt"),
    ("/v1/completions", {**GOOD_COMPLETION, "prompt": [10**6]}, 422, "prompt"),
    ("/v1/completions", {**GOOD_COMPLETION, "prompt": ""}, 422, "prompt"),
    ("/v1/completions", {**GOOD_COMPLETION, "prompt": 5}, 422, "prompt"),
    ("/v1/completions", {"prompt": "x"}, 422, "model"),
    ("/v1/chat/completions", {**GOOD_CHAT, "messages": []}, 422, "messages"),
    ("/v1/chat/completions", {**GOOD_CHAT, "messages": [{"role": "robot", "content": "x"}]}, 422, "messages"),
    (
        "/v1/chat/completions",
        {**GOOD_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        422,
        "messages",
    ),
    ("/v1/chat/completions", {**GOOD_CHAT, "tools": [{"type": "function"}]}, 422, "tools"),
    ("/v1/chat/completions", {**GOOD_CHAT, "response_format": {"type": "json_object"}}, 422, "response_format"),
    ("/v1/chat/completions", {**GOOD_CHAT, "max_completion_tokens": 1000}, 422, "max_tokens"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_generation_requests_get_an_openai_error_naming_the_field(sft_server, path, body, status, param):
    code, answer = sft_server["client"].call("POST", path, body, key=sft_server["key"])
    assert code == status, answer
    assert set(answer["error"]) >= {"message", "type", "param"}, answer
    assert param in (answer["error"]["param"] or "") + answer["error"]["message"], answer


def test_access_body_size_and_garbage_are_refused(sft_server):
    client, key = sft_server["client"], sft_server["key"]
    assert client.call("POST", "/v1/completions", GOOD_COMPLETION)[0] == 401
    assert client.call("POST", "/v1/completions", GOOD_COMPLETION, key="fml_wrong")[0] == 401
    feedback = {"generation_id": "x", "rating": "up"}
    assert client.call("POST", "/v1/feedback", feedback, key=sft_server["predict_only"])[0] == 403
    assert client.call("POST", "/v1/completions", b"{not json", key=key)[0] == 422
    status, answer = client.call("POST", "/v1/completions", {**GOOD_COMPLETION, "prompt": "x" * 5_000}, key=key)
    assert status == 413 and "bytes" in json.dumps(answer)
    # Fields that change nothing are accepted, as other OpenAI-compatible servers do.
    status, answer = client.call(
        "POST", "/v1/completions", {**GOOD_COMPLETION, "user": "u1", "logprobs": None, "frequency_penalty": 0}, key=key
    )
    assert status == 200, answer


# --- storage and feedback -----------------------------------------------------------------------------------


def test_generations_are_stored_and_feedback_exports_as_training_data(sft_server, tmp_path: Path):
    client, key, store = sft_server["client"], sft_server["key"], sft_server["store"]
    prompt = sentiment_prompt("film 11 was clumsy")
    status, answer = client.call(
        "POST", "/v1/completions", {**GOOD_COMPLETION, "prompt": prompt, "temperature": 0}, key=key
    )
    assert status == 200
    generation_id = answer["id"]
    stored = store.get(generation_id)
    assert stored.prompt == prompt and stored.kind == "completion"
    assert stored.choices == [
        {
            "text": answer["choices"][0]["text"],
            "finish_reason": "stop",
            "completion_tokens": answer["usage"]["completion_tokens"],
        }
    ]
    assert stored.prompt_tokens == answer["usage"]["prompt_tokens"] and stored.seconds > 0
    chat = {
        **GOOD_CHAT,
        "messages": [{"role": "user", "content": sentiment_prompt("film 12 was great")}],
        "temperature": 0,
    }
    chat_id = client.call("POST", "/v1/chat/completions", chat, key=key)[1]["id"]

    assert client.call("POST", "/v1/feedback", {"generation_id": generation_id}, key=key)[0] == 422
    assert client.call("POST", "/v1/feedback", {"generation_id": "nope", "rating": "up"}, key=key)[0] == 404
    assert (
        client.call("POST", "/v1/feedback", {"generation_id": generation_id, "choice": 3, "rating": "up"}, key=key)[0]
        == 422
    )
    assert client.call("POST", "/v1/feedback", {"generation_id": generation_id, "rating": "meh"}, key=key)[0] == 422
    corrected = {"generation_id": generation_id, "rating": "down", "correction": " positive", "comment": "sarcasm"}
    assert client.call("POST", "/v1/feedback", corrected, key=key)[0] == 201
    assert client.call("POST", "/v1/feedback", {"generation_id": chat_id, "rating": "up"}, key=key)[0] == 201

    output = tmp_path / "prefs.jsonl"
    result = CliRunner().invoke(
        cli_app,
        ["feedback", "export", "--kind", "generation", "-o", str(output), "--workspace", str(sft_server["workspace"])],
    )
    assert result.exit_code == 0, result.output
    rows = {row["generation_id"]: row for row in map(json.loads, output.read_text().splitlines())}
    assert rows[generation_id]["prompt"] == prompt and rows[generation_id]["response"] == " positive"
    assert (
        rows[generation_id]["chosen"] == " positive" and rows[generation_id]["rejected"] == answer["choices"][0]["text"]
    )
    assert rows[chat_id]["messages"][-1] == {"role": "assistant", "content": " positive"}
    assert "chosen" not in rows[chat_id]
    # The export is the next run's data as it is.
    next_run = ForgeConfig.model_validate(
        {
            "task": "instruction-tuning",
            "data": {"train": str(output), "prompt": "prompt", "response": "response"},
            "model": {"backbone": str(sft_server["runtime"].predictor.run.path)},
        }
    )
    examples = read_examples(output, next_run)
    assert len(examples) == len(rows)


# --- cancellation, timeouts and shutdown ----------------------------------------------------------------------


def metric(client: Client, name: str) -> float:
    text = client.call("GET", "/metrics")[1]
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def wait_for_gauge(client: Client, name: str, value: float) -> bool:
    """Poll a gauge until it reads `value` (up to 10 s): polling a state, not timing anything."""
    for _ in range(200):
        if metric(client, name) == value:
            return True
        threading.Event().wait(0.05)
    return metric(client, name) == value


def test_a_client_that_leaves_mid_stream_frees_its_slot(lm_run: Path):
    runtime = load_runtime(lm_run)
    settings = ServeConfig(max_batch=4, max_tokens=2_000)
    with serving(create_generation_app(runtime, None, settings)) as client:
        connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
        body = json.dumps(
            {"model": "tiny_lm", "prompt": "the cat", "max_tokens": 2_000, "stream": True, "temperature": 0}
        )
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        first = response.readline()
        assert first.startswith(b"data: {")
        # The first token reaches the client before the engine's step publishes the gauge: poll for it.
        assert wait_for_gauge(client, "forgeml_batch_rows", 1.0)
        connection.sock.shutdown(2)
        connection.close()
        assert wait_for_gauge(client, "forgeml_batch_rows", 0.0)
        assert 0 < metric(client, "forgeml_generated_tokens_total") < 2_000
        status, answer = client.call(
            "POST", "/v1/chat/completions", {"model": "tiny_lm", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert status == 422 and "completions" in answer["error"]["message"]


def test_a_request_past_its_time_ends_with_length(lm_run: Path):
    runtime = load_runtime(lm_run)
    settings = ServeConfig(max_batch=4, max_tokens=2_000, request_timeout_s=0.3)
    with serving(create_generation_app(runtime, None, settings)) as client:
        request = {"model": "tiny_lm", "prompt": "the", "max_tokens": 2_000, "temperature": 0}
        status, answer = client.call("POST", "/v1/completions", request)
        assert status == 200 and answer["choices"][0]["finish_reason"] == "length", answer
        assert 0 < answer["usage"]["completion_tokens"] < 500  # cut by the timeout, not by the context


def test_sigterm_ends_running_streams_cleanly(lm_run: Path, tmp_path: Path):
    workspace = tmp_path / "workspace"
    run = shutil.copytree(lm_run, workspace / "runs" / "tiny_lm" / lm_run.name)
    streams = 8
    with server_process(run, workspace, "--no-auth") as (process, client):
        responses = []
        for index in range(streams):
            connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
            body = {"model": "tiny_lm", "prompt": f"the {index}", "max_tokens": 2_000, "stream": True, "temperature": 0}
            connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            responses.append(connection.getresponse())
        for response in responses:
            assert response.readline().startswith(b"data: {")  # every stream is running
        process.send_signal(signal.SIGTERM)
        for response in responses:
            lines = response.read().decode().split("\n\n")
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises SIGTERM after its graceful shutdown, so process managers see why it ended
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in process.stdout.read()
    with GenerationStore(database_url(workspace)).engine.connect() as connection:
        rows = connection.exec_driver_sql("select choices from generations").fetchall()
    assert len(rows) == streams  # every stream stored (the warm-up generation is not a request)
    for (choices,) in rows:
        (choice,) = json.loads(choices)
        assert choice["finish_reason"] == "length" and choice["completion_tokens"] < 500  # cut by the drain


def test_a_key_past_its_token_rate_gets_429(sft_run: Path, tmp_path: Path):
    url = database_url(tmp_path)
    key = KeyStore(url).create(["predict"], "tokens")
    settings = ServeConfig(token_rate_limit=60, max_tokens=64)  # a minute's worth: 60 tokens
    with serving(create_generation_app(load_runtime(sft_run), KeyStore(url), settings)) as client:
        request = {**GOOD_COMPLETION, "prompt": "Review: a\nSentiment:", "max_tokens": 20}
        assert client.call("POST", "/v1/completions", request, key=key)[0] == 200  # ~9 prompt + 20 tokens
        status, answer = client.call("POST", "/v1/completions", {**request, "max_tokens": 40}, key=key)
        assert status == 429 and answer["error"]["type"] == "rate_limit_error"
        assert "tokens" in answer["error"]["message"] and int(client.headers["retry-after"]) >= 1


# --- the demo page, in headless Chromium ----------------------------------------------------------------------


def test_demo_page_streams_an_answer_and_records_a_rating(sft_server):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (the dev extra)")
    import chromium

    executable = chromium.find_chromium()
    if executable is None:
        pytest.skip("chromium not installed; `make test` installs it")
    client, store = sft_server["client"], sft_server["store"]
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(f"http://127.0.0.1:{client.port}/")
        assert page.text_content("#model-name") == "tiny_sft"
        page.fill("#api-key", sft_server["key"])
        page.fill("#prompt", sentiment_prompt("film 21 was lovely"))
        page.fill("#temperature", "0")
        page.click("#generate")
        page.wait_for_function(
            "['done', 'stopped at the token limit'].includes(document.getElementById('status').textContent)"
            " || document.getElementById('status').className === 'error'",
            timeout=30_000,
        )
        assert page.text_content("#status") == "done", page.text_content("#status")
        assert page.text_content("#answer") == " positive"
        page.click("#thumbs-up")
        page.wait_for_function("document.getElementById('feedback-status').textContent.includes('recorded')")
        browser.close()
    assert not problems, problems
    rows = store.export_rows()
    assert any(row["response"] == " positive" and row["rating"] == "up" for row in rows)


# --- reliability under a mixed load -----------------------------------------------------------------------------

LOAD_REQUESTS = int(os.environ.get("FORGEML_LOAD_REQUESTS", "2000"))
BAD_LOAD_BODIES = [
    {"model": "tiny_lm", "prompt": "the", "max_tokens": 0},
    {"model": "tiny_lm", "prompt": "the", "n": 99},
    {"model": "other", "prompt": "the"},
    {"model": "tiny_lm", "prompt": "the", "logprobs": 2},
    {"model": "tiny_lm"},
]


def _mixed_request(port: int, index: int) -> tuple[int, bool]:
    """One request of the mix (by index: whole, streamed, abandoned mid-stream, bad); (status, accepted)."""
    kind = index % 4
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"}
    try:
        if kind == 3:
            connection.request("POST", "/v1/completions", json.dumps(BAD_LOAD_BODIES[index % 5]), headers)
            response = connection.getresponse()
            response.read()
            return response.status, False
        body = {"model": "tiny_lm", "prompt": f"the {index % 7}", "max_tokens": 12, "temperature": 0.8, "seed": index}
        if kind == 2:
            body["max_tokens"] = 400
        connection.request("POST", "/v1/completions", json.dumps({**body, "stream": kind > 0}), headers)
        response = connection.getresponse()
        if kind == 0:
            answer = json.loads(response.read())
            assert response.status != 200 or answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
        elif kind == 1:
            events = response.read().decode().split("\n\n")
            assert response.status != 200 or "data: [DONE]" in events, events[-3:]
        else:
            response.readline()  # the first piece, then the client goes away
            connection.sock.shutdown(2)
        return response.status, response.status == 200
    finally:
        connection.close()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's RSS from /proc")
def test_a_mixed_load_gives_no_5xx_stores_every_generation_and_leaks_nothing(lm_run: Path, tmp_path: Path):
    from test_serve_process import _rss_bytes

    workspace = tmp_path / "workspace"
    run = shutil.copytree(lm_run, workspace / "runs" / "tiny_lm" / lm_run.name)
    with server_process(run, workspace, "--no-auth", "--max-batch", "32") as (process, client):
        with ThreadPoolExecutor(32) as pool:
            warm = list(pool.map(lambda i: _mixed_request(client.port, i), range(200)))
            rss_warm = _rss_bytes(process.pid)
            results = list(pool.map(lambda i: _mixed_request(client.port, i), range(LOAD_REQUESTS)))
        rss_after = _rss_bytes(process.pid)
        assert wait_for_gauge(client, "forgeml_batch_rows", 0.0)  # no slot leaked
        assert metric(client, "forgeml_queue_length") == 0.0
    statuses = Counter(status for status, _ in warm + results)
    rss = f"RSS after warm-up {rss_warm / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB"
    print(f"\nmixed load: {dict(statuses)}; {rss}")
    assert not [s for s in statuses if s >= 500], statuses
    sent = [*range(200), *range(LOAD_REQUESTS)]
    assert statuses[200] == sum(1 for i in sent if i % 4 != 3)  # every good request answered, every bad refused
    assert set(statuses) <= {200, 404, 422}, statuses
    rows = (
        GenerationStore(database_url(workspace))
        .engine.connect()
        .exec_driver_sql("select choices, seconds, prompt_tokens from generations")
        .fetchall()
    )
    assert len(rows) == sum(accepted for _, accepted in warm + results)  # every accepted request is stored
    for choices, seconds, prompt_tokens in rows:
        (choice,) = json.loads(choices)
        assert choice["finish_reason"] in ("stop", "length", "cancelled") and seconds > 0 and prompt_tokens > 0
    assert rss_after <= 1.10 * rss_warm, f"RSS grew from {rss_warm / 2**20:.0f} MiB to {rss_after / 2**20:.0f} MiB"


def test_a_run_that_redacts_pii_stores_prompts_and_corrections_redacted(lm_run: Path, tmp_path: Path):
    store = GenerationStore(database_url(tmp_path))
    with serving(create_generation_app(load_runtime(lm_run), None, ServeConfig(), store)) as client:
        request = {"model": "tiny_lm", "prompt": "the cat wrote to ann@example.com", "max_tokens": 5}
        status, answer = client.call("POST", "/v1/completions", request)
        assert status == 200
        correction = {"generation_id": answer["id"], "correction": " call +44 20 7946 0958", "rating": "down"}
        assert client.call("POST", "/v1/feedback", correction)[0] == 201
    stored = store.get(answer["id"])
    assert "ann@example.com" not in stored.prompt and "[EMAIL]" in stored.prompt
    (row,) = store.export_rows()
    assert "7946" not in row["response"] and "[PHONE]" in row["response"]


# --- compressed variants ------------------------------------------------------------------------------------


def test_compress_measures_onnx_variants_and_serve_runs_the_selected_one(lm_run: Path, tmp_path: Path):
    workspace = tmp_path / "workspace"
    run = shutil.copytree(lm_run, workspace / "runs" / "tiny_lm" / lm_run.name)
    with pytest.raises(ForgeError, match="forgeml compress"):
        load_runtime(run, engine="onnx")  # nothing exported yet
    result = CliRunner().invoke(cli_app, ["compress", str(run)])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "compress" / "compression.json").read_text())
    variants = {variant["name"]: variant for variant in report["variants"]}
    assert set(variants) == {"pytorch_fp32", "onnx_fp32", "onnx_int8"}
    assert variants["onnx_fp32"]["perplexity"] == pytest.approx(variants["pytorch_fp32"]["perplexity"], rel=1e-4)
    assert variants["onnx_fp32"]["greedy_agreement"] == 1.0
    assert abs(variants["onnx_int8"]["perplexity_change"]) < 0.05
    for variant in variants.values():
        assert variant["tokens_per_s_batch1"] > 0 and variant["tokens_per_s_batch8"] > 0
    assert "The language model's variants" in (run / "card.md").read_text()

    runtime = load_runtime(run)  # auto: what compress selected
    assert runtime.engine == (
        "pytorch" if report["selected"] == "pytorch_fp32" else f"onnxruntime ({report['selected']})"
    )
    served = load_runtime(run, engine="onnx_fp32")
    request = {"model": "tiny_lm", "prompt": "the cat", "max_tokens": 30, "temperature": 0}
    with serving(create_generation_app(served, None, ServeConfig())) as client:
        status, answer = client.call("POST", "/v1/completions", request)
    expected = forgeml.load(run).generate("the cat", max_new_tokens=30, temperature=0)
    assert status == 200 and answer["choices"][0]["text"] == expected
