"""Inference over several processes: ``torchrun`` with 2 CPU processes writes the same files, bit for bit, as one
process; rank 0 merges the report and the lists in input order; a rerun after an interrupted run redoes only the
cases that run had not finished."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from test_inference_fixtures import inference_config, phantom_dataset, phantom_experiment, save_checkpoint

from ldm.data.volume import read_volume
from inference.cases import read_cases
from ldm.errors import ConfigError
from inference.devices import Placement, cpu_threads_per_process, launch_placement
from ldm.distributed import Launch, detect_launch, process_group, shard, slurm_tasks_on_node
from inference.journal import CaseJournal, run_fingerprint
from inference.options import parse_options
from inference.runner import load_model, run_inference, run_stage

ROOT = Path(__file__).resolve().parents[1]
TEST_PY = ROOT / "pipeline" / "test.py"
CASES = 3  # odd: the two ranks get 2 and 1 cases
OUTPUT = {"lmnet": "samples_0.nii.gz", "linet": "inpainting_0.nii.gz"}


def test_launch_from_torchrun_and_slurm_variables():
    assert detect_launch({}) == Launch()
    torchrun = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (torchrun.rank, torchrun.world, torchrun.local_rank, torchrun.launcher) == (3, 8, 1, "torchrun")
    slurm = detect_launch({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"})
    assert (slurm.rank, slurm.world, slurm.local_rank, slurm.launcher) == (5, 6, 2, "slurm")
    step = detect_launch({"SLURM_PROCID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2"})
    assert (step.world, step.is_main, step.distributed) == (2, False, True)
    assert shard(list("abcde"), Launch(1, 2)) == ["b", "d"]


def test_cpu_threads_are_shared_by_the_processes_of_one_node_not_the_whole_world():
    # torchrun on 4 nodes x 2 processes of 32 cores: each process gets 16 threads, not 32 // 8 = 4.
    torchrun = detect_launch({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (torchrun.local_world, torchrun.processes_on_node) == (2, 2)
    placement = launch_placement(5, 8, 1, 0, "same", local_world=torchrun.local_world)
    assert cpu_threads_per_process(32, placement.processes_on_node) == 16
    # srun with 3 tasks on node 0 and 3 on node 1, 2 on node 2 (SLURM's compressed list).
    slurm = detect_launch({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
                           "SLURM_STEP_TASKS_PER_NODE": "3(x2),2"})
    assert slurm.processes_on_node == 2
    assert [slurm_tasks_on_node("4(x2),3", node) for node in range(3)] == [4, 4, 3]
    with pytest.raises(ConfigError, match="tasks per node"):
        slurm_tasks_on_node("4x2", 0)
    # Unknown layout (no per-node count) or --gpus processes on one machine: the whole world shares the cores.
    assert Launch(1, 4).processes_on_node == 4
    assert Placement(1, 3, "cpu", "cpu").processes_on_node == 3
    assert [cpu_threads_per_process(16, n) for n in (1, 3, 16, 40)] == [16, 5, 1, 1]
    assert cpu_threads_per_process(None, 2) == 1


def test_each_launched_process_samples_on_the_gpu_of_its_local_rank():
    assert launch_placement(5, 8, 2, 4, "same") == Placement(5, 8, "cuda:2", "cuda:2")
    assert launch_placement(5, 8, 2, 1, "cpu") == Placement(5, 8, "cuda:0", "cpu")   # one GPU given per process
    assert launch_placement(1, 2, 1, 0, "same") == Placement(1, 2, "cpu", "cpu")
    with pytest.raises(ConfigError, match="local rank 3: only 2 GPU"):
        launch_placement(3, 4, 3, 2, "same")
    with pytest.raises(ConfigError, match="neighbour"):
        launch_placement(0, 2, 0, 4, "neighbour")
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        with process_group(Launch(1, 2, 1, "slurm"), environ={}):
            pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    phantoms = phantom_dataset(root / "phantoms")
    configs = {}
    for stage in ("lmnet", "linet"):
        configs[stage] = root / f"{stage}_test.yaml"
        OmegaConf.save(inference_config(stage, save_checkpoint(stage, root / f"{stage}.ckpt"), None), configs[stage])
    return root, phantoms, configs


def run_test_py(root: Path, config: Path, exp: str, processes: int) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    environment = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    environment.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    command = [*launcher, str(TEST_PY), "--base", str(config), "--exp", exp, "--no-preview"]
    finished = subprocess.run(command, cwd=root, capture_output=True, text=True, env=environment, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished


def test_two_torchrun_processes_write_what_one_process_writes(setup):
    root, phantoms, configs = setup
    for exp in ("one", "two"):
        phantom_experiment(root / exp, phantoms, cases=CASES)
    printed = {}
    for stage in ("lmnet", "linet"):
        for exp, processes in (("one", 1), ("two", 2)):
            printed[exp] = run_test_py(root, configs[stage], exp, processes).stdout
        assert printed["two"].count(f"{stage}: {CASES} case(s), {CASES} done, 0 failed") == 1   # rank 0 alone
        reports = {exp: json.loads((root / exp / f"{stage}_report.json").read_text()) for exp in ("one", "two")}
        assert [case["case_id"] for case in reports["two"]["cases"]] == \
            [case["case_id"] for case in reports["one"]["cases"]]                                  # input order
        for alone, shared in zip(reports["one"]["cases"], reports["two"]["cases"]):
            assert shared["status"] == "done" and Path(shared["outputs"]["image" if stage == "linet" else "mask"]
                                                       ).name == OUTPUT[stage]
            assert [lesion["seed"] for lesion in shared["lesions"]] == [lesion["seed"] for lesion in alone["lesions"]]
            first = read_volume(root / "one" / alone["case_id"] / OUTPUT[stage])[0]
            second = read_volume(root / "two" / shared["case_id"] / OUTPUT[stage])[0]
            np.testing.assert_array_equal(first, second)
            assert (root / "one" / alone["case_id"] / OUTPUT[stage]).read_bytes() == \
                (root / "two" / shared["case_id"] / OUTPUT[stage]).read_bytes()
        assert not (root / "two" / f"{stage}_progress").exists()          # the journal of a completed run is gone
    assert (root / "one" / "label_list.txt").read_text() == (root / "two" / "label_list.txt").read_text()


def test_rerun_after_an_interrupted_run_redoes_only_the_missing_cases(setup, tmp_path):
    root, phantoms, configs = setup
    exp_dir = phantom_experiment(tmp_path / "exp", phantoms, cases=CASES)
    config = OmegaConf.load(configs["lmnet"])
    config.inference.exp_dir = str(exp_dir)
    options = parse_options(config.inference, "lmnet")
    fingerprint = run_fingerprint(OmegaConf.to_container(config.model), asdict(options))
    journal = CaseJournal.for_run(exp_dir, "lmnet", fingerprint)
    cases = read_cases(exp_dir, dict(options.lists))
    # An interrupted run: the first two cases were done and recorded, then the process died.
    interrupted = run_stage(load_model(config), "lmnet", cases[:2], options, journal=journal)
    written = {case.case_id: (case.out_dir / OUTPUT["lmnet"]).stat().st_mtime_ns for case in cases[:2]}
    assert sorted(path.name for path in journal.folder.iterdir()) == ["000000.json", "000001.json"]
    assert sorted(journal.finished(cases)) == [0, 1]
    other_seed = run_fingerprint(OmegaConf.to_container(config.model), asdict(options.with_overrides(seed=8)))
    assert CaseJournal(journal.folder, other_seed).finished(cases) == {}      # other settings: redo everything
    moved = shutil.move(cases[1].out_dir / OUTPUT["lmnet"], tmp_path / "aside.nii.gz")
    assert sorted(journal.finished(cases)) == [0]                                # an output gone: redo that case
    shutil.move(moved, cases[1].out_dir / OUTPUT["lmnet"])

    outcome = run_inference(config)
    assert [result.case_id for result in outcome.results] == [case.case_id for case in cases]
    assert all(result.ok for result in outcome.results)
    for case in cases[:2]:   # kept, not redone: no second file, the first untouched
        assert not (case.out_dir / "samples_1.nii.gz").exists()
        assert (case.out_dir / OUTPUT["lmnet"]).stat().st_mtime_ns == written[case.case_id]
    assert [lesion.seed for lesion in outcome.results[0].lesions] == [lesion.seed for lesion in interrupted[0].lesions]
    assert (cases[2].out_dir / OUTPUT["lmnet"]).is_file() and not journal.folder.exists()
    report = json.loads(outcome.report_path.read_text())
    assert [case["status"] for case in report["cases"]] == ["done"] * CASES

    again = run_inference(config)   # a completed run leaves no journal: the next run is a new one
    assert all(Path(result.outputs["mask"]).name == "samples_1.nii.gz" for result in again.results)


def test_slurm_without_tasks_per_node_divides_the_tasks_over_the_nodes_and_shard_takes_any_placement():
    launch = detect_launch({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
                            "SLURM_LOCALID": "1"})
    assert (launch.launcher, launch.rank, launch.world, launch.processes_on_node, launch.nodes) == ("slurm", 5, 8, 4, 2)
    torchrun = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"})
    assert (torchrun.processes_on_node, torchrun.nodes) == (4, 2)

    class Placement:  # what inference.runner shards by: anything with rank and world
        rank, world = 1, 3

    assert shard(list(range(8)), Placement()) == [1, 4, 7]
