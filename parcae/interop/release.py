"""The official release layout: a folder (or Hugging Face Hub repository) as the official ``parcae_lm`` package's
``save_pretrained`` writes it and ``from_pretrained`` reads it (github.com/sandyresearch/parcae @ dee8363,
parcae_lm/__init__.py):

    config.json                 every field of the official config dataclass + "_class_name" (ParcaeConfig | GPTConfig)
    pytorch_model.bin | model.pt  a plain state dict with official key names
    tokenizer.json              (+ optional tokenizer_config.json, special_tokens_map.json)

Reading goes through :func:`parcae.model.from_official` (which refuses keys it cannot place, by name); writing
through :func:`parcae.model.to_official`. Everything here raises :class:`InteropError` (one line) for bad input.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from parcae.errors import UsageError

from parcae.model import LoopedLM, ModelConfig
from parcae.model.config import has_value_embedding
from parcae.model.official import official_block_prefix

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("pytorch_model.bin", "model.pt")  # the order official from_pretrained tries them
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
CLASS_NAMES = {"ParcaeConfig": "Parcae", "GPTConfig": "GPT"}
# The official evaluation script loads this tokenizer for hub models when none is given (scripts/eval.py).
OFFICIAL_TOKENIZER_REPO = "SandyResearch/parcae-tokenizer"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class InteropError(UsageError):
    """Unusable input for import/export; the message is one line."""


@dataclass
class OfficialFolder:
    root: Path
    config: dict[str, Any]        # config.json without "_class_name"
    class_name: str               # "ParcaeConfig" or "GPTConfig"
    weights: Path
    tokenizer_files: dict[str, Path]

    @property
    def is_gpt(self) -> bool:
        return self.class_name == "GPTConfig"


# -- reading -----------------------------------------------------------------------------------------------
def read_folder(root: str | Path) -> OfficialFolder:
    """Check a local folder in the official layout (config, class name, weights) without loading the weights."""
    root = Path(root)
    if not root.is_dir():
        raise InteropError(f"{root} is not a folder")
    if not (root / CONFIG_FILE).is_file():
        raise InteropError(f"{root} has no {CONFIG_FILE}, so it is not an official release folder "
                           f"(expected {CONFIG_FILE} + {' or '.join(WEIGHT_FILES)})")
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InteropError(f"{root / CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise InteropError(f"{root / CONFIG_FILE} does not hold a JSON object")
    class_name = config.pop("_class_name", None)
    if class_name not in CLASS_NAMES:
        raise InteropError(f"{root / CONFIG_FILE}: _class_name={class_name!r} is not an official model config "
                           f"(known: {', '.join(CLASS_NAMES)})")
    weights = next((root / w for w in WEIGHT_FILES if (root / w).is_file()), None)
    if weights is None:
        raise InteropError(f"{root} has no weights ({' or '.join(WEIGHT_FILES)})")
    tokenizer_files = {name: root / name for name in TOKENIZER_FILES if (root / name).is_file()}
    return OfficialFolder(root, config, class_name, weights, tokenizer_files)


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.startswith((".", "/"))


def download(repo_id: str, files: tuple[str, ...] = (CONFIG_FILE, *WEIGHT_FILES, *TOKENIZER_FILES),
             revision: Optional[str] = None) -> Path:
    """The local snapshot folder of a Hub repository (only ``files``); one-line InteropError when it cannot be had
    (offline without a cached copy, unknown repository, network error)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files)))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        from huggingface_hub import constants

        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
               "the Hub could not be reached (no network, or an unknown repository)")
        raise InteropError(f"cannot download {repo_id}: {why} and it is not in the local cache "
                           f"({type(err).__name__}); pass a local folder in the official layout instead") from None
    except HfHubHTTPError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InteropError(f"cannot download {repo_id} from the Hugging Face Hub: {first}") from None
    except OSError as err:  # connection problems
        raise InteropError(f"cannot download {repo_id} from the Hugging Face Hub: {type(err).__name__}: {err}") \
            from None


def resolve_source(source: str) -> OfficialFolder:
    """A local folder, or a Hub repository id downloaded to the local cache."""
    path = Path(source)
    if path.exists():
        return read_folder(path)
    if not is_hub_id(source):
        raise InteropError(f"{source}: no such folder (and not a Hub repository id like SandyResearch/parcae-140m)")
    return read_folder(download(source))


def resolve_tokenizer(folder: OfficialFolder, tokenizer: Optional[str], hub: bool) -> dict[str, Path]:
    """The tokenizer files to use: ``tokenizer`` (a tokenizer.json, a folder holding one, or a Hub id), else the
    release's own, else (Hub releases only) the official tokenizer repository."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_file():
            return {TOKENIZER_FILE: path}
        if path.is_dir():
            files = {n: path / n for n in TOKENIZER_FILES if (path / n).is_file()}
            if TOKENIZER_FILE not in files:
                raise InteropError(f"--tokenizer {tokenizer}: the folder has no {TOKENIZER_FILE}")
            return files
        if not is_hub_id(tokenizer):
            raise InteropError(f"--tokenizer {tokenizer}: no such file or folder")
        root = download(tokenizer, TOKENIZER_FILES)
        return resolve_tokenizer(folder, str(root), hub=False)
    if TOKENIZER_FILE in folder.tokenizer_files:
        return folder.tokenizer_files
    if hub:
        return resolve_tokenizer(folder, OFFICIAL_TOKENIZER_REPO, hub=False)
    raise InteropError(f"{folder.root} has no {TOKENIZER_FILE}; pass --tokenizer <tokenizer.json or Hub id>")


def load_weights(folder: OfficialFolder) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(folder.weights, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: say which, in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InteropError(f"cannot read {folder.weights} as a PyTorch state dict: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InteropError(f"{folder.weights} does not hold a plain state dict (name -> tensor)")
    return state


# -- configs -----------------------------------------------------------------------------------------------
def our_config(folder: OfficialFolder) -> ModelConfig:
    """Our ModelConfig for the folder's official config; refuses what the conversion cannot represent."""
    from parcae.model import config_from_official

    config = dict(folder.config)
    if config.get("mup_model_scaling_factor", 1) != 1:
        raise InteropError(f"official config field mup_model_scaling_factor={config['mup_model_scaling_factor']} "
                           "is not supported (only 1)")
    # The class name decides the family (the conversion otherwise guesses from the name).
    config["model_class_name"] = CLASS_NAMES[folder.class_name]
    if not folder.is_gpt and str(config.get("name", "")).startswith("gpt"):
        config["name"] = "parcae-" + str(config["name"])
    try:
        cfg = config_from_official(config)
    except KeyError as err:
        raise InteropError(f"{folder.root / CONFIG_FILE} lacks the field {err.args[0]!r}") from None
    except ValueError as err:
        raise InteropError(f"{folder.root / CONFIG_FILE}: {err}") from None
    return cfg


def official_gate_blocks(cfg: ModelConfig) -> set[int]:
    """Our stack indices whose block the official code gives a value-embedding gate.

    The official Parcae builds the tables over the P+R+C distinct blocks (as we do) but each block's gate from
    its layer id in the unrolled model (prelude i, core P+i, coda P+R·μ_rec+i) against ``n_layer = R·μ_bwd``.
    """
    if not cfg.value_embeddings:
        return set()
    if not cfg.looped:
        return {i for i in range(cfg.n_layers) if has_value_embedding(i, cfg.n_layers)}
    P, R = cfg.n_prelude, cfg.n_recurrent
    n_layer = R * cfg.backprop_depth
    gated = set()
    for i in range(cfg.n_layers):
        layer_id = i if i < P + R else P + R * cfg.mean_recurrence + (i - P - R)
        if has_value_embedding(layer_id, n_layer):
            gated.add(i)
    return gated


def value_embedding_disagreement(cfg: ModelConfig) -> Optional[str]:
    """None when the official code's value-embedding tables and gates sit on the same blocks (then our model is
    exactly the official one); else one line naming the first official key that would be dead, and why."""
    tables, gates = set(cfg.value_embedding_layers), official_gate_blocks(cfg)
    if tables == gates:
        return None
    n_layer = cfg.n_recurrent * cfg.backprop_depth
    rule = (f"the official code places value-embedding tables over the P+R+C = {cfg.n_layers} blocks but gates by "
            f"n_layer = R·μ_bwd = {cfg.n_recurrent}·{cfg.backprop_depth} = {n_layer}")
    i = min(tables ^ gates)
    if i in tables:
        return (f"value_embeds.{i}.weight: {rule}, so block {i} has a table and no gate and the table is never "
                "read; parcae keeps tables and gates together and cannot represent it")
    return (f"{official_block_prefix(cfg, i)}attn.ve_gate.weight: {rule}, so block {i} has a gate and no table "
            "and the gate is never used; parcae keeps tables and gates together and cannot represent it")


def official_model(folder: OfficialFolder, state: Optional[dict[str, torch.Tensor]] = None) -> LoopedLM:
    """Our model holding the folder's weights (refuses unplaceable keys and value-embedding disagreements)."""
    from parcae.model import from_official

    cfg = our_config(folder)
    problem = value_embedding_disagreement(cfg)
    if problem:
        raise InteropError(problem)
    state = load_weights(folder) if state is None else state
    try:
        return from_official(state, cfg)
    except ValueError as err:
        raise InteropError(f"{folder.weights}: {err}") from None


# -- writing -----------------------------------------------------------------------------------------------
# Fields of the official config dataclasses (parcae_lm/models/config.py, gpt/config.py, parcae/config.py) with
# their defaults; config.json must hold exactly these (from_pretrained passes them to the dataclass).
_BASE_FIELDS: dict[str, Any] = {
    "name": "", "hf_config": {}, "block_size": 4096, "n_embd": 4096, "intermediate_size": None,
    "num_attention_heads": 32, "num_key_value_heads": None, "vocab_size": 50254, "padding_multiple": 512,
    "padded_vocab_size": None, "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50000},
    "use_abacus": False, "randomize_positions_from": None, "block_class_name": "TransformerPreNormBlock",
    "norm_class_name": "RMSNorm", "attn_impl": "flash", "norm_eps": 1e-5, "mlp_class_name": "BaseMLP",
    "nonlin_name": "ReLU2", "bias": False, "qk_bias": False, "init_strategy": "scaled-zero",
    "init_orthogonal": True, "skip_initialization": False, "mup_model_scaling_factor": 1,
    "use_fused_head": "pytorch", "debias_attention": False, "center_attention": False, "clip_qkv": None,
    "qk_norm": True, "logit_softcap": None, "activation_checkpoint_impl": "per-block", "simple_ops": False,
    "strategy": "single",
}
_CLASS_FIELDS: dict[str, dict[str, Any]] = {
    "GPTConfig": {"n_layer": 16, "tie_embeddings": True},
    "ParcaeConfig": {
        "injection_type": "diagonal", "n_layers_in_recurrent_block": 4, "n_layers_in_prelude": 1,
        "n_layers_in_coda": 1, "state_init": "like-init", "recurrent_embedding_dimension": 1024,
        "recurrent_intermediation_embedding_dimension": 3520, "recurrent_num_attention_heads": None,
        "prelude_norm": True, "sampling_scheme": "poisson-truncated-full", "mean_recurrence": 32,
        "mean_backprop_depth": 8, "lockstep_n": False, "lockstep_k": False, "curriculum_target": "forward",
        "recurrent_iteration_method": "per-sequence", "tie_embeddings": True, "model_class_name": "Parcae",
        "activation_checkpoint_impl": "per-iteration",
        "_is_recurrent_block_config": False,
    },
}


def unrepresentable(cfg: ModelConfig) -> Optional[str]:
    """One line naming the first feature of ``cfg`` that the official code cannot represent, or None."""
    checks = [
        (cfg.injection == "diagonal_zoh", "injection='diagonal_zoh' (exact zero-order-hold input gain): the official "
                                          "diagonal injection is the Euler form only"),
        (cfg.block != "prenorm", f"block={cfg.block!r} (sandwich norm): the official blocks are pre-norm only"),
        (cfg.mlp != "relu2", f"mlp={cfg.mlp!r}: the official MLP is ReLU² only"),
        (not cfg.value_embeddings, "value_embeddings=False: the official models always have value embeddings"),
        (cfg.looped and not cfg.readout, "readout=False: the official Parcae always applies the readout C"),
        (cfg.rope_base != 50000, f"rope_base={cfg.rope_base:g}: official from_pretrained always uses RoPE base "
                                 "50000"),
        (cfg.looped and cfg.depth_scheme != "poisson_truncated",
         f"depth_scheme={cfg.depth_scheme!r}: the official sampler is the truncated Poisson only"),
    ]
    for bad, why in checks:
        if bad:
            return why
    problem = value_embedding_disagreement(cfg)
    if problem:
        return "value embeddings: " + problem.split(": ", 1)[1].replace("cannot represent it",
                                                                        "the official code would not read it")
    return None


def official_config_json(model: LoopedLM, previous: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """config.json for ``model``: the official fields, starting from ``previous`` (the imported release's config,
    so fields we do not model keep their values), overridden by what the weights require."""
    from parcae.model import to_official

    cfg = model.config
    class_name = "ParcaeConfig" if cfg.looped else "GPTConfig"
    fields = {**_BASE_FIELDS, **_CLASS_FIELDS[class_name]}
    _, ours = to_official(model)
    config = {k: v for k, v in (previous or {}).items() if k in fields}
    config.update({k: v for k, v in ours.items() if k in fields})
    if previous and "name" in previous:
        config["name"] = previous["name"]
    config.setdefault("hf_config", {"org": "", "name": config.get("name", cfg.name)})
    config["rope_settings"] = {**_BASE_FIELDS["rope_settings"], **(config.get("rope_settings") or {}),
                               "rope_base": int(cfg.rope_base)}
    if not cfg.looped:
        config["n_layer"] = cfg.n_layers
        config["tie_embeddings"] = True
    out = {k: config.get(k, default) for k, default in fields.items()}
    out["_class_name"] = class_name
    return out
