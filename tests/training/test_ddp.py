"""Two DDP processes (gloo, CPU) train exactly like one process on the same global batch: per-sequence depths
and initial-state noise follow each sequence, gradients are averaged, every step's loss agrees."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "ddp_equivalence.py"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_matches_one_process(tmp_path):
    for devices in (1, 2):
        result = subprocess.run([sys.executable, str(SCRIPT), "--devices", str(devices), "--out",
                                 str(tmp_path / f"d{devices}")], capture_output=True, text=True, timeout=300,
                                cwd=SCRIPT.parent)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = json.loads((tmp_path / "d1.json").read_text())
    two = json.loads((tmp_path / "d2.json").read_text())
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, abs=2e-5)
