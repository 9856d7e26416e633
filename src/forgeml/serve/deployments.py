"""Which model answers a request: the primary, a canary share, a shadow; each following a registry alias.

A `Deployment` is one loaded model version with its own micro-batcher. `Deployments` routes requests
(a canary's share is chosen by hashing the caller's key or route header, so a caller always sees the same
version) and keeps each deployment on the version its alias points at: when the alias moves, the new
version is loaded and warmed beside the old one, smoke-tested, and swapped in between two requests; the
old one answers what it already took, then is freed. A version that fails to load or to answer is not
swapped in: the old keeps serving and the failure is reported at /v1/models and in /metrics.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from forgeml.serve.batching import MicroBatcher
from forgeml.serve.runtime import ModelRuntime

logger = logging.getLogger(__name__)


@dataclass
class VersionStats:
    """What /v1/models reports per served version: traffic, latency, agreement with the primary, accuracy."""

    requests: int = 0
    records: int = 0
    seconds: float = 0.0
    compared: int = 0  # shadow (or canary) answers compared with the primary's
    agreed: int = 0
    feedback: int = 0
    feedback_correct: int = 0
    skipped: int = 0  # shadow: requests not scored because it was behind

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "records": self.records,
            "mean_latency_ms": round(1000 * self.seconds / self.requests, 2) if self.requests else None,
            "agreement_with_primary": round(self.agreed / self.compared, 4) if self.compared else None,
            "feedback": self.feedback,
            "feedback_accuracy": round(self.feedback_correct / self.feedback, 4) if self.feedback else None,
            **({"skipped_while_behind": self.skipped} if self.skipped else {}),
        }


@dataclass
class Deployment:
    """One model version being served in a role (primary, canary or shadow)."""

    role: str
    runtime: ModelRuntime
    batcher: MicroBatcher
    reference: str | None = None  # the NAME@ALIAS it follows; None: a fixed run
    registry_version: int | None = None
    share: float = 100.0  # canary: percent of callers; shadow: percent of requests also scored
    stats: VersionStats = field(default_factory=VersionStats)

    def describe(self) -> dict[str, Any]:
        described = {**self.runtime.describe(), "role": self.role, **self.stats.summary()}
        if self.reference:
            described["follows"] = self.reference
            described["registry_version"] = self.registry_version
        if self.role != "primary":
            described["share_percent"] = self.share
        return described


@dataclass
class ReloadFailure:
    reference: str
    version: int | None
    error: str
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


# Builds a deployment's batcher for a runtime (the app's scoring function, metrics and record store).
BatcherFactory = Callable[[ModelRuntime, str], MicroBatcher]
# Loads the version a reference points at now: (runtime, registry version), on a worker thread.
Loader = Callable[[str], tuple[ModelRuntime, int]]
# The version a reference points at now (a cheap registry query), on a worker thread.
Lookup = Callable[[str], int | None]


class Deployments:
    """The primary deployment plus optional canary and shadow, kept on their aliases' versions."""

    def __init__(
        self,
        primary: Deployment,
        canary: Deployment | None = None,
        shadow: Deployment | None = None,
        loader: Loader | None = None,
        lookup: Lookup | None = None,
        make_batcher: BatcherFactory | None = None,
        on_reload: Callable[[Deployment, bool], None] | None = None,
    ):
        self.primary, self.canary, self.shadow = primary, canary, shadow
        self.loader, self.lookup, self.make_batcher = loader, lookup, make_batcher
        self.on_reload = on_reload
        self.failures: list[ReloadFailure] = []
        self._failed_versions: dict[str, int | None] = {}  # not retried until the alias moves again
        self._lock = asyncio.Lock()
        self._retired: dict[str, VersionStats] = {}  # stats of versions swapped out, by version

    @property
    def active(self) -> list[Deployment]:
        return [d for d in (self.primary, self.canary, self.shadow) if d is not None]

    def route(self, caller: str | None) -> Deployment:
        """The deployment that answers `caller` (a key id, a route header or the client address)."""
        if self.canary is None or caller is None:
            return self.primary
        return self.canary if bucket(caller) < self.canary.share else self.primary

    def wants_shadow(self, request_id: str, backlog: int) -> bool:
        """Whether to score this request on the shadow too: its share of requests, unless the shadow already
        has `backlog` requests waiting (under a load the machine cannot carry twice, the shadow samples
        what it can instead of queueing without end)."""
        if self.shadow is None or bucket(request_id) >= self.shadow.share:
            return False
        if self.shadow.batcher.waiting >= backlog:
            self.shadow.stats.skipped += 1
            return False
        return True

    def by_version(self, version: str) -> VersionStats | None:
        """The stats of whichever deployment (current or retired) served run `version`."""
        for deployment in self.active:
            if deployment.runtime.version == version:
                return deployment.stats
        return self._retired.get(version)

    async def start(self) -> None:
        for deployment in self.active:
            await deployment.batcher.start()

    async def stop(self) -> None:
        for deployment in self.active:
            await deployment.batcher.stop()

    async def watch(self, interval_s: float) -> None:
        """Check the aliases every `interval_s` seconds until cancelled."""
        await poll_registry(self.reload, interval_s)

    async def reload(self) -> list[dict[str, Any]]:
        """Move every deployment that follows an alias to the version it points at now."""
        if self.lookup is None or self.loader is None or self.make_batcher is None:
            return []
        changes = []
        async with self._lock:  # the watcher and POST /v1/admin/reload never load the same version twice
            for role in ("primary", "canary", "shadow"):
                deployment = getattr(self, role)
                if deployment is None or deployment.reference is None:
                    continue
                target = await asyncio.to_thread(self.lookup, deployment.reference)
                if target is None or target == deployment.registry_version:
                    continue
                if self._failed_versions.get(deployment.reference) == target:
                    continue
                changes.append(await self._switch(role, deployment, target))
        return changes

    async def _switch(self, role: str, old: Deployment, target: int) -> dict[str, Any]:
        assert self.loader is not None and self.make_batcher is not None and old.reference is not None
        started = time.perf_counter()
        try:
            runtime, version = await asyncio.to_thread(self._load, old.reference)
        except Exception as error:
            failure = ReloadFailure(old.reference, target, f"{type(error).__name__}: {error}")
            self.failures.append(failure)
            self._failed_versions[old.reference] = target
            logger.error("not switching %s to version %s: %s", old.reference, target, failure.error)
            if self.on_reload:
                self.on_reload(old, False)
            return {
                "role": role,
                "follows": old.reference,
                "version": target,
                "switched": False,
                "error": failure.error,
            }
        batcher = self.make_batcher(runtime, role)
        await batcher.start()
        new = Deployment(role, runtime, batcher, old.reference, version, old.share)
        setattr(self, role, new)  # between two requests: every later request goes to the new version
        self._failed_versions.pop(old.reference, None)
        self._retired[old.runtime.version] = old.stats
        await old.batcher.stop()  # answers everything the old version already took
        # The old model's objects were frozen out of the collector's sight at start-up: let it see them again.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        if self.on_reload:
            self.on_reload(new, True)
        logger.warning("%s now serves %s (version %s)", old.reference, runtime.version, version)
        return {
            "role": role,
            "follows": old.reference,
            "version": version,
            "run": runtime.version,
            "switched": True,
            "seconds": round(time.perf_counter() - started, 2),
        }

    def _load(self, reference: str) -> tuple[ModelRuntime, int]:
        """Load, warm and smoke-test the version `reference` points at (raises when any step fails)."""
        assert self.loader is not None
        runtime, version = self.loader(reference)
        runtime.warm_up()  # a prediction through every layer: the smoke test
        return runtime, version


async def poll_registry(reload: Callable[[], Awaitable[Any]], interval_s: float) -> None:
    """Call `reload` every `interval_s` seconds until cancelled (a server following registry aliases)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await reload()
        except Exception:  # a broken registry must not stop the watcher; it is logged and retried
            logger.exception("checking the registry for alias moves failed")


def bucket(key: str) -> float:
    """A stable number in [0, 100) for `key`: the same caller always lands in the same share."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


class RegistryFollower:
    """Loads what a NAME@ALIAS (or NAME@VERSION) reference points at, and tells when that changes."""

    def __init__(self, registry: Any, engine: str | None = None, workers: int | None = None):
        self.registry, self.engine, self.workers = registry, engine, workers

    def lookup(self, reference: str) -> int | None:
        from forgeml.registry import parse_reference

        parsed = parse_reference(reference)
        if parsed is None:
            return None
        name, target = parsed
        if target.isdigit():  # a fixed version never moves
            return int(target)
        return self.registry.alias_version(name, target)

    def load_any(self, reference: str) -> tuple[Any, int]:
        """The runtime of the version `reference` names now (a language model's too) and its version number."""
        from forgeml.serve.runtime import load_runtime

        version = self.registry.resolve(reference)
        runtime = load_runtime(version["run_path"], self.engine, self.workers)
        runtime.name = version["name"]  # predictions and feedback are recorded under the registered name
        return runtime, version["version"]

    def load(self, reference: str) -> tuple[ModelRuntime, int]:
        """`load_any` for a predictive model (what canary, shadow and reload serve)."""
        from forgeml.errors import ForgeError

        runtime, version = self.load_any(reference)
        if getattr(runtime, "generates", False):
            raise ForgeError(f"{reference}: a language model; canary, shadow and reload serve predictive models")
        return runtime, version

    def load_generative(self, reference: str) -> tuple[Any, int]:
        """`load_any` for a language model (what a language-model server switches to when its alias moves)."""
        from forgeml.errors import ForgeError

        runtime, version = self.load_any(reference)
        if not getattr(runtime, "generates", False):
            raise ForgeError(f"{reference}: version {version} predicts; this server serves a language model")
        return runtime, version
