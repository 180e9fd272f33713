"""Hugging Face model of a Parcae looped language model: transformers classes around parcae's own model.

``save_pretrained`` (and so ``parcae export --format hf``) copies this file into every folder it writes, with
configuration_parcae.py and the torch-only model files it imports (parcae/model's config, depth, init, injection,
layers, loop, looped, loss and state, and parcae's errors and validation: :data:`REMOTE_CODE`, which import only
each other, torch and the standard library), so anyone can load the folder without parcae:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(folder)                     # adds <|bos|> in front, as parcae does
    out = model.generate(**tok(["ROMEO:"], return_tensors="pt"), max_new_tokens=20, num_loops=8)

There is no second copy of the model here: ``ParcaeForCausalLM.model`` *is* a ``parcae.model.LoopedLM`` (the same
parameter names, the same forward, ``LoopedLM.step``), and this file only adapts transformers' conventions to it:

* the loop count ``num_loops`` (a keyword of ``forward`` and ``generate``, default ``config.num_loops``);
* transformers' key/value cache (``DynamicCache``): :class:`CacheAdapter` gives ``LoopedLM.step`` the cache interface
  of parcae/model/loop.py (``cache.once`` / ``cache.loop`` views whose ``update(k, v)`` returns keys, values and
  the attention mask). It has one layer per prelude block, one per (iteration, recurrent block) and one per coda
  block: layer ``P + t·R + r`` holds iteration t of recurrent block r. A cache belongs to one loop count;
* padded batches (``attention_mask``): a row's positions (RoPE and the initial state) count only its real tokens and
  no query attends to padding, so a left-padded prompt gives what it gives alone;
* the initial state: parcae's evaluation h₀, ``positional_noise(config.state_seed, sequence 0, position)``
  (docs/design.md §1.4), so a row's logits never depend on the rest of the batch;
* logits over the tokenizer's vocabulary (the padded embedding rows cut off) and the loss over them (parcae's
  scoring rule, ``token_nll``; parcae's training loss is over the padded rows — docs/ecosystem.md).

A fresh ``ParcaeForCausalLM(config)`` is initialised by parcae's own init (parcae/model/init.py), as ``parcae fit``
starts. The loop runs a fixed number of iterations (adaptive exit is parcae's own engine, ``parcae generate --exit``);
a training-mode forward (no cache; unpadded rows) starts from fresh noise and backpropagates the last
``backprop_depth`` iterations, as parcae trains (with padding it runs through the cache adapter and backpropagates
every iteration).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_parcae import ParcaeConfig

try:  # an exported folder: parcae's model files travel beside this one
    from .config import ModelConfig
    from .depth import Depths
    from .layers import rope_table
    from .loop import Uniform
    from .looped import LoopedLM
    from .loss import real_logits, token_nll
except ImportError:  # inside the parcae package
    from parcae.model.config import ModelConfig
    from parcae.model.depth import Depths
    from parcae.model.layers import rope_table
    from parcae.model.loop import Uniform
    from parcae.model.looped import LoopedLM
    from parcae.model.loss import real_logits, token_nll

# The files trust_remote_code runs, written beside every saved model: folder file -> file of the parcae package.
REMOTE_CODE = {"configuration_parcae.py": "hf/configuration_parcae.py", "modeling_parcae.py": "hf/modeling_parcae.py",
               **{name: f"model/{name}" for name in ("config.py", "depth.py", "init.py", "injection.py", "layers.py",
                                                       "loop.py", "looped.py", "loss.py", "state.py")},
               "errors.py": "errors.py", "validation.py": "validation.py"}
AUTO_MAP = {"AutoConfig": "configuration_parcae.ParcaeConfig",
            "AutoModel": "modeling_parcae.ParcaeModel",
            "AutoModelForCausalLM": "modeling_parcae.ParcaeForCausalLM"}

# transformers renames the cache argument and output field from past_key_values to cache (deprecated in 5.2x):
# accept both, return the one this version's output class has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def model_config(config: ParcaeConfig) -> ModelConfig:
    """parcae's ModelConfig of a ParcaeConfig (same field names; training-only fields ride along in config.json)."""
    defaults = ModelConfig()
    return ModelConfig(**{f.name: getattr(config, f.name, getattr(defaults, f.name))
                          for f in dataclasses.fields(ModelConfig)})


class CacheAdapter:
    """The cache interface of parcae/model/loop.py over a transformers ``Cache`` (``None``: store nothing, only mask).

    ``LoopedLM.step`` asks for a view per attention layer — ``once(block_index, rows, write)`` for prelude and coda
    blocks, ``loop(recurrent_block, iteration, rows, write)`` for the recurrent ones — whose ``update(k, v)`` stores
    the new keys/values [B, S, kv_heads, hd] in the transformers cache layer of that (block, iteration) and returns
    all keys and values [B, kv_heads, L, hd] with the attention mask [B, 1, S, L]. Every row runs every iteration
    here (a ``Uniform`` schedule), so ``rows`` is always None and padding is handled by the mask."""

    def __init__(self, cache: Optional[Cache], config: ModelConfig, loops: int, mask: Tensor, capacity: int) -> None:
        self.cache, self.mask, self.capacity = cache, mask, capacity
        self.P, self.R = config.n_prelude, config.n_recurrent
        self.coda_shift = (loops - 1) * config.n_recurrent  # coda block P+R+k is cache layer P+loops·R+k

    def once(self, index: int, rows, write) -> "_View":
        return _View(self, index if index < self.P + self.R else index + self.coda_shift)

    def loop(self, block: int, iteration: int, rows, write) -> "_View":
        return _View(self, self.P + iteration * self.R + block)


class _View:
    def __init__(self, adapter: CacheAdapter, layer: int) -> None:
        self.adapter, self.layer = adapter, layer

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keys, values = k.transpose(1, 2), v.transpose(1, 2)
        if self.adapter.cache is not None:
            keys, values = self.adapter.cache.update(keys, values, self.layer)
        return keys, values, self.adapter.mask


def write_remote_code(folder: str | Path) -> list[str]:
    """Copy :data:`REMOTE_CODE` into ``folder`` (from this file's own folder when it runs as remote code, else from
    the parcae package); returns the names written."""
    here = Path(__file__).resolve().parent
    remote = (here / "looped.py").is_file()  # this file runs from a saved folder, beside the model files
    for name, source in REMOTE_CODE.items():
        src, dest = (here / name if remote else here.parent / source), Path(folder) / name
        if not dest.exists() or not dest.samefile(src):
            shutil.copyfile(src, dest)
    return sorted(REMOTE_CODE)


class ParcaePreTrainedModel(PreTrainedModel):
    config_class = ParcaeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, then the remote code (:data:`REMOTE_CODE`) with the Auto classes in
        config.json's ``auto_map``, so the folder loads with ``trust_remote_code=True`` where parcae is absent (a
        merged LoRA fine-tune, for one). Done here, not by transformers' auto-class registration, because in the
        package the model files live in parcae/model, not beside this file."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)
        return out

    def _init_weights(self, module: nn.Module) -> None:
        """Parameters: nothing here — ``LoopedLM`` initialises itself with parcae's init when it is built
        (parcae/model/init.py), and weights a checkpoint provides are never re-initialised. The RoPE table (a
        non-persistent buffer, which from_pretrained creates empty) is filled here."""
        if isinstance(module, LoopedLM):
            cfg = module.config
            init.copy_(module.rope, rope_table(module.rope.shape[0], cfg.head_dim, cfg.rope_base, module.rope.device))


class _LoopedModel(ParcaePreTrainedModel):
    """``self.model`` is parcae's LoopedLM: its state dict is ``model.`` + LoopedLM's names."""

    def __init__(self, config: ParcaeConfig) -> None:
        super().__init__(config)
        self.model = LoopedLM(model_config(config))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.wte = value

    def loops_of(self, num_loops: Optional[int]) -> int:
        if not self.config.looped:
            if num_loops not in (None, 1):
                raise ValueError(f"num_loops={num_loops}: this is a fixed-depth model (injection='none'); it has no "
                                 "loop to set")
            return 1
        loops = self.config.num_loops if num_loops is None else num_loops
        if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
            raise ValueError(f"num_loops must be an integer >= 1, got {loops!r}")
        return loops

    def _run(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor], position_ids: Optional[Tensor],
             cache: Optional[Cache], use_cache: Optional[bool], num_loops: Optional[int], hidden: bool = False
             ) -> tuple[Tensor, Optional[Cache]]:
        """(fp32 logits over the padded vocabulary, or the final-normed hidden states with ``hidden``; the cache)."""
        if input_ids is None:
            raise ValueError("Parcae needs input_ids (value embeddings are looked up by token id; inputs_embeds is "
                             "not supported)")
        B, S = input_ids.shape
        loops = self.loops_of(num_loops)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:  # training: no cache, truncated backprop below
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None:
            self._fit_cache(cache, loops)
        lm = self.model
        seed = None if self.training else self.config.state_seed  # training: fresh noise each forward
        plain = cache is None and position_ids is None and (attention_mask is None or bool(attention_mask.all()))
        if plain:  # causal attention within input_ids; training backpropagates the last backprop_depth iterations
            depths = Depths.split(loops, self.config.backprop_depth, B) if self.config.looped else None
            out = lm.step(input_ids, depths=depths, state_seed=seed, need_logits=not hidden, final_hidden=hidden)
        else:
            mask, positions = self._mask_and_positions(input_ids, attention_mask, position_ids, past)
            adapter = CacheAdapter(cache, lm.config, loops, mask, capacity=past + S)
            out = lm.step(input_ids, schedule=Uniform(loops), positions=positions, cache=adapter, state_seed=seed,
                          need_logits=not hidden, final_hidden=hidden)
        return out.logits, cache

    def _fit_cache(self, cache: Cache, loops: int) -> None:
        """A cache holds one loop count's layers: add layers for a deeper forward, refuse a cache of another count."""
        made_for = getattr(cache, "parcae_num_loops", None)
        if made_for is not None and made_for != loops and cache.get_seq_length() > 0:
            raise ValueError(f"this key/value cache was filled at num_loops={made_for}; a forward at num_loops={loops} "
                             "cannot reuse it (start a new cache)")
        cache.parcae_num_loops = loops
        need = self.config.cache_layers(loops)
        if getattr(cache, "layer_class_to_replicate", None) is None:
            while len(cache.layers) < need:
                cache.layers.append(DynamicLayer())

    def _mask_and_positions(self, input_ids: Tensor, attention_mask: Optional[Tensor],
                            position_ids: Optional[Tensor], past: int) -> tuple[Tensor, Tensor]:
        """Boolean attention mask [B, 1, S, past+S] (True: may attend) and positions [B, S]."""
        B, S = input_ids.shape
        L = past + S
        dev = input_ids.device
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be [batch, past + new tokens], got {tuple(attention_mask.shape)}")
            if attention_mask.shape[1] == S and past:  # only the new tokens' mask: the cached ones were real
                attention_mask = torch.cat([attention_mask.new_ones(B, past), attention_mask], 1)
            if attention_mask.shape[1] != L:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens, expected {L} "
                                 f"({past} cached + {S} new)")
            real = attention_mask.bool().to(dev)
        if position_ids is None:
            if attention_mask is not None:  # count only real tokens (left padding)
                position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]
            else:
                position_ids = torch.arange(past, L, device=dev)[None].expand(B, S)
        positions = position_ids.to(dev).long().expand(B, S)
        key_cols = torch.arange(L, device=dev)
        query_cols = torch.arange(past, L, device=dev)
        mask = (key_cols[None, :] <= query_cols[:, None])[None]                      # [1, S, L] causal
        if attention_mask is not None:
            mask = mask & real[:, None, :]
        mask = mask | (key_cols[None, :] == query_cols[:, None])[None]              # a padding query sees itself
        return mask[:, None].expand(B, 1, S, L), positions


class ParcaeModel(_LoopedModel):
    """``AutoModel``: the final-normed hidden states (the input of the tied head)."""

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[Cache] = None,
                use_cache: Optional[bool] = None, num_loops: Optional[int] = None, cache: Optional[Cache] = None,
                **kwargs) -> BaseModelOutputWithPast:
        hidden, cache = self._run(input_ids, attention_mask, position_ids,
                                  past_key_values if past_key_values is not None else cache, use_cache, num_loops,
                                  hidden=True)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{_CACHE_FIELD: cache})


class ParcaeForCausalLM(_LoopedModel, GenerationMixin):
    """Logits over the tokenizer's vocabulary (the padded embedding rows are cut off) from the tied embedding."""

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[Cache] = None,
                inputs_embeds: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                use_cache: Optional[bool] = None, num_loops: Optional[int] = None, logits_to_keep: int = 0,
                cache: Optional[Cache] = None, **kwargs) -> CausalLMOutputWithPast:
        """``labels`` are the input ids (shifted here; -100 is ignored); ``num_loops`` overrides config.num_loops;
        ``cache`` is the newer transformers' name of ``past_key_values``."""
        if inputs_embeds is not None:
            raise ValueError("ParcaeForCausalLM takes input_ids, not inputs_embeds (value embeddings are looked up by "
                             "token id)")
        logits, cache = self._run(input_ids, attention_mask, position_ids,
                                  past_key_values if past_key_values is not None else cache, use_cache, num_loops)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        logits = real_logits(logits, self.config.vocab_size)
        loss = None
        if labels is not None:
            # token_nll ignores -100 (IGNORE_INDEX), transformers' label for "no loss here"
            loss = token_nll(logits[:, :-1], labels[:, 1:].to(logits.device), self.config.vocab_size, reduction="mean")
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
