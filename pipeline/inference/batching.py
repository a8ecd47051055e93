"""Batched sampling: the lesions of several cases that are in flight at once go through the UNet as one batch.

Each case keeps its own code path (:func:`inference.lmnet.sample_case`, :func:`inference.linet.inpaint_case`) and
runs in a worker thread; the model those threads see is a :class:`BatchingModel`, whose ``sample`` waits until
every case in flight has asked for a sample (or finished), then runs the waiting requests of the same shape and
settings as one batch of at most ``batch_size`` items. Each item keeps its own ``torch.Generator`` (the samplers
draw the noise of item ``i`` from generator ``i`` alone), so an item gets the noise it gets one by one: outputs
equal one-by-one sampling up to fp32 rounding (batched convolutions add up in another order, ~1e-6).

A case may ask for several items at once: the boxes of one case that do not depend on each other
(:mod:`inference.box_batches`; a later box depends on earlier ones where LMNet's cavity rule sees them or LINet's
crop holds their paste). A batch that raises (e.g. CUDA out of memory) is retried item
by item, so an error lands on the case that caused it. The threads take turns with LINet's VQ (its tiled passes
patch its GroupNorm layers). On CUDA with ``batch_memory_mb`` the first batch of each shape runs one item and its
measured peak memory sets how many items fit in the budget.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from inference.cases import CaseSpec
from inference.common import process_cases
from inference.options import InferenceOptions
from inference.results import CaseResult

MEBIBYTE = 2**20
# The VQ of LINet: its tiled passes swap the GroupNorm layers' forward for whole-volume statistics, so two
# threads must not run it at once.
SERIALISED_MODULE = "first_stage_model"


@dataclass
class SampleRequest:
    """One ``model.sample`` call of one case: batch-1 tensors, other arguments, its generator, then the outcome."""

    tensors: dict[str | int, torch.Tensor | None]
    settings: dict[str, Any]
    generator: torch.Generator | None
    autocast: tuple[bool, torch.dtype | None]
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False
    group: tuple = field(init=False)

    def __post_init__(self):
        shapes = tuple((key, None if value is None else (tuple(value.shape), value.dtype))
                       for key, value in sorted(self.tensors.items(), key=lambda item: str(item[0])))
        self.group = (shapes, tuple(sorted(self.settings.items())), self.autocast)


def split_arguments(args: Sequence[Any], kwargs: dict[str, Any]) -> list[SampleRequest]:
    """One :class:`SampleRequest` per batch item of the arguments of ``model.sample``: every tensor holds the same
    number of items, and ``generator`` is one generator (one item) or one per item."""
    tensors: dict[str | int, torch.Tensor | None] = {index: value for index, value in enumerate(args)}
    settings = {}
    for name, value in kwargs.items():
        if name in ("generator", "progress"):
            continue
        if isinstance(value, torch.Tensor) or value is None:
            tensors[name] = value
        else:
            settings[name] = value
    sizes = {value.shape[0] for value in tensors.values() if isinstance(value, torch.Tensor)}
    if len(sizes) != 1 or any(value is not None and not isinstance(value, torch.Tensor) for value in tensors.values()):
        raise ValueError("batched sampling needs tensors with the same number of items in every argument")
    items = sizes.pop()
    generator = kwargs.get("generator")
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * items
    if len(generators) != items or (items > 1 and not isinstance(generator, (list, tuple))):
        raise ValueError(f"batched sampling of {items} items needs one generator per item")
    device_type = "cuda" if torch.is_autocast_enabled("cuda") else "cpu"
    enabled = torch.is_autocast_enabled(device_type)
    autocast = (enabled, torch.get_autocast_dtype(device_type) if enabled else None)
    return [SampleRequest({key: None if value is None else value[row:row + 1] for key, value in tensors.items()},
                          settings, generators[row], autocast) for row in range(items)]


class BatchingModel:
    """A diffusion model whose ``sample`` batches the calls of all threads in flight (module docstring); every
    other attribute is the wrapped model's. Wrap each case's work in :meth:`case`."""

    def __init__(self, model: torch.nn.Module, batch_size: int, memory_budget_mb: float = 0.0):
        self._model, self._batch_size, self._memory_budget_mb = model, int(batch_size), float(memory_budget_mb)
        self._condition = threading.Condition()
        self._pending: list[SampleRequest] = []
        self._active = 0
        self._waiting = 0  # sample calls whose requests are pending
        self._running = False
        self._fitting: dict[tuple, int] = {}
        self._serial_lock = threading.Lock()
        self.batch_sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._model, name)
        if name == SERIALISED_MODULE and value is not None:
            return Serialised(value, self._serial_lock)
        return value

    @contextmanager
    def case(self) -> Iterator[None]:
        """Around the work of one case: sampling waits for every case inside such a block."""
        with self._condition:
            self._active += 1
        try:
            yield
        finally:
            with self._condition:
                self._active -= 1
            self._flush_when_all_wait()

    def sample(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``model.sample`` for one or more items (one generator per item), run as part of batches; returns the
        items' samples ``[items, ...]``."""
        requests = split_arguments(args, kwargs)
        with self._condition:
            self._pending.extend(requests)
            self._waiting += 1
        self._flush_when_all_wait()
        with self._condition:
            while not all(request.done for request in requests):
                self._condition.wait()
        for request in requests:
            if request.error is not None:
                raise request.error
        return torch.cat([request.result for request in requests])

    def _flush_when_all_wait(self) -> None:
        # One sample call per waiting case: when as many wait as cases are in flight, nobody else will ask.
        with self._condition:
            if self._running or not self._pending or self._waiting < self._active:
                return
            requests, self._pending, self._waiting = self._pending, [], 0
            self._running = True
        try:
            self._run(requests)
        finally:
            with self._condition:
                self._running = False
                self._condition.notify_all()
        self._flush_when_all_wait()

    def _run(self, requests: list[SampleRequest]) -> None:
        groups: dict[tuple, list[SampleRequest]] = {}
        for request in requests:
            groups.setdefault(request.group, []).append(request)
        for group, members in groups.items():
            start = 0
            while start < len(members):
                size = self._items_per_batch(group)
                chunk = members[start:start + size]
                self._run_chunk(chunk, measure=group not in self._fitting and self._measures())
                start += len(chunk)

    def _measures(self) -> bool:
        return self._memory_budget_mb > 0 and self._model.device.type == "cuda"

    def _items_per_batch(self, group: tuple) -> int:
        if not self._measures():
            return self._batch_size
        return self._fitting.get(group, 1)

    def _run_chunk(self, chunk: list[SampleRequest], measure: bool = False) -> None:
        try:
            if measure:
                torch.cuda.synchronize(self._model.device)
                baseline = torch.cuda.memory_allocated(self._model.device)
                torch.cuda.reset_peak_memory_stats(self._model.device)
            outputs = self._sample_batch(chunk)
            if measure:
                per_item = max(torch.cuda.max_memory_allocated(self._model.device) - baseline, 1) / MEBIBYTE
                fitting = int(self._memory_budget_mb // per_item)
                self._fitting[chunk[0].group] = max(1, min(self._batch_size, fitting))
        except Exception as error:  # noqa: BLE001 - retried item by item so that the error lands on its case
            if len(chunk) == 1:
                chunk[0].error = error
                chunk[0].done = True
                return
            for request in chunk:
                self._run_chunk([request])
            return
        self.batch_sizes.append(len(chunk))
        for request, output in zip(chunk, outputs):
            request.result, request.done = output[None], True

    def _sample_batch(self, chunk: list[SampleRequest]) -> torch.Tensor:
        first = chunk[0]
        tensors = {key: None if value is None else torch.cat([request.tensors[key] for request in chunk])
                   for key, value in first.tensors.items()}
        positional = [tensors[index] for index in sorted(key for key in tensors if isinstance(key, int))]
        named = {key: value for key, value in tensors.items() if isinstance(key, str)}
        generators = chunk[0].generator if len(chunk) == 1 else [request.generator for request in chunk]
        enabled, dtype = first.autocast
        device_type = self._model.device.type
        with torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled):
            return self._model.sample(*positional, **named, **first.settings, generator=generators)


class Serialised:
    """A module whose methods run one call at a time (under ``lock``); other attributes are the module's."""

    def __init__(self, module: torch.nn.Module, lock: threading.Lock):
        self._module, self._lock = module, lock

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._module, name)
        if not callable(value):
            return value

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return value(*args, **kwargs)

        return locked


def run_cases(process: Callable[[Any, CaseSpec], CaseResult], model: torch.nn.Module, cases: Sequence[CaseSpec],
              options: InferenceOptions, description: str, position: int = 0,
              on_result: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    """Run ``process(model, case)`` for every case; returns the results in the order of ``cases``.

    With ``options.batch_size`` 1 the cases run one after the other in this thread; with more, that many cases
    are in flight (threads) and ``process`` gets a :class:`BatchingModel`, so their lesions share UNet batches.
    ``on_result`` is called (from this thread) as each case finishes."""
    if options.batch_size <= 1:
        def one(case: CaseSpec) -> CaseResult:
            start = time.perf_counter()
            result = process(model, case)
            result.seconds = round(time.perf_counter() - start, 3)
            if on_result is not None:
                on_result(result)
            return result

        return process_cases(one, cases, description, options.progress, position)
    batching = BatchingModel(model, options.batch_size, options.batch_memory_mb)

    def in_flight(case: CaseSpec) -> CaseResult:
        if batching.device.type == "cuda":
            torch.cuda.set_device(batching.device)  # the current device is per thread
        start = time.perf_counter()
        with batching.case():
            result = process(batching, case)
        result.seconds = round(time.perf_counter() - start, 3)
        return result

    results: dict[int, CaseResult] = {}
    with ThreadPoolExecutor(max_workers=options.batch_size) as pool, \
            tqdm(total=len(cases), desc=description, unit="case", disable=not options.progress, position=position,
                 leave=position == 0) as bar:
        futures = {pool.submit(in_flight, case): index for index, case in enumerate(cases)}
        for future in as_completed(futures):
            result = future.result()
            results[futures[future]] = result
            if on_result is not None:
                on_result(result)
            bar.set_postfix_str(f"{result.case_id}: {result.status}")
            bar.update(1)
    return [results[index] for index in range(len(cases))]
