"""Runs over several processes and nodes: who this process is, its share of the cases, and the few messages the
processes exchange.

A process learns its place from the launcher's environment: ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``); ``srun`` sets ``SLURM_PROCID``,
``SLURM_NTASKS`` (or ``SLURM_STEP_NUM_TASKS``), ``SLURM_LOCALID``, ``SLURM_NODEID`` and ``SLURM_STEP_TASKS_PER_NODE``
(such as ``4(x2),3``; without it, ``SLURM_NTASKS`` over ``SLURM_JOB_NUM_NODES`` or ``SLURM_NNODES``), and the job
script exports ``MASTER_ADDR`` (the first node) and optionally ``MASTER_PORT`` (default 29500). Without either, the
run is a single process. Training (``main.py``), preprocessing and inference all read their place from here.

Process ``rank`` of ``world`` (a :class:`Launch`, or anything with ``rank`` and ``world``) takes the items ``rank, rank + world, ...`` of a list; the processes meet in a gloo
process group (it works on CPUs and GPUs alike and only carries small Python objects): rank 0 broadcasts what
all must agree on and gathers the others' results. Seeds never depend on the rank (see :mod:`inference.plan`).
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping, Sequence, TypeVar

import torch.distributed as dist

from ldm.errors import ConfigError

DEFAULT_MASTER_PORT = "29500"
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# A collective waits for the slowest process: gathering the results waits until every shard is done (hours).
COLLECTIVE_TIMEOUT = timedelta(days=7)
Item = TypeVar("Item")


@dataclass(frozen=True)
class Launch:
    """This process's place: global ``rank`` of ``world`` processes, ``local_rank`` on its node (its GPU), and
    ``local_world`` processes on its node (``None``: the launcher did not say; then the whole world is assumed to
    share the node, which never oversubscribes its cores)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launcher: str = "none"
    local_world: int | None = None

    @property
    def processes_on_node(self) -> int:
        return self.local_world or self.world

    @property
    def nodes(self) -> int:
        """Nodes of the run (``world`` over the processes per node)."""
        return max(1, self.world // self.processes_on_node)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _integer(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None and default is not None:
        return default
    if value is None or not value.strip().isdigit():
        raise ConfigError(f"environment variable {name}={value!r}: expected a non-negative integer")
    return int(value)


def slurm_tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Tasks on node ``node`` from SLURM's compressed ``*_TASKS_PER_NODE`` list: ``4(x2),3`` is 4, 4, 3."""
    counts = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ConfigError(f"SLURM tasks per node {tasks_per_node!r}: expected a list such as 4(x2),3")
        counts += [int(match[1])] * int(match[2] or 1)
    if not 0 <= node < len(counts):
        raise ConfigError(f"SLURM node {node} is not within the tasks-per-node list {tasks_per_node!r}")
    return counts[node]


def _slurm_local_world(environ: Mapping[str, str]) -> int | None:
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name in environ:
            return slurm_tasks_on_node(environ[name], _integer(environ, "SLURM_NODEID", 0))
    for name in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if name in environ and "SLURM_NTASKS" in environ:
            return max(1, _integer(environ, "SLURM_NTASKS") // max(1, _integer(environ, name)))
    return None


def detect_launch(environ: Mapping[str, str] | None = None) -> Launch:
    """This process's :class:`Launch` from the environment (module docstring); a single process by default."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        launch = Launch(_integer(environ, "RANK"), _integer(environ, "WORLD_SIZE"),
                        _integer(environ, "LOCAL_RANK", 0), "torchrun",
                        _integer(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else None)
    elif "SLURM_PROCID" in environ and ("SLURM_STEP_NUM_TASKS" in environ or "SLURM_NTASKS" in environ):
        world_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
        launch = Launch(_integer(environ, "SLURM_PROCID"), _integer(environ, world_name),
                        _integer(environ, "SLURM_LOCALID", 0), "slurm",
                        _slurm_local_world(environ))
    else:
        return Launch()
    if not 0 <= launch.rank < launch.world:
        raise ConfigError(f"{launch.launcher}: rank {launch.rank} is not within a world of {launch.world} process(es)")
    return launch


def shard(items: Sequence[Item], launch: Any) -> list[Item]:
    """This process's share of ``items``: ``rank, rank + world, ...`` (list order kept); ``launch``: a
    :class:`Launch` or anything with ``rank`` and ``world`` (an inference placement)."""
    return list(items)[launch.rank::launch.world]


@contextmanager
def process_group(launch: Launch, environ: Mapping[str, str] | None = None) -> Iterator[None]:
    """A gloo process group for the block when ``launch`` spans several processes (nothing otherwise)."""
    if not launch.distributed or dist.is_initialized():
        yield
        return
    environ = os.environ if environ is None else environ
    address = environ.get("MASTER_ADDR")
    if not address:
        raise ConfigError(f"{launch.launcher}: {launch.world} processes but MASTER_ADDR is not set; export the host "
                          "of rank 0 (under SLURM: the first node of the job, see docs/inference.md)")
    # torchrun's agent may already serve the store on MASTER_PORT: env:// knows how to join it.
    init_method = ("env://" if launch.launcher == "torchrun"
                   else f"tcp://{address}:{environ.get('MASTER_PORT', DEFAULT_MASTER_PORT)}")
    dist.init_process_group("gloo", init_method=init_method, rank=launch.rank, world_size=launch.world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def broadcast_from_main(launch: Launch, value: Any) -> Any:
    """Rank 0's ``value`` on every process (``value`` of other ranks is ignored)."""
    if not launch.distributed:
        return value
    holder = [value if launch.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_to_main(launch: Launch, items: list[Item]) -> list[Item] | None:
    """Every process's ``items`` concatenated (rank order) on rank 0; ``None`` on the other ranks."""
    if not launch.distributed:
        return list(items)
    gathered = [None] * launch.world if launch.is_main else None
    dist.gather_object(list(items), gathered, dst=0)
    if not launch.is_main:
        return None
    return [item for part in gathered for item in part]
