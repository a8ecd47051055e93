"""One inference run from a merged config: the stage, the model on its devices, one process per sampling device,
and the files the run writes besides the per-case outputs.

The stage follows the model class (``MaskDiffusion`` -> LMNet, ``InpaintingDiffusion`` -> LINet). With several
placements (``--gpus 0,2``) each runs in its own spawned process on the cases ``rank::world``; results come back
to this process, which writes ``<exp>/label_list.txt`` (LMNet: one row per case of ``img_list.txt``, what LINet
reads next) and ``<exp>/<stage>_report.json`` (options and, per case, outputs, lesions, seeds, errors). Under
torchrun or srun each process runs its share and rank 0 writes those files (:mod:`ldm.distributed`).
"""
from __future__ import annotations

import os
import traceback
from queue import Empty
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.errors import ConfigError, LesionDiffusionError, MissingWeightsError
from ldm.models.checkpoint import checkpoint_trust
from ldm.models.diffusion.inpainting import InpaintingDiffusion
from ldm.models.diffusion.mask import MaskDiffusion
from ldm.util import get_obj_from_str, instantiate_from_config
from inference.candidates import JudgeFactory, judging, require_judge
from inference.cases import CaseSpec, read_cases, write_list
from inference.devices import (Placement, cpu_threads_per_process, launch_placement, plan_placements,
                               visible_gpu_count)
from ldm.distributed import broadcast_from_main, detect_launch, gather_to_main, process_group, shard
from inference.journal import CaseJournal, run_fingerprint
from inference.lmnet import label_list_entries, sample_masks
from inference.linet import inpaint_cases
from inference.options import InferenceOptions, parse_options
from inference.preflight import preflight
from inference.required_files import check_required_files
from inference.results import CaseResult, write_run_report
from inference.spacing import spacing_warnings
from inference.weights import verify_weights, weight_records

POLL_SECONDS = 5.0
StageHook = Callable[[str, Path, list, InferenceOptions], list]
STAGE_CLASSES = {"lmnet": MaskDiffusion, "linet": InpaintingDiffusion}
WEIGHTS_HINT = ("place the released checkpoint there (see docs/weights.md), or point "
                "model.params.ckpt_path=... to your own training run's checkpoints/last.ckpt")


@dataclass
class RunOutcome:
    """What a run did: the stage, one result per case (list order), and the files written besides the cases."""

    stage: str
    results: list[CaseResult]
    report_path: Path
    label_list: Path | None = None
    dropped: list = field(default_factory=list)
    main: bool = True  # False on the ranks > 0 of torchrun/srun: their results are in rank 0's outcome

    @property
    def failed(self) -> list[CaseResult]:
        return [result for result in self.results if not result.ok]


def config_stage(config: DictConfig) -> str:
    """``lmnet`` or ``linet`` from ``model.target``; ConfigError for another model."""
    model = config.get("model")
    if not isinstance(model, DictConfig) or "target" not in model:
        raise ConfigError("the config has no model block with a 'target'")
    cls = get_obj_from_str(model.target, key_path="model.target")
    for stage, base in STAGE_CLASSES.items():
        if isinstance(cls, type) and issubclass(cls, base):
            return stage
    raise ConfigError(f"model.target {model.target!r}: inference runs MaskDiffusion (LMNet) or InpaintingDiffusion "
                      "(LINet) models")


def check_weights(config: DictConfig) -> None:
    """MissingWeightsError unless ``model.params.ckpt_path`` names an existing file (sampling with untrained
    weights would silently produce noise)."""
    path = (config.model.get("params") or {}).get("ckpt_path")
    if not path:
        raise MissingWeightsError(f"model.params.ckpt_path is not set: inference needs trained weights; {WEIGHTS_HINT}")
    if not Path(path).is_file():
        raise MissingWeightsError(f"{path}: checkpoint not found (model.params.ckpt_path); {WEIGHTS_HINT}")


def load_model(config: DictConfig, device: str | torch.device = "cpu",
               vq_device: str | torch.device | None = None) -> torch.nn.Module:
    """The model of ``config`` with its checkpoint, in eval mode without gradients, on ``device``; a LINet's VQ
    goes to ``vq_device`` (default: ``device``). Checkpoints are read safely unless the config has
    ``trust_checkpoint: true`` (``ldm.models.checkpoint``)."""
    check_weights(config)
    with checkpoint_trust(bool(config.get("trust_checkpoint", False))):
        model = instantiate_from_config(config.model, key_path="model")
    model.eval()
    model.requires_grad_(False)
    model.to(device)
    first_stage = getattr(model, "first_stage_model", None)
    if first_stage is not None and vq_device is not None and torch.device(vq_device) != torch.device(device):
        first_stage.to(vq_device)
    return model


def run_stage(model: torch.nn.Module, stage: str, cases: Sequence[CaseSpec], options: InferenceOptions,
              debug: bool = False, position: int = 0, step_progress: bool = False,
              journal: CaseJournal | None = None, judge: JudgeFactory | None = None) -> list[CaseResult]:
    """Run one stage on ``cases`` with a loaded model; one result per case, each recorded in ``journal``.
    ``judge(options)`` makes the judge of best of K and resampling (:mod:`inference.candidates`), used only when
    the options ask for them."""
    run = sample_masks if stage == "lmnet" else inpaint_cases
    lesion_judge = judge(options) if judge is not None and judging(options) else None
    return run(model, cases, options, debug=debug, position=position, step_progress=step_progress,
               on_result=None if journal is None else journal.record, judge=lesion_judge)


def run_shard(config: DictConfig, stage: str, placement: Placement, cases: Sequence[CaseSpec],
              options: InferenceOptions, debug: bool = False, journal: CaseJournal | None = None,
              judge: JudgeFactory | None = None) -> list[CaseResult]:
    """Load the model on ``placement`` and run the cases ``rank::world`` of ``cases``."""
    if placement.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(placement.device))
    elif placement.processes_on_node > 1:
        torch.set_num_threads(cpu_threads_per_process(os.cpu_count(), placement.processes_on_node))
    model = load_model(config, placement.device, placement.vq_device)
    own = shard(cases, placement)
    # Step bars of several processes would overwrite each other's lines: only a single process shows them.
    return run_stage(model, stage, own, options, debug, position=placement.rank,
                     step_progress=options.progress and placement.world == 1, journal=journal, judge=judge)


def _worker(config: dict, stage: str, placement: Placement, cases: list[CaseSpec], options: InferenceOptions,
            debug: bool, queue, journal: CaseJournal | None = None, judge: JudgeFactory | None = None) -> None:
    try:
        results = run_shard(OmegaConf.create(config), stage, placement, cases, options, debug, journal, judge)
        queue.put((placement.rank, "ok", results))
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which decides
        message = str(error) if isinstance(error, LesionDiffusionError) else traceback.format_exc()
        queue.put((placement.rank, "error", (type(error).__name__, message,
                                             isinstance(error, LesionDiffusionError))))


def run_spawned(config: DictConfig, stage: str, placements: Sequence[Placement], cases: Sequence[CaseSpec],
                options: InferenceOptions, debug: bool = False, journal: CaseJournal | None = None,
                judge: JudgeFactory | None = None) -> list[CaseResult]:
    """Run every placement in its own spawned process (``judge``: a picklable factory, see :func:`run_stage`);
    returns all results (any order)."""
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    container = OmegaConf.to_container(config, resolve=True)
    processes = [context.Process(target=_worker,
                                 args=(container, stage, placement, list(cases), options, debug, queue, journal,
                                       judge))
                 for placement in placements]
    for process in processes:
        process.start()
    results, errors, reported = [], [], set()
    while len(reported) < len(processes):
        try:
            rank, status, payload = queue.get(timeout=POLL_SECONDS)
        except Empty:
            # A process killed from outside (out of memory, a signal) never reports: do not wait for it forever.
            dead = [rank for rank, process in enumerate(processes)
                    if rank not in reported and process.exitcode not in (None, 0)]
            for rank in dead:
                reported.add(rank)
                errors.append((rank, ("ProcessExit", f"exited with code {processes[rank].exitcode} before "
                                                     "reporting its results", False)))
            continue
        reported.add(rank)
        if status == "ok":
            results.extend(payload)
        else:
            errors.append((rank, payload))
    for process in processes:
        process.join()
    if errors:
        rank, (name, message, expected) = sorted(errors)[0]
        if expected:
            raise LesionDiffusionError(f"[rank {rank}] {message}")
        raise RuntimeError(f"inference process {rank} failed with {name}:\n{message}")
    return results


def run_inference(config: DictConfig, gpus: Sequence[int] = (), debug: bool = False,
                  placements: Sequence[Placement] | None = None, after_stage: StageHook | None = None,
                  judge: JudgeFactory | None = None) -> RunOutcome:
    """Run the stage of ``config`` on every case of its experiment folder (see the module docstring).

    ``gpus``: CUDA ids, one process each (none: one process on ``inference.device``); ``placements`` replaces
    that plan (e.g. two CPU processes). Under torchrun or srun this process runs its share of the cases and rank 0
    merges them (:mod:`ldm.distributed`). Cases an interrupted run of the same settings finished are kept
    (:mod:`inference.journal`). ``after_stage(stage, exp_dir, results, options)``: runs on the results before the
    report is written and returns what it dropped (``quality.gate.gate_stage``, the quality gate, which
    ``inference.quality_gate: true`` needs; inference itself never imports the quality package). ``judge``: the
    factory of the judge that best of K and resampling need (``quality.candidates.lesion_judge``, see
    :mod:`inference.candidates`). Returns the outcome; a bad case never raises, a bad config does."""
    stage = config_stage(config)
    check_required_files(config)
    options = parse_options(config.get("inference"), stage)
    if stage == "linet" and options.quality_gate and after_stage is None:
        raise ConfigError("inference.quality_gate is true but no gate was given: run test.py or synthesize.py, or "
                          "pass after_stage=quality.gate.gate_stage to run_inference")
    require_judge(options, judge)
    cases = read_cases(options.exp_dir, dict(options.lists))
    check_weights(config)
    verify_weights(config, stage)
    # Every case is checked before any model runs; a case with a problem fails here, naming each problem.
    ready, refused = preflight(cases, options)
    off_spacing = spacing_warnings(cases, options)
    exp_dir = Path(options.exp_dir)
    launch = detect_launch()
    if launch.distributed and (gpus or placements):
        raise ConfigError(f"--gpus under {launch.launcher}: the launcher starts one process per GPU; drop --gpus")
    journal = CaseJournal.for_run(exp_dir, stage, run_fingerprint(OmegaConf.to_container(config.model, resolve=True),
                                                                  asdict(options)))
    with process_group(launch):
        finished = broadcast_from_main(launch, journal.finished(ready) if launch.is_main else None)
        pending = [case for case in ready if case.index not in finished]
        if launch.distributed:
            placement = launch_placement(launch.rank, launch.world, launch.local_rank, visible_gpu_count(),
                                         options.vq_device, options.device, launch.local_world)
            own = run_shard(config, stage, placement, pending, options, debug, journal, judge)
            results = gather_to_main(launch, own)
            if not launch.is_main:
                return RunOutcome(stage, own, exp_dir / f"{stage}_report.json", main=False)
        else:
            if placements is None:
                placements = plan_placements(gpus, visible_gpu_count(), options.vq_device, options.device)
            if not pending:
                results = []
            elif len(placements) == 1:
                results = run_shard(config, stage, placements[0], pending, options, debug, journal, judge)
            else:
                results = run_spawned(config, stage, placements, pending, options, debug, journal, judge)
    for result in results:
        result.warnings[:0] = [off_spacing[result.index]] if result.index in off_spacing else []
    results = sorted([*results, *refused, *finished.values()], key=lambda result: result.index)
    label_list = None
    if stage == "lmnet":
        label_list = write_list(exp_dir / options.label_list_name, label_list_entries(results, cases, options))
    # The report is written after the hook, so that it lists what the hook moved (the quality gate's rejections).
    dropped = after_stage(stage, exp_dir, results, options) if after_stage is not None else []
    report = write_run_report(exp_dir / f"{stage}_report.json", stage, asdict(options), results,
                              weight_records(config))
    journal.clear()
    return RunOutcome(stage, results, report, label_list, dropped)
