"""Convert a checkpoint to safetensors, or say what a checkpoint file is.

    python pipeline/convert_checkpoint.py LINet.ckpt LINet.safetensors        # weights and EMA, same key names
    python pipeline/convert_checkpoint.py --info LINet.ckpt                   # which model, EMA, step, sizes
    python pipeline/convert_checkpoint.py --info my.ckpt --config my_model.yaml

A ``.safetensors`` file holds tensors only (no pickle, so reading it cannot run code) and is accepted wherever a
``.ckpt`` is: ``model.params.ckpt_path=LINet.safetensors``. The conversion keeps the ``state_dict`` (the model's
weights, the EMA weights ``model_ema.*``, the VQ and text tower inside LINet/LMNet) with unchanged key names, and
the epoch, global step and Lightning version as metadata; optimiser and callback states are left out. A module's
non-tensor extra state (the demo VocabularyEncoder's phrase map) travels as JSON in the metadata.

``--info`` compares the file's keys and shapes with the models of our release and demo configs (built on the
``meta`` device, so nothing is allocated) and with any ``--config`` given, names the one it fits (LMNet, LINet,
VQ, ...) and lists every key that would not load.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ldm.cli import add_version, examples, find_config, run_command  # noqa: E402
from ldm.errors import DataError  # noqa: E402
from ldm.fileio import atomic_path  # noqa: E402
from ldm.models.checkpoint import (  # noqa: E402
    SAFETENSORS_SUFFIX, TEST_ONLY_PREFIXES, encode_extra_state, model_key_shapes, read_checkpoint, state_dict_of,
    tensor_shape, version_dependent)
from ldm.util import load_config  # noqa: E402

# Our own models, by name: the config they are built from and key prefixes a file may hold beyond the model
# (a VQ training checkpoint holds its loss: LPIPS and discriminators, which inference never builds).
KNOWN_MODELS = (
    ("LMNet", "configs/diffusion/maskdiffusion.yaml", ()),
    ("LINet", "configs/diffusion/lesiondiffusion.yaml", ()),
    ("VQ", "configs/autoencoder/lesiondiffusion_vq.yaml", ("loss.",)),
    ("demo LMNet", "configs/demo/lmnet.yaml", ()),
    ("demo LINet", "configs/demo/linet.yaml", ()),
    ("demo VQ", "configs/demo/vq.yaml", ("loss.",)),
)
METADATA_KEYS = ("epoch", "global_step", "pytorch-lightning_version")
MEGABYTE = 1024 ** 2


@dataclass
class Fit:
    """How a state dict fits one model: keys the model lacks, keys the file lacks, and shape mismatches."""

    name: str
    config: str
    keys: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)


def model_shapes(config_file: str | Path) -> dict[str, tuple]:
    """Key -> shape of the ``model`` of a config, built on the meta device without reading any weight file."""
    return model_key_shapes(load_config([find_config(config_file)]).model)


def fit(state: Mapping[str, Any], name: str, config: str, shapes: Mapping[str, tuple],
        extra_prefixes: Sequence[str] = ()) -> Fit:
    """Compare a state dict with a model's key -> shape map, the way strict loading does."""
    result = Fit(name, config, len(shapes))
    for key, value in state.items():
        if key.startswith(tuple(extra_prefixes) + TEST_ONLY_PREFIXES) or (key not in shapes and version_dependent(key)):
            result.skipped.append(key)
        elif key not in shapes:
            result.unexpected.append(key)
        elif tensor_shape(value) != shapes[key]:
            result.mismatched.append(f"{key} {tensor_shape(value)} vs {shapes[key]}")
    result.missing = [key for key in shapes if key not in state and not version_dependent(key)]
    return result


def best_fit(state: Mapping[str, Any], configs: Sequence[str | Path] = ()) -> list[Fit]:
    """Every known model (and each of ``configs``) compared with ``state``, best fit first."""
    candidates = [(name, config, extra) for name, config, extra in KNOWN_MODELS]
    candidates += [(Path(config).name, str(config), ("loss.",)) for config in configs]
    fits = [fit(state, name, config, model_shapes(config), extra) for name, config, extra in candidates]
    return sorted(fits, key=lambda item: (item.problems, -item.keys))


def describe(path: str | Path, configs: Sequence[str | Path] = (), trust: bool | None = None) -> dict[str, Any]:
    """What the checkpoint at ``path`` is: format, size, tensors, parameters, EMA, step, and the model fits."""
    path = Path(path)
    content = read_checkpoint(path, trust)
    state = state_dict_of(content, str(path))
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    ema = [key for key in tensors if key.startswith("model_ema.")]
    if path.suffix == SAFETENSORS_SUFFIX:
        kind = "safetensors"
    else:
        kind = "Lightning checkpoint" if "state_dict" in content else "bare state dict"
    meta = content.get("metadata", {}) if path.suffix == SAFETENSORS_SUFFIX else content
    return {
        "path": str(path), "format": kind, "file_mb": round(path.stat().st_size / MEGABYTE, 1),
        "keys": len(state), "tensors": len(tensors), "parameters": sum(value.numel() for value in tensors.values()),
        "dtypes": sorted({str(value.dtype).replace("torch.", "") for value in tensors.values()}),
        "ema_tensors": len(ema),
        "ema_updates": int(tensors["model_ema.num_updates"]) if "model_ema.num_updates" in tensors else None,
        **{key: content.get(key, meta.get(key)) for key in METADATA_KEYS},
        "other_entries": sorted(key for key in content if key not in ("state_dict", "metadata", *METADATA_KEYS))
        if "state_dict" in content else [],
        "fits": best_fit(state, configs),
    }


def _listed(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def info_lines(info: Mapping[str, Any]) -> list[str]:
    """The ``--info`` report as text lines."""
    extra = info["keys"] - info["tensors"]
    extra_text = f" and {extra} non-tensor extra state entr{'y' if extra == 1 else 'ies'}" if extra else ""
    lines = [f"{info['path']}: {info['format']}, {info['file_mb']} MB, {info['keys']} keys: {info['tensors']} "
             f"tensors{extra_text}, {info['parameters']:,} values ({', '.join(info['dtypes'])})"]
    ema = (f"yes, {info['ema_tensors']} tensors (model_ema.*), {info['ema_updates']} updates"
           if info["ema_tensors"] else "no")
    lines.append(f"  EMA: {ema}")
    lines.append("  epoch {epoch}, global step {global_step}, Lightning {version}".format(
        epoch=info["epoch"], global_step=info["global_step"], version=info["pytorch-lightning_version"]))
    if info["other_entries"]:
        lines.append(f"  other entries (not needed for inference): {', '.join(info['other_entries'])}")
    best = info["fits"][0]
    if best.problems == 0:
        lines.append(f"  fits {best.name} ({best.config}): all {best.keys} keys load strictly")
    else:
        lines.append(f"  fits no known model; closest: {best.name} ({best.config}), {best.problems} key(s) "
                     f"would not load")
        for title, keys in (("missing from the file", best.missing), ("not in the model", best.unexpected),
                            ("shape differs (file vs model)", best.mismatched)):
            if keys:
                lines.append(f"    {title}: {_listed(keys)}")
    if best.skipped:
        lines.append(f"  not loaded (training-only or version-dependent): {_listed(best.skipped, 3)}")
    others = [f"{item.name} {item.problems}" for item in info["fits"][1:]]
    lines.append(f"  keys that would not load in the other models: {', '.join(others)}")
    return lines


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def convert(source: str | Path, target: str | Path, trust: bool | None = None) -> dict[str, Any]:
    """Write the weights and EMA of ``source`` to ``target`` (``.safetensors``) with the same key names and the
    epoch/step as metadata, atomically; returns ``{"tensors", "file_mb", "metadata"}``."""
    from safetensors.torch import save_file

    source, target = Path(source), Path(target)
    if target.suffix != SAFETENSORS_SUFFIX:
        raise DataError(f"{target}: the output must end in {SAFETENSORS_SUFFIX}")
    content = read_checkpoint(source, trust)
    state = state_dict_of(content, str(source))
    tensors, extra_state, storages = {}, {}, set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            extra_state[key] = value
            continue
        value = value.detach().contiguous()
        # safetensors refuses tensors that share or only partly use a storage: those are copied.
        shared = value.untyped_storage().data_ptr() in storages
        if shared or _storage_bytes(value) != value.numel() * value.element_size():
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    metadata = {"format": "pt", "source": source.name}
    if source.suffix == SAFETENSORS_SUFFIX:
        metadata.update(content["metadata"])
    else:
        metadata.update({key: str(content[key]) for key in METADATA_KEYS if content.get(key) is not None})
    metadata.update(encode_extra_state(extra_state, str(source)))
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
        temporary.chmod(0o666 & ~_umask())  # safetensors creates the file private (0600); a weights file is not
    return {"tensors": len(tensors), "file_mb": round(target.stat().st_size / MEGABYTE, 1), "metadata": metadata}


def build_parser() -> argparse.ArgumentParser:
    paragraphs = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        description="\n\n".join([paragraphs[0], *paragraphs[2:]]), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples("python pipeline/convert_checkpoint.py weights/LINet.ckpt weights/LINet.safetensors",
                        "python pipeline/convert_checkpoint.py --info weights/LINet.ckpt"))
    parser.add_argument("source", metavar="IN", help="a checkpoint: .ckpt (Lightning), a state dict, or .safetensors")
    parser.add_argument("target", metavar="OUT.safetensors", nargs="?", help="the safetensors file to write")
    parser.add_argument("--info", action="store_true", help="describe IN instead of converting it")
    parser.add_argument("--config", nargs="*", default=[], help="more model configs to compare IN with (--info)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="read IN with full unpickling (may run code from the file); only for a trusted source")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return add_version(parser)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns 0 on success, 1 with a one-line error otherwise."""
    return run_command(run, build_parser().parse_args(argv), "convert_checkpoint.py")


def run(args: argparse.Namespace) -> int:
    """Describe or convert for parsed arguments; returns the exit status."""
    trust = args.trust_checkpoint or None
    if args.info:
        print("\n".join(info_lines(describe(args.source, args.config, trust))))
        return 0
    if args.target is None:
        raise DataError("give OUT.safetensors to convert to, or --info to describe IN")
    written = convert(args.source, args.target, trust)
    print(f"wrote {args.target}: {written['tensors']} tensors, {written['file_mb']} MB "
          f"(step {written['metadata'].get('global_step', '-')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
