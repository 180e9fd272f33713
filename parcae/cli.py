"""The ``parcae`` command (LightningCLI) and its extra verbs.

    parcae fit --config recipes/mini/debug.yaml                     # train; run dir checkpoints/<run_name>/
    parcae fit --config recipes/mini/debug.yaml --ckpt_path last    # resume that run exactly
    parcae validate --ckpt_path checkpoints/debug/last.ckpt
    parcae test --ckpt_path checkpoints/debug/last.ckpt --loops 1,2,4,8,16    # or --loops 1-16
    parcae predict --ckpt_path checkpoints/debug/last.ckpt --prompt "ROMEO:" --loops 8
    parcae prepare shakespeare | shards ... | tokenizer ...         # data preparation (data_prep)
    parcae model parcae-140m --meta                                 # inspect a preset
    tensorboard --logdir checkpoints

``validate``/``test``/``predict`` with a ``--ckpt_path`` inside a run directory and no ``--config`` read that
run's ``config.yaml`` (model, data, trainer), so a checkpoint path is all they need.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from parcae.command_line import add_parameters, call_verb, exit_with_error, interruptible
from parcae.errors import UsageError
from parcae.inference.options import DepthOptions
from parcae.runs import rundir
from parcae.runs.checkpoint import run_relative_path
from parcae.training.module import NonFiniteLossError, loop_rows
from parcae.training.run import EVAL_TRAINER_KEYS, RUN_CONFIG_KEYS, RecipeCLI

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


def verb_function(verb: str) -> Callable:
    module, function = VERBS[verb][0].split(":")
    return getattr(importlib.import_module(module), function)


def run_verb(verb: str, argv: list[str]) -> Any:
    """Parse ``argv`` for ``parcae <verb>`` and call its function; a bad command line is a UsageError."""
    if verb == "prepare":
        return _prepare(argv)
    return call_verb(verb, verb_function(verb), argv)


class ParcaeCLI(RecipeCLI):
    """``parcae fit/validate/test/predict``: the recipe CLI; ``test --loops`` is the module's ``test_loops``
    argument, and a test sweep's metrics (returned by ``Trainer.test``) are reported as a table and files."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        skip = RecipeCLI.subcommands()
        skip["predict"] = skip["predict"] | {"depth"}  # Trainer.predict's depth comes from the flat flags below
        return skip

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        # LightningCLI builds one parser per subcommand here; test's --loops exists only on test's parser.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":  # --loops, --exit, ... as generate has them (one DepthOptions)
            add_parameters(parser, DepthOptions)
        if subcommand == "test":
            parser.add_argument("--loops", type=Optional[str], default=None,
                                help="Loop counts to evaluate: comma-separated counts and ranges, e.g. 1,2,4,8,16 "
                                     "or 1-16 (default: μ_rec and model.eval_loops).")
            parser.link_arguments("loops", "model.test_loops")  # an argument of the module, not a side channel
        return parser

    def predict(self, **kwargs) -> list[str]:
        """``Trainer.predict`` with the depth flags gathered into one DepthOptions."""
        config = self.config_init[self.subcommand]
        depth = DepthOptions(**{f.name: config[f.name] for f in dataclasses.fields(DepthOptions)})
        return self.trainer.predict(depth=depth, **kwargs)

    def test(self, **kwargs) -> list[dict]:
        """Run ``Trainer.test`` and report its per-loop results: table, test_loops.json/.csv/.png, fitted law."""
        from parcae.options import loop_cost_note

        module = self.model
        note = loop_cost_note(module.test_loops, module.arch.mean_recurrence) if module.test_loops else None
        if note:
            print(f"[parcae] {note}", flush=True)
        metrics = self.trainer.test(**kwargs)
        rows = loop_rows(metrics[0]) if metrics else []
        if rows and self.trainer.is_global_zero:
            from parcae.experiments.test_report import write_test_report

            step = module.checkpoint_step if module.checkpoint_step is not None else self.trainer.global_step
            write_test_report(rows, self.results_dir, module.arch.name, module.arch.mean_recurrence,
                              module.arch.looped, step, split=getattr(self.datamodule, "test_split", "val"),
                              checkpoint=kwargs.get("ckpt_path"))
        return metrics


def _with_run_config(argv: list[str]) -> list[str]:
    """validate/test/predict --ckpt_path <run_dir>/x.ckpt without --config: use <run_dir>/config.yaml."""
    if not argv or argv[0] not in ("validate", "test", "predict") or "--config" in argv:
        return argv
    ckpt = None
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            ckpt = argv[i + 1]
        elif arg.startswith("--ckpt_path="):
            ckpt = arg.split("=", 1)[1]
    if ckpt is None:
        return argv
    rundir.check_checkpoint(ckpt)
    config = Path(ckpt).resolve().parent / "config.yaml"
    if not config.is_file():
        return argv
    import yaml

    saved = yaml.safe_load(config.read_text())
    keep = {k: v for k, v in saved.items() if k in RUN_CONFIG_KEYS}
    data = keep.get("data")
    if isinstance(data, dict):  # relative data paths are relative to where the run was trained, not to here
        keep["data"] = data = dict(data)
        for key in ("datasets", "val_dataset", "tokenizer"):
            value = data.get(key)
            if isinstance(value, str):
                data[key] = _run_path(config.parent, saved, value)
            elif isinstance(value, list):
                data[key] = [_run_path(config.parent, saved, v) if isinstance(v, str) else v for v in value]
    if isinstance(keep.get("trainer"), dict):  # devices of the training run may not exist here
        keep["trainer"] = {k: v for k, v in keep["trainer"].items() if k in EVAL_TRAINER_KEYS}
    import atexit
    import tempfile

    # The evaluation's config exists only to start it: a temporary folder, never the run directory.
    derived = Path(tempfile.mkdtemp(prefix="parcae-")) / f"{argv[0]}_config.yaml"
    atexit.register(shutil.rmtree, derived.parent, ignore_errors=True)
    derived.write_text(yaml.safe_dump(keep, sort_keys=False))
    return [argv[0], "--config", str(derived), *argv[1:]]


def _run_path(run_dir: Path, saved: dict, named: str) -> str:
    """A path from a run's config.yaml as found from here (unchanged if it is found nowhere: the error names it)."""
    found = run_relative_path(run_dir, saved, named)
    return named if found is None else str(found)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = argv[0] if argv and not argv[0].startswith("-") else "parcae"
    with interruptible(verb, RESUME_HINTS.get(verb)):
        return _main(argv)


def _main(argv: list[str]) -> None:
    torch.set_float32_matmul_precision("high")
    if argv and argv[0] in VERBS:
        try:
            return run_verb(argv[0], argv[1:])
        except UsageError as err:
            exit_with_error(argv[0], err)
        except OSError as err:  # a file the user named that is missing or unreadable, or a full/read-only disk
            if _user_named(err, argv) or _write_fault(err):
                exit_with_error(argv[0], f"{err.filename}: {rundir.describe_os_error(err)}")
            raise
    if argv and argv[0] in ("-h", "--help"):
        print("extra commands:\n" + "\n".join(f"  {v:<11} {h}" for v, (_, h) in VERBS.items()) + "\n")
    _quiet_known_noise()
    try:
        args = _with_run_config(argv)
        # The arguments travel in args=; sys.argv keeps them for Lightning's launcher, which starts the other
        # local ranks (`--trainer.devices 2` without torchrun) by re-running this command line.
        sys.argv = [sys.argv[0], *argv]
        ParcaeCLI(args=args)
    except (UsageError, NonFiniteLossError) as err:  # user mistakes only: anything else keeps its traceback
        exit_with_error(argv[0], err)
    except OSError as err:  # disk full, read-only folder: what failed, and the run's last good checkpoint
        if not _write_fault(err):
            raise
        good = rundir.newest_good_checkpoint(Path(err.filename).parent) if err.filename else None
        exit_with_error(argv[0], f"could not write {err.filename or 'a file'}: {rundir.describe_os_error(err)}"
                        + (f"; last good checkpoint: {good}" if good else ""))
    finally:
        rundir.release_held_locks()


def _write_fault(err: OSError) -> bool:
    return err.errno in rundir.WRITE_FAULT_ERRNOS


def _user_named(err: OSError, argv: list[str]) -> bool:
    """Whether an OSError is about a file the user named on the command line (a mistake, not a bug)."""
    if not err.filename:
        return False
    failed = Path(str(err.filename)).resolve()
    return any(Path(a.split("=", 1)[-1]).resolve() == failed for a in argv[1:] if a.split("=", 1)[-1])


def _quiet_known_noise() -> None:
    """Silence warnings and tips that carry no information for parcae users."""
    import logging
    import warnings

    for pattern in (r".*isinstance\(treespec, LeafSpec\)", r".*`IterableDataset` has `__len__` defined",
                    r"Checkpoint directory .* exists and is not empty", r".*persistent_workers=True",
                    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
                    r".*does not have many workers which may be a bottleneck",
                    r"LightningCLI's args parameter is intended to run from within Python"):
        warnings.filterwarnings("ignore", message=pattern)

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.getMessage()).startswith("💡")

    for name in ("lightning.pytorch", "lightning.fabric"):  # handlers also see records of child loggers
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoTips())


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
