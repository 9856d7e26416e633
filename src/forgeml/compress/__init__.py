"""Compression: smaller, faster variants of a run's model, measured side by side.

`compress_run` builds the variants (`variants.py`), measures each on the test split and for speed
(`measure.py`), and draws the frontier and picks the default for serving (`frontier.py`).
"""

from forgeml.compress.frontier import compress_model

__all__ = ["compress_model"]
