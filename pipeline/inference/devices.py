"""Where each inference process runs: sampling device, VQ device, and the UNet's autocast precision.

Every decision is a pure function of the requested GPU ids and the visible GPU count, so it is tested without
GPUs. One process per sampling device; with ``--gpus 0,2`` rank 0 samples on ``cuda:0`` and rank 1 on ``cuda:2``,
each handling the cases ``rank, rank + world, ...``. Under torchrun or srun every process is one rank of the
launcher's world and samples on the GPU of its local rank (:func:`launch_placement`).

``vq_device`` (LINet): ``same`` keeps the VQ on the sampling device (tiled decoding bounds its memory), ``cpu``
moves it to the CPU, ``neighbour`` gives every rank the next visible GPU after its own that no rank samples on and
no other rank already uses (the original decoded on ``cuda:i+1``; here the choice is checked and never collides).
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager, Sequence

import torch

from ldm.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Devices of one inference process."""

    rank: int
    world: int
    device: str
    vq_device: str
    # Processes on this machine (they share its CPU cores); None: all ``world`` (spawned by --gpus on one machine).
    local_world: int | None = None

    @property
    def processes_on_node(self) -> int:
        return self.local_world or self.world


def cpu_threads_per_process(cpu_count: int | None, processes_on_node: int) -> int:
    """Torch CPU threads for each of ``processes_on_node`` processes sharing a machine of ``cpu_count`` cores
    (at least 1; an unknown ``cpu_count`` counts as 1)."""
    return max(1, (cpu_count or 1) // max(1, processes_on_node))


def default_device(requested: str, visible_gpus: int) -> str:
    """The device of a single-process run: ``auto`` is ``cuda:0`` when a GPU is visible, else ``cpu``."""
    if requested == "auto":
        return "cuda:0" if visible_gpus > 0 else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or requested.startswith("cuda:"):
        index = requested.partition(":")[2] or "0"
        if not index.isdigit() or int(index) >= visible_gpus:
            raise ConfigError(f"inference.device {requested!r}: {visible_gpus} GPU(s) visible")
        return f"cuda:{int(index)}"
    raise ConfigError(f"inference.device {requested!r}: expected auto, cpu or cuda:N")


def neighbour_gpus(sampling: Sequence[int], visible_gpus: int) -> list[int]:
    """For each sampling GPU, the next visible GPU after it (wrapping around) not used by any other rank."""
    taken = set(sampling)
    chosen = []
    for gpu in sampling:
        candidates = [(gpu + step) % visible_gpus for step in range(1, visible_gpus)]
        free = next((c for c in candidates if c not in taken), None)
        if free is None:
            raise ConfigError(
                f"inference.vq_device: neighbour needs a free GPU next to every sampling GPU; sampling on "
                f"{list(sampling)} leaves none of the {visible_gpus} visible GPU(s) for GPU {gpu}. Use "
                "vq_device: same (tiled VQ decoding on the sampling GPU), or sample on fewer GPUs (e.g. --gpus 0,2 "
                "on 4 GPUs)")
        taken.add(free)
        chosen.append(free)
    return chosen


def plan_placements(gpus: Sequence[int], visible_gpus: int, vq_device: str, device: str = "auto") -> list[Placement]:
    """One :class:`Placement` per process: one per id in ``gpus``, or a single one on ``device`` without ids."""
    for gpu in gpus:
        if gpu >= visible_gpus:
            raise ConfigError(f"--gpus: GPU {gpu} is not visible ({visible_gpus} GPU(s) visible"
                              f"{', check CUDA_VISIBLE_DEVICES' if visible_gpus else ''})")
    if gpus:
        sampling = [f"cuda:{gpu}" for gpu in gpus]
        gpu_ids = list(gpus)
    else:
        sampling = [default_device(device, visible_gpus)]
        gpu_ids = [int(sampling[0].partition(":")[2])] if sampling[0].startswith("cuda") else []
    if vq_device == "same":
        vq = list(sampling)
    elif vq_device == "cpu":
        vq = ["cpu"] * len(sampling)
    elif vq_device == "neighbour":
        if not gpu_ids:
            raise ConfigError("inference.vq_device: neighbour needs GPUs (sampling runs on the CPU); use same")
        vq = [f"cuda:{gpu}" for gpu in neighbour_gpus(gpu_ids, visible_gpus)]
    else:
        raise ConfigError(f"inference.vq_device {vq_device!r}: expected same, neighbour or cpu")
    return [Placement(rank, len(sampling), device_name, vq_name)
            for rank, (device_name, vq_name) in enumerate(zip(sampling, vq))]


def launch_placement(rank: int, world: int, local_rank: int, visible_gpus: int, vq_device: str,
                     device: str = "auto", local_world: int | None = None) -> Placement:
    """The placement of process ``rank`` of ``world`` started by torchrun or srun (:mod:`ldm.distributed`).

    ``auto`` samples on ``cuda:<local_rank>``, or on ``cuda:0`` when the launcher gives each process one GPU of its
    own (one visible), else on the CPU; the VQ stays on that device or goes to the CPU. ``local_world``: processes
    on this node (``None``: unknown, all ``world`` assumed)."""
    if device == "auto" and visible_gpus > 0:
        if visible_gpus > 1 and local_rank >= visible_gpus:
            raise ConfigError(f"local rank {local_rank}: only {visible_gpus} GPU(s) visible on this node; start at "
                              f"most {visible_gpus} processes per node (torchrun --nproc-per-node, srun "
                              "--ntasks-per-node)")
        sampling = f"cuda:{local_rank if visible_gpus > 1 else 0}"
    else:
        sampling = default_device(device, visible_gpus)
    if vq_device not in ("same", "cpu"):
        raise ConfigError(f"inference.vq_device {vq_device!r}: under torchrun or srun use same or cpu (neighbour "
                          "pairs GPUs of one --gpus process group)")
    return Placement(rank, world, sampling, sampling if vq_device == "same" else "cpu", local_world)


def autocast_dtype(device: str | torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for the UNet: ``None`` for fp32, and on a non-CUDA device (with a warning)."""
    if precision == "fp32":
        return None
    if precision not in AUTOCAST_DTYPES:
        raise ConfigError(f"inference.precision {precision!r}: expected fp32, bf16 or fp16")
    if torch.device(device).type != "cuda":
        warnings.warn(f"inference.precision {precision} applies on CUDA only; sampling on {device} in fp32",
                      stacklevel=2)
        return None
    return AUTOCAST_DTYPES[precision]


def autocast(device: str | torch.device, dtype: torch.dtype | None) -> ContextManager:
    """Autocast context for the UNet (a no-op when ``dtype`` is None)."""
    return nullcontext() if dtype is None else torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def visible_gpu_count() -> int:
    """Number of CUDA devices this process can see (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
