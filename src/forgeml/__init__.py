"""forgeml: from a pre-trained model and your data to a trained, evaluated, documented model.

import forgeml
result = forgeml.run("examples/sst2.yaml")
forgeml.load(result.run_dir).predict(["great film"])
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from forgeml.config import ForgeConfig, load_config
from forgeml.errors import ArtifactError, ConfigError, DataError, ForgeError

# torch and transformers take seconds to import: load the API only when it is first used, so
# `forgeml --help` and `forgeml config schema` stay instant.
_API = (
    "Predictor",
    "RunResult",
    "audit",
    "backup",
    "compare",
    "ensemble",
    "evaluate",
    "explain",
    "generate_images",
    "load",
    "predict",
    "promote",
    "register",
    "report",
    "restore",
    "resume",
    "retrain",
    "run",
    "runs",
    "study",
    "tune",
)


def __getattr__(name: str) -> Any:
    if name in _API:
        from forgeml import api

        return getattr(api, name)
    raise AttributeError(f"module 'forgeml' has no attribute {name!r}")


__all__ = [
    "ArtifactError",
    "ConfigError",
    "DataError",
    "ForgeConfig",
    "ForgeError",
    "__version__",
    "load_config",
    *_API,
]
