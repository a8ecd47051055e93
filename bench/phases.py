"""Where the time of one ``synthesize.py`` run goes, phase by phase (run through ``bench/sample.py --only phases``).

One real CT (``../shared/data/totalseg-example``, 3 mm, with its TotalSegmentator segmentation as ``--seg``, so no
segmentation model runs) through :func:`synthesize.synthesize` in this process with the demo configs: their
checkpoints from ``make demo`` when present, else checkpoints of the same architectures with random weights (the
time does not depend on the weights). Phases: the imports a fresh process pays, each step of preprocessing (as
``preprocess_report.json`` records it), per stage the model loading, the sampling (``model.sample``) and the rest
of the stage (reads, crops, VQ, thresholds, pastes, writes, previews), and what remains of the command.
"""
from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT.parent / "shared" / "data" / "totalseg-example"


def stage_configs(lmnet_config: str, linet_config: str, folder: Path) -> tuple[str, str]:
    """The two test configs, or copies pointing at random-weight checkpoints when their checkpoints are absent."""
    import torch
    from omegaconf import OmegaConf

    from ldm.util import PIPELINE_DIR, instantiate_from_config, load_config

    paths = []
    for stage, config_path in (("lmnet", lmnet_config), ("linet", linet_config)):
        config = load_config([PIPELINE_DIR / config_path])
        if Path(str(config.model.params.ckpt_path)).is_file():
            paths.append(str(PIPELINE_DIR / config_path))
            continue
        config.model.params.ckpt_path = None
        model = instantiate_from_config(config.model, key_path="model")
        torch.save({"state_dict": model.state_dict()}, folder / f"{stage}.ckpt")
        config.model.params.ckpt_path = str(folder / f"{stage}.ckpt")
        OmegaConf.save(config, folder / f"{stage}_test.yaml")
        paths.append(str(folder / f"{stage}_test.yaml"))
    return paths[0], paths[1]


@contextmanager
def timing(owner, name: str, totals: dict, key_of):
    """Replace ``owner.name`` by a wrapper adding its seconds to ``totals[key_of(args)]`` for the block."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            key = key_of(args, kwargs)
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def stage_of_model(model) -> str:
    return "lmnet" if type(model).__name__ == "MaskDiffusion" else "linet"


def bench_phases(lmnet_config: str, linet_config: str, sampling, device) -> dict:
    """Seconds per phase of one synthesis (one lesion) with ``sampling`` on ``device``."""
    start = time.perf_counter()
    import synthesize
    from ldm.models.diffusion.ddpm import DDPM
    from inference import runner
    imports = time.perf_counter() - start

    totals: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        lmnet, linet = stage_configs(lmnet_config, linet_config, folder)
        with timing(DDPM, "run_sampler", totals, lambda args, _: f"{stage_of_model(args[0])} sampling"), \
                timing(runner, "load_model", totals, lambda args, _: f"{runner.config_stage(args[0])} loading"), \
                timing(runner, "run_inference", totals, lambda args, _: f"{runner.config_stage(args[0])} stage"):
            start = time.perf_counter()
            rows = synthesize.synthesize([EXAMPLE / "example_ct_sm.nii.gz"], "liver", "cyst", folder / "out",
                                         segs=[EXAMPLE / "example_seg.nii.gz"], seg_version="v2",
                                         lmnet_config=lmnet, linet_config=linet, steps=sampling.steps,
                                         sampler=sampling.name, overrides=[f"inference.device={device.type}"],
                                         progress=False)
            command = time.perf_counter() - start
        if not rows[0].ok:
            raise RuntimeError(f"synthesis failed in {rows[0].stage}: {rows[0].error}")
        preprocess = json.loads((folder / "out" / "preprocess_report.json").read_text())["cases"][0]["seconds"]
    phases = {"imports": imports, **{f"preprocess {step}": seconds for step, seconds in preprocess.items()}}
    for stage in ("lmnet", "linet"):
        loading, sampling_seconds = totals.get(f"{stage} loading", 0.0), totals.get(f"{stage} sampling", 0.0)
        phases[f"{stage} loading"] = loading
        phases[f"{stage} sampling"] = sampling_seconds
        phases[f"{stage} rest"] = totals.get(f"{stage} stage", 0.0) - loading - sampling_seconds
    phases["rest of the command"] = command - sum(seconds for name, seconds in phases.items()
                                                  if name not in ("imports",))
    not_sampling = imports + command - totals.get("lmnet sampling", 0.0) - totals.get("linet sampling", 0.0)
    return {"phases_seconds": {name: round(seconds, 2) for name, seconds in phases.items()},
            "total_seconds": round(imports + command, 2), "not_sampling_seconds": round(not_sampling, 2)}
