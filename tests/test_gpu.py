"""What only a GPU can show (``pytest -m gpu``; skipped with the reason when no CUDA device is visible), each next to
its CPU twin, which runs the same set-up and checks in ``make test`` so a GPU run cannot die on something the CPU
could have shown. Tiny random models; nothing here needs TotalSegmentator or an LLM client.

Tolerances: autocast sampling against float32 (10 DDIM steps, eta 1, same noise), max |difference| / std of the
float32 sample below ``AUTOCAST_TOLERANCE``: 0.2 for bf16 (8 bits of mantissa), 0.05 for fp16 (11 bits); measured
with CPU autocast 0.045 / 0.094 (LMNet / LINet) in bf16 and 0.0055 / 0.012 in fp16;
streamed VQ decoding on the GPU against the CPU within 1e-4 with TF32 off (cuDNN's default TF32 convolutions round
inputs to 10 bits, about 1e-3).
"""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from test_diffusion import lesion_batch, tiny_lmnet
from test_inference_fixtures import (
    TINY_VQ, inference_config, model_block, phantom_dataset, phantom_experiment, randomise, save_checkpoint,
)
from test_inpainting import image_batch, tiny_linet

from ldm.models.autoencoder import VQModelInterface
from ldm.models.diffusion import samplers
from ldm.models.diffusion.samplers import SamplerSettings
from ldm.util import instantiate_from_config
from inference.cases import read_cases
from inference.devices import launch_placement, plan_placements
from inference.lmnet import sample_masks
from inference.options import parse_options
from inference.runner import load_model, run_inference

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device visible (run pytest -m gpu on a GPU machine)")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="vq_device neighbour needs two visible GPUs")
AUTOCAST_TOLERANCE = {torch.bfloat16: 0.2, torch.float16: 0.05}
OVERSIZED_BYTES = 1 << 50  # 1 PiB: no device holds it, so the allocation itself fails


# ------------------------------------------------------------------------------------------ checks
def train_one_step(stage: str, accelerator: str, precision: str) -> None:
    """One Lightning training step of a tiny LMNet or LINet: the step runs, the loss is finite, weights move."""
    torch.manual_seed(0)
    model, batch = (tiny_lmnet(), lesion_batch(2)) if stage == "lmnet" else (tiny_linet(), image_batch())
    before = [parameter.detach().clone() for parameter in model.model.parameters()]
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(model, torch.utils.data.DataLoader([batch], batch_size=None))
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    after = [parameter.detach().cpu() for parameter in model.model.parameters()]
    assert any(not torch.equal(old, new) for old, new in zip(before, after))


def autocast_gap(stage: str, device: torch.device, dtype: torch.dtype) -> float:
    """max |autocast sample - float32 sample| / std(float32 sample), same seed, DDIM eta 1 (the release sampler)."""
    torch.manual_seed(0)
    model = instantiate_from_config(model_block(stage))
    randomise(model)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(1)
    if stage == "lmnet":
        inputs = [(torch.rand(1, 3, 8, 16, 16, generator=generator) > 0.5).float().to(device)]
    else:
        mask = torch.zeros(1, 1, 8, 8, 8, device=device)
        mask[..., 2:6, 2:6, 2:6] = 1
        inputs = [torch.randn(1, 4, 8, 8, 8, generator=generator).to(device), mask]
    context = model.encode_context([{"shape": "round-like,", "density": "low density lesion,"}])
    sampling = SamplerSettings("ddim", steps=10, eta=1.0)
    reference = model.sample(*inputs, context, sampling, generator=torch.Generator().manual_seed(2))
    with torch.autocast(device.type, dtype=dtype):
        low = model.sample(*inputs, context, sampling, generator=torch.Generator().manual_seed(2))
    return float((low.float() - reference).abs().max() / reference.std())


def streamed_decode_gap(device: torch.device) -> float:
    """max |streamed decode on ``device`` - whole decode on the CPU| of one random latent (tiny VQ)."""
    torch.manual_seed(0)
    vq = VQModelInterface(**TINY_VQ["params"]).eval()
    latent = torch.randn(1, 4, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        on_cpu = vq.decode(latent)
        streamed = vq.to(device).decode_streamed(latent.to(device), tile=4).cpu()
    return float((streamed - on_cpu).abs().max())


def experiment(root, stage_device: str, **inference):
    """An experiment of two phantom cases and the LMNet config of a tiny random model on ``stage_device``."""
    exp_dir = phantom_experiment(root / "exp", phantom_dataset(root / "phantoms"), cases=2)
    config = inference_config("lmnet", save_checkpoint("lmnet", root / "lmnet.ckpt"), exp_dir, steps=2,
                              attempts=1, device=stage_device, **inference)
    return exp_dir, config


def masks_on_rank_device(root, visible_gpus: int) -> list[str]:
    """For each local rank of this node, the placement torchrun/srun gives it, the model loaded there and its
    LMNet masks; returns the devices the models ended on."""
    exp_dir, config = experiment(root, "auto")
    options = parse_options(config.inference, "lmnet")
    devices = []
    for local_rank in range(max(1, visible_gpus)):
        placement = launch_placement(local_rank, max(1, visible_gpus), local_rank, visible_gpus, "same")
        model = load_model(config, placement.device, placement.vq_device)
        devices.append(str(next(model.parameters()).device))
        results = sample_masks(model, read_cases(exp_dir, dict(options.lists)), options)
        assert all(result.ok for result in results), [result.error for result in results]
    return devices


def both_stages(root, device: str, vq_device: str, gpus=()) -> None:
    """LMNet then LINet through the runner on ``device`` with the VQ on ``vq_device``; every case must succeed."""
    exp_dir, lmnet = experiment(root, device)
    linet = inference_config("linet", save_checkpoint("linet", root / "linet.ckpt"), exp_dir, steps=2,
                             device=device, vq_device=vq_device)
    for config in (lmnet, linet):
        outcome = run_inference(config, gpus=gpus)
        assert not outcome.failed, [result.error for result in outcome.failed]


def one_case_out_of_memory(root, device: str, monkeypatch) -> list:
    """The first sampler step of the first case asks ``device`` for 1 PiB; returns both cases' results."""
    exp_dir, config = experiment(root, device)
    options = parse_options(config.inference, "lmnet")
    model = load_model(config, device)
    step, asked = samplers.DDIMSampler.step, []

    def oversized_once(self, eps, index, x, generator=None):
        if not asked:
            asked.append(True)
            torch.empty(OVERSIZED_BYTES, dtype=torch.uint8, device=x.device)
        return step(self, eps, index, x, generator)

    monkeypatch.setattr(samplers.DDIMSampler, "step", oversized_once)
    return sample_masks(model, read_cases(exp_dir, dict(options.lists)), options)


# ------------------------------------------------------------------------------------------ GPU tests
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("stage", ["lmnet", "linet"])
def test_gpu_training_step_in_mixed_precision(stage, precision):
    train_one_step(stage, "gpu", precision)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("stage", ["lmnet", "linet"])
def test_gpu_autocast_sampling_agrees_with_float32(stage, dtype):
    assert autocast_gap(stage, torch.device("cuda"), dtype) < AUTOCAST_TOLERANCE[dtype]


@pytest.mark.gpu
@needs_cuda
def test_gpu_streamed_vq_decode_equals_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert streamed_decode_gap(torch.device("cuda")) < 1e-4


@pytest.mark.gpu
@needs_cuda
def test_gpu_each_local_rank_samples_on_its_own_gpu(tmp_path):
    assert masks_on_rank_device(tmp_path, torch.cuda.device_count()) == \
        [f"cuda:{rank}" for rank in range(torch.cuda.device_count())]


@pytest.mark.gpu
@needs_two
def test_gpu_vq_on_the_neighbour_gpu(tmp_path):
    placement = plan_placements([0], torch.cuda.device_count(), "neighbour")[0]
    assert (placement.device, placement.vq_device) == ("cuda:0", "cuda:1")
    both_stages(tmp_path, "auto", "neighbour", gpus=[0])


@pytest.mark.gpu
@needs_cuda
def test_gpu_out_of_memory_fails_only_that_case(tmp_path, monkeypatch):
    first, second = one_case_out_of_memory(tmp_path, "cuda", monkeypatch)
    assert first.status == "failed" and "CUDA out of memory while trying to allocate" in first.error
    assert second.ok


# ------------------------------------------------------------------------------------------ CPU twins
@pytest.mark.parametrize("stage", ["lmnet", "linet"])
def test_cpu_training_step_in_bf16_mixed(stage):
    train_one_step(stage, "cpu", "bf16-mixed")


@pytest.mark.parametrize("stage", ["lmnet", "linet"])
def test_cpu_autocast_sampling_agrees_with_float32(stage):
    assert autocast_gap(stage, torch.device("cpu"), torch.bfloat16) < AUTOCAST_TOLERANCE[torch.bfloat16]


def test_cpu_streamed_vq_decode_equals_the_whole_decode():
    assert streamed_decode_gap(torch.device("cpu")) < 1e-4


def test_cpu_rank_placement_without_gpus_samples_on_the_cpu(tmp_path):
    assert masks_on_rank_device(tmp_path, 0) == ["cpu"]


def test_cpu_both_stages_with_the_vq_on_the_cpu(tmp_path):
    both_stages(tmp_path, "cpu", "cpu")


def test_cpu_oversized_allocation_fails_only_that_case(tmp_path, monkeypatch):
    first, second = one_case_out_of_memory(tmp_path, "cpu", monkeypatch)
    assert first.status == "failed" and "allocate" in first.error
    assert second.ok
