"""The one rule for "which checkpoint of a run" (parcae.runs.newest_checkpoint) on hand-made run directories: the
good checkpoint with the highest recorded step; last.ckpt is a pointer, not a competitor; staging files and
damaged files are passed over with a note. (Real `parcae fit` runs of the same rule: tests/training/.)"""

import os

import pytest
import torch

from parcae.runs import CheckpointError, newest_checkpoint


def _checkpoint(path, step):
    torch.save({"state_dict": {}, "hyper_parameters": {"arch": {"name": "tiny"}}, "global_step": step}, path)


# files of the run directory (name -> recorded step, or "damaged"/"staging") -> (chosen, its step, note fragment)
CASES = {
    "last is newest": ({"last.ckpt": 12, "step=0000008.ckpt": 8, "step=0000012.ckpt": 12}, "last.ckpt", 12, None),
    "kill during last's write after step 10": ({"last.ckpt": 5, "step=0000010.ckpt": 10, ".last.ckpt.tmp-77": "staging"},
                                              "step=0000010.ckpt", 10, "last.ckpt holds step 5"),
    "no last": ({"step=0000004.ckpt": 4, "step=0000008.ckpt": 8}, "step=0000008.ckpt", 8, "there is no last.ckpt"),
    "damaged newest step": ({"last.ckpt": 8, "step=0000012.ckpt": "damaged"}, "last.ckpt", 8, None),
    "damaged last": ({"last.ckpt": "damaged", "step=0000008.ckpt": 8}, "step=0000008.ckpt", 8, "truncated"),
    "a -v1 copy of an old moved run": ({"last.ckpt": 20, "last-v1.ckpt": 30, "step=0000025-v1.ckpt": 25},
                                       "last-v1.ckpt", 30, "last.ckpt holds step 20"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_newest_good_checkpoint_by_step_is_chosen(tmp_path, case):
    files, chosen, step, note = CASES[case]
    for name, value in files.items():
        if value == "damaged":
            _checkpoint(tmp_path / name, 99)
            data = (tmp_path / name).read_bytes()
            (tmp_path / name).write_bytes(data[: len(data) // 2])
        elif value == "staging":
            (tmp_path / name).write_bytes(b"PK\x03\x04" + os.urandom(64))
        else:
            _checkpoint(tmp_path / name, value)
    found = newest_checkpoint(tmp_path)
    assert (found.path.name, found.step) == (chosen, step)
    if note is None:
        assert found.note is None
    else:
        assert note in found.note, found.note
    damaged = {n for n, v in files.items() if v == "damaged"}
    assert {p.name for p in found.unreadable} == damaged


def test_no_good_checkpoint_is_one_line_naming_each_file(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"")
    (tmp_path / "step=0000004.ckpt").write_bytes(os.urandom(100))
    with pytest.raises(CheckpointError) as info:
        newest_checkpoint(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "last.ckpt" in message and "step=0000004.ckpt" in message
