"""Multi-process (DDP) training set-up for ``torchrun``.

Launch ``nvsm train`` (or ``nvsm fewshot``, see ``nvsm.fewshot.loop``) once per process with
``torchrun``; the command line is otherwise the same as for a single process::

    torchrun --standalone --nproc_per_node 2 -m nvsm.cli train -r synthetic-car-supervised \\
        --out runs/ddp

(``--standalone`` makes torchrun pick a free local port; ``-m nvsm.cli`` runs the CLI module,
``torchrun --standalone --nproc_per_node 2 "$(which nvsm)" train ...`` works as well.)

``train.batch_size`` is the batch of ONE process: with N processes every optimiser step sees
N × batch_size crops. Each process draws its own batch (a disjoint slice of one shared
shuffle whenever the data set is large enough), its own augmentations and clutter samples; the
gradients are averaged by ``DistributedDataParallel`` and the feature-bank updates are
all-gathered, so the backbone and the banks stay identical on every process. Only rank 0 writes
``run_info.json``, checkpoints, ``train_summary.json`` and runs the evaluation.

The process group uses NCCL when the device is a CUDA device and gloo otherwise (CPU training,
e.g. ``-s device=cpu``, or a machine without CUDA). Without torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) everything here is
a no-op and training runs in one process as before.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

T = TypeVar("T")

#: Environment variables torchrun sets for every process it launches.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Default time-out of a collective operation (seconds); override with $NVSM_DIST_TIMEOUT.
DEFAULT_TIMEOUT_S = 1800.0


class PeerFailed(RuntimeError):
    """Another process of the job stopped (its own output says why), so this one cannot go on:
    a collective operation lost its peer."""


def _lost_peer(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective operation failing because a peer went away: torch's
    distributed errors, or gloo's / NCCL's plain RuntimeError ("Connection closed by peer")."""
    text = str(exc).lower()
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        word in text for word in ("gloo", "nccl", "closed by peer", "reset by peer")
    )


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the (possibly single-process) job.

    Attributes:
        rank: global rank (0 in a single-process run).
        world_size: number of processes (1 in a single-process run).
        local_rank: rank on this machine (picks the GPU).
        device: the device this process trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is running."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun's environment variables are all set."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def is_initialized() -> bool:
    """True when a ``torch.distributed`` process group is running."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 and in a single-process run."""
    return get_rank() == 0


def _pick_device(preference: str | torch.device, local_rank: int | None) -> torch.device:
    """The device of this process. ``auto`` means CUDA when available, else CPU. Under torchrun
    (``local_rank`` given) a CUDA device becomes ``cuda:<local_rank>``; otherwise the
    preference is used as given (as ``nvsm.pipeline.resolve_device`` does).

    Raises:
        ValueError: CUDA asked for but absent, or more processes on this machine than it has
            GPUs (the extra ones shared a GPU, which NCCL refuses deep inside its first call).
    """
    name = str(preference)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and local_rank is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_rank >= count:
            raise ValueError(
                f"device: torchrun started local rank {local_rank} on this machine, which has "
                f"{count} CUDA device(s) for device={str(preference)!r}; start at most "
                f"{count} process(es) per machine (torchrun --nproc-per-node) or use "
                "-s device=cpu"
            )
        return torch.device(device.type, local_rank)
    return device


def init_distributed(
    device: str | torch.device = "auto",
    backend: str | None = None,
    timeout_s: float | None = None,
) -> DistInfo:
    """Initialise the process group from torchrun's environment and pick this rank's device.

    Not launched by torchrun: returns rank 0, world size 1 and the preferred device
    (``auto`` → CUDA if available, else CPU) and initialises nothing. When a process group is
    already running (e.g. set up by a test harness) it is reused.

    Args:
        device: preferred device: ``auto``, ``cpu``, ``cuda`` (→ ``cuda:<LOCAL_RANK>``), ...
        backend: process-group backend; default NCCL for CUDA devices, gloo otherwise.
        timeout_s: time-out of collective operations (default $NVSM_DIST_TIMEOUT or 30 min).

    Returns:
        The ``DistInfo`` of this process.
    """
    if not (launched_by_torchrun() or is_initialized()):
        return DistInfo(0, 1, 0, _pick_device(device, None))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not is_initialized():
        if not dist.is_available():
            raise RuntimeError("launched by torchrun but torch.distributed is not available")
        if backend is None:
            backend = "nccl" if dev.type == "cuda" and dist.is_nccl_available() else "gloo"
        if timeout_s is None:
            timeout_s = float(os.environ.get("NVSM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=_dt.timedelta(seconds=timeout_s),
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


@contextmanager
def process_group(device: str | torch.device = "auto") -> Iterator[DistInfo]:
    """``init_distributed(device)`` for the ``with`` block, torn down after it when this block
    set the group up (not one a test harness or caller runs already). Call the work in a
    function of its own inside the block: its trainers and DDP wrappers are released when it
    returns, before the teardown (torn down later, gloo's threads could abort the process)."""
    owns_group = launched_by_torchrun() and not is_initialized()
    info = init_distributed(device)  # no-op without torchrun
    try:
        yield info
    except RuntimeError as exc:
        # One process's error ended it; the others then failed in their next collective with
        # a long gloo traceback that hid the cause, which the failed process has printed.
        if info.world_size > 1 and not isinstance(exc, PeerFailed) and _lost_peer(exc):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PeerFailed(
                f"rank {info.rank}: another process of this run stopped, so this one cannot go "
                f"on (the other's own error line says why; here: {first})"
            ) from exc
        raise
    finally:
        if owns_group:
            cleanup()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself without a process group."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(work: Callable[[], T]) -> T:
    """``work()`` run on rank 0 alone, its result sent to every rank (``work()`` itself
    without a process group): for what must happen once, such as writing files, or must give
    every rank the same answer. The others wait; when rank 0 fails, every rank raises: the same
    ``ValueError`` or ``FileNotFoundError`` (a bad input, one line on every rank), or a
    ``RuntimeError`` naming rank 0's error, rather than hanging until the time-out."""
    if not is_initialized():
        return work()
    result: tuple[str, Any] = ("ok", None)
    if get_rank() == 0:
        try:
            result = ("ok", work())
        except (ValueError, FileNotFoundError) as exc:  # subclasses too (DatasetError, ...)
            kind = "FileNotFoundError" if isinstance(exc, FileNotFoundError) else "ValueError"
            result = (kind, str(exc))
            broadcast_object(result)
            raise
        except BaseException as exc:
            broadcast_object(("RuntimeError", f"rank 0 failed: {type(exc).__name__}: {exc}"))
            raise
    kind, value = broadcast_object(result)
    if kind == "ok":
        return cast(T, value)
    raise {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}.get(
        kind, RuntimeError
    )(value)


def main_first(work: Callable[[], T]) -> T:
    """``work()`` on rank 0, then, once it has succeeded there, on the other ranks (each
    returns its own result): for a step whose first run prepares what the others then read,
    such as generating the built-in dataset. Rank 0's failure is raised on every rank as in
    ``on_main``."""
    if not is_initialized():
        return work()
    mine: list[T] = []
    on_main(lambda: mine.append(work()))  # the other ranks wait for rank 0's run
    return mine[0] if get_rank() == 0 else work()


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group, if one is running.

    Unreachable objects that hold the group (a DDP wrapper's reducer, caught in a reference
    cycle) are collected first: torn down later, at interpreter exit, gloo's threads could abort
    the process (SIGABRT, "terminate called without an active exception"). Call it after the
    frames that use the group have returned."""
    if is_initialized():
        gc.collect()
        dist.destroy_process_group()
