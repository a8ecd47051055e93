"""The demo shows a lesion the quality gate rejected from where the gate moved it."""
import os

from demo.run_demo import rejected_path


def test_an_output_the_gate_moved_is_found_in_rejected_and_the_newest_copy_wins(tmp_path):
    case = tmp_path / "user_ct"
    (case / "rejected").mkdir(parents=True)
    kept = case / "inpainting_0_label.nii.gz"
    kept.write_bytes(b"label")
    assert rejected_path(kept) == kept                       # still in place: unchanged
    moved = case / "inpainting_0.nii.gz"
    older, newer = case / "rejected" / moved.name, case / "rejected" / f"{moved.name}~2"
    older.write_bytes(b"first run")
    newer.write_bytes(b"second run")
    os.utime(older, (1_000, 1_000))
    os.utime(newer, (2_000, 2_000))
    assert rejected_path(str(moved)) == newer                # moved aside twice: the later run's file
    missing = case / "samples_0.nii.gz"
    assert rejected_path(missing) == missing                 # neither place: the path as given
