"""The Hugging Face folder layout of a parcae model: ``parcae export --format hf`` writes it, ``parcae import`` reads it.

    parcae export --format hf checkpoints/mini-parcae out/mini-parcae-hf
    parcae import out/mini-parcae-hf --run_name back

The folder (docs/ecosystem.md):

    config.json                 ParcaeConfig: model_type "parcae", auto_map, every ModelConfig field, num_loops
    model.safetensors           parcae's own state dict under "model." (LoopedLM names: wte, prelude.0.attn.q_proj, ...)
    configuration_parcae.py     parcae/hf/configuration_parcae.py, verbatim (remote code: torch + transformers)
    modeling_parcae.py          parcae/hf/modeling_parcae.py, verbatim: transformers classes around LoopedLM
    config.py, looped.py, ...   parcae's model files, verbatim: the one model source, no second copy (the files
                                trust_remote_code runs are parcae.hf.modeling_parcae.REMOTE_CODE)
    generation_config.json      BOS / EOS / PAD ids, greedy by default
    tokenizer.json              the run's tokenizer with a post-processor that puts <|bos|> in front
    tokenizer_config.json       PreTrainedTokenizerFast with bos/eos/pad tokens and the context length

The weights keep parcae's names, so export -> import is the identity on the state dict and on the ModelConfig.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from parcae.model import LoopedLM, ModelConfig

from .release import CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_FILES, InteropError

WEIGHTS_FILE = "model.safetensors"
PREFIX = "model."  # ParcaeForCausalLM.model is a LoopedLM


def is_hf_folder(path: str | Path) -> bool:
    """A local folder whose config.json says ``model_type: parcae``."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "parcae"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


# ModelConfig fields ParcaeConfig has no parameter for: training-only settings that ride along in config.json as
# extra attributes (transformers keeps unknown keyword arguments) and come back on import. Any other ModelConfig field
# must be a ParcaeConfig parameter, or export refuses (a new field must not vanish into **kwargs unnoticed).
TRAINING_ONLY_FIELDS = ("depth_scheme", "depth_granularity", "init")


def hf_config(config: ModelConfig, num_loops: Optional[int] = None, bos: int = 0, eos: int = 1,
              pad: Optional[int] = 2):
    """The ParcaeConfig of a ModelConfig (every field kept; training-only ones ride along as extra attributes)."""
    import inspect

    from parcae.hf import ParcaeConfig
    from parcae.hf.modeling_parcae import AUTO_MAP

    fields = dataclasses.asdict(config)
    known = inspect.signature(ParcaeConfig.__init__).parameters
    unknown = [f for f in fields if f not in known and f not in TRAINING_ONLY_FIELDS]
    if unknown:
        raise InteropError(f"ModelConfig field(s) {', '.join(unknown)} have no ParcaeConfig parameter: teach "
                           "parcae/hf/configuration_parcae.py (and the model code) them, or list them in "
                           "TRAINING_ONLY_FIELDS, before exporting")
    return ParcaeConfig(**fields, num_loops=num_loops, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                        architectures=["ParcaeForCausalLM"], auto_map=dict(AUTO_MAP))


# ModelConfig fields a folder may leave out (the default is then taken): a label and training-only settings that do
# not change what the model computes. Every other field is required: a default would silently build another model.
OPTIONAL_FIELDS = ("name", "depth_scheme", "depth_granularity", "init")


def model_config_of(config: dict[str, Any], where: Path) -> ModelConfig:
    """The ModelConfig stored in an HF folder's config.json (its ModelConfig fields); refuses, in one line naming
    them, a config.json that lacks any field besides :data:`OPTIONAL_FIELDS` (every export writes them all)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    missing = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in config and f.name not in OPTIONAL_FIELDS]
    if missing:
        raise InteropError(f"{where} lacks the model field{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
                           "refusing to fill in defaults (a parcae HF export writes every field)")
    try:
        return ModelConfig(**{k: v for k, v in config.items() if k in names})
    except (TypeError, ValueError) as err:
        raise InteropError(f"{where}: not a parcae model configuration ({str(err).splitlines()[0]})") from None


def _hf_tokenizer(tokenizer_json: Path, block_size: int):
    """A PreTrainedTokenizerFast of the run's tokenizer that frames text as parcae does (<|bos|> first, no EOS)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from parcae.data.tokenizer import BOS, EOS, PAD

    tok = Tokenizer.from_file(str(tokenizer_json))
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B:1",
                                                       special_tokens=[(BOS, bos)])
    pad = PAD if tok.token_to_id(PAD) is not None else EOS  # batched generation pads; never attended
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=pad,
                                   model_max_length=block_size, padding_side="left", clean_up_tokenization_spaces=False)


def export_hf(model: LoopedLM, tokenizer_json: Path, out: Path, num_loops: Optional[int] = None) -> Path:
    """Write ``model`` and its tokenizer as the HF folder ``out`` (atomically; refuses a non-empty ``out``)."""
    from transformers import GenerationConfig

    from parcae.hf import ParcaeForCausalLM

    from parcae.runs import write_folder_atomically

    cfg = model.config
    if num_loops is not None and (isinstance(num_loops, bool) or not isinstance(num_loops, int) or num_loops < 1):
        raise InteropError(f"--num_loops must be an integer >= 1, got {num_loops!r}")
    if num_loops not in (None, 1) and not cfg.looped:
        raise InteropError(f"--num_loops {num_loops}: {cfg.name} is a fixed-depth model (injection='none')")
    num_loops = num_loops if cfg.looped else 1
    tokenizer = _hf_tokenizer(tokenizer_json, cfg.block_size)
    ids = {k: tokenizer.convert_tokens_to_ids(getattr(tokenizer, f"{k}_token")) for k in ("bos", "eos", "pad")}
    config = hf_config(cfg, num_loops, ids["bos"], ids["eos"], ids["pad"])
    hf_model = ParcaeForCausalLM(config)
    hf_model.model.load_state_dict(model.state_dict(), strict=True)
    hf_model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                                  pad_token_id=ids["pad"], do_sample=False)

    def fill(staging: Path) -> None:
        hf_model.save_pretrained(staging, safe_serialization=True)  # weights, config and the remote code
        tokenizer.save_pretrained(staging)
        _usual_file_modes(staging)

    write_folder_atomically(out, fill, "output folder")
    return out


def _usual_file_modes(folder: Path) -> None:
    """Give every file the mode a plain new file gets (0644 under the usual umask 022): safetensors writes its file
    0600, which would leave the weights unreadable to the others who can read the rest of the folder."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def code_files(folder: Path) -> list[str]:
    """The Python files of an HF folder: what ``trust_remote_code=True`` runs."""
    return sorted(p.name for p in Path(folder).glob("*.py"))


def read_hf_folder(root: Path) -> tuple[LoopedLM, dict[str, Path], dict[str, Any]]:
    """(our model with the folder's weights, its tokenizer files, its config.json) of an HF folder we wrote."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = json.loads((root / CONFIG_FILE).read_text())
    cfg = model_config_of(config, root / CONFIG_FILE)
    if not (root / WEIGHTS_FILE).is_file():
        raise InteropError(f"{root} has no {WEIGHTS_FILE}")
    try:
        state = load_file(root / WEIGHTS_FILE)
    except (SafetensorError, OSError) as err:
        raise InteropError(f"cannot read {root / WEIGHTS_FILE}: {str(err).splitlines()[0]}") from None
    foreign = sorted(k for k in state if not k.startswith(PREFIX))
    if foreign:
        raise InteropError(f"{root / WEIGHTS_FILE}: key {foreign[0]!r} is not under {PREFIX!r}; not a parcae HF folder")
    model = LoopedLM(cfg)
    try:
        model.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        raise InteropError(f"{root / WEIGHTS_FILE} does not fit a {cfg.name} model: "
                           f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
    model.eval()
    tokenizer_files = {n: root / n for n in TOKENIZER_FILES if (root / n).is_file()}
    if TOKENIZER_FILE not in tokenizer_files:
        raise InteropError(f"{root} has no {TOKENIZER_FILE}")
    return model, tokenizer_files, config


def weights_sha256(root: Path) -> dict[str, str]:
    from parcae.data.tokenizer import file_sha256

    return {p.name: file_sha256(p) for p in (root / CONFIG_FILE, root / WEIGHTS_FILE)}

