"""The demo page in a real browser (headless Debian Chromium driven by Playwright): type a sentence, see the
label, its probability bars and word highlights, send a correction, and find it in the database."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

import forgeml
from forgeml.serve.app import create_app
from forgeml.serve.keys import KeyStore
from forgeml.serve.records import RecordStore
from forgeml.serve.runtime import ModelRuntime
from forgeml.store import database_url
from test_image import image_config, stripes, write_npz

from serving import serving

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (the dev extra has it)")


def _chromium() -> str:
    import chromium

    executable = chromium.find_chromium()
    if executable is None:
        pytest.skip("chromium not installed; `make test` installs it")
    return executable


def test_type_predict_see_highlights_and_send_a_correction(sentiment_model, tmp_path: Path) -> None:
    executable = _chromium()
    workspace = tmp_path / "workspace"
    run = shutil.copytree(sentiment_model.run.path, workspace / "runs" / "tiny" / sentiment_model.run.id)
    key = KeyStore(database_url(workspace)).create(["predict", "feedback"], name="demo")
    records = RecordStore(database_url(workspace))
    with (
        serving(create_app(ModelRuntime(run), KeyStore(database_url(workspace)), records=records)) as client,
        playwright_api.sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        elsewhere: list[str] = []
        page.on("request", lambda r: elsewhere.append(r.url) if "127.0.0.1" not in r.url else None)

        page.goto(f"http://127.0.0.1:{client.port}/")
        assert page.text_content("#model-name") == "tiny"
        page.fill("#api-key", key)
        page.fill("#input-0", "the film was great")
        page.click("#predict")
        page.wait_for_selector("#explanation span.word", timeout=30_000)
        assert page.text_content("#label") == "positive"
        bars = page.locator("#bars .bar")
        assert bars.count() == 2 and bars.first.text_content().startswith("positive")
        words = page.locator("#explanation span.word")
        assert [words.nth(i).text_content() for i in range(words.count())] == ["the", "film", "was", "great"]
        scores = [float(words.nth(i).get_attribute("data-score")) for i in range(words.count())]
        assert max(range(4), key=scores.__getitem__) == 3  # "great" is highlighted most

        page.select_option("#correct-label", "negative")
        page.fill("#comment", "ironic")
        page.click("#send-feedback")
        page.wait_for_function("document.getElementById('feedback-status').textContent.includes('recorded')")
        browser.close()

    assert not problems, problems
    assert not elsewhere, elsewhere  # nothing fetched from outside: the page works offline
    stored = RecordStore(database_url(workspace)).feedback()
    assert len(stored) == 1
    assert (stored[0]["inputs"], stored[0]["predicted"], stored[0]["label"], stored[0]["comment"]) == (
        "the film was great",
        "positive",
        "negative",
        "ironic",
    )


def test_a_bad_key_shows_the_servers_reason(sentiment_model, tmp_path: Path) -> None:
    executable = _chromium()
    keys = KeyStore(database_url(tmp_path))
    with (
        serving(create_app(ModelRuntime(sentiment_model.run.path), keys)) as client,
        playwright_api.sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{client.port}/")
        page.fill("#api-key", "fml_000000000000_wrong")
        page.fill("#input-0", "fine")
        page.click("#predict")
        page.wait_for_selector("#status.error")
        assert page.text_content("#status") == "401: invalid API key"
        assert page.is_hidden("#result")
        browser.close()


def test_an_image_model_takes_an_upload_and_shows_its_label(tmp_path: Path) -> None:
    executable = _chromium()
    run = forgeml.run(image_config(write_npz(tmp_path / "d.npz"), epochs=3), workspace=tmp_path / "ws").run_dir
    image = stripes(1, seed=5)[0][0]
    Image.fromarray(image).save(tmp_path / "stripes.png")
    expected = forgeml.load(run).predict([str(tmp_path / "stripes.png")])[0]["label"]
    with (
        serving(create_app(ModelRuntime(run), None)) as client,
        playwright_api.sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(f"http://127.0.0.1:{client.port}/")
        page.click("#predict")  # nothing chosen yet: said so, nothing sent
        page.wait_for_selector("#status.error")
        assert page.text_content("#status") == "choose an image file first"
        page.set_input_files("#input-0", str(tmp_path / "stripes.png"))
        page.wait_for_selector("#preview", state="visible")  # shown once the browser has decoded the file
        page.click("#predict")
        page.wait_for_selector("#result:not(.hidden)")
        assert page.text_content("#label") == expected
        assert page.locator("#bars .bar").count() == 2
        assert page.is_hidden("#explanation-box")  # word attributions are for text models
        browser.close()
    assert not problems, problems
