"""synthesize.py runs the quality gate by default: a CT whose lesion still fails after resampling is reported as
failed (table, summary, exit status), naming what disagrees, with its files kept in rejected/; one that passes
is done. The tolerances come from OUT/quality.toml, so the verdict is known by construction."""
from pathlib import Path

import pytest
from conftest import TOTALSEG_EXAMPLE, require_shared
from test_inference_fixtures import saved_test_configs

import synthesize

# Every check off but ``hu``, which no lesion passes at 0 HU: fails by construction, at the LINet stage only.
ONLY_HU_EXACT = '[tolerances]\nhu_abs = 0.0\ndisabled = ["density", "inside_organ", "volume", "extent", ' \
                '"components", "unchanged_outside", "attributes"]\n'
NOTHING_CHECKED = '[tolerances]\ndisabled = ["hu", "density", "inside_organ", "volume", "extent", "components", ' \
                  '"unchanged_outside", "attributes"]\n'


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return saved_test_configs(tmp_path_factory.mktemp("gate_configs"))


def command(configs, out: Path, *extra: str) -> list[str]:
    example = require_shared(TOTALSEG_EXAMPLE)
    return ["--ct", str(example / "example_ct_sm.nii.gz"), "--seg", str(example / "example_seg.nii.gz"),
            "--seg-version", "v2", "--organ", "liver", "--lesion", "cyst", "--out", str(out), "--spacing", "3",
            "--steps", "2", "--no-progress", "--lmnet-config", str(configs["lmnet"]),
            "--linet-config", str(configs["linet"]), *extra]


def test_a_ct_whose_lesion_still_fails_is_reported_failed_with_its_files_kept(configs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "quality.toml").write_text(ONLY_HU_EXACT)
    assert synthesize.main(command(configs, out, "--resample-failed", "1")) == 1
    printed = capsys.readouterr().out.splitlines()
    failed = next(line for line in printed if "FAILED in quality gate" in line)
    assert "lesion 0 failed hu" in failed and "rejected" in failed
    assert "      linet lesion 0: 2 round(s), 2 sample(s), disagree: hu" in printed
    assert "      lmnet box 0: 1 round(s), 1 sample(s), agrees" in printed
    assert printed[-1] == "synthesize: 1 CT(s), 0 done, 1 failed"
    rejected = out / "example_ct_sm" / "rejected"
    assert (rejected / "inpainting_0.nii.gz").is_file() and (rejected / "inpainting_0_label.nii.gz").is_file()
    assert not (out / "example_ct_sm" / "inpainting_0.nii.gz").exists()
    assert any(line.strip() == f"linet_rejected_image: {rejected / 'inpainting_0.nii.gz'}" for line in printed)


def test_a_ct_whose_lesions_pass_is_done_and_no_gate_skips_the_gate(configs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "quality.toml").write_text(NOTHING_CHECKED)
    assert synthesize.main(command(configs, out)) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "      linet lesion 0: 1 round(s), 1 sample(s), agrees" in printed
    assert printed[-1] == "synthesize: 1 CT(s), 1 done, 0 failed"
    assert (out / "quality.csv").is_file() and (out / "example_ct_sm" / "inpainting_0.nii.gz").is_file()
    skipped = tmp_path / "skipped"
    skipped.mkdir()
    (skipped / "quality.toml").write_text(ONLY_HU_EXACT)
    assert synthesize.main(command(configs, skipped, "--no-gate")) == 0     # what fails the gate counts as done
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == "synthesize: 1 CT(s), 1 done, 0 failed"
    assert not (skipped / "quality.csv").exists() and not any("round(s)" in line for line in printed)
