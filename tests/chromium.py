"""Render local HTML files with headless Chromium, for tests that check what a browser really shows."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

TIMEOUT_S = 60
# Everything that would make Chromium talk to the network or to a profile is off: tests stay offline
# and independent of whoever ran Chromium on this machine before.
FLAGS = (
    "--headless",
    "--no-sandbox",  # tests often run as root in containers, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """The Chromium executable, or None when it is not installed."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def _run(page: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    executable = find_chromium()
    if executable is None:
        raise FileNotFoundError("chromium not installed")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [executable, *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited with {result.returncode}: {result.stderr[-2000:]}")
    return result


def dump_dom(page: Path, virtual_time_ms: int = 5000) -> str:
    """The DOM after the page loaded and its scripts ran (virtual time lets `load` fire first)."""
    return _run(page, f"--virtual-time-budget={virtual_time_ms}", "--dump-dom").stdout


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 2000) -> Path:
    """Save a PNG screenshot of `page` to `out`."""
    _run(page, f"--screenshot={out.resolve()}", f"--window-size={width},{height}")
    return out
