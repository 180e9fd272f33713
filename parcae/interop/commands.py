"""``parcae import`` and ``parcae export``: the official release layout <-> a parcae run directory.

    parcae import SandyResearch/parcae-140m                       # Hub id -> checkpoints/parcae-140m/
    parcae import path/to/release --run_name mine --runs_dir runs # a local folder in the official layout
    parcae export --format official checkpoints/parcae-140m out/parcae-140m
    parcae export --format hf checkpoints/parcae-140m out/parcae-140m-hf   # transformers / lm-eval / vLLM folder
    parcae import out/parcae-140m-hf --run_name back                       # an HF folder we wrote, read back

See docs/released_models.md for the walk-through (loop sweep, CORE, generation) on the released models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal, Optional

import torch

from .release import (CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_FILES, InteropError, is_hub_id, official_config_json,
                      official_model, resolve_source, resolve_tokenizer, unrepresentable)
from parcae.runs import check_new_folder, load_checkpoint, write_folder_atomically

from .hf_folder import WEIGHTS_FILE, code_files, export_hf, is_hf_folder, read_hf_folder, weights_sha256
from .runs import CHECKPOINT, write_run

EXPORT_WEIGHTS = "model.pt"  # what official save_pretrained writes


def _default_run_name(source: str) -> str:
    return Path(source.rstrip("/")).name or "imported"


def _check_tokenizer(files: dict[str, Path], vocab_size: int) -> None:
    from parcae.data import DataError, check_tokenizer_fits, load_tokenizer

    path = files[TOKENIZER_FILE]
    try:
        tok = load_tokenizer(str(path.resolve()))
    except ValueError as err:  # missing <|bos|>/<|eos|>, or not a tokenizers file
        raise InteropError(f"{err}; parcae frames documents as <|bos|> ... <|eos|> — pass --tokenizer with one "
                           "that has them") from None
    except Exception as err:
        raise InteropError(f"{path} is not a tokenizers tokenizer.json ({type(err).__name__})") from None
    try:
        check_tokenizer_fits(tok, path, vocab_size)  # the rule every verb applies when it loads the run
    except DataError as err:
        raise InteropError(f"{err}; it is not this model's tokenizer") from None


def summary_lines(model, run_dir: Path) -> list[str]:
    cfg = model.config
    counts = model.parameter_counts()
    total = counts.pop("total")
    kind = (f"looped ({cfg.injection} injection), μ_rec = {cfg.mean_recurrence}, μ_bwd = {cfg.backprop_depth}, "
            f"P/R/C = {cfg.n_prelude}/{cfg.n_recurrent}/{cfg.n_coda}" if cfg.looped
            else f"fixed-depth GPT, {cfg.n_layers} layers")
    ckpt = run_dir / CHECKPOINT
    lines = [f"{cfg.name}: {total:,} parameters; {kind}; d = {cfg.d_model}, vocab {cfg.vocab_size:,}, "
             f"context {cfg.block_size}",
             "  " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if v),
             f"written: {run_dir} ({CHECKPOINT}, config.yaml, tokenizer.json, import.json)",
             "next:",
             f"  parcae perplexity --ckpt_path {ckpt} --text wiki.test.raw --loops "
             + ("1,2,4,8,16" if cfg.looped else "1"),
             f"  parcae predict --ckpt_path {ckpt} --prompt \"The meaning of life is\""
             + (f" --loops {cfg.mean_recurrence}" if cfg.looped else ""),
             f"  parcae core --ckpt_path {ckpt} --bundle <eval_bundle>",
             f"  python -m data_prep.shards --tokenizer {run_dir / TOKENIZER_FILE} --input <texts> --output <shards>",
             f"  parcae test --ckpt_path {ckpt} --data.datasets [<shards>]" + (" --loops 1-16" if cfg.looped else ""),
             f"  parcae export --format official {run_dir} <folder>"]
    return lines


def import_release(source: str, run_name: Optional[str] = None, runs_dir: str | Path = "checkpoints",
                   tokenizer: Optional[str] = None, quiet: bool = False) -> Path:
    """Import an official release (local folder or Hub id) into ``<runs_dir>/<run_name>``; returns the run dir."""
    from parcae.data.tokenizer import file_sha256

    run_dir = Path(runs_dir) / (run_name or _default_run_name(source))
    check_new_folder(run_dir, "--run_name")  # fail before any download
    if is_hf_folder(source):  # our Hugging Face layout (parcae export --format hf)
        return _import_hf_folder(Path(source), run_dir, tokenizer, quiet)
    hub = not Path(source).exists() and is_hub_id(source)
    folder = resolve_source(source)
    tokenizer_files = resolve_tokenizer(folder, tokenizer, hub)
    model = official_model(folder)
    _check_tokenizer(tokenizer_files, model.config.vocab_size)
    provenance = {"source": source, "hub": hub, "folder": str(folder.root.resolve()),
                  "class_name": folder.class_name, "official_config": folder.config,
                  "files": {p.name: file_sha256(p) for p in [folder.root / CONFIG_FILE, folder.weights]},
                  "tokenizer_source": str(tokenizer_files[TOKENIZER_FILE])}
    write_run(model, run_dir, tokenizer_files, provenance,
              checkpoint_extra={"imported": {"source": source, "class_name": folder.class_name,
                                             "official_config": folder.config}})
    if not quiet:
        print("\n".join(summary_lines(model, run_dir.resolve())), flush=True)
    return run_dir


def _import_hf_folder(root: Path, run_dir: Path, tokenizer: Optional[str], quiet: bool) -> Path:
    model, tokenizer_files, config = read_hf_folder(root)
    if tokenizer is not None:
        tokenizer_files = resolve_tokenizer(None, tokenizer, hub=False)
    _check_tokenizer(tokenizer_files, model.config.vocab_size)
    provenance = {"source": str(root), "hub": False, "folder": str(root.resolve()), "format": "hf",
                  "num_loops": config.get("num_loops"), "files": weights_sha256(root),
                  "tokenizer_source": str(tokenizer_files[TOKENIZER_FILE])}
    write_run(model, run_dir, tokenizer_files, provenance, checkpoint_extra={"imported": {"source": str(root),
                                                                                          "format": "hf"}})
    if not quiet:
        print("\n".join(summary_lines(model, run_dir.resolve())), flush=True)
    return run_dir


def _load_run(run: str | Path, out: Path):
    """The run to export (``parcae.runs.LoadedRun``: model, tokenizer, metadata; the checkpoint opened once);
    refuses an ``out`` that is a file or a non-empty folder first."""
    check_new_folder(out, "output folder")  # before loading a large checkpoint
    return load_checkpoint(run)  # a run directory (its newest good checkpoint) or a file


def export_hf_run(run: str | Path, out: str | Path, num_loops: Optional[int] = None, quiet: bool = False) -> Path:
    """Write a run's checkpoint as a Hugging Face folder (transformers, lm-eval, PEFT, vLLM); returns ``out``."""
    out = Path(out)
    loaded = _load_run(run, out)
    export_hf(loaded.model, loaded.tokenizer_path, out, num_loops)
    if not quiet:
        code = code_files(out)
        print(f"written: {out} (config.json [model_type parcae], {WEIGHTS_FILE}, {', '.join(code)}, "
              f"generation_config.json, tokenizer); load it with "
              f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True), which runs the folder's "
              f"own Python files ({', '.join(code)}) — docs/ecosystem.md", flush=True)
    return out


def export_official(run: str | Path, out: str | Path, quiet: bool = False) -> Path:
    """Write a run's checkpoint in the official layout to the new folder ``out``; returns ``out``."""
    from parcae.model import to_official

    out = Path(out)
    loaded = _load_run(run, out)
    model, tokenizer = loaded.model, loaded.tokenizer_path
    problem = unrepresentable(model.config)
    if problem:
        raise InteropError(f"{model.config.name} cannot be written in the official layout: {problem}")
    previous = (loaded.metadata.get("imported") or {}).get("official_config")  # an imported release's config.json
    state, _ = to_official(model)
    config = official_config_json(model, previous)
    tokenizer_files = {n: tokenizer.parent / n for n in TOKENIZER_FILES if (tokenizer.parent / n).is_file()
                       and n != TOKENIZER_FILE}
    tokenizer_files[TOKENIZER_FILE] = tokenizer

    def fill(staging: Path) -> None:
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        torch.save(state, staging / EXPORT_WEIGHTS)
        for name, path in tokenizer_files.items():
            shutil.copyfile(path, staging / name)

    write_folder_atomically(out, fill, "output folder")
    if not quiet:
        print(f"written: {out} ({CONFIG_FILE} [{config['_class_name']}], {EXPORT_WEIGHTS}, "
              f"{', '.join(sorted(tokenizer_files))}); load it with parcae_lm.from_pretrained or "
              f"`parcae import {out}`", flush=True)
    return out


def import_command(source: str, /, *, run_name: Optional[str] = None, runs_dir: str = "checkpoints",
                   tokenizer: Optional[str] = None) -> None:
    """Import an official Parcae/GPT release (local folder or Hugging Face Hub id) into a run directory.

    Args:
        source: a folder with config.json + pytorch_model.bin/model.pt, or a Hub id (e.g. SandyResearch/parcae-140m).
        run_name: run directory name (default: the source's last component).
        runs_dir: parent folder of run directories.
        tokenizer: tokenizer.json, a folder holding one, or a Hub id (default: the release's own; Hub releases
            without one: SandyResearch/parcae-tokenizer).
    """
    import_release(source, run_name, runs_dir, tokenizer)


def export_command(run: str, out: str, /, *, format: Literal["official", "hf"] = "official",  # noqa: A002
                   num_loops: Optional[int] = None) -> None:
    """Write a run's model in another layout.

    Args:
        run: run directory (its newest good checkpoint) or a .ckpt file.
        out: output folder (must not exist or be empty).
        format: official: the parcae_lm save_pretrained layout (config.json, model.pt, tokenizer); hf: a
            transformers folder (AutoModelForCausalLM with trust_remote_code, lm-eval, vLLM).
        num_loops: with --format hf: the loop count a forward runs by default (default: μ_rec).
    """
    if format == "hf":
        export_hf_run(run, out, num_loops)
    elif num_loops is not None:
        raise InteropError("--num_loops applies to --format hf only")
    else:
        export_official(run, out)
