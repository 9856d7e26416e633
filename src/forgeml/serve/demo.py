"""The demo page at `/`: one self-contained HTML file (no external scripts, styles or fonts), so it works
offline and behind a firewall. It calls the same API as any client: predict, explain and feedback for a
predictor; streamed completions or chat, ratings and corrections for a language model."""

from __future__ import annotations

import html
import json
from functools import cache
from importlib.resources import files
from typing import Any


@cache
def _template(name: str) -> str:
    return files("forgeml.serve").joinpath(name).read_text(encoding="utf-8")


def demo_page(model: dict[str, Any], auth: bool, generates: bool = False) -> str:
    """The page for `model` (the runtime's `describe()`); with `auth`, it asks for an API key."""
    description = {**model, "auth": auth}
    # Inside <script>, "</" could end the element early: JSON's \u003c escape keeps it inert.
    embedded = json.dumps(description).replace("<", "\\u003c")
    template = _template("demo_generate.html" if generates else "demo.html")
    return template.replace("__TITLE__", html.escape(model["name"])).replace("__MODEL__", embedded)
