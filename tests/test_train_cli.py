"""main.py's command line without training: GPU ids, run folders and resume, torchrun settings, learning-rate
scaling, config overrides reaching the model, and LINet's refusal to start without a VQ checkpoint."""
from pathlib import Path

import pytest

import main
from ldm.cli import parse_gpus, split_overrides
from ldm.distributed import TORCHRUN_VARIABLES
from ldm.errors import ConfigError, MissingWeightsError

ROOT = Path(__file__).resolve().parents[1]
LMNET = ROOT / "pipeline" / "configs" / "demo" / "lmnet.yaml"
LINET = ROOT / "pipeline" / "configs" / "demo" / "linet.yaml"
SPLITS = {"train": "train", "validation": "val"}


def data_overrides(lists: Path, kinds: tuple[str, ...]) -> list[str]:
    """Point the demo config's data block at the test phantoms, with tiny crops."""
    items = []
    for split, prefix in SPLITS.items():
        items += [f"data.params.{split}.params.{kind}_list={lists}/{prefix}_{kind}_list.txt" for kind in kinds]
        items.append(f"data.params.{split}.params.crop_shape=[8,16,16]")
    return items


def options(*argv: str):
    arguments, overrides = split_overrides(list(argv))
    return main.build_parser().parse_args(arguments), overrides


def test_gpu_ids_are_ids_not_digit_counts():
    assert parse_gpus("0,1") == [0, 1]
    assert parse_gpus("10,11") == [10, 11]
    assert parse_gpus("3") == [3]
    assert parse_gpus("2,") == [2]
    for bad in ("a", "0;1", "", "1,1"):
        with pytest.raises(ConfigError):
            parse_gpus(bad)
    assert main.parse_devices("4") == 4 and main.parse_devices("-1") == -1 and main.parse_devices("auto") == "auto"


def test_overrides_are_taken_from_anywhere_on_the_command_line():
    opt, overrides = options("-b", "a.yaml", "model.params.x=3", "-t", "data.params.batch_size=2", "--gpus", "0,1")
    assert overrides == ["model.params.x=3", "data.params.batch_size=2"]
    assert opt.base == ["a.yaml"] and opt.train is True and opt.gpus == "0,1" and opt.scale_lr is True
    opt, _ = options("-b", "a.yaml", "-t", "false", "--scale_lr", "false")
    assert opt.train is False and opt.scale_lr is False


def test_run_folder_name_resume_and_refusal_to_overwrite(tmp_path):
    opt, _ = options("-b", str(LMNET), "-l", str(tmp_path), "-f", "_x")
    paths = main.resolve_run(opt)
    assert paths.run_dir == tmp_path / "lmnet_x" and paths.resume_checkpoint is None and paths.configs == [LMNET]

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    opt, _ = options("-r", str(run))
    with pytest.raises(ConfigError, match="no checkpoint and no saved configs"):
        main.resolve_run(opt)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / "checkpoints" / "epoch=000001.ckpt").write_bytes(b"x")
    for name in ("20240102T000000-project.yaml", "20240101T000000-project.yaml", "20240101T000000-lightning.yaml"):
        (run / "configs" / name).write_text("model: {}\n")
    (tmp_path / "extra.yaml").write_text("model: {}\n")
    paths = main.resolve_run(options("-r", str(run), "-b", str(tmp_path / "extra.yaml"))[0])
    assert paths.run_dir == run and paths.resume_checkpoint == run / "checkpoints" / "last.ckpt"
    assert [p.name for p in paths.configs] == ["20240101T000000-lightning.yaml", "20240101T000000-project.yaml",
                                               "20240102T000000-project.yaml", "extra.yaml"]
    paths = main.resolve_run(options("-r", str(run / "checkpoints" / "epoch=000001.ckpt"))[0])
    assert paths.run_dir == run and paths.resume_checkpoint.name == "epoch=000001.ckpt"

    with pytest.raises(ConfigError, match="cannot be combined"):
        main.resolve_run(options("-r", str(run), "-n", "other")[0])
    with pytest.raises(ConfigError, match="already holds a run"):
        main.resolve_run(options("-b", str(LMNET), "-l", str(tmp_path), "-n", "run")[0])
    with pytest.raises(ConfigError, match="no config given"):
        main.resolve_run(options("-l", str(tmp_path))[0])


def test_trainer_settings_follow_torchrun_and_the_flags(monkeypatch):
    for name in TORCHRUN_VARIABLES + ("GROUP_RANK",):
        monkeypatch.delenv(name, raising=False)
    opt, _ = options("--max_steps", "7", "--precision", "bf16-mixed")
    settings = main.trainer_settings(opt, {"max_epochs": 5, "max_steps": 1}, manual_optimization=False)
    assert settings == {"max_epochs": 5, "max_steps": 7, "precision": "bf16-mixed", "devices": 1}
    settings = main.trainer_settings(options("--gpus", "10,11")[0], {}, manual_optimization=True)
    assert settings == {"accelerator": "gpu", "devices": [10, 11], "strategy": "ddp_find_unused_parameters_true"}
    with pytest.raises(ConfigError, match="both given"):
        main.trainer_settings(options("--gpus", "0", "--devices", "2")[0], {}, manual_optimization=False)

    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("GROUP_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "8")
    settings = main.trainer_settings(options()[0], {}, manual_optimization=False)
    assert settings == {"devices": 4, "num_nodes": 2}
    with pytest.raises(ConfigError, match="nproc_per_node"):
        main.trainer_settings(options("--gpus", "0,1")[0], {}, manual_optimization=False)


def test_linet_refuses_to_start_without_a_vq_checkpoint(tmp_path, capsys):
    vq = tmp_path / "vq.ckpt"
    argv = ["-b", str(LINET), "-l", str(tmp_path / "logs"), f"model.params.first_stage_config.params.ckpt_path={vq}"]
    assert main.main(argv) == 1
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "Traceback" not in message
    assert str(vq) in message and "configs/autoencoder/lesiondiffusion_vq.yaml" in message
    assert "configs/demo/vq.yaml" in message
    assert not (tmp_path / "logs").exists()
    with pytest.raises(MissingWeightsError):
        main.main(argv + ["--debug"])

    config = main.load_config([LINET], [f"model.params.first_stage_config.params.ckpt_path={vq}"])
    vq.write_bytes(b"weights")
    main.check_first_stage(config.model)
    config = main.load_config([LINET], ["model.params.first_stage_config.params.ckpt_path=null",
                                        f"model.params.ckpt_path={vq}"])
    main.check_first_stage(config.model)
    without = main.weights_from_resume(config.model)
    assert without.params.ckpt_path is None and without.params.first_stage_config.params.ckpt_path is None
    assert config.model.params.ckpt_path == str(vq)


def test_overrides_reach_the_model_and_the_learning_rate_is_scaled(phantoms, tmp_path, caplog):
    kinds = ("image", "label", "type", "seg", "coarseg")
    opt, overrides = options("-b", str(LMNET), "-l", str(tmp_path), "--logger", "none",
                             "model.params.fg_loss_weight=3", "lightning.trainer.accumulate_grad_batches=2",
                             "data.params.batch_size=3", *data_overrides(phantoms, kinds))
    with caplog.at_level("INFO"):
        run = main.prepare(opt, overrides)
    assert run.model.fg_loss_weight == 3.0
    base = run.config.model.base_learning_rate
    assert run.model.learning_rate == pytest.approx(2 * 1 * 1 * 3 * base)
    assert f"{2 * 3 * base:.2e} = 2 (accumulate_grad_batches) x 1 (devices) x 1 (nodes) x 3 (batch size)" in caplog.text
    assert run.trainer.accumulate_grad_batches == 2 and run.trainer.logger is None
    assert not tmp_path.joinpath("lmnet").exists(), "nothing is written before fit"
    names = [type(callback).__name__ for callback in run.trainer.callbacks]
    for expected in ("SetupCallback", "LastCheckpoint", "ModelCheckpoint", "ImageLogger", "ResourceMonitor"):
        assert expected in names
    assert "LearningRateMonitor" not in names, "no logger, no learning-rate monitor"

    opt, overrides = options("-b", str(LMNET), "-l", str(tmp_path), "--scale_lr", "false",
                             "lightning.callbacks.image_logger=null", *data_overrides(phantoms, kinds))
    run = main.prepare(opt, overrides)
    assert run.model.learning_rate == pytest.approx(run.config.model.base_learning_rate)
    assert "ImageLogger" not in [type(callback).__name__ for callback in run.trainer.callbacks]


def test_base_is_found_in_pipeline_and_the_given_flags_are_recorded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt, _ = options("--base", "configs/demo/lmnet.yaml", "--max_steps", "20", "--every_n_train_steps", "5",
                     "--precision", "bf16-mixed", "--devices", "2")
    assert main.resolve_run(opt).configs == [LMNET]
    with pytest.raises(ConfigError, match="configs/demo/nope.yaml: config file not found"):
        main.resolve_run(options("--base", "configs/demo/nope.yaml")[0])
    config = main.load_config([LMNET])
    main.record_plan(config, opt)
    assert config.lightning.trainer.max_steps == 20 and config.lightning.trainer.precision == "bf16-mixed"
    assert config.lightning.trainer.max_epochs == 20, "the config's own value stays when no flag is given"
    assert "devices" not in config.lightning.trainer, "the hardware layout is not part of the plan"
    assert main.every_n_train_steps(config) == 5
    assert main.every_n_train_steps(main.load_config([LMNET])) == 50


def test_trainer_settings_follow_slurm_srun(monkeypatch):
    for name in TORCHRUN_VARIABLES + ("GROUP_RANK",):
        monkeypatch.delenv(name, raising=False)
    slurm = {"SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NAME": "lmnet", "SLURM_JOB_ID": "17",
             "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NODELIST": "gpu[01-02]"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert main.under_slurm() and main.launcher_layout() == (4, 2, "SLURM's --ntasks-per-node")
    assert main.trainer_settings(options()[0], {}, manual_optimization=False) == {"devices": 4, "num_nodes": 2}
    with pytest.raises(ConfigError, match="ntasks-per-node"):
        main.trainer_settings(options("--devices", "2")[0], {}, manual_optimization=False)
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: not an srun task
    assert not main.under_slurm() and main.launcher_layout() is None
