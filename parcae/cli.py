"""The ``parcae`` command: LightningCLI's fit/validate/test/predict plus one table of extra verbs (VERBS).

    parcae --help                                                   # the commands (no torch, no Lightning)
    parcae fit --config recipes/mini/debug.yaml                     # train; run dir checkpoints/<run_name>/
    parcae fit --config recipes/mini/debug.yaml --ckpt_path last    # resume that run exactly
    parcae test --ckpt_path checkpoints/debug --loops 1,2,4,8,16    # a run directory or one of its checkpoints
    parcae generate --ckpt_path checkpoints/debug --prompt "ROMEO:" --loops 8
    parcae prepare shakespeare | shards ... | tokenizer ...         # data preparation (data_prep)
    parcae model parcae-140m --meta                                 # inspect a preset
    tensorboard --logdir checkpoints

Parsing and dispatch only, and cheap to import: a verb's module is imported when that verb runs, and Lightning
(parcae.lightning_cli, seconds to import) only for fit/validate/test/predict.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from parcae.command_line import call_verb, exit_with_error, interruptible
from parcae.errors import UsageError

# LightningCLI's verbs (parcae.lightning_cli): their options come from the recipe classes (`parcae fit --help`).
LIGHTNING_VERBS = {
    "fit": "train a recipe: `parcae fit --config recipes/mini/debug.yaml` (resume: `--ckpt_path last`)",
    "validate": "validation loss of a run directory or checkpoint (`parcae validate --ckpt_path checkpoints/debug`)",
    "test": "loss by loop count, table and files in the run (`parcae test --ckpt_path checkpoints/debug --loops 1-16`)",
    "predict": "generate through the Trainer (`parcae predict --ckpt_path checkpoints/debug --prompt \"ROMEO:\"`)",
}

# The verbs outside LightningCLI's fit/validate/test/predict: name -> (module:function, imported only when used;
# one-line help). Each function is typed and documented, and `parcae <verb>` reads its flags from them
# (parcae.command_line); `prepare <step>` parses the typed functions of data_prep (PREPARE_STEPS) the same way.
VERBS = {
    "report": ("parcae.experiments.report:report",
               "the paper's tables beside our results (`parcae report table5`, `parcae report mini`, `--list`)"),
    "lm-eval": ("parcae.eval.lm_eval_adapter:lm_eval_command",
                "lm-evaluation-harness tasks at a fixed loop count (optional extra `.[eval]`; `parcae lm-eval --help`)"),
    "perplexity": ("parcae.eval.perplexity:perplexity",
                   "token/word perplexity and bits per byte of a text file at chosen loops (`parcae perplexity ...`)"),
    "core": ("parcae.eval.core:core",
             "CORE / Core-Extended at a loop count from a local eval bundle (`parcae core --ckpt_path ... --bundle ...`)"),
    "scaling-law": ("parcae.experiments.scaling_study:scaling_law",
                    "isoFLOP optima, power laws, parametric and unified laws (`parcae scaling-law runs.csv`)"),
    "fit-loops": ("parcae.analysis.fits:fit_loops",
                  "fit L(T) = L∞ + Z·exp(−zT) and Table 12's other forms to a loop sweep (`parcae fit-loops <run dir>`)"),
    "mini": ("parcae.experiments.miniatures:mini",
             "run a CPU miniature of a paper claim and write its report: `parcae mini stability` (docs/miniatures.md)"),
    "sweep": ("parcae.experiments.sweep:expand_and_run",
              "expand a sweep definition into runs: `parcae sweep recipes/sweeps/isoflop_140m.yaml [--run]`"),
    "prepare": ("parcae.cli:_prepare", "data preparation: `parcae prepare shakespeare`, `parcae prepare shards --help`, "
                                       "`parcae prepare tokenizer --help`"),
    "model": ("parcae.model.__main__:inspect_presets",
              "inspect presets: parameters by part, FLOPs per token (`parcae model parcae-140m --meta`)"),
    "import": ("parcae.interop.commands:import_command",
               "import an official Parcae/GPT release into a run directory: `parcae import SandyResearch/parcae-140m`"),
    "export": ("parcae.interop.commands:export_command",
               "write a run in the official release layout: `parcae export --format official <run dir> <folder>`"),
    "generate": ("parcae.inference.cli:generate",
                 "KV-cached generation at fixed or adaptive depth (`parcae generate --ckpt_path ... --prompt ...`)"),
    "serve": ("parcae.inference.serve:serve",
              "OpenAI-style /v1/completions server with continuous batching (`parcae serve --ckpt_path ... --port 8000`)"),
    "consolidate": ("parcae.training.consolidate:consolidate_command",
                    "sharded (FSDP) checkpoint folder -> one file for test/predict/export (`parcae consolidate RUN_DIR`)"),
}

# What the one-line message of an interrupted verb adds: how to continue (checkpoints are atomic, runs resume).
RESUME_HINTS = {"fit": "resume with the same command and --ckpt_path last",
                "sweep": "re-run the same command to resume (each run continues from its newest checkpoint)",
                "mini": "re-run the same command to resume the suite"}

CLIError = UsageError  # the name older code and tests use


def __getattr__(name: str):
    if name == "ParcaeCLI":  # the LightningCLI class, imported (with Lightning) only when asked for
        from parcae.lightning_cli import ParcaeCLI

        return ParcaeCLI
    raise AttributeError(f"module 'parcae.cli' has no attribute {name!r}")


def verb_function(verb: str) -> Callable:
    module, function = VERBS[verb][0].split(":")
    return getattr(importlib.import_module(module), function)


def run_verb(verb: str, argv: list[str]) -> Any:
    """Parse ``argv`` for ``parcae <verb>`` and call its function; a bad command line is a UsageError."""
    if verb == "prepare":
        return _prepare(argv)
    function = verb_function(verb)
    torch = sys.modules.get("torch")  # verbs that compute imported it with their module; the others never need it
    if torch is not None:
        torch.set_float32_matmul_precision("high")
    return call_verb(verb, function, argv)


def usage() -> str:
    """What ``parcae --help`` prints: every command in one line each (no import beyond this module)."""
    lines = ["usage: parcae <command> [options]        (`parcae <command> --help`: that command's options)", "",
             "train and evaluate (LightningCLI; `parcae fit --help` lists the recipe options):"]
    lines += [f"  {v:<11} {h}" for v, h in LIGHTNING_VERBS.items()]
    lines += ["", "extra commands:"] + [f"  {v:<11} {h}" for v, (_, h) in VERBS.items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = argv[0] if argv and not argv[0].startswith("-") else "parcae"
    with interruptible(verb, RESUME_HINTS.get(verb)):
        return _main(argv)


def _main(argv: list[str]) -> None:
    if argv and argv[0] in VERBS:
        try:
            return run_verb(argv[0], argv[1:])
        except UsageError as err:
            exit_with_error(argv[0], err)
        except OSError as err:  # a file the user named that is missing or unreadable, or a full/read-only disk
            from parcae.runs.storage import WRITE_FAULT_ERRNOS, describe_os_error

            if _user_named(err, argv) or err.errno in WRITE_FAULT_ERRNOS:
                exit_with_error(argv[0], f"{err.filename}: {describe_os_error(err)}")
            raise
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return
    if not argv[0].startswith("-") and argv[0] not in LIGHTNING_VERBS:
        exit_with_error(argv[0], "no such command (`parcae --help` lists them)")
    from parcae.lightning_cli import lightning_main  # Lightning: fit/validate/test/predict only

    lightning_main(argv)


def _user_named(err: OSError, argv: list[str]) -> bool:
    """Whether an OSError is about a file the user named on the command line (a mistake, not a bug)."""
    if not err.filename:
        return False
    failed = Path(str(err.filename)).resolve()
    return any(Path(a.split("=", 1)[-1]).resolve() == failed for a in argv[1:] if a.split("=", 1)[-1])


PREPARE_STEPS = {  # `parcae prepare <step>`: typed functions of data_prep, parsed like every other verb
    "shakespeare": "data_prep.shakespeare:shakespeare_command",
    "shards": "data_prep.shards:shards_command",
    "tokenizer": "data_prep.tokenizer:tokenizer_command",
}


def _prepare(rest: list[str]) -> None:
    if not rest or rest[0] in ("-h", "--help"):
        print(f"usage: parcae prepare {{{','.join(PREPARE_STEPS)}}} [options]\n  " + VERBS["prepare"][1])
        return
    step, args = rest[0], rest[1:]
    if step not in PREPARE_STEPS:
        raise UsageError(f"unknown step {step!r} ({', '.join(PREPARE_STEPS)})")
    module, function = PREPARE_STEPS[step].split(":")
    call_verb(f"prepare {step}", getattr(importlib.import_module(module), function), args)
