"""scripts/demo_curves.py, the demo's last step: both loss-by-loops curves in nats per token, gaps to T = 1, one PNG."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_demo_curves_puts_validation_and_held_out_losses_side_by_side(tmp_path):
    (tmp_path / "test_loops.json").write_text(json.dumps(
        {"mean_recurrence": 4, "results": [{"loops": 1, "loss": 5.0}, {"loops": 4, "loss": 4.8}]}))
    # held-out loss per token = total NLL / predicted tokens: 100/20 = 5.0 at T = 1, 90/20 = 4.5 at T = 4
    (tmp_path / "perplexity_book.json").write_text(json.dumps(
        {"results": [{"loops": 1, "nll": 100.0, "tokens": 20}, {"loops": 4, "nll": 90.0, "tokens": 20}]}))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_curves.py"), str(tmp_path), "book"],
                         capture_output=True, text=True, check=True, env={"COLUMNS": "200", "PATH": ""}).stdout
    row = next(line for line in out.splitlines() if line.strip("│ ").startswith("4 "))
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells == ["4", "4.8000", "+0.2000", "4.5000", "+0.5000"]
    assert (tmp_path / "demo_loops.png").stat().st_size > 1000 and f"plot: {tmp_path / 'demo_loops.png'}" in out
