"""``preprocess.py`` under ``torchrun`` with 2 CPU processes: the same files, lists and report as one process."""
import hashlib
import json
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "pipeline" / "preprocess.py"
ORGANS = ("liver", "kidney left", "spleen")  # three rows: the two ranks get 2 and 1


def run_preprocess(folder, exp, processes):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    command = [*launcher, str(SCRIPT), "imgs.txt", exp, "attrs.txt", "--seg-list", "segs.txt", "--seg-version", "v2",
               "--spacing", "3", "--reporter", "offline", "--seed", "5", "--no-progress"]
    environment = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    environment["OMP_NUM_THREADS"] = "1"
    finished = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=environment, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished.stdout


def test_two_processes_write_what_one_process_writes(totalseg_example, tmp_path):
    ct, seg = totalseg_example / "example_ct_sm.nii.gz", totalseg_example / "example_seg.nii.gz"
    (tmp_path / "imgs.txt").write_text(f"{ct}\n" * len(ORGANS))
    (tmp_path / "segs.txt").write_text(f"{seg}\n" * len(ORGANS))
    (tmp_path / "attrs.txt").write_text("".join(json.dumps({"organ type": organ, "lesion type": "cyst"}) + "\n"
                                                for organ in ORGANS))
    printed = {exp: run_preprocess(tmp_path, exp, processes) for exp, processes in (("one", 1), ("two", 2))}
    assert printed["two"].count("3 case(s): 3 done, 0 skipped, 0 failed") == 1     # rank 0 alone prints

    def contents(exp):
        files = sorted(path for path in (tmp_path / exp).rglob("*") if path.is_file())
        return {str(path.relative_to(tmp_path / exp)): hashlib.sha256(path.read_bytes()).hexdigest()
                for path in files if path.name not in ("preprocess_report.json", "preprocess.json")}

    one, two = contents("one"), contents("two")
    assert one == two and len([name for name in one if name.endswith("bbox.nii.gz")]) == len(ORGANS)
    reports = []
    for exp in ("one", "two"):   # the same report but for the folder name in the output paths and the timings
        text = (tmp_path / exp / "preprocess_report.json").read_text().replace(str(tmp_path / exp), "EXP")
        reports.append(json.loads(text)["cases"])
        for case in reports[-1]:
            case.pop("seconds")
    assert reports[0] == reports[1]
    assert [case["index"] for case in reports[1]] == [0, 1, 2] and all("EXP" in case["outputs"]["img"]
                                                                       for case in reports[1])
