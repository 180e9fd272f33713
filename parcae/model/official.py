"""Convert between the official Parcae checkpoint layout (github.com/sandyresearch/parcae @ dee8363) and ours.

    model = from_official(state_dict, official_config)     # refuses anything it cannot place, by name
    state_dict, official_config = to_official(model)

Official key names (parcae_lm/models/): ``transformer.{prelude,core_block,coda}.{i}`` (GPT: ``transformer.h.{i}``)
→ our P+R+C stack; ``transformer.adapter.{A_log,dt_bias,B}`` / ``transformer.adapter.adapter`` → our
injection; ``transformer.C`` → readout; ``value_embeds.{i}`` keep their stack index. Two official keys
carry no information of their own and are checked, not loaded: ``freqs_cis`` (must equal our RoPE table)
and ``lm_head.weight`` (tied: must equal the embedding; in the official GPT built with
``use_fused_head=""`` it is a dead, untied [d, V] parameter that the forward never reads).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .config import ModelConfig
from .layers import rope_table
from .looped import LoopedLM

# Within a block: official name -> ours.
_BLOCK_KEYS = {
    "norm_1.weight": "attn_norm.weight",
    "attn.c_q.weight": "attn.q_proj.weight",
    "attn.c_k.weight": "attn.k_proj.weight",
    "attn.c_v.weight": "attn.v_proj.weight",
    "attn.c_proj.weight": "attn.out_proj.weight",
    "attn.ve_gate.weight": "attn.ve_gate.weight",
    "norm_2.weight": "mlp_norm.weight",
    "mlp.fc.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}
_TOP_KEYS = {
    "transformer.wte.weight": "wte.weight",
    "transformer.ln_f.weight": "final_norm.weight",
    "transformer.ln_prelude.weight": "prelude_norm.weight",
    "transformer.C.weight": "readout.weight",
    "transformer.adapter.A_log": "injection.A_log",
    "transformer.adapter.dt_bias": "injection.dt_bias",
    "transformer.adapter.B": "injection.B",
    "transformer.adapter.adapter.weight": "injection.proj.weight",
}
_INJECTIONS = {"diagonal": "diagonal", "linear": "concat", "add": "add"}

# Official config values we can represent (anything else is refused, naming the field).
_REQUIRED = {
    "block_class_name": "TransformerPreNormBlock", "norm_class_name": "RMSNorm", "mlp_class_name": "BaseMLP",
    "nonlin_name": "ReLU2", "bias": False, "qk_bias": False, "logit_softcap": None, "tie_embeddings": True,
    "use_abacus": False, "debias_attention": False, "center_attention": False, "clip_qkv": None,
}


def _is_gpt(config: Mapping[str, Any]) -> bool:
    return str(config.get("name", "")).startswith("gpt") or config.get("model_class_name") == "GPT"


def config_from_official(config: Mapping[str, Any]) -> ModelConfig:
    """Our :class:`ModelConfig` for an official config dict (official field names)."""
    for field, expected in _REQUIRED.items():
        if field in config and config[field] != expected:
            raise ValueError(f"official config field {field}={config[field]!r} is not supported (only {expected!r})")
    d = config["n_embd"]
    for field, ours in (("recurrent_embedding_dimension", d),
                        ("recurrent_intermediation_embedding_dimension", config["intermediate_size"])):
        if config.get(field) not in (None, ours):
            raise ValueError(f"official config field {field}={config[field]!r} differs from the main width "
                             f"({ours}); recurrent width != model width is not supported")
    if config.get("recurrent_num_attention_heads") not in (None, config["num_attention_heads"]):
        raise ValueError("official config field recurrent_num_attention_heads differs from num_attention_heads; "
                         "not supported")
    common = dict(
        name=str(config.get("name", "official")), vocab_size=config["vocab_size"],
        padding_multiple=config.get("padding_multiple", 64), block_size=config["block_size"], d_model=d,
        n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads"),
        d_ff=config["intermediate_size"], qk_norm=bool(config.get("qk_norm", True)),
        norm_eps=config.get("norm_eps", 1e-5), value_embeddings=True)
    if _is_gpt(config):
        cfg = ModelConfig(injection="none", n_prelude=config["n_layer"], n_recurrent=0, n_coda=0, **common)
    else:
        injection = config.get("injection_type", "diagonal")
        if injection not in _INJECTIONS:
            raise ValueError(f"official config field injection_type={injection!r} is not supported "
                             f"(known: {sorted(_INJECTIONS)})")
        state_init = config.get("state_init", "like-init")
        if state_init not in ("like-init", "zero"):
            raise ValueError(f"official config field state_init={state_init!r} is not supported (like-init, zero)")
        cfg = ModelConfig(
            injection=_INJECTIONS[injection], n_prelude=config["n_layers_in_prelude"],
            n_recurrent=config["n_layers_in_recurrent_block"], n_coda=config["n_layers_in_coda"],
            prelude_norm=bool(config.get("prelude_norm", True)), readout=True, state_init=state_init,
            mean_recurrence=config["mean_recurrence"], backprop_depth=config["mean_backprop_depth"],
            depth_granularity="per_batch" if config.get("recurrent_iteration_method") == "per-batch"
            else "per_sequence", **common)
    padded = config.get("padded_vocab_size", cfg.padded_vocab_size)
    if cfg.padded_vocab_size != padded:
        raise ValueError(f"official config field padded_vocab_size={padded} does not match vocab_size "
                         f"{cfg.vocab_size} padded to a multiple of {cfg.padding_multiple}")
    return cfg


def _stage(config: ModelConfig, index: int) -> tuple[str, int]:
    """(stage, index within it) of block ``index`` of the P+R+C stack."""
    P, R = config.n_prelude, config.n_recurrent
    if index < P:
        return "prelude", index
    if index < P + R:
        return "recurrent", index - P
    return "coda", index - P - R


_OFFICIAL_STAGES = {"prelude": "prelude", "recurrent": "core_block", "coda": "coda"}


def official_block_prefix(config: ModelConfig, index: int) -> str:
    """The official key prefix of block ``index`` of our P+R+C stack (``transformer.core_block.0.``)."""
    if not config.looped:
        return f"transformer.h.{index}."
    stage, local = _stage(config, index)
    return f"transformer.{_OFFICIAL_STAGES[stage]}.{local}."


def _our_block_prefix(config: ModelConfig, index: int) -> str:
    stage, local = _stage(config, index)
    return f"{stage}.{local}."


def key_map(config: ModelConfig) -> dict[str, str]:
    """official key -> our key, for every parameter of a model with this config."""
    mapping = {}
    for i in range(config.n_layers):
        for theirs, ours in _BLOCK_KEYS.items():
            mapping[official_block_prefix(config, i) + theirs] = _our_block_prefix(config, i) + ours
    for i in config.value_embedding_layers:
        mapping[f"value_embeds.{i}.weight"] = f"value_embeds.{i}.weight"
    mapping.update(_TOP_KEYS)
    return mapping


def from_official(state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | ModelConfig) -> LoopedLM:
    """Build our model from an official state_dict and config. Every official key must be placed."""
    cfg = config if isinstance(config, ModelConfig) else config_from_official(config)
    model = LoopedLM(cfg)
    ours = model.state_dict()
    mapping = key_map(cfg)
    converted, unplaced = {}, []
    for key, value in state_dict.items():
        if key == "freqs_cis":
            expected = rope_table(value.shape[1], cfg.head_dim, cfg.rope_base)[None, :, None]
            if value.shape != expected.shape or not torch.allclose(value.float(), expected, atol=1e-6):
                raise ValueError("official freqs_cis does not match our RoPE table "
                                 f"(head_dim {cfg.head_dim}, base {cfg.rope_base}); refusing to convert")
            continue
        if key == "lm_head.weight":
            wte = state_dict.get("transformer.wte.weight")
            if wte is not None and value.shape == wte.shape and torch.equal(value, wte):
                continue  # tied: the same tensor as the embedding
            if not cfg.looped and wte is not None and value.shape == wte.T.shape:
                continue  # official GPT without the fused head: a dead untied [d, V] parameter
            raise ValueError("official lm_head.weight is neither tied to transformer.wte.weight nor the "
                             "official GPT's unused head; refusing to convert")
        target = mapping.get(key)
        if target is None or target not in ours:
            unplaced.append(key)
            continue
        if ours[target].shape != value.shape:
            raise ValueError(f"official {key} has shape {tuple(value.shape)}, expected {tuple(ours[target].shape)} "
                             f"for {target}")
        converted[target] = value
    if unplaced:
        raise ValueError(f"cannot place official key(s) in a {cfg.name} model: {', '.join(unplaced)}")
    missing = sorted(set(ours) - set(converted))
    if missing:
        raise ValueError(f"official state_dict lacks key(s) for: {', '.join(missing)}")
    model.load_state_dict(converted, strict=True)
    return model


def to_official(model: LoopedLM) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The official state_dict and config for one of our models (pre-norm ReLU² blocks only)."""
    cfg = model.config
    if cfg.block != "prenorm" or cfg.mlp != "relu2" or not cfg.value_embeddings:
        raise ValueError("to_official supports the Transformer setup only (block='prenorm', mlp='relu2', "
                         f"value_embeddings=True); {cfg.name} has block={cfg.block!r}, mlp={cfg.mlp!r}, "
                         f"value_embeddings={cfg.value_embeddings}")
    if cfg.looped and not cfg.readout:
        raise ValueError("to_official needs readout=True: the official model always has transformer.C")
    if cfg.injection == "diagonal_zoh":
        raise ValueError("injection='diagonal_zoh' has no official counterpart (the official code is Euler only)")
    reverse = {ours: theirs for theirs, ours in key_map(cfg).items()}
    ours = model.state_dict()
    state = {reverse[k]: v.detach().clone() for k, v in ours.items()}
    state["freqs_cis"] = rope_table(cfg.block_size, cfg.head_dim, cfg.rope_base)[None, :, None].clone()
    wte = state["transformer.wte.weight"]
    # Looped: tied head. GPT: the official (use_fused_head="") model owns an unused [d, V] head.
    state["lm_head.weight"] = wte if cfg.looped else wte.T.contiguous()
    official = {
        "name": cfg.name, "block_size": cfg.block_size, "n_embd": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "vocab_size": cfg.vocab_size,
        "padding_multiple": cfg.padding_multiple, "padded_vocab_size": cfg.padded_vocab_size,
        "norm_eps": cfg.norm_eps, "qk_norm": cfg.qk_norm, "init_strategy": "scaled-zero", "init_orthogonal": True,
        "use_fused_head": "" if not cfg.looped else "pytorch", "model_class_name": "Parcae",
        "n_layers_in_prelude": cfg.n_prelude, "n_layers_in_recurrent_block": cfg.n_recurrent,
        "n_layers_in_coda": cfg.n_coda, "n_layer": cfg.n_layers if not cfg.looped else None,
        "recurrent_embedding_dimension": cfg.d_model, "recurrent_intermediation_embedding_dimension": cfg.d_ff,
        "prelude_norm": cfg.prelude_norm, "state_init": cfg.state_init,
        "mean_recurrence": cfg.mean_recurrence, "mean_backprop_depth": cfg.backprop_depth,
        "sampling_scheme": "poisson-truncated-full",
        "recurrent_iteration_method": cfg.depth_granularity.replace("_", "-"),
        "tie_embeddings": True, **_REQUIRED,
    }
    if cfg.looped:
        official["injection_type"] = {v: k for k, v in _INJECTIONS.items()}[cfg.injection]
        official["n_layer"] = cfg.n_recurrent * cfg.backprop_depth  # as parcae_lm/models/parcae/config.py defines it
    elif not cfg.name.startswith("gpt"):
        official["name"] = f"gpt-{cfg.name}"  # the official registry tells GPT from Parcae by name
    return state, official
