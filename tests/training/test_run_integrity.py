"""Nothing lost, nothing misleading: every way a user can hand parcae a bad option, a damaged file or a full disk
ends in a short message and a non-zero exit, with no traceback, and the run directory unchanged where nothing
should change. Plus the run lock (one writer per run) and resume from the newest checkpoint that loads.

    pytest tests/training/test_run_integrity.py -q

Commands run in-process through ``parcae.cli.main`` (the same code path as the console script, without paying
the import time per case); one tiny trained run is shared by the cases and copied where a case must change it.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import write_recipe
from parcae.cli import main

PROTECTED = ("config.yaml", "hparams.yaml")


def files_of(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its sha256: equal snapshots mean a byte-identical folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def protected_files(run_dir: Path) -> dict[str, str]:
    """The training record: config, hyperparameters and every checkpoint."""
    snap = files_of(run_dir)
    return {k: v for k, v in snap.items() if k in PROTECTED or k.endswith(".ckpt")}


def run(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, what the command printed to stdout and stderr plus its exit message). A traceback, i.e. any
    exception other than SystemExit, fails the calling test by propagating."""
    capsys.readouterr()
    code, message = 0, ""
    try:
        main([str(a) for a in argv])
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            code, message = 1, exit_.code
        else:
            code = exit_.code or 0
    captured = capsys.readouterr()
    return code, "\n".join(s for s in (captured.out, captured.err, message) if s.strip())


def assert_one_line_error(code: int, output: str, *fragments: str, max_lines: int = 3) -> str:
    assert code != 0, output
    assert "Traceback" not in output, output
    error_lines = [line for line in output.splitlines() if "error" in line.lower()]
    assert error_lines, output
    last = error_lines[-1]
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    assert len([line for line in output.splitlines() if line.strip()]) <= max_lines, output
    assert "weights_only" not in output
    return last


# -- a shared tiny run -------------------------------------------------------------------------------------------
@pytest.fixture
def trained(tiny_run):
    return tiny_run  # the session's shared 12-step run (conftest.tiny_run); cases that change it use run_copy


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run (and a recipe pointing at it) for cases that change it."""
    _, _, run_dir = trained
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "tiny")
    recipe = write_recipe(tmp_path / "tiny.yaml", _datasets(run_dir), runs)
    return recipe, runs / "tiny"


def _datasets(run_dir: Path) -> Path:
    import yaml

    datasets = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["datasets"]
    return Path(datasets if isinstance(datasets, str) else datasets[0])


def _damaged(tmp_path: Path, kind: str, good: Path) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "foreign":
        import torch

        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "other-model":  # a checkpoint of another architecture (d_model 64 instead of the recipe's 32)
        import torch

        from conftest import TINY_ARCH
        from parcae.model import LoopedLM, ModelConfig
        from parcae.runs import lightning_checkpoint

        other = ModelConfig(**{**TINY_ARCH, "name": "other-model", "d_model": 64, "d_ff": 128})
        torch.save(lightning_checkpoint(LoopedLM(other)), path)
    return path


# -- 1. only fit writes a run directory ------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["validate"],
    ["test", "--loops", "1,2"],
    ["predict", "--prompt", "alpha", "--max_new_tokens", "3", "--temperature", "0"],
], ids=["validate", "test", "predict"])
def test_evaluation_verbs_leave_the_training_record_alone(trained, capsys, argv):
    _, _, run_dir = trained
    before = protected_files(run_dir)
    code, output = run([argv[0], "--ckpt_path", run_dir / "step=0000008.ckpt", *argv[1:]], capsys)
    assert code == 0, output
    assert protected_files(run_dir) == before
    assert not list(run_dir.glob(".*config*.yaml"))  # no derived config beside the checkpoint


def test_test_outputs_record_the_checkpoint_step(trained, capsys):
    _, _, run_dir = trained
    code, output = run(["test", "--ckpt_path", run_dir / "step=0000008.ckpt", "--loops", "1,2"], capsys)
    assert code == 0, output
    assert json.loads((run_dir / "test_loops.json").read_text())["global_step"] == 8


# -- the table: (command, expected message fragments); every case must exit non-zero in a few lines -------------
# "{run}" is the shared run directory, "{recipe}" its recipe, "{tmp}" a fresh folder for this case.
CASES = {
    # checkpoints named by the user
    "test a truncated checkpoint": (["test", "--ckpt_path", "{tmp}/truncated.ckpt"], ["truncated.ckpt", "truncated"]),
    "test a random file": (["test", "--ckpt_path", "{tmp}/random.ckpt"], ["random.ckpt", "not a PyTorch checkpoint"]),
    "test a foreign torch file": (["test", "--ckpt_path", "{tmp}/foreign.ckpt"], ["foreign.ckpt", "not a Lightning"]),
    "validate an empty file": (["validate", "--ckpt_path", "{tmp}/empty.ckpt"], ["empty.ckpt"]),
    "test a missing checkpoint": (["test", "--ckpt_path", "{tmp}/missing.ckpt"], ["missing.ckpt"]),
    "fit from a random file": (["fit", "--config", "{recipe}", "--run_name", "fresh", "--ckpt_path",
                                "{tmp}/random.ckpt"], ["random.ckpt"]),
    "perplexity of a truncated checkpoint": (["perplexity", "--ckpt_path", "{tmp}/truncated.ckpt", "--text",
                                              "{tmp}/text.txt"], ["truncated.ckpt"]),
    # options out of range
    "batch size 0": (["fit", "--config", "{recipe}", "--run_name", "fresh", "--data.batch_size", "0"],
                     ["batch_size"]),
    "val_every 0": (["fit", "--config", "{recipe}", "--run_name", "fresh", "--val_every", "0"], ["--val_every"]),
    "checkpoint_every 0": (["fit", "--config", "{recipe}", "--run_name", "fresh", "--checkpoint_every", "0"],
                           ["--checkpoint_every"]),
    "max_new_tokens -5": (["predict", "--ckpt_path", "{run}/last.ckpt", "--max_new_tokens", "-5"],
                          ["--max_new_tokens"]),
    "temperature -1": (["predict", "--ckpt_path", "{run}/last.ckpt", "--temperature", "-1"], ["--temperature"]),
    "top_k -5": (["predict", "--ckpt_path", "{run}/last.ckpt", "--top_k", "-5"], ["--top_k"]),
    "test loops empty": (["test", "--ckpt_path", "{run}/last.ckpt", "--loops", ","], ["--loops"]),
    "perplexity window 0": (["perplexity", "--ckpt_path", "{run}/last.ckpt", "--text", "{tmp}/text.txt",
                             "--window", "0"], ["--window"]),
    "perplexity loops empty": (["perplexity", "--ckpt_path", "{run}/last.ckpt", "--text", "{tmp}/text.txt",
                                "--loops", ""], ["--loops"]),
    # resume that would change what the run is
    "resume with another model": (["fit", "--config", "{recipe}", "--ckpt_path", "last", "--model.arch.d_model",
                                   "64", "--model.arch.d_ff", "128"], ["d_model"]),
    "resume with another batch size": (["fit", "--config", "{recipe}", "--ckpt_path", "last",
                                        "--data.batch_size", "2"], ["batch_size", "4", "2"]),
    "fit again without resuming": (["fit", "--config", "{recipe}"], ["already holds"]),
    "fit from another model's checkpoint": (["fit", "--config", "{recipe}", "--run_name", "fresh", "--ckpt_path",
                                            "{tmp}/other-model.ckpt", "--inexact_data_resume", "true"],
                                           ["other-model.ckpt", "'other-model'", "'tiny-parcae'", "d_model 64 vs 32"]),
    # files and names given to the other verbs
    "unknown preset": (["model", "parcae-999m", "--meta"], ["parcae-999m"]),
    "missing sweep file": (["sweep", "{tmp}/missing.yaml"], ["missing.yaml"]),
    "missing scaling csv": (["scaling-law", "{tmp}/missing.csv"], ["missing.csv"]),
    "missing text file": (["perplexity", "--ckpt_path", "{run}/last.ckpt", "--text", "{tmp}/missing.txt"],
                          ["missing.txt"]),
    "loop fit of a fixed-depth result": (["fit-loops", "{tmp}/gpt_loops.json"], ["gpt_loops.json"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(trained, tmp_path, capsys, name):
    root, recipe, run_dir = trained
    argv_template, fragments = CASES[name]
    for kind in ("truncated", "random", "foreign", "empty", "other-model"):
        _damaged(tmp_path, kind, run_dir / "step=0000004.ckpt")
    (tmp_path / "text.txt").write_text("alpha beta gamma delta. " * 40)
    (tmp_path / "gpt_loops.json").write_text(json.dumps({"model": "tiny-gpt", "mean_recurrence": 1,
                                                         "results": [{"loops": 1, "loss": 5.0}]}))
    argv = [a.format(run=run_dir, recipe=recipe, tmp=tmp_path) for a in argv_template]
    runs_before, tmp_before = files_of(run_dir.parent), files_of(tmp_path)
    code, output = run(argv, capsys)
    assert_one_line_error(code, output, *[f.format(run=run_dir, tmp=tmp_path) for f in fragments])
    assert files_of(run_dir.parent) == runs_before  # no new run directory, nothing changed in the old one
    assert files_of(tmp_path) == tmp_before


def test_tokenizer_that_does_not_fit_the_model_is_refused(trained, tmp_path, capsys):
    from data_prep.tokenizer import train_tokenizer
    from conftest import synthetic_documents

    _, _, run_dir = trained
    small = train_tokenizer(synthetic_documents(50), vocab_size=300, show_progress=False)
    small.save(str(tmp_path / "small_tokenizer.json"))
    (tmp_path / "text.txt").write_text("alpha beta gamma. " * 20)
    before = files_of(run_dir)
    code, output = run(["perplexity", "--ckpt_path", run_dir / "last.ckpt", "--text", tmp_path / "text.txt",
                        "--tokenizer", tmp_path / "small_tokenizer.json"], capsys)
    assert_one_line_error(code, output, "small_tokenizer.json", "4,096")
    assert files_of(run_dir) == before


def test_damaged_data_chunk_is_named_before_training(trained, tmp_path, capsys):
    _, _, run_dir = trained
    data = tmp_path / "shards"
    shutil.copytree(_datasets(run_dir), data)
    chunk = sorted((data / "train").glob("*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "runs")
    code, output = run(["fit", "--config", recipe], capsys)
    assert_one_line_error(code, output, chunk.name, "damaged")
    assert not (tmp_path / "runs").exists()


def test_large_loop_counts_state_their_cost_first(trained, capsys):
    _, _, run_dir = trained
    code, output = run(["test", "--ckpt_path", run_dir / "last.ckpt", "--loops", "65", "--trainer.limit_test_batches",
                        "1"], capsys)
    assert code == 0, output
    note = output.index("--loops up to 65")
    assert note < output.index("loss by loop count")


# -- a failed start does not block a retry ---------------------------------------------------------------------
def test_run_directory_without_a_checkpoint_can_be_started_again(trained, tmp_path, capsys):
    _, _, run_dir = trained
    recipe = write_recipe(tmp_path / "r.yaml", _datasets(run_dir), tmp_path / "runs", max_steps=4)
    failed = tmp_path / "runs" / "tiny"
    failed.mkdir(parents=True)
    (failed / "config.yaml").write_text("left by a fit that failed before its first step\n")
    (failed / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    code, output = run(["fit", "--config", recipe], capsys)
    assert code == 0, output
    assert (failed / "last.ckpt").is_file()
    kept = list(failed.glob("attempt-*/events.out.tfevents.1.host.1.0"))
    assert kept, sorted(p.name for p in failed.rglob("*"))  # the old files are moved aside, not deleted


# -- storage faults --------------------------------------------------------------------------------------------
def test_disk_full_during_a_checkpoint_is_one_line_naming_the_last_good_one(run_copy, capsys):
    """A real write failure from the kernel: RLIMIT_FSIZE makes any write past 1 MB fail (EFBIG), as a full disk
    fails with ENOSPC, while the checkpoint (5 MB) is written."""
    recipe, run_dir = run_copy
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        code, output = run(["fit", "--config", recipe, "--ckpt_path", "last", "--trainer.max_steps", "16"], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    line = assert_one_line_error(code, output, "step=0000016.ckpt", "accepted only part", "last good checkpoint",
                                 max_lines=40)
    assert "last.ckpt" in line
    assert not list(run_dir.glob(".*.tmp-*"))  # no half-written file left behind


def test_unwritable_runs_dir_is_one_line(trained, tmp_path, capsys):
    _, _, run_dir = trained
    not_a_folder = tmp_path / "runs"
    not_a_folder.write_text("a file where the runs folder should be\n")
    recipe = write_recipe(tmp_path / "r.yaml", _datasets(run_dir), not_a_folder)
    code, output = run(["fit", "--config", recipe], capsys)
    assert_one_line_error(code, output, str(not_a_folder / "tiny"))


def test_evaluation_in_a_folder_that_cannot_be_written_prints_results(trained, tmp_path, capsys, monkeypatch):
    """Root can write anywhere, so the folder's refusal is stood in for by the probe's answer."""
    from parcae.runs import storage

    _, _, run_dir = trained
    monkeypatch.setattr(storage, "writable_dir", lambda path: Path(path) != run_dir)
    before = files_of(run_dir)
    code, output = run(["test", "--ckpt_path", run_dir / "last.ckpt", "--loops", "1,2"], capsys)
    assert code == 0, output
    assert "loss by loop count" in output and "not writable" in output
    assert files_of(run_dir) == before
    code, output = run(["test", "--ckpt_path", run_dir / "last.ckpt", "--loops", "1,2", "--output_dir",
                        tmp_path / "out"], capsys)
    assert code == 0, output
    assert (tmp_path / "out" / "test_loops.json").is_file()
    assert files_of(run_dir) == before


# -- one writer per run ----------------------------------------------------------------------------------------
LOCK_HOLDER = "import sys, time; from parcae.runs.rundir import RunLock; RunLock(sys.argv[1]).acquire(); " \
              "print('locked', flush=True); time.sleep(600)"


def test_second_fit_refuses_while_the_first_holds_the_lock_then_takes_over_a_dead_lock(run_copy, capsys):
    recipe, run_dir = run_copy
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = files_of(run_dir)
        code, output = run(["fit", "--config", recipe, "--ckpt_path", "last", "--trainer.max_steps", "16"], capsys)
        assert_one_line_error(code, output, f"pid {holder.pid}", str(run_dir))
        assert files_of(run_dir) == before
    finally:
        holder.kill()  # SIGKILL: the lock file stays, its flock goes with the process
        holder.wait()
    assert (run_dir / ".fit.lock").is_file()
    code, output = run(["fit", "--config", recipe, "--ckpt_path", "last", "--trainer.max_steps", "16"], capsys)
    assert code == 0, output
    assert "took over the lock" in output and f"pid {holder.pid}" in output
    assert (run_dir / "step=0000016.ckpt").is_file()
    assert not (run_dir / ".fit.lock").exists()  # released at the end


def test_lock_is_exclusive_and_released():
    from parcae.runs.rundir import RunLock, RunLockedError

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        with RunLock(folder) as lock:
            assert lock.note is None
            with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
                RunLock(folder).acquire()
        assert os.listdir(folder) == []
        with RunLock(folder) as again:  # a clean release leaves no note for the next one
            assert again.note is None


# -- resume picks the newest checkpoint that loads ---------------------------------------------------------------
def test_resume_skips_a_truncated_last_ckpt_and_says_which_it_used(run_copy, capsys):
    from parcae.runs.rundir import check_checkpoint

    recipe, run_dir = run_copy
    last = run_dir / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    newest = run_dir / "step=0000012.ckpt"
    newest.write_bytes(os.urandom(100))
    code, output = run(["fit", "--config", recipe, "--ckpt_path", "last"], capsys)
    assert code == 0, output
    assert "resuming from" in output and "step=0000008.ckpt" in output and "last.ckpt" in output
    # the run went on from step 8 and wrote good checkpoints under their own names; the damaged ones are kept
    assert check_checkpoint(last)["global_step"] == 12 and check_checkpoint(newest)["global_step"] == 12
    assert (run_dir / "last.ckpt.unreadable").stat().st_size == 1000
    assert not list(run_dir.glob("*-v1.ckpt"))


def test_auto_resume_without_last_ckpt_uses_the_newest_step_checkpoint(run_copy, capsys):
    recipe, run_dir = run_copy
    (run_dir / "last.ckpt").unlink()
    code, output = run(["fit", "--config", recipe, "--auto_resume", "true", "--trainer.max_steps", "13"], capsys)
    assert code == 0, output
    assert "step=0000012.ckpt" in output and "no last.ckpt" in output


def test_resume_without_any_good_checkpoint_does_not_suggest_itself(run_copy, capsys):
    recipe, run_dir = run_copy
    for ckpt in run_dir.glob("*.ckpt"):
        ckpt.write_bytes(b"")
    before = files_of(run_dir)
    code, output = run(["fit", "--config", recipe, "--ckpt_path", "last"], capsys)
    line = assert_one_line_error(code, output, "no checkpoint that loads")
    assert "--ckpt_path last" not in line and "--auto_resume" not in line
    assert files_of(run_dir) == before


# -- issue 19: a run directory is the run's record, wherever it lives ---------------------------------------------
def _moved(how: str, source: Path, target: Path) -> None:
    if how == "cp -r":
        subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    else:
        subprocess.run(["mv", str(source), str(target)], check=True)


def _step_of(path: Path) -> int:
    from parcae.runs import check_checkpoint

    return int(check_checkpoint(path)["global_step"])


@pytest.mark.parametrize("how", ["cp -r", "mv"])
def test_copied_or_moved_run_resumes_forward_twice(run_copy, tmp_path, capsys, how):
    """#1: Lightning remembers the old folder in the checkpoint; the run's own files decide what "last" is, so the
    copy (or the moved run) resumes from its newest step, writes last.ckpt and step files under their own names
    (never -vN) and goes forward again on the next resume."""
    recipe, source = run_copy
    kept = {name: digest for name, digest in files_of(source).items() if name.startswith("step=")}
    target = source.parent / "b"
    _moved(how, source, target)
    assert source.exists() == (how == "cp -r")
    for max_steps in (16, 20):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, output = run(["fit", "--config", recipe, "--run_name", "b", "--ckpt_path", "last",
                                "--trainer.max_steps", max_steps], capsys)
        assert code == 0, output
        assert not [w for w in caught if "dirpath has changed" in str(w.message)]
        assert _step_of(target / "last.ckpt") == max_steps
        assert (target / f"step=00000{max_steps}.ckpt").is_file()
    names = sorted(p.name for p in target.iterdir())
    assert not [n for n in names if "-v" in n], names
    assert {n: d for n, d in files_of(target).items() if n in kept} == kept  # steps 1-12 were not trained again
    if how == "cp -r":
        assert _step_of(source / "last.ckpt") == 12  # the original is left as it was


# "{recipe}" the recipe of a copy of the trained run (12 steps), "{other}" shards of another (300-token) vocabulary.
REFUSED_FITS = {
    "data of another vocabulary": (["--data.datasets", "[{other}]"], ["300-token vocabulary", "4,096"]),
    "model that cannot be built": (["--model.arch.n_heads", "3"], ["n_heads"]),
    "schedule without a length": (["--trainer.max_steps", "-1"], ["max_steps"]),
    "another model": (["--model.arch.d_model", "64", "--model.arch.d_ff", "128"], ["d_model"]),
}


@pytest.fixture(scope="module")
def other_vocabulary_shards(tmp_path_factory):
    from conftest import synthetic_documents, write_jsonl
    from data_prep.shards import prepare_shards
    from data_prep.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("other_vocabulary")
    small = train_tokenizer(synthetic_documents(50), vocab_size=300, show_progress=False)
    small.save(str(root / "small_tokenizer.json"))
    src = write_jsonl(root / "docs.jsonl", synthetic_documents(60))
    prepare_shards([src], root / "shards", root / "small_tokenizer.json", val_fraction=0.1, chunk_tokens=1024,
                   num_workers=1, quiet=True)
    return root / "shards"


@pytest.mark.parametrize("name,start", [(name, start) for name in REFUSED_FITS for start in ("fresh", "resume")
                                        if not (name == "another model" and start == "fresh")])
def test_a_refused_fit_writes_nothing(run_copy, other_vocabulary_shards, capsys, name, start):
    """#6: every check that can refuse a fit runs before the first byte is written: the runs folder is byte for
    byte as it was (no config.yaml rewritten, no events file, no lock, no new run directory). (A fresh run has no
    model to differ from, so "another model" is a resume case only.)"""
    recipe, run_dir = run_copy
    args, fragments = REFUSED_FITS[name]
    where = ["--ckpt_path", "last"] if start == "resume" else ["--run_name", "fresh"]
    before = files_of(run_dir.parent)
    names_before = sorted(p.name for p in run_dir.parent.rglob("*"))
    code, output = run(["fit", "--config", recipe, *where,
                        *[a.format(other=other_vocabulary_shards) for a in args]], capsys)
    assert_one_line_error(code, output, *fragments, max_lines=6)
    assert files_of(run_dir.parent) == before
    assert sorted(p.name for p in run_dir.parent.rglob("*")) == names_before  # no empty folder either


def test_fit_keeps_a_copy_of_its_tokenizer_and_generate_finds_it_from_anywhere(trained, tmp_path, capsys,
                                                                                 monkeypatch):
    """#10: the run directory carries its tokenizer, so `parcae generate --ckpt_path /abs/run/last.ckpt` works from
    any folder; a run written before fit kept a copy finds it through config.yaml, relative paths included."""
    import yaml

    from parcae.runs import load_checkpoint

    _, _, run_dir = trained
    data = _datasets(run_dir)
    assert (run_dir / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, output = run(["generate", "--ckpt_path", run_dir / "last.ckpt", "--prompt", "alpha", "--max_new_tokens",
                        "3", "--temperature", "0"], capsys)
    assert code == 0, output
    assert load_checkpoint(run_dir).tokenizer_path == run_dir / "tokenizer.json"
    # an older run: no copy, and config.yaml names the data relative to the folder it was trained from
    project = tmp_path / "project"
    shutil.copytree(run_dir, project / "runs" / "old")
    (project / "data").symlink_to(data, target_is_directory=True)
    (project / "runs" / "old" / "tokenizer.json").unlink()
    config = yaml.safe_load((project / "runs" / "old" / "config.yaml").read_text())
    config.update(runs_dir="runs", run_name="old")
    config["data"].update(datasets=["data"], val_dataset="data")
    (project / "runs" / "old" / "config.yaml").write_text(yaml.safe_dump(config))
    loaded = load_checkpoint(project / "runs" / "old" / "last.ckpt")
    assert loaded.tokenizer_path == project / "data" / "tokenizer.json"
    # parcae test from elsewhere reads the run's data where the run was trained (config.yaml says "data")
    code, output = run(["test", "--ckpt_path", str(project / "runs" / "old" / "last.ckpt"), "--loops", "1",
                        "--trainer.limit_test_batches", "1"], capsys)
    assert code == 0, output
    assert json.loads((project / "runs" / "old" / "test_loops.json").read_text())["results"][0]["loops"] == 1


# -- issue 19 #10: a stale lock says what is known of its holder ----------------------------------------------------
def _other_boot() -> str:
    from parcae.runs.lock import boot_id

    own = boot_id() or "00000000-0000-0000-0000-000000000000"
    return own[:-1] + ("1" if own[-1] != "1" else "2")


STALE_LOCKS = {  # what the lock file says -> what the note must (and must not) say
    "pid 1 of this boot (pid 1 always runs)": ("pid 1 on {host} (boot {boot})", ["pid 1 runs"], ["no longer running"]),
    "pid 1 before a restart": ("pid 1 on {host} (boot {other})", ["restarted"], ["no longer running"]),
    "pid 1 on another machine": ("pid 1 on node-elsewhere-7 (boot {boot})", ["another machine"], ["no longer running"]),
    "a dead pid of this boot": ("pid {dead} on {host} (boot {boot})", ["no longer running"], []),
    "an old lock file without a boot id": ("pid {dead} on {host}", ["no longer running"], []),
}


@pytest.mark.parametrize("case", list(STALE_LOCKS))
def test_a_lock_left_behind_is_described_truthfully(tmp_path, case):
    import socket

    from parcae.runs.lock import RunLock, boot_id

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record, wanted, unwanted = STALE_LOCKS[case]
    (tmp_path / ".fit.lock").write_text(record.format(host=socket.gethostname(), boot=boot_id(), other=_other_boot(),
                                                      dead=dead.pid) + "\n")
    with RunLock(tmp_path) as lock:
        for fragment in wanted:
            assert fragment in lock.note, lock.note
        for fragment in unwanted:
            assert fragment not in lock.note, lock.note
    assert not (tmp_path / ".fit.lock").exists()


def test_export_to_an_existing_file_names_it_a_file(trained, tmp_path, capsys):
    """#10: `parcae export` to a path that is a file says so (not "not empty; choose another output folder")."""
    _, _, run_dir = trained
    target = tmp_path / "out.bin"
    target.write_text("mine")
    code, output = run(["export", run_dir, target], capsys)
    assert_one_line_error(code, output, str(target), "is an existing file")
    assert target.read_text() == "mine"


# -- a run resumes wherever its data now lives -------------------------------------------------------------------
def _train_losses(path: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def _moved_run(trained, tmp_path: Path) -> tuple[Path, Path, Path]:
    """``cp -r`` of the trained run (its step-12 checkpoints dropped, so it resumes at step 8) and of its shards to
    another path; returns (the copied run, the copied shards, a recipe naming the copied shards)."""
    _, _, run_dir = trained
    moved = tmp_path / "elsewhere" / "shards"
    shutil.copytree(_datasets(run_dir), moved)
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "tiny")
    for name in ("step=0000012.ckpt", "last.ckpt"):
        (runs / "tiny" / name).unlink()
    return runs / "tiny", moved, write_recipe(tmp_path / "tiny.yaml", moved, runs)


@pytest.mark.parametrize("recorded", ["index digest", "older checkpoint"])
def test_copied_run_resumes_from_its_shards_under_another_path(trained, tmp_path, capsys, recorded):
    """The resumed steps see the batches the uninterrupted run saw: the loader position carries over to the same
    shards at their new path (identified by their index's digest, or for checkpoints written before parcae recorded
    it, by the chunks and samples per chunk the position counts)."""
    import torch

    _, _, original = trained
    run_dir, _, recipe = _moved_run(trained, tmp_path)
    if recorded == "older checkpoint":
        ckpt = torch.load(run_dir / "step=0000008.ckpt", weights_only=False, map_location="cpu")
        assert ckpt.pop("TokenDataModule")["train_index_sha256"]
        torch.save(ckpt, run_dir / "step=0000008.ckpt")
    before = set(run_dir.glob("events.out.tfevents.*"))
    code, output = run(["fit", "--config", recipe, "--ckpt_path", "last"], capsys)
    assert code == 0, output
    assert "Traceback" not in output
    new = set(run_dir.glob("events.out.tfevents.*")) - before
    assert len(new) == 1, output
    got, reference = _train_losses(new.pop()), _train_losses(original)
    assert sorted(got) == [8, 9, 10, 11]
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step


def test_copied_run_refuses_other_shards_at_the_new_path_in_one_line_writing_nothing(trained, tmp_path, capsys):
    run_dir, moved, recipe = _moved_run(trained, tmp_path)
    index = moved / "train" / "index.json"
    index.write_text(json.dumps(json.loads(index.read_text()), indent=1))  # same chunks, other index: not provable
    before = files_of(tmp_path)
    code, output = run(["fit", "--config", recipe, "--ckpt_path", "last"], capsys)
    assert_one_line_error(code, output, str(moved), "--data.datasets", max_lines=2)
    assert files_of(tmp_path) == before


def test_moved_shards_accepts_only_the_same_index(trained, tmp_path):
    """The rule itself, without a fit: where the saved position points now, or a one-line refusal."""
    import torch

    from parcae.data import TokenDataModule
    from parcae.errors import UsageError

    run_dir, moved, _ = _moved_run(trained, tmp_path)
    ckpt = torch.load(run_dir / "step=0000008.ckpt", weights_only=False, map_location="cpu")
    same_place = TokenDataModule(datasets=[str(_datasets(trained[2]))], seq_len=32, batch_size=4)
    assert same_place.moved_shards(ckpt, "x.ckpt") == []
    elsewhere = TokenDataModule(datasets=[str(moved)], seq_len=32, batch_size=4)
    [(state, now)] = elsewhere.moved_shards(ckpt, "x.ckpt")
    assert now == str((moved / "train").resolve()) and state["input_dir_path"] != now
    elsewhere.relocate(ckpt, "x.ckpt")
    assert elsewhere.moved_shards(ckpt, "x.ckpt") == []
    two = TokenDataModule(datasets=[str(moved), str(moved)], seq_len=32, batch_size=4)
    with pytest.raises(UsageError, match="trained on 1 dataset"):
        two.moved_shards(ckpt, "x.ckpt")


# -- Ctrl-C reaches the loader workers too -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_during_test_with_loader_workers_is_one_line(trained, tmp_path):
    """A terminal's Ctrl-C goes to the whole process group, loader workers included: they leave it to the main
    process, which ends with its one line and status 130 (before: a worker's traceback, or a hang)."""
    import threading
    import time

    _, _, run_dir = trained
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "LITDATA_DISABLE_VERSION_CHECK": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "parcae", "test", "--ckpt_path", str(run_dir / "step=0000008.ckpt"),
                             "--data.num_workers", "1", "--loops", ",".join(str(i) for i in range(1, 65)),
                             "--output_dir", str(tmp_path / "out")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)

    def worker_started() -> bool:  # a forked child running parcae (other children may probe sys.path)
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for kid in kids:
            try:
                if b"parcae" in Path(f"/proc/{kid}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
        return False

    err: list[str] = []  # stderr, line by line as it comes
    reader = threading.Thread(target=lambda: err.extend(line.rstrip("\n") for line in proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not worker_started():
            assert proc.poll() is None and time.monotonic() < deadline, "\n".join(err)
            time.sleep(0.05)
        time.sleep(1.0)  # the test loop runs; what was written so far has been read
        before = len(err)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, "\n".join(err)
    assert not any("Traceback" in line for line in err), "\n".join(err)
    assert [line for line in err[before:] if line.strip()] == ["parcae test: interrupted (SIGINT)"], "\n".join(err)
