"""`python -m forgeml ...` (and `torchrun ... -m forgeml run CONFIG` on each machine of a multi-node run)."""

from forgeml.cli import entrypoint

entrypoint()
