"""The environment under test is the locked one: `make setup` installs requirements.lock, and the lock
covers every dependency and extra that pyproject.toml declares."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = ROOT / "Makefile"
# The federated environment (`make setup-federated`) is the only one with Flower; it has a lock of its own.
FEDERATED = importlib.util.find_spec("flwr") is not None
LOCK = ROOT / ("requirements-federated.lock" if FEDERATED else "requirements.lock")


def setup_extras() -> list[str]:
    """The extras `make setup` (or `make setup-federated`) installs, as the Makefile lists them."""
    text = MAKEFILE.read_text()
    variables = dict(re.findall(r"^(EXTRAS(?:_FED)?)\s*:=\s*(\S+)", text, re.MULTILINE))
    extras = variables["EXTRAS_FED" if FEDERATED else "EXTRAS"].replace("$(EXTRAS)", variables["EXTRAS"])
    return extras.split(",")


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_every_locked_package_is_installed_at_its_locked_version() -> None:
    wrong = {}
    for name, version in locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong[name] = (version, "missing")
            continue
        # A local build label (torch 2.13.0+cpu, +cu128) is the same release as the lock's pin.
        if Version(installed).public != Version(version).public:
            wrong[name] = (version, installed)
    assert not wrong, f"installed packages differ from {LOCK.name} (run `make setup`): {wrong}"


def test_the_lock_covers_every_declared_dependency_and_the_extras_setup_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = setup_extras()
    assert set(extras) <= set(project["optional-dependencies"]), f"make setup installs unknown extras: {extras}"
    pins = locked()
    declared = project["dependencies"] + [dep for extra in extras for dep in project["optional-dependencies"][extra]]
    for dependency in map(Requirement, declared):
        name = canonicalize_name(dependency.name)
        assert name in pins, f"{dependency.name} is declared in pyproject.toml but not locked: run `make lock`"
        # The lock was resolved from these ranges: a pin outside one means the lock is stale.
        if not dependency.specifier.contains(Version(pins[name]).public, prereleases=True):
            pytest.fail(f"{dependency}: locked at {pins[name]}, outside the declared range; run `make lock`")
