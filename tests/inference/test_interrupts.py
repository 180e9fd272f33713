"""Ctrl-C and SIGTERM on long verbs, as a user sends them: real ``parcae`` processes, interrupted once work is under
way (after a progress line or a checkpoint), end with one line and status 130 / 143, no traceback; a result file
being written stays ``<name>.partial`` holding exactly the finished records the message counts; an existing
``--output`` is refused before any work."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import write_recipe
from parcae.runs.rundir import newest_good_checkpoint
from test_generate_cli import make_run

ROOT = Path(__file__).resolve().parents[2]
STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
WORDS = {signal.SIGINT: "interrupted (SIGINT)", signal.SIGTERM: "terminated (SIGTERM)"}
PROMPTS = 40


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "LITDATA_DISABLE_VERSION_CHECK": "1"}
    return subprocess.Popen([sys.executable, "-m", "parcae", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def interrupt_when(proc: subprocess.Popen, ready, signum: int, timeout: float = 240) -> tuple[int, list[str]]:
    """Collect the process's output until ``ready(lines)`` holds, send ``signum``, return (status, all lines)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while not ready(lines):
            if proc.poll() is not None:
                reader.join(5)
                pytest.fail("the process ended before it was interrupted:\n" + "\n".join(lines))
            assert time.monotonic() < deadline, "no progress in time:\n" + "\n".join(lines)
            time.sleep(0.05)
        proc.send_signal(signum)
        proc.wait(timeout=60)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, lines


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    ckpt, _ = make_run(root, "parcae")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"ROMEO {i}:"}) + "\n" for i in range(PROMPTS)))
    return ckpt, prompts


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_generate_interrupted_keeps_the_finished_records_as_partial(run, tmp_path, signum):
    ckpt, prompts = run
    out = tmp_path / "out.jsonl"
    proc = start(["generate", "--ckpt_path", str(ckpt), "--prompts", str(prompts), "--output", str(out),
                  "--batch_size", "1", "--max_new_tokens", "40", "--device", "cpu"])
    status, lines = interrupt_when(proc, lambda lines: f"[generate] 2/{PROMPTS} prompts" in lines, signum)
    assert status == STATUS[signum], lines
    assert not any("Traceback" in line for line in lines), lines
    message = lines[-1]
    assert message.startswith(f"parcae generate: {WORDS[signum]}; "), lines
    assert not out.exists()  # the final name only ever holds a complete file
    kept = re.search(r"(\S+\.partial) keeps the (\d+) of (\d+) finished records", message)
    assert kept and Path(kept.group(1)) == tmp_path / "out.jsonl.partial" and int(kept.group(3)) == PROMPTS, message
    records = [json.loads(r) for r in Path(kept.group(1)).read_text().splitlines()]
    assert len(records) == int(kept.group(2)) >= 2  # what the message counts, all whole JSON records
    assert [r["prompt"] for r in records] == [f"ROMEO {i}:" for i in range(len(records))]


def test_generate_refuses_an_existing_output_before_any_work(run, tmp_path):
    from parcae.cli import main

    ckpt, prompts = run
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    with pytest.raises(SystemExit) as info:
        main(["generate", "--ckpt_path", str(ckpt), "--prompts", str(prompts), "--output", str(out)])
    assert str(info.value) == (f"parcae generate: error: --output {out} already exists; pass --overwrite to replace "
                               "it, or choose another name")
    assert out.read_text() == "earlier results\n"
    main(["generate", "--ckpt_path", str(ckpt), "--prompts", str(prompts), "--output", str(out), "--overwrite",
          "--max_new_tokens", "2", "--batch_size", "40", "--device", "cpu"])
    assert len(out.read_text().splitlines()) == PROMPTS and not (tmp_path / "out.jsonl.partial").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_fit_interrupted_mid_training_ends_with_one_line(tmp_path, small_shards, signum):
    recipe = write_recipe(tmp_path / "tiny.yaml", small_shards, tmp_path / "runs", max_steps=100000)
    run_dir = tmp_path / "runs" / "tiny"
    proc = start(["fit", "--config", str(recipe)])
    # a checkpoint is on disk, so training is under way; the signal lands within the next steps
    status, lines = interrupt_when(proc, lambda lines: (run_dir / "step=0000004.ckpt").exists(), signum)
    assert status == STATUS[signum], lines
    assert not any("Traceback" in line for line in lines), lines
    assert lines[-1] == f"parcae fit: {WORDS[signum]}; resume with the same command and --ckpt_path last", lines
    leftovers = [p.name for p in run_dir.iterdir() if ".tmp" in p.name]
    assert not leftovers, leftovers  # no half-written checkpoint: the resume starts from the newest good one
    assert newest_good_checkpoint(run_dir) is not None
