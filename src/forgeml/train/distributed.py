"""Training on several processes or machines: torchrun starts the processes, torch.distributed joins them.

`forgeml run CONFIG --nproc N` starts `torchrun --standalone --nproc-per-node N -m forgeml.cli run CONFIG`;
on several machines a user runs torchrun with its rendezvous flags (`--nnodes`, `--node-rank`,
`--rdzv-endpoint`) and `-m forgeml run CONFIG` on each. Every process then prepares the same data, builds
the same model (DDP copies rank 0's weights to the others) and walks the same length-grouped batches of
each epoch; each process computes its share of every batch, and DDP averages the gradients, so N
processes take the same optimizer steps at the same global batch as one. Only rank 0 writes: the run
directory, checkpoints, the store, the card. Every process evaluates the whole validation split, so all
of them take the same early-stopping decision without exchanging it. gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Any

import numpy as np
import torch

from forgeml.errors import ConfigError


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_lead() -> bool:
    """True in the process that writes (rank 0, or the only one)."""
    return rank_and_size()[0] == 0


def join() -> None:
    """Join the process group torchrun set up (once): NCCL on GPUs, gloo on CPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    _die_with_parent()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def from_lead(value: Any) -> Any:
    """Rank 0's `value`, on every process (e.g. the run directory rank 0 created)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(batches: list[np.ndarray], rank: int, size: int) -> list[np.ndarray]:
    """This process's rows of each global batch (every process gets the same number of batches, so their
    collective operations pair up; a batch smaller than the process count is computed whole by each)."""
    if size == 1:
        return batches
    return [rows[rank::size] if len(rows) >= size else rows for rows in batches]


def launch(arguments: list[str], nproc: int) -> int:
    """Run `forgeml ARGUMENTS` as `nproc` torchrun processes on this machine; their exit code."""
    if nproc < 1:
        raise ConfigError(f"--nproc: must be at least 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "forgeml.cli", *arguments]
    # torchrun would otherwise warn that it sets OMP_NUM_THREADS=1; train.threads sets it per process.
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    process = subprocess.Popen(command, env=environment, preexec_fn=_die_with_parent)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        return process.wait()


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so a killed launcher leaves no orphans behind."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
