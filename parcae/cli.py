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

import importlib
import math
import sys
from pathlib import Path
from typing import Optional, Union

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from parcae.data import DataError, open_shards
from parcae.data.datamodule import TokenDataModule
from parcae.training.callbacks import AtomicCheckpointIO, RunSummary, StepProgressBar
from parcae.training.module import LoopedLMModule, NonFiniteLossError, parse_loops

VERBS = {
    "report": "the paper's tables beside our results (`parcae report table5`, `parcae report mini`, `--list`)",
    "lm-eval": "lm-evaluation-harness tasks at a fixed loop count (optional extra `.[eval]`; `parcae lm-eval --help`)",
    "perplexity": "token/word perplexity and bits per byte of a text file at chosen loops (`parcae perplexity ...`)",
    "core": "CORE / Core-Extended at a loop count from a local eval bundle (`parcae core --ckpt_path ... --bundle ...`)",
    "scaling-law": "isoFLOP optima, power laws, parametric and unified laws (`parcae scaling-law runs.csv`)",
    "fit-loops": "fit L(T) = L∞ + Z·exp(−zT) and Table 12's other forms to a loop sweep (`parcae fit-loops <run dir>`)",
    "mini": "run a CPU miniature of a paper claim and write its report: `parcae mini stability` (docs/miniatures.md)",
    "sweep": "expand a sweep definition into runs: `parcae sweep recipes/sweeps/isoflop_140m.yaml [--run]`",
    "prepare": "data preparation: `parcae prepare shakespeare`, `parcae prepare shards --help`, "
               "`parcae prepare tokenizer --help`",
    "model": "inspect presets: parameters by part, FLOPs per token (`parcae model parcae-140m --meta`)",
    "generate": "KV-cached generation at fixed or adaptive depth (`parcae generate --ckpt_path ... --prompt ...`)",
    "serve": "OpenAI-compatible /v1/completions server with LitServe (`parcae serve --ckpt_path ... --port 8000`)",
}


# Verbs outside LightningCLI: module:function taking the remaining arguments (imported only when used).
VERB_MAINS = {
    "report": "parcae.eval.report:main", "lm-eval": "parcae.eval.lm_eval_adapter:main",
    "perplexity": "parcae.eval.perplexity:main", "core": "parcae.eval.core:main",
    "scaling-law": "parcae.eval.scaling:main", "fit-loops": "parcae.eval.fits:main",
    "mini": "parcae.eval.miniatures:main", "sweep": "parcae.sweep:main", "prepare": "parcae.cli:_prepare",
    "model": "parcae.model.__main__:main", "generate": "parcae.inference.cli:main",
    "serve": "parcae.inference.serve:main",
}


class CLIError(ValueError):
    """A user mistake on the command line; printed as one line."""


class ParcaeTrainer(Trainer):
    """Trainer whose ``test`` takes ``--loops`` and whose ``predict`` generates text from ``--prompt``."""

    def test(self, model=None, dataloaders=None, ckpt_path=None, verbose: bool = True, datamodule=None,
             weights_only=None, loops: Optional[str] = None):
        """Evaluate at each loop count: --loops 4,8,16 (or ranges, 1-16); default μ_rec and the eval loops.

        Args:
            loops: comma-separated loop counts and ranges, e.g. "1,2,4,8,16" or "1-16".
        """
        if loops is not None and model is not None:
            parsed = parse_loops(loops)
            if not model.arch.looped and parsed != [1]:
                raise CLIError(f"--loops {loops}: {model.arch.name} is a fixed-depth model (injection='none'); "
                               "it has no loops to vary")
            model.test_loops = parsed
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def predict(self, model=None, dataloaders=None, datamodule=None, return_predictions=None, ckpt_path=None,
                weights_only=None, prompt: str = "", loops: Optional[int] = None, max_new_tokens: int = 200,
                temperature: float = 0.8, top_k: Optional[int] = 50, seed: int = 0):
        """Generate text after --prompt at --loops iterations (default μ_rec).

        Args:
            prompt: text to continue (a <|bos|> token is prepended).
            loops: loop iterations per generated token (default: the model's μ_rec).
            max_new_tokens: tokens to generate.
            temperature: sampling temperature; 0 for greedy decoding.
            top_k: sample among the k most likely tokens (None: all).
            seed: sampling seed.
        """
        from parcae.data import load_tokenizer

        if loops is not None and (loops < 1 or (not model.arch.looped and loops != 1)):
            raise CLIError(f"--loops {loops}: must be >= 1" + ("" if model.arch.looped else
                                                              f", and {model.arch.name} has no loops"))
        if datamodule is None:
            raise CLIError("predict needs the data config (for the tokenizer): pass --config or a --ckpt_path "
                           "inside a run directory")
        tok = load_tokenizer(str(datamodule.tokenizer_path))
        ids = [tok.token_to_id("<|bos|>"), *tok.encode(prompt, add_special_tokens=False).ids]
        from parcae.inference.cli import predict_with_engine

        model.generation = {"loops": loops, "max_new_tokens": max_new_tokens, "temperature": temperature,
                            "top_k": top_k, "seed": seed, "stop_id": tok.token_to_id("<|eos|>"),
                            "generate": predict_with_engine}
        loader = torch.utils.data.DataLoader([torch.tensor([ids])], batch_size=None)
        outputs = super().predict(model, loader, None, True, ckpt_path, weights_only)
        texts = [tok.decode(out, skip_special_tokens=True) for out in outputs]
        if self.is_global_zero:
            for text in texts:
                print(text)
        return texts


class ParcaeCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(LoopedLMModule, TokenDataModule, trainer_class=ParcaeTrainer,
                         save_config_kwargs={"overwrite": True}, args=args, run=run,
                         parser_kwargs={"default_env": False})

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str, default="debug",
                            help="Run directory name: outputs go to <runs_dir>/<run_name>/.")
        parser.add_argument("--runs_dir", type=str, default="checkpoints", help="Parent folder of run directories.")
        parser.add_argument("--checkpoint_every", type=int, default=1000,
                            help="Save a checkpoint every N optimizer steps (plus last.ckpt).")
        parser.add_argument("--auto_resume", type=bool, default=False,
                            help="fit: resume <run_dir>/last.ckpt when it exists instead of refusing to start.")
        parser.add_argument("--max_tokens", type=Optional[float], default=None,
                            help="Training tokens; sets trainer.max_steps = ceil(max_tokens / tokens per step) "
                                 "unless trainer.max_steps is given explicitly.")
        parser.add_argument("--global_batch_size", type=Optional[int], default=None,
                            help="Sequences per optimizer step over all devices; sets "
                                 "trainer.accumulate_grad_batches = global / (data.batch_size x devices x nodes).")
        parser.add_argument("--val_every", type=Optional[int], default=None,
                            help="Validate every N optimizer steps (sets trainer.val_check_interval).")

    # -- run directory rules ----------------------------------------------------------------------------
    def _cfg(self):
        """This command's config (``run=False`` parses without a subcommand: treated like fit)."""
        return self.config if self.subcommand is None else self.config[self.subcommand]

    def _run_dir(self) -> Path:
        return Path(self._cfg().runs_dir) / self._cfg().run_name

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        for root in ([cfg.data.datasets] if isinstance(cfg.data.datasets, str) else cfg.data.datasets):
            open_shards(root, cfg.data.get("prepare_hint"))  # fail fast, before a large model is built
        if self.subcommand not in ("fit", None):
            return
        self._resolve_run_length(cfg)
        if cfg.checkpoint_every < 1:
            raise CLIError(f"--checkpoint_every must be >= 1, got {cfg.checkpoint_every}")
        run_dir = self._run_dir()
        last = run_dir / "last.ckpt"
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path in (None, ""):
            if last.exists() and cfg.auto_resume:
                cfg.ckpt_path = str(last)
            elif run_dir.exists() and any(run_dir.iterdir()):
                what = "a checkpoint (last.ckpt)" if last.exists() else "files from an earlier run"
                raise CLIError(f"{run_dir} already holds {what}; resume with --ckpt_path last (or --auto_resume true),"
                               f" or choose another --run_name (or delete {run_dir})")
        elif ckpt_path == "last" and not last.exists():
            raise CLIError(f"--ckpt_path last: there is no {last} to resume")

    @staticmethod
    def _resolve_run_length(cfg, quiet: bool = False) -> None:
        """Paper quantities -> Trainer settings: accumulation from the global batch, steps from tokens."""
        trainer = cfg.trainer
        devices = _device_count(trainer.accelerator, trainer.devices)
        per_pass = cfg.data.batch_size * devices * (trainer.num_nodes or 1)
        if cfg.global_batch_size is not None:
            if cfg.global_batch_size < 1 or cfg.global_batch_size % per_pass:
                raise CLIError(f"global_batch_size {cfg.global_batch_size} is not a multiple of data.batch_size x "
                               f"devices x nodes = {cfg.data.batch_size} x {devices} x {trainer.num_nodes or 1}")
            trainer.accumulate_grad_batches = cfg.global_batch_size // per_pass
        tokens_per_step = per_pass * (trainer.accumulate_grad_batches or 1) * cfg.data.seq_len
        if cfg.max_tokens is not None and (trainer.max_steps is None or trainer.max_steps < 1):
            trainer.max_steps = math.ceil(cfg.max_tokens / tokens_per_step)
        if cfg.val_every is not None:
            trainer.val_check_interval = cfg.val_every * (trainer.accumulate_grad_batches or 1)
            trainer.check_val_every_n_epoch = None
        if trainer.max_steps and trainer.max_steps > 0 and not quiet:
            print(f"[parcae] {tokens_per_step:,} tokens per step ({per_pass * (trainer.accumulate_grad_batches or 1)}"
                  f" sequences x {cfg.data.seq_len}), {trainer.max_steps:,} steps = "
                  f"{trainer.max_steps * tokens_per_step / 1e6:,.1f}M tokens", flush=True)

    def instantiate_trainer(self, **kwargs):
        cfg = self._cfg()
        run_dir = self._run_dir()
        kwargs.setdefault("logger", TensorBoardLogger(save_dir=cfg.runs_dir, name=cfg.run_name, version="",
                                                      default_hp_metric=False))
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_cfg.get("callbacks") or [])
        callbacks.append(RunSummary())
        if trainer_cfg.get("enable_progress_bar") is not False:
            callbacks.append(StepProgressBar())
        if self.subcommand in ("fit", None):
            callbacks.append(ModelCheckpoint(dirpath=run_dir, filename="step={step:07d}", auto_insert_metric_name=False,
                                             every_n_train_steps=cfg.checkpoint_every, save_top_k=-1, save_last=True))
        kwargs["callbacks"] = callbacks
        plugins = trainer_cfg.get("plugins") or []
        kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), AtomicCheckpointIO()]
        kwargs.setdefault("enable_model_summary", False)  # RunSummary prints ours
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        if self.trainer.max_steps is None or self.trainer.max_steps < 1:
            if self.model.schedule_config.name != "constant":
                raise CLIError(f"trainer.max_steps must be set (> 0) for the {self.model.schedule_config.name!r} "
                               "learning-rate schedule")


class _ParseOnlyCLI(ParcaeCLI):
    """Parses and validates a recipe without building the model, data or trainer."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse_recipe(path: str | Path, overrides: Optional[list[str]] = None, resolve: bool = True):
    """The fully resolved ``fit`` config of a recipe (composed pieces, defaults, command-line style overrides),
    with run length and accumulation derived as ``parcae fit`` would (``resolve``); builds nothing."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # the arguments travel in args=
    try:
        cli = _ParseOnlyCLI(args=["--config", str(path), *(overrides or [])], run=False)
    finally:
        sys.argv = argv
    if resolve:
        ParcaeCLI._resolve_run_length(cli.config, quiet=True)
    return cli.config


def model_config_of(cfg) -> "ModelConfig":
    """The ModelConfig of a parsed config (``cfg.model.arch``), without jsonargparse's bookkeeping keys."""
    import dataclasses

    from parcae.model import ModelConfig

    arch = cfg.model.arch
    values = arch.as_dict() if hasattr(arch, "as_dict") else dict(arch)
    return ModelConfig(**{f.name: values[f.name] for f in dataclasses.fields(ModelConfig) if f.name in values})


def _device_count(accelerator, devices) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


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
    if not Path(ckpt).is_file():
        raise CLIError(f"--ckpt_path {ckpt}: no such checkpoint file")
    config = Path(ckpt).resolve().parent / "config.yaml"
    if not config.is_file():
        return argv
    import yaml

    saved = yaml.safe_load(config.read_text())
    keep = {k: v for k, v in saved.items() if k in ("seed_everything", "trainer", "model", "data", "run_name",
                                                    "runs_dir")}
    if isinstance(keep.get("trainer"), dict):  # devices of the training run may not exist here
        keep["trainer"] = {k: v for k, v in keep["trainer"].items()
                           if k in ("accelerator", "precision", "limit_test_batches", "limit_val_batches",
                                    "limit_predict_batches")}
    derived = Path(ckpt).resolve().parent / f".{argv[0]}_config.yaml"
    derived.write_text(yaml.safe_dump(keep, sort_keys=False))
    return [argv[0], "--config", str(derived), *argv[1:]]


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    torch.set_float32_matmul_precision("high")
    if argv and argv[0] in VERBS:
        module, function = VERB_MAINS[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print("extra commands:\n" + "\n".join(f"  {v:<8} {h}" for v, h in VERBS.items()) + "\n")
    _quiet_known_noise()
    try:
        args = _with_run_config(argv)
        sys.argv = sys.argv[:1]  # the arguments travel in args= (LightningCLI warns when both are set)
        ParcaeCLI(args=args)
    except (CLIError, DataError, NonFiniteLossError, ValueError) as err:
        if isinstance(err, ValueError) and not isinstance(err, (CLIError, DataError)) and "\n" in str(err):
            raise
        sys.exit(f"parcae: error: {err}")


def _quiet_known_noise() -> None:
    """Silence warnings and tips that carry no information for parcae users."""
    import logging
    import warnings

    for pattern in (r".*isinstance\(treespec, LeafSpec\)", r".*`IterableDataset` has `__len__` defined",
                    r"Checkpoint directory .* exists and is not empty", r".*persistent_workers=True",
                    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
                    r".*does not have many workers which may be a bottleneck"):
        warnings.filterwarnings("ignore", message=pattern)

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.getMessage()).startswith("💡")

    for name in ("lightning.pytorch", "lightning.fabric"):  # handlers also see records of child loggers
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoTips())


def _prepare(rest: list[str]) -> None:
    if not rest or rest[0] in ("-h", "--help"):
        print("usage: parcae prepare {shakespeare,shards,tokenizer} [options]\n  " + VERBS["prepare"])
        return
    step, args = rest[0], rest[1:]
    if step == "shakespeare":
        from data_prep.shakespeare import main as run
    elif step == "shards":
        from data_prep.shards import main as run
    elif step == "tokenizer":
        from data_prep.tokenizer import main as run
    else:
        sys.exit(f"parcae prepare: unknown step {step!r} (shakespeare, shards, tokenizer)")
    run(args)
