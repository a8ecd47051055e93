"""Does the text control the lesion? Trained demo models, held-out healthy phantoms, requested vs measured phrases.

    .venv/bin/python bench/text_control.py [--per-phrase 20] [--candidates 4] [--sampler ddim] [--steps 20] [--retrain] [--out DIR]

1. trains the demo models (``configs/demo/{vq,lmnet,linet}.yaml`` on the attribute phantoms of ``make demo``,
   :func:`demo.run_demo.train_stage`) unless ``demo/checkpoints`` holds them;
2. renders held-out attribute phantoms (another seed, never trained on) in case order until
   every requested phrase (3 densities; round / irregular; sharp / fading margin; homogeneous /
   heterogeneous) occurs at least ``--per-phrase`` times. Each case's report (written from its construction) is the
   request; its lesion's box, on its healthy CT, is where the lesion is asked for;
3. per lesion and candidate: LMNet samples a mask in the box with the report's LMNet text, LINet inpaints it into
   the healthy CT with the LINet text (the crops, thresholds, latent mask and paste of ``synthesize.py``), and
   :func:`demo.fidelity.describe_lesion` measures it (:func:`ldm.lesion.describe_lesion`, the description the
   quality gate and ``prepare_dataset.py`` use);
4. prints per attribute the agreement of the measured phrase with the requested one for K = 1 (the first
   candidate), with the requests shuffled among the lesions (the chance level of a model that ignores the text)
   and for best of K (the candidate agreeing with most requested attributes; ties: smallest HU error, then the
   first). Writes ``DIR/text_control.json`` and ``DIR/text_control.png`` (the first lesions, before and after).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "pipeline"), str(ROOT)]

from demo.fidelity import describe_lesion, phrase_class  # noqa: E402
from demo.make_phantoms import ORIENTATIONS, make_phantoms, render_case  # noqa: E402
from demo.run_demo import DEFAULT_STEPS, DEMO_DIR, STAGES, TRAINING_CASES, train_stage  # noqa: E402
from inference.linet import latent_mask  # noqa: E402
from inference.options import DEFAULT_THRESHOLDS  # noqa: E402
from inference.paste import paste_generated  # noqa: E402
from inference.runner import load_model  # noqa: E402
from inference.thresholds import choose_threshold  # noqa: E402
from ldm.data.attributes import lmnet_attributes, linet_attributes, report_attributes, resolve_cavity  # noqa: E402
from ldm.data.crops import bbox_center, mask_bbox, paste_crop, plan_crop, take_crop  # noqa: E402
from ldm.data.intensity import AIR_HU, hu_to_unit, unit_to_hu  # noqa: E402
from ldm.data.organs import NUM_V1_CLASSES, organ_id  # noqa: E402
from ldm.data.synthetic_geometry import geometry_for  # noqa: E402
from ldm.models.diffusion.samplers import SAMPLERS, SamplerSettings  # noqa: E402
from ldm.util import PIPELINE_DIR, load_config  # noqa: E402
from quality.tolerances import Tolerances  # noqa: E402

HELDOUT_SEED = 1000
POOL = 160  # held-out phantoms drawn at most; the bench takes the shortest prefix that covers every phrase
CROP = (16, 32, 32)  # the training crop of the demo LMNet and LINet
RIM_MM = 2.0
ATTRIBUTES = ("density", "shape", "surface characteristics", "density variations", "size")
TARGETS = {"density": 0.9, "size": 0.9, "shape": 0.7, "surface characteristics": 0.7, "density variations": 0.7}


@dataclass
class Request:
    """One held-out lesion to synthesise: where (healthy CT, box) and what (the report of its construction)."""

    healthy: np.ndarray
    image: np.ndarray
    seg: np.ndarray
    box: np.ndarray
    size_vox: tuple[int, ...]
    attributes: dict
    classes: dict
    ct_value: float
    spacing: tuple[float, ...]


def make_request(case: dict, geometry) -> Request:
    """The request of one rendered held-out phantom (:func:`demo.make_phantoms.render_case`)."""
    key = str(organ_id("liver"))
    attributes = report_attributes(case["report"], key)
    box = np.zeros(case["label"].shape, dtype=bool)
    bbox = mask_bbox(case["label"] == 2)
    box[bbox] = True
    classes = {name: phrase_class(name, attributes[name]) for name in ATTRIBUTES if name != "size"}
    ct_value = float(linet_attributes(attributes, key)["CT value"].split()[0])
    return Request(case["healthy"].astype(np.float32), case["image"].astype(np.float32),
                   case["seg"].astype(np.int16), box,
                   tuple(s.stop - s.start for s in bbox), attributes, classes, ct_value, geometry.spacing_zyx)


def heldout_requests(per_phrase: int) -> list[Request]:
    """Held-out attribute phantoms (seed :data:`HELDOUT_SEED`, the demo's grid), rendered in case order until
    every requested phrase occurs ``per_phrase`` times."""
    geometry = geometry_for((48, 96, 96), (2.0, 2.0, 2.0), ORIENTATIONS["LPS"])
    wanted = {("density", c) for c in ("hypo", "iso", "hyper")} | {("shape", c) for c in ("round", "irregular")} | {
        ("surface characteristics", c) for c in ("sharp", "fading")} | {
        ("density variations", c) for c in ("homogeneous", "heterogeneous")}
    requests, counts = [], {}
    with tqdm(desc="held-out phantoms", unit="case") as bar:
        for index in range(POOL):
            requests.append(make_request(render_case(HELDOUT_SEED, index, geometry, "attributes"), geometry))
            bar.update()
            for item in requests[-1].classes.items():
                counts[item] = counts.get(item, 0) + 1
            if all(counts.get(item, 0) >= per_phrase for item in wanted):
                return requests
    raise SystemExit(f"{POOL} held-out phantoms hold fewer than {per_phrase} lesions of some phrase: {counts}")


def _chunks(indices: list[int], texts: list[dict], size: int) -> list[list[int]]:
    """Runs of at most ``size`` lesions whose texts have the same number of attributes (no padding token: the
    models were trained one sample at a time)."""
    by_length: dict[int, list[int]] = {}
    for index in indices:
        by_length.setdefault(len(texts[index]), []).append(index)
    return [group[start:start + size] for group in by_length.values() for start in range(0, len(group), size)]


@torch.no_grad()
def sample_masks(lmnet, requests: list[Request], candidate: int, seed: int, sampling: SamplerSettings,
                 batch: int) -> list[np.ndarray]:
    """One LMNet mask per request (full-volume bool), candidate ``candidate``, in the request's box."""
    key = str(organ_id("liver"))
    windows, conds, texts = [], [], []
    for request in requests:
        window = plan_crop(request.box.shape, CROP, bbox_center(request.box))
        box, seg = take_crop(request.box, window, fill=False), take_crop(request.seg, window, fill=0)
        organ = seg == int(key)
        cavity = resolve_cavity(key, request.attributes, box, organ)
        texts.append(lmnet_attributes(request.attributes, key, cavity))
        channels = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
                    for a in (seg / NUM_V1_CLASSES, organ, box)]
        conds.append(lmnet.condition_volume(*channels))
        windows.append((window, box))
    masks: list[np.ndarray | None] = [None] * len(requests)
    for chunk in _chunks(list(range(len(requests))), texts, batch):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + candidate * 10_007 + chunk[0])
        raw = lmnet.sample(torch.cat([conds[i] for i in chunk]), lmnet.encode_context([texts[i] for i in chunk]),
                           sampling=sampling, generator=generator)
        for row, index in enumerate(chunk):
            window, box = windows[index]
            chosen = choose_threshold(raw[row, 0].numpy(), box, np.zeros_like(box), DEFAULT_THRESHOLDS)
            masks[index] = paste_crop(np.zeros(requests[index].box.shape, dtype=bool),
                                      chosen.mask, window)
    return masks


@torch.no_grad()
def inpaint(linet, requests: list[Request], masks: list[np.ndarray], candidate: int, seed: int,
            sampling: SamplerSettings,
            batch: int) -> list[np.ndarray | None]:
    """The healthy CT of each request with its lesion inpainted by LINet (HU), None where the mask is empty."""
    key = str(organ_id("liver"))
    texts = [linet_attributes(request.attributes, key) for request in requests]
    results: list[np.ndarray | None] = [None] * len(requests)
    usable = [i for i, mask in enumerate(masks) if mask.any()]
    factor = int(linet.first_stage_model.downsample_factor)
    for chunk in _chunks(usable, texts, batch):
        windows = [plan_crop(masks[i].shape, CROP, bbox_center(masks[i])) for i in chunk]
        lesions = [take_crop(masks[i], window, fill=False) for i, window in zip(chunk, windows)]
        images = [hu_to_unit(take_crop(requests[i].healthy, window, fill=AIR_HU)) for i, window in zip(chunk, windows)]
        latent = linet.encode(torch.from_numpy(np.stack(images)[:, None]))
        mask = torch.cat([latent_mask(lesion, factor, latent.device, dilation=linet.latent_mask_dilation)
                          for lesion in lesions])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + candidate * 10_007 + chunk[0] + 7)
        sampled = linet.sample(latent, mask, linet.encode_context([texts[i] for i in chunk]),
                               sampling=sampling,
                               generator=generator)
        decoded = unit_to_hu(linet.decode(sampled)[:, 0, : CROP[0], : CROP[1], : CROP[2]].numpy())
        for row, index in enumerate(chunk):
            volume = requests[index].healthy.copy()
            paste_generated(volume, decoded[row], lesions[row], windows[row], RIM_MM, requests[index].spacing)
            results[index] = volume
    return results


@torch.no_grad()
def first_stage_contrast(linet, requests: list[Request]) -> dict:
    """How much of each held-out lesion's contrast with the liver survives the VQ's encode-decode (what LINet's
    output goes through): median of (decoded - organ) / (drawn - organ) over the lesion, hypo and hyper lesions."""
    ratios = []
    for request in requests:
        if request.classes["density"] == "iso":
            continue
        lesion = np.zeros(request.box.shape, dtype=bool)
        window = plan_crop(lesion.shape, CROP, bbox_center(request.box))
        drawn = take_crop(request.image, window, fill=AIR_HU)
        inside = take_crop(request.image != request.healthy, window, fill=False) & take_crop(request.box, window, False)
        organ = take_crop(request.seg == organ_id("liver"), window, fill=False) & ~take_crop(request.box, window, False)
        decoded = unit_to_hu(linet.decode(linet.encode(torch.from_numpy(hu_to_unit(drawn))[None, None]))[0, 0].numpy())
        reference = float(np.median(drawn[organ]))
        ratios.append((float(decoded[inside].mean()) - reference) / (float(drawn[inside].mean()) - reference))
    return {"lesions": len(ratios), "median_contrast_kept": round(float(np.median(ratios)), 2)}


def measure_result(request: Request, volume: np.ndarray | None, mask: np.ndarray) -> dict:
    """Measured class per attribute (None = not judged), the size check and the HU error of one lesion."""
    if volume is None:
        return {"classes": {}, "size_ok": False, "hu_error": float("inf"), "size_vox": None}
    phrases, measurement = describe_lesion(volume, mask, request.seg, organ_id("liver"), request.spacing)
    classes = {name: phrase_class(name, phrases[name]) for name in request.classes}
    if measurement.margin_leak is None:  # an isodense lesion has no margin to see
        classes["surface characteristics"] = None
    low, high = Tolerances().extent_ratio
    ratios = [m / r for m, r in zip(measurement.size_vox, request.size_vox)]
    return {"classes": classes, "size_ok": all(low <= ratio <= high for ratio in ratios),
            "hu_error": abs(measurement.interior_mean_hu - request.ct_value), "size_vox": list(measurement.size_vox),
            "mean_hu": round(measurement.interior_mean_hu, 1)}


def agreements(request: Request, judged: dict) -> dict[str, bool | None]:
    """Per attribute: the measured class equals the requested one (None where it cannot be judged)."""
    out: dict[str, bool | None] = {"size": judged["size_ok"]}
    for name, wanted in request.classes.items():
        got = judged["classes"].get(name)
        out[name] = None if got is None and name in judged["classes"] else got == wanted
    if request.classes["density"] == "iso":
        out["surface characteristics"] = None
    return out


def best_candidate(request: Request, judged: list[dict]) -> int:
    """The candidate agreeing with most requested attributes; ties: smallest HU error, then the first."""
    def score(index: int):
        agreed = sum(bool(value) for value in agreements(request, judged[index]).values())
        return (-agreed, judged[index]["hu_error"], index)

    return min(range(len(judged)), key=score)


def rates(pairs: list[dict[str, bool | None]]) -> dict[str, dict]:
    table = {}
    for name in ATTRIBUTES:
        values = [p[name] for p in pairs if p.get(name) is not None]
        table[name] = {"judged": len(values), "agreement": round(float(np.mean(values)), 3) if values else None}
    return table


def shuffled_agreement(requests: list[Request], judged: list[dict], seed: int) -> dict[str, dict]:
    """Agreement of the measured lesions with the requests of other lesions (a random permutation, 20 draws)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(20):
        order = rng.permutation(len(requests))
        for index, other in enumerate(order):
            pairs.append(agreements(requests[other], judged[index]))
    return rates(pairs)


def write_preview(path: Path, requests: list[Request], volumes: list, masks: list, judged: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [i for i, volume in enumerate(volumes) if volume is not None][:12]
    figure, axes = plt.subplots(2, len(shown), figsize=(1.6 * len(shown), 3.8), squeeze=False)
    for column, index in enumerate(shown):
        z, y, x = bbox_center(masks[index])
        window = (slice(max(y - 16, 0), y + 16), slice(max(x - 16, 0), x + 16))
        for row, image in enumerate((requests[index].healthy, volumes[index])):
            axes[row, column].imshow(image[z][window], cmap="gray", vmin=-100, vmax=200)
            axes[row, column].axis("off")
        wanted = requests[index].classes
        axes[0, column].set_title(f"{wanted['density']} {wanted['shape'][:5]}\n{wanted['surface characteristics']} "
                                  f"{wanted['density variations'][:5]}", fontsize=6)
        axes[1, column].set_title(f"{judged[index].get('mean_hu', '-')} HU", fontsize=6)
    figure.suptitle("requested (top: healthy CT) vs synthesised (bottom), K=1", fontsize=8)
    figure.tight_layout()
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(path)


def ensure_models(retrain: bool) -> dict[str, Path]:
    """The demo checkpoints, trained with the demo's step counts when missing (or ``retrain``)."""
    checkpoints, logs = DEMO_DIR / "checkpoints", DEMO_DIR / "logs"
    make_phantoms(DEMO_DIR / "data", n=TRAINING_CASES, seed=0, lesions="attributes")
    return {stage: train_stage(stage, DEFAULT_STEPS[stage], checkpoints, logs, retrain) for stage in STAGES}


def load(stage_config: str, checkpoint: Path):
    overrides = [f"model.params.ckpt_path={checkpoint}"]
    return load_model(load_config([PIPELINE_DIR / stage_config], overrides))


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    checkpoints = ensure_models(args.retrain)
    lmnet, linet = load("configs/demo/lmnet_test.yaml", checkpoints["lmnet"]), load("configs/demo/linet_test.yaml",
                                                                                    checkpoints["linet"])
    out = Path(args.out).resolve() if args.out else DEMO_DIR / "out" / "text_control"
    requests = heldout_requests(args.per_phrase)
    print(f"[bench] {len(requests)} held-out lesions, {args.candidates} candidate(s) each", flush=True)
    judged, volumes, masks = [], [], []
    sampling = SamplerSettings(args.sampler, args.steps)
    for candidate in tqdm(range(args.candidates), desc="candidates", unit="K"):
        masks_k = sample_masks(lmnet, requests, candidate, args.seed, sampling, args.batch)
        volumes_k = inpaint(linet, requests, masks_k, candidate, args.seed, sampling, args.batch)
        judged.append([measure_result(r, v, m) for r, v, m in zip(requests, volumes_k, masks_k)])
        volumes.append(volumes_k)
        masks.append(masks_k)
    first = judged[0]
    chosen = [best_candidate(r, [judged[k][i] for k in range(args.candidates)]) for i, r in enumerate(requests)]
    best = [judged[k][i] for i, k in enumerate(chosen)]
    result = {
        "lesions": len(requests), "candidates": args.candidates, "sampler": args.sampler, "steps": args.steps,
        "k1": rates([agreements(r, j) for r, j in zip(requests, first)]),
        "shuffled": shuffled_agreement(requests, first, args.seed),
        f"k{args.candidates}": rates([agreements(r, j) for r, j in zip(requests, best)]),
        "hu_error_median": {"k1": round(float(np.median([j["hu_error"] for j in first])), 1),
                            f"k{args.candidates}": round(float(np.median([j["hu_error"] for j in best])), 1)},
        "requested": {name: {c: sum(r.classes[name] == c for r in requests) for c in sorted({r.classes[name]
                                                                                              for r in requests})}
                      for name in requests[0].classes},
        "first_stage": first_stage_contrast(linet, requests),
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / "text_control.json.tmp"
    temporary.write_text(json.dumps(result, indent=1) + "\n")
    temporary.replace(out / "text_control.json")
    write_preview(out / "text_control.png", requests, volumes[0], masks[0], first)
    return result


def print_table(result: dict) -> None:
    best = f"k{result['candidates']}"
    print(f"{'attribute':26s} {'judged':>6s} {'K=1':>6s} {'shuffled':>8s} {best.upper().replace('K', 'K='):>6s} "
          f"{'target':>6s}")
    for name in ATTRIBUTES:
        row = [result["k1"][name], result["shuffled"][name], result[best][name]]
        cells = [f"{100 * r['agreement']:5.0f}%" if r["agreement"] is not None else "   n/a" for r in row]
        print(f"{name:26s} {row[0]['judged']:6d} {cells[0]:>6s} {cells[1]:>8s} {cells[2]:>6s} "
              f"{100 * TARGETS[name]:5.0f}%")
    print(f"median |HU - requested CT value|: K=1 {result['hu_error_median']['k1']} HU, {best.upper()} "
          f"{result['hu_error_median'][best]} HU; {result['lesions']} lesions, {result['seconds']:.0f} s")
    print(f"VQ encode-decode keeps {100 * result['first_stage']['median_contrast_kept']:.0f} % of a held-out lesion's "
          f"contrast with the liver (median of {result['first_stage']['lesions']} hypo- and hyperdense lesions)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-phrase", type=int, default=20, help="lesions per requested phrase, at least")
    parser.add_argument("--candidates", type=int, default=4, help="K of best of K")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddim", help="sampler of both stages")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per sample")
    parser.add_argument("--batch", type=int, default=16, help="lesions per UNet batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train the demo models again")
    parser.add_argument("--out", help="output folder (default demo/out/text_control)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    result = run(args)
    print(json.dumps(result))
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
