"""``parcae fit/validate/test/predict``: the LightningCLI side of the ``parcae`` command, imported only for these
four verbs (importing Lightning takes seconds; ``parcae --help``, ``generate``, ``serve`` and the other verbs of
parcae/cli.py never pay for it).

    parcae fit --config recipes/mini/debug.yaml                     # train; run dir checkpoints/<run_name>/
    parcae fit --config recipes/mini/debug.yaml --ckpt_path last    # resume that run exactly
    parcae validate --ckpt_path checkpoints/debug                   # a run directory or one of its checkpoints
    parcae test --ckpt_path checkpoints/debug --loops 1,2,4,8,16    # or --loops 1-16
    parcae predict --ckpt_path checkpoints/debug/last.ckpt --prompt "ROMEO:" --loops 8

``validate``/``test``/``predict`` take ``--ckpt_path`` as a checkpoint file or a run directory (its newest good
checkpoint, parcae.runs.newest_checkpoint); without ``--config`` they read that run's ``config.yaml`` (model, data,
trainer), so a run directory is all they need. Their results go into the run directory (or ``--output_dir``).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from parcae.command_line import add_parameters, exit_with_error
from parcae.errors import UsageError
from parcae.inference.options import DepthOptions
from parcae.runs import is_sharded_checkpoint, open_checkpoint, rundir
from parcae.runs.checkpoint import run_relative_path
from parcae.training.module import NonFiniteLossError, loop_rows
from parcae.training.run import EVAL_TRAINER_KEYS, RUN_CONFIG_KEYS, RecipeCLI

EVALUATIONS = ("validate", "test", "predict")  # the verbs that read a checkpoint of a run


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


def lightning_main(argv: list[str]) -> None:
    """``parcae fit|validate|test|predict ...`` (or LightningCLI's own top-level options): one-line errors for user
    mistakes and storage faults, the run's lock released on the way out."""
    torch.set_float32_matmul_precision("high")
    _quiet_known_noise()
    try:
        args, opened = _with_run_config(argv)
        # The arguments travel in args=; sys.argv keeps them for Lightning's launcher, which starts the other
        # local ranks (`--trainer.devices 2` without torchrun) by re-running this command line.
        sys.argv = [sys.argv[0], *argv]
        ParcaeCLI(args=args, opened=opened)
    except (UsageError, NonFiniteLossError) as err:  # user mistakes only: anything else keeps its traceback
        exit_with_error(argv[0], err)
    except OSError as err:  # disk full, read-only folder: what failed, and the run's last good checkpoint
        if err.errno not in rundir.WRITE_FAULT_ERRNOS:
            raise
        good = rundir.newest_good_checkpoint(Path(err.filename).parent) if err.filename else None
        exit_with_error(argv[0], f"could not write {err.filename or 'a file'}: {rundir.describe_os_error(err)}"
                        + (f"; last good checkpoint: {good}" if good else ""))
    finally:
        rundir.release_held_locks()


def _ckpt_argument(argv: list[str]) -> Optional[tuple[int, str, str]]:
    """(index, value, spelling) of the last ``--ckpt_path`` in ``argv`` (spelling "=" for ``--ckpt_path=X``)."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            found = (i + 1, argv[i + 1], " ")
        elif arg.startswith("--ckpt_path="):
            found = (i, arg.split("=", 1)[1], "=")
    return found


def _with_run_config(argv: list[str]) -> tuple[list[str], Optional[tuple[str, dict]]]:
    """validate/test/predict: ``--ckpt_path <run dir>`` becomes the run's newest good checkpoint (runs' one rule);
    without ``--config``, the run's ``config.yaml`` (model, data, trainer) is the config. Returns the arguments and
    (``--ckpt_path``, the checkpoint opened to check it), which the command reads instead of opening it again."""
    if not argv or argv[0] not in EVALUATIONS:
        return argv, None
    given = _ckpt_argument(argv)
    if given is None:
        return argv, None
    index, ckpt, spelling = given
    if Path(ckpt).is_dir() and not is_sharded_checkpoint(ckpt):
        argv = list(argv)
        path, opened = open_checkpoint(ckpt)  # one-line CheckpointError when none of the run's checkpoints loads
        chosen = str(path)
        argv[index] = chosen if spelling == " " else f"--ckpt_path={chosen}"
        ckpt = chosen
    else:
        opened = rundir.check_checkpoint(ckpt)  # a missing, damaged or sharded file: one line naming it
    opened = (ckpt, opened)
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        return argv, opened
    config = Path(ckpt).resolve().parent / "config.yaml"
    if not config.is_file():
        return argv, opened
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
    return [argv[0], "--config", str(derived), *argv[1:]], opened


def _run_path(run_dir: Path, saved: dict, named: str) -> str:
    """A path from a run's config.yaml as found from here (unchanged if it is found nowhere: the error names it)."""
    found = run_relative_path(run_dir, saved, named)
    return named if found is None else str(found)


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
