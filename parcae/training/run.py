"""Training runs from recipes: the LightningCLI that builds module, data and trainer from a recipe, the rules of a
run directory, run length from paper quantities (tokens, global batch), and parsing a recipe without running it.

    from parcae.training.run import parse_recipe, model_config_of
    cfg = parse_recipe("recipes/table5_140m_parcae.yaml", ["--model.arch.mean_recurrence", "4"])
    model_config_of(cfg).mean_recurrence     # 4

The ``parcae`` command (parcae/lightning_cli.py) subclasses :class:`RecipeCLI` and adds the verbs; this module holds what
a training run needs, so that sweeps and analyses can parse recipes without importing the command line.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from parcae.data import open_shards
from parcae.data.datamodule import TokenDataModule
from parcae.errors import UsageError
from parcae.inference.options import DepthOptions
from parcae.model import PRESETS, ModelConfig

from parcae.runs import copy_atomically, rundir
from parcae.runs.layout import TOKENIZER_FILE
from .callbacks import AtomicCheckpointIO, RunCheckpoint, RunSummary, StepProgressBar, ThroughputCallback
from .module import LoopedLMModule
from parcae.options import check_options, loop_cost_note

RUN_CONFIG_KEYS = ("seed_everything", "trainer", "model", "data", "run_name", "runs_dir")
# Trainer settings of a training run that an evaluation of its checkpoint keeps (devices may not exist here).
EVAL_TRAINER_KEYS = ("accelerator", "precision", "limit_test_batches", "limit_val_batches", "limit_predict_batches")


class ParcaeTrainer(Trainer):
    """Trainer whose ``predict`` generates text from ``--prompt`` (``test``'s ``--loops`` is the module's
    ``test_loops`` argument, see parcae.lightning_cli.ParcaeCLI)."""

    def predict(self, model=None, dataloaders=None, datamodule=None, return_predictions=None, ckpt_path=None,
                weights_only=None, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: Optional[int] = 50, seed: int = 0, depth: Optional[DepthOptions] = None) -> list[str]:
        """Generate text after --prompt at --loops iterations (default μ_rec) or adaptive depth (--exit ...).

        Args:
            prompt: text to continue (a <|bos|> token is prepended).
            max_new_tokens: tokens to generate (0: only the prompt).
            temperature: sampling temperature; 0 for greedy decoding.
            top_k: sample among the k most likely tokens (None: all).
            seed: sampling seed.
            depth: loop iterations per token; the command line fills it from --loops, --exit, --min_loops,
                --max_loops, --exit_every, --kv_policy, --continuous (as ``parcae generate``).
        """
        from parcae.data.tokenizer import encode_prompt, load_tokenizer, stop_ids
        from parcae.inference import Sampling

        from .module import GenerationRequest

        depth = depth or DepthOptions()
        loops = depth.loops
        check_options(max_new_tokens=(max_new_tokens, 0), temperature=(temperature, 0, "0 is greedy decoding"),
                      top_k=(top_k, 1, "omit it to sample from all tokens"), loops=(loops, 1))
        if loops is not None and not model.arch.looped and loops != 1:
            raise UsageError(f"--loops {loops}: {model.arch.name} is a fixed-depth model (injection='none'); it "
                             "has no loops to set")
        note = loop_cost_note([loops], model.arch.mean_recurrence) if loops else None
        if note:
            print(f"[parcae] {note}", flush=True)
        if datamodule is None:
            raise UsageError("predict needs the data config (for the tokenizer): pass --config or a --ckpt_path "
                             "inside a run directory")
        tok = load_tokenizer(str(datamodule.tokenizer_path))
        ids = encode_prompt(tok, prompt)
        if len(ids) > model.arch.block_size:
            raise UsageError(f"--prompt has {len(ids)} tokens, more than the model's context of "
                             f"{model.arch.block_size}")
        try:
            depth.engine(model.net)  # refuse bad depth options now, in one line
        except ValueError as err:
            raise UsageError(str(err)) from None
        request = GenerationRequest(ids, min(max_new_tokens, model.arch.block_size - len(ids)),
                                    Sampling(temperature=temperature, top_k=top_k, seed=seed), stop_ids(tok), depth)
        loader = torch.utils.data.DataLoader([request], batch_size=None)
        outputs = super().predict(model, loader, None, True, ckpt_path, weights_only)
        texts = [tok.decode(out, skip_special_tokens=True) for out in outputs]
        if self.is_global_zero:
            for text in texts:
                print(text)
        return texts


# -- recipes: presets by name and composed pieces ----------------------------------------------------------
def expand_recipe(path: str | Path) -> dict:
    """A recipe file as the config LightningCLI parses: ``model.arch`` given by preset name expanded to its
    fields, ``from:`` pieces merged with the keys beside them, relative piece paths made absolute.

    A recipe may say::

        model:
          arch: parcae-140m                 # a preset by name (parcae.model.PRESETS) ...
          arch: {preset: parcae-140m, mean_recurrence: 4}   # ... or a preset with overrides
        data:
          from: ../configs/data/fineweb-edu.yaml            # a configs/ piece ...
          batch_size: 8                                     # ... with overrides
    """
    import yaml

    path = Path(path)
    try:
        recipe = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UsageError(f"--config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"--config {path}: a recipe is a mapping of options, got {type(recipe).__name__}")
    return _expand(recipe, path.resolve().parent, str(path))


def preset_fields(value, where: str) -> Optional[dict]:
    """The full field dict of ``arch: <preset>`` / ``arch: {preset: <name>, ...overrides}``; None otherwise."""
    if isinstance(value, str) and not value.endswith((".yaml", ".yml")):
        name, overrides = value, {}
    elif isinstance(value, dict) and "preset" in value:
        name, overrides = value["preset"], {k: v for k, v in value.items() if k != "preset"}
    else:
        return None
    if name not in PRESETS:
        raise UsageError(f"{where}: unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    fields = dataclasses.asdict(PRESETS[name])
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise UsageError(f"{where}: preset {name!r} has no field(s) {', '.join(unknown)}")
    return {**fields, **overrides}


def _expand(node, base: Path, where: str, key: str = ""):
    import yaml

    if key.endswith("arch") and (fields := preset_fields(node, f"{where}: {key}")) is not None:
        return fields
    if isinstance(node, dict):
        node = dict(node)
        if "from" in node:
            piece = _piece_path(node.pop("from"), base, where, key)
            loaded = yaml.safe_load(piece.read_text()) or {}
            node = {**{k: _expand(v, piece.parent, str(piece), f"{key}.{k}".strip(".")) for k, v in loaded.items()},
                    **node}
        return {k: _expand(v, base, where, f"{key}.{k}".strip(".")) for k, v in node.items()}
    if isinstance(node, str) and node.endswith((".yaml", ".yml")) and (base / node).is_file():
        return str((base / node).resolve())  # a piece: absolute, since the recipe is parsed from text
    return node


def _piece_path(value, base: Path, where: str, key: str) -> Path:
    piece = base / str(value)
    if not piece.is_file():
        raise UsageError(f"{where}: {key}.from names {value!r}, which is not a file (relative to {base})")
    return piece


def expand_config_arguments(args: list[str]) -> list[str]:
    """``--config FILE`` -> ``--config <expanded recipe text>``; ``--model.arch <preset>`` -> its fields."""
    import json

    import yaml

    out, i = [], 0
    while i < len(args):
        arg = args[i]
        name, value, step = arg, None, 1
        if "=" in arg and arg.startswith("--"):
            name, value = arg.split("=", 1)
        elif arg in ("--config", "-c", "--model.arch") and i + 1 < len(args):
            value, step = args[i + 1], 2
        if name in ("--config", "-c") and value is not None and Path(value).is_file():
            out += ["--config", yaml.safe_dump(expand_recipe(value), sort_keys=False)]
        elif name == "--model.arch" and value is not None and \
                (fields := preset_fields(value, "--model.arch")) is not None:
            out += ["--model.arch", json.dumps(fields)]
        else:
            out += args[i:i + step]
        i += step
    return out


class RecipeCLI(LightningCLI):
    """LightningCLI over :class:`LoopedLMModule` and :class:`TokenDataModule` with parcae's run options."""

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, (list, tuple)):
            args = expand_config_arguments(list(args))
        given = sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else ["--config"]
        # fit --ckpt_path: a model named here (recipe, --model, --model.arch*) must be the checkpoint's
        self.model_named = any(str(a).split("=", 1)[0] in ("--config", "-c", "--model")
                               or str(a).startswith("--model.arch") for a in given)
        super().parse_arguments(parser, args)

    def __init__(self, args=None, run: bool = True, opened: Optional[tuple[str, dict]] = None, **kwargs) -> None:
        """``opened``: (``--ckpt_path``, the checkpoint as :func:`parcae.runs.check_checkpoint` returned it), when the
        caller already opened it (``parcae validate/test/predict``): neither the checks nor the evaluation's restore
        open it again."""
        self.opened_checkpoint = opened
        super().__init__(LoopedLMModule, TokenDataModule, trainer_class=ParcaeTrainer,
                         save_config_kwargs={"overwrite": True}, args=args, run=run,
                         parser_kwargs={"default_env": False}, **kwargs)

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
        parser.add_argument("--inexact_data_resume", type=bool, default=False,
                            help="fit: resume although data.batch_size, data.seq_len or the device count changed; "
                                 "model and optimizer resume, the data order differs from an uninterrupted run.")
        parser.add_argument("--output_dir", type=Optional[str], default=None,
                            help="validate/test: folder for results and TensorBoard events (default: the "
                                 "checkpoint's run directory when writable; else results are only printed).")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the hyperparameters of ``--ckpt_path`` here, before any hook. Check the file first, so
        that a damaged or foreign one is one line naming it, and read them from that same checked (memory-mapped)
        load instead of Lightning's second full ``torch.load``."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path == "last":
            return
        ckpt = self._opened(ckpt_path, allow_sharded=subcommand == "fit")
        self.opened_checkpoint = (ckpt_path, ckpt)  # what the checks below read, instead of opening it again
        hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k != "_instantiator"}
        if not hparams:
            return  # a sharded folder: its hyperparameters stay in meta.pt, and the config describes the model
        if subcommand == "fit" and getattr(self, "model_named", False) and "arch" in hparams:
            # a fit continues the recipe's model: never swap in the checkpoint's (even with --inexact_data_resume)
            rundir.check_same_model(ckpt, ckpt_path, dataclasses.asdict(model_config_of(self.config[subcommand])))
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def _opened(self, ckpt_path: str, allow_sharded: bool = False) -> dict:
        """The checkpoint opened before (by the caller or ``_parse_ckpt_path``), when it is this path; else checked
        (opened) now."""
        path, ckpt = self.opened_checkpoint or (None, None)
        return ckpt if path == ckpt_path else rundir.check_checkpoint(ckpt_path, allow_sharded=allow_sharded)

    # -- run directory rules ----------------------------------------------------------------------------
    def _cfg(self):
        """This command's config (``run=False`` parses without a subcommand: treated like fit)."""
        return self.config if self.subcommand is None else self.config[self.subcommand]

    def _run_dir(self) -> Path:
        return Path(self._cfg().runs_dir) / self._cfg().run_name

    def before_instantiate_classes(self) -> None:
        """Every check before anything is built or written: options, data and its vocabulary, the model, and (fit)
        the run directory and the checkpoint to resume. A refused fit leaves the run directory byte for byte as it
        was; the first write (the run's lock) happens in :meth:`before_fit`."""
        cfg = self._cfg()
        check_options(**{"data.batch_size": (cfg.data.batch_size, 1), "data.seq_len": (cfg.data.seq_len, 1),
                         "data.val_batch_size": (cfg.data.get("val_batch_size"), 1),
                         "data.num_workers": (cfg.data.get("num_workers"), 0),
                         "checkpoint_every": (cfg.checkpoint_every, 1), "val_every": (cfg.val_every, 1),
                         "global_batch_size": (cfg.global_batch_size, 1), "max_tokens": (cfg.max_tokens, 1)})
        for root in ([cfg.data.datasets] if isinstance(cfg.data.datasets, str) else cfg.data.datasets):
            open_shards(root, cfg.data.get("prepare_hint"))  # fail fast, before a large model is built
        model_config = model_config_of(cfg)
        arch = dataclasses.asdict(model_config)
        if self.subcommand not in ("fit", None):
            if cfg.get("ckpt_path"):
                rundir.check_same_model(self._opened(cfg.ckpt_path), cfg.ckpt_path, arch)
            return
        resolve_run_length(cfg)
        self._check_schedule(cfg)
        self.data_tokenizer = check_data(cfg, model_config)
        run_dir = self._run_dir()
        self.unreadable: list[Path] = []
        resume, self.notes = rundir.plan_fit(run_dir, cfg.get("ckpt_path"), cfg.auto_resume, self.unreadable)
        self.resuming = resume is not None
        if resume is not None:
            trainer = cfg.trainer
            world = device_count(trainer.accelerator, trainer.devices) * (trainer.num_nodes or 1)
            saved = rundir.check_checkpoint(resume, allow_sharded=True)
            self.notes += rundir.check_resume_compatible(saved, resume, arch, cfg.data.batch_size,
                                                         cfg.data.seq_len, world, cfg.inexact_data_resume)
            check_same_tokenizer(run_dir, self.data_tokenizer)
            data_module(cfg).moved_shards(saved, resume)  # refuse shards that are not the run's, before any write
            cfg.ckpt_path = str(resume)

    @staticmethod
    def _check_schedule(cfg) -> None:
        from .optim import ScheduleConfig

        schedule, default = cfg.model.get("schedule"), ScheduleConfig().name
        name = schedule.get("name", default) if hasattr(schedule, "get") else getattr(schedule, "name", default)
        max_steps = cfg.trainer.max_steps
        if (max_steps is None or max_steps < 1) and name != "constant":
            raise UsageError(f"trainer.max_steps must be set (> 0) for the {name!r} learning-rate schedule")

    def _take_run_directory(self) -> None:
        """fit: the first writes into the run directory, after every check passed and every object was built: the
        lock, damaged checkpoints kept aside, files of a start that wrote no checkpoint moved aside, and the run's
        own copy of its tokenizer (so every verb finds it from any folder)."""
        run_dir = self._run_dir()
        lock = rundir.RunLock(run_dir).acquire()
        if not lock.held:  # a helper process of a multi-process run: the first process tidies and reports
            return
        notes = list(self.notes)
        if lock.note:
            notes.insert(0, lock.note)
        notes.append(rundir.set_aside_unreadable(self.unreadable))
        if not self.resuming:
            notes.append(rundir.set_aside_failed_start(run_dir))
        if self.data_tokenizer is not None and not (run_dir / TOKENIZER_FILE).is_file():
            copy_atomically(self.data_tokenizer, run_dir / TOKENIZER_FILE, "the run's copy of its tokenizer")
        for note in filter(None, notes):
            print(f"[parcae] {note}", flush=True)

    def instantiate_trainer(self, **kwargs):
        cfg = self._cfg()
        run_dir = self._run_dir()
        self.results_dir: Optional[Path] = run_dir
        if self.subcommand in ("validate", "test", "predict"):
            # Evaluations never write the training record (no config.yaml); their results go to --output_dir,
            # the checkpoint's folder when it can be written, or nowhere (printed, with a note).
            self.save_config_callback = None
            ckpt_path = cfg.get("ckpt_path")
            self.results_dir, note = rundir.results_dir_for(ckpt_path or run_dir, cfg.get("output_dir"))
            if note and self.subcommand != "predict":
                print(f"[parcae] {note}", flush=True)
            if self.results_dir is None or self.subcommand == "predict":
                kwargs.setdefault("logger", False)
            else:
                kwargs.setdefault("logger", TensorBoardLogger(save_dir=self.results_dir.parent,
                                                              name=self.results_dir.name, version="",
                                                              default_hp_metric=False))
        kwargs.setdefault("logger", TensorBoardLogger(save_dir=cfg.runs_dir, name=cfg.run_name, version="",
                                                      default_hp_metric=False))
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_cfg.get("callbacks") or [])
        callbacks += [RunSummary(), ThroughputCallback()]
        if trainer_cfg.get("enable_progress_bar") is not False:
            callbacks.append(StepProgressBar())
        if self.subcommand in ("fit", None):
            callbacks.append(RunCheckpoint(dirpath=run_dir, every_n_train_steps=cfg.checkpoint_every))
        kwargs["callbacks"] = callbacks
        plugins = trainer_cfg.get("plugins") or []
        # validate/test/predict restore the checkpoint their checks opened (memory-mapped) instead of loading it again
        opened = self.opened_checkpoint if self.subcommand not in ("fit", None) else None
        kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), AtomicCheckpointIO(opened)]
        kwargs.setdefault("enable_model_summary", False)  # RunSummary prints ours
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        self._take_run_directory()


def check_data(cfg, arch: ModelConfig) -> Optional[Path]:
    """The data of a fit fits its model: every shard folder (and ``data.tokenizer``) has the model's vocabulary
    and one tokenizer; returns that tokenizer's file. Builds the data module's metadata only (manifests)."""
    dm = data_module(cfg)
    dm.check_vocabulary(arch.vocab_size, arch.name)
    return dm.tokenizer_path


def data_module(cfg) -> TokenDataModule:
    """The data module a parsed config describes (reads manifests only when asked; nothing is loaded)."""
    data = cfg.data.as_dict() if hasattr(cfg.data, "as_dict") else dict(cfg.data)
    return TokenDataModule(**{k: v for k, v in data.items() if not k.startswith("__")})


def check_same_tokenizer(run_dir: Path, tokenizer: Optional[Path]) -> None:
    """A resumed run keeps its tokenizer: refuse data tokenized with another file than the run's own copy."""
    from parcae.data.tokenizer import file_sha256

    own = run_dir / TOKENIZER_FILE
    if tokenizer is None or not own.is_file():
        return  # runs trained before fit kept a copy: the vocabulary check is what there is
    if file_sha256(own) != file_sha256(tokenizer):
        raise UsageError(f"{run_dir} was trained with {own} but the data was tokenized with {tokenizer}, another "
                         "tokenizer; resume with the run's data, or start a new --run_name")


def resolve_run_length(cfg, quiet: bool = False) -> None:
    """Paper quantities -> Trainer settings: accumulation from the global batch, steps from tokens."""
    trainer = cfg.trainer
    devices = device_count(trainer.accelerator, trainer.devices)
    per_pass = cfg.data.batch_size * devices * (trainer.num_nodes or 1)
    if cfg.global_batch_size is not None:
        if cfg.global_batch_size < 1 or cfg.global_batch_size % per_pass:
            raise UsageError(f"global_batch_size {cfg.global_batch_size} is not a multiple of data.batch_size x "
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


def device_count(accelerator, devices) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


class _ParseOnlyCLI(RecipeCLI):
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
        resolve_run_length(cli.config, quiet=True)
    return cli.config


def model_config_of(cfg) -> ModelConfig:
    """The ModelConfig of a parsed config (``cfg.model.arch``), without jsonargparse's bookkeeping keys."""
    arch = cfg.model.arch
    values = arch.as_dict() if hasattr(arch, "as_dict") else dict(arch)
    return ModelConfig(**{f.name: values[f.name] for f in dataclasses.fields(ModelConfig) if f.name in values})
