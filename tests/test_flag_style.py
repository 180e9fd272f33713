"""One flag style in every verb: underscores, as LightningCLI's own flags (``--ckpt_path``, ``--runs_dir``).

Builds the command line of every verb of ``parcae.cli.VERBS`` from its function, reads every
``add_argument("--...")`` left in the package and the data-preparation scripts, and every ``--flag`` shown in the
docs, README and recipes, and refuses hyphenated ones (the external tools' flags that docs quote —
pip, sbatch, torchrun, vllm serve — are named below)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTERNAL = {"--no-deps", "--no-build-isolation", "--extra-index-url", "--index-url", "--no-index", "--no-binary",
            "--ntasks-per-node", "--cpus-per-task", "--job-name", "--gpus-per-node", "--nproc-per-node",
            "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--node-rank", "--master-addr",
            "--master-port", "--only-binary", "--python-version", "--no-cache-dir", "--force-reinstall",
            "--nproc_per_node", "--exclusive", "--gres", "--mem-per-cpu", "--time", "--output", "--partition",
            "--standalone", "--log-dir", "--max-restarts", "--no-compile", "--upgrade-strategy",
            "--max-model-len", "--enforce-eager", "--hf-overrides"}  # vllm serve


def test_every_argparse_flag_uses_underscores():
    bad = []
    for path in [*(ROOT / "parcae").rglob("*.py"), *(ROOT / "data_prep").rglob("*.py"),
                 *(ROOT / "benchmarks").rglob("*.py")]:
        for flag in re.findall(r"add_argument\(\s*\"(--[a-z0-9_-]+)\"", path.read_text()):
            if "-" in flag[2:]:
                bad.append(f"{path.relative_to(ROOT)}: {flag}")
    assert not bad, bad


def test_every_verb_flag_uses_underscores():
    from parcae.cli import VERBS, verb_function
    from parcae.command_line import verb_parser

    bad = []
    for verb in VERBS:
        if verb == "prepare":  # the data-preparation scripts' own parsers, read above
            continue
        for action in verb_parser(verb, verb_function(verb))._actions:
            bad += [f"parcae {verb}: {flag}" for flag in action.option_strings if "-" in flag.lstrip("-")]
    assert not bad, bad


def test_docs_show_underscore_flags():
    files = subprocess.run(["git", "ls-files", "*.md", "*.yaml", "*.sh"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()
    bad = []
    for name in files:
        text = (ROOT / name).read_text(errors="replace")
        for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)+)\b", text)):
            if flag not in EXTERNAL:
                bad.append(f"{name}: {flag}")
    assert not bad, bad
