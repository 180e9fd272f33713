"""The looped language model (paper §2, Eq. 1-3, Alg. 1); a fixed-depth GPT when ``injection="none"``.

    e       = N_pre(Prelude(embed(s)))             prelude blocks, then the prelude norm (App. J)
    h_0     ~ like-init | 0 | given
    h_{t+1} = R(Ā h_t + B̄ e),  t = 0 .. T−1         injection first, then the recurrent blocks
    logits  = embedᵀ N_f(Coda(C h_T))               readout C, coda blocks, final norm, tied head

Training runs T_i = n_i + k_i iterations for sequence i: n_i without gradient, then k_i with it
(truncated BPTT, activation memory ∝ μ_bwd, not T). Sequences with different depths share a batch at
proportional cost: each iteration computes only the sequences still looping (cost ∝ Σ T_i), which is
exactly running every sequence alone (the official code instead runs all to the batch maximum and masks).

One forward for everything: ``forward`` (training, eval) and the inference engine both call ``step``. A cached
step adds the tokens' positions, a cache the attention layers store into and read from, and a schedule saying
which rows run each iteration (a generated token leaves the loop when its exit rule fires); see
:mod:`parcae.model.loop` for both interfaces.

Sharded training (FSDP) rule: a sharded block all-gathers its parameters on every call and reduce-scatters
its gradients in backward, so every rank must call the recurrent blocks the same number of times per step,
whatever depths its own rows drew. ``LoopedLM.depth_sync`` (set by the trainer, plain ``None`` otherwise)
maps this rank's iteration counts (no-grad phase, grad phase) to the maximum over all ranks, one small
all-reduce per forward. Each rank then runs that many iterations; an iteration with no active row on this
rank still calls the blocks with a zero-row batch, which takes part in the collectives but computes nothing,
so the work on active rows stays proportional to their depths.

    python -m parcae.model parcae-debug   # builds a preset, runs one training forward, prints telemetry
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .depth import Depths
from .init import initialize
from .injection import make_injection
from .layers import Block, RMSNorm, rope_table
from .loop import LoopRecorder, PerSequence, Schedule, pick
from .state import positional_noise

from .loss import IGNORE_INDEX  # label value excluded from the loss (owned by the scoring rule, loss.py)


@dataclass
class LoopOutput:
    logits: Tensor                       # fp32 [B, S, padded_vocab]
    loss: Optional[Tensor] = None        # mean cross-entropy over labels != IGNORE_INDEX
    telemetry: Optional[dict] = None     # see LoopedLM.forward(telemetry=True)
    state: Optional[Tensor] = None       # [B, S, d] the state h read out (looped models; LoopedLM.step)


class LoopedLM(nn.Module):
    check_token_ids = True  # validate ids in forward (a host sync); off where ids were checked on entry

    def __init__(self, config: ModelConfig, *, init: bool = True) -> None:
        super().__init__()
        self.config = config
        V, d, P, R = config.padded_vocab_size, config.d_model, config.n_prelude, config.n_recurrent
        self.wte = nn.Embedding(V, d)  # tied with the LM head
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(V, config.kv_heads * config.head_dim) for i in config.value_embedding_layers})
        self.prelude = nn.ModuleList(Block(config, i) for i in range(P))
        self.recurrent = nn.ModuleList(Block(config, P + j) for j in range(R))
        self.coda = nn.ModuleList(Block(config, P + R + k) for k in range(config.n_coda))
        looped = config.looped
        self.prelude_norm = RMSNorm(d, config.norm_eps) if looped and config.prelude_norm else None
        self.injection = make_injection(config) if looped else None
        self.readout = nn.Linear(d, d, bias=False) if looped and config.readout else None  # C
        self.final_norm = RMSNorm(d, config.norm_eps)
        self.register_buffer("rope", rope_table(config.block_size, config.head_dim, config.rope_base),
                             persistent=False)
        # Recompute each backpropagated iteration in the backward pass instead of storing its activations
        # (the official "per-iteration" activation checkpointing): memory per iteration ~ one state h.
        self.checkpoint_iterations = False
        # Optional hook for sharded training: list of local iteration counts -> their maxima over all ranks
        # (see the module docstring). None: each forward runs only as many iterations as its own rows need.
        self.depth_sync: Optional[Callable[[list[int]], list[int]]] = None
        if init:  # init=False: the weights are about to be replaced (from_state_dict)
            initialize(self, config)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, Tensor]) -> "LoopedLM":
        """A model holding ``state`` (a checkpoint's weights, e.g. memory-mapped), without running the
        initialization whose weights ``state`` replaces (the orthogonal inits are most of the start-up of
        ``parcae generate``): ``state``'s tensors are taken as they are (cast to the model's dtypes; strict).
        Equal, weight for weight, to ``LoopedLM(config)`` followed by ``load_state_dict(state)``."""
        model = cls(config, init=False)
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(dtypes.get(k, v.dtype)) for k, v in state.items()}, strict=True, assign=True)
        return model

    # ----------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, *, loops: Optional[int] = None,
                depths: Optional[Depths] = None, initial_state: Optional[Tensor] = None,
                state_seed: Optional[int | list[int]] = None, telemetry: bool = False) -> LoopOutput:
        """Logits (and loss if ``labels``, already shifted) for ``input_ids`` [B, S].

        Args:
            loops: exactly this many iterations for every sequence (default μ_rec); with gradient
                enabled only the last min(loops, μ_bwd) are backpropagated.
            depths: per-sequence (no-grad, grad) iteration counts, e.g. from :class:`DepthSampler`.
            initial_state: h₀ [B, S, d]; otherwise ``config.state_init``.
            state_seed: seed for the like-init noise, or one seed per sequence. ``None`` uses the global RNG
                in training mode and seed 0 in eval mode, so evaluation is deterministic. In eval mode the
                noise is :func:`parcae.model.state.positional_noise` of (seed, sequence, position), every row
                sequence 0 unless a list of seeds names each row's own: a row's logits never depend on the
                other rows of the batch or on where it sits (the rule of the engine and the exported models).
            telemetry: also return ρ(Ā), mean decay, ‖h_t‖ per iteration, ‖h_T − h_{T−1}‖ (absolute
                and relative to ‖h_T‖) and the depths run.
        """
        B, S = self._check_input(input_ids)
        if self.injection is None and (depths is not None or loops not in (None, 1)):
            raise ValueError(f"{self.config.name} is a fixed-depth model (injection='none'); it has no loops "
                             f"to set (got loops={loops})")
        depths = self._resolve_depths(B, loops, depths) if self.injection is not None else None
        out = self.step(input_ids, depths=depths, initial_state=initial_state, state_seed=state_seed,
                        telemetry=telemetry)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten().long(), ignore_index=IGNORE_INDEX)
        return out

    def step(self, input_ids: Tensor, *, depths: Optional[Depths] = None, schedule: Optional[Schedule] = None,
             positions: Optional[Tensor] = None, cache=None, real: Optional[Tensor] = None,
             initial_state: Optional[Tensor] = None, state_seed: Optional[int | list[int]] = None,
             sequences: Optional[Tensor] = None, need_logits: bool = True, final_hidden: bool = False,
             telemetry: bool = False) -> LoopOutput:
        """The one forward: the full sequence (training, eval) or a chunk of it against a cache (generation).

        Args:
            depths: per-sequence iteration counts (the forward's); or ``schedule``: who runs each iteration
                (see :mod:`parcae.model.loop`; the engine's exit rules are one).
            positions: [B, S] position of each token in its sequence (default 0..S−1), for RoPE and h₀.
            cache: where attention stores and reads keys/values (see :mod:`parcae.model.loop`); None: causal
                attention within ``input_ids`` only.
            real: [B, S] tokens that store keys/values (the others are padding).
            sequences: [B] sequence identity of each row for the eval h₀ noise (default: 0 for every row, so a
                row's h₀ depends on (seed, position) only).
            final_hidden: return the final-normed coda output (the head's input) in place of the logits.
        Returns logits (None unless ``need_logits``) and, for looped models, the state read out.
        """
        B, S = input_ids.shape
        x, rope, value_embeddings = self.prelude_step(input_ids, positions, cache, real)
        if self.injection is None:  # fixed-depth GPT: the same stack, run once
            for block in self.recurrent:
                x = block(x, rope, value_embeddings.get(block.index),
                          None if cache is None else cache.once(block.index, None, real))
            return LoopOutput(self.read_out(x, rope, value_embeddings, cache, None, real, need_logits, final_hidden))
        e, h = self.loop_input(x, initial_state, state_seed, sequences, positions)
        stats = None
        if schedule is None:
            if cache is not None:
                raise ValueError("a cached step needs a schedule (parcae.model.loop), not per-sequence depths")
            depths = depths if depths is not None else self._resolve_depths(B, None, None)
            h, stats = self.loop(h, e, depths, rope, value_embeddings, telemetry)
        else:
            h = self._iterate(h, self.injection.input_term(e), schedule, rope, value_embeddings, cache)
            h, logits = schedule.output(h)
            if logits is not None:  # the exit checks already read these states out
                return LoopOutput(logits, state=h)
        return LoopOutput(self.read_out(h, rope, value_embeddings, cache, None, real, need_logits, final_hidden), None,
                          stats, h)

    def prelude_step(self, input_ids: Tensor, positions: Optional[Tensor] = None, cache=None,
                     real: Optional[Tensor] = None, rows: Optional[Tensor] = None
                     ) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """The entry of a step: x = Prelude(embed(ids)) (the prelude blocks storing the keys/values of tokens
        ``real`` of rows ``rows`` of the cache's step), with the RoPE rows and value embeddings of the tokens that
        the later blocks take."""
        rope = self._rope(input_ids.shape[1]) if positions is None else self._rope_at(positions, cache)
        value_embeddings = self.value_embeddings_of(input_ids)  # once, not per loop
        x = self.wte(input_ids)
        for block in self.prelude:
            x = block(x, rope, value_embeddings.get(block.index),
                      None if cache is None else cache.once(block.index, rows, real))
        return x, rope, value_embeddings

    def loop_input(self, x: Tensor, initial_state: Optional[Tensor] = None, state_seed=None,
                   sequences: Optional[Tensor] = None, positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(e, h₀) of a looped model from the prelude's output x: e = N_pre(x) and the initial state (``step``'s
        arguments of the same names)."""
        e = self.prelude_norm(x) if self.prelude_norm is not None else x
        return e, self._initial_state(e, initial_state, state_seed, sequences, positions)

    def value_embeddings_of(self, input_ids: Tensor) -> dict[int, Tensor]:
        """{stack index: value embedding [B, S, kv_heads·head_dim]} for the blocks that have one."""
        return {int(i): table(input_ids) for i, table in self.value_embeds.items()}

    def read_out(self, h: Tensor, rope: Tensor, value_embeddings: dict[int, Tensor], cache=None,
                 rows: Optional[Tensor] = None, write: Optional[Tensor] = None, need_logits: bool = True,
                 final_hidden: bool = False) -> Optional[Tensor]:
        """logits = embedᵀ N_f(Coda(C h)) for the state h of rows ``rows`` (None: all); N_f(Coda(C h)) itself with
        ``final_hidden``."""
        x = h if self.readout is None else self.readout(h)
        for block in self.coda:
            view = None if cache is None else cache.once(block.index, rows, write)
            x = block(x, rope, value_embeddings.get(block.index), view)
        if final_hidden:
            return self.final_norm(x)
        return self.lm_head(x) if need_logits else None

    def lm_head(self, x: Tensor) -> Tensor:
        """fp32 logits from the coda output: final norm, then the tied embedding."""
        return F.linear(self.final_norm(x), self.wte.weight).float()

    def loop(self, h: Tensor, e: Tensor, depths: Depths, rope: Tensor, value_embeddings: dict[int, Tensor],
             telemetry: bool = False) -> tuple[Tensor, Optional[dict]]:
        """h ← R(Ā h + B̄ e): ``depths.no_grad[i]`` iterations without gradient, then ``depths.grad[i]`` with it."""
        drive = self.injection.input_term(e)  # B̄ e is the same on every iteration
        record = LoopRecorder(h, depths) if telemetry else None
        phases = [depths.no_grad, depths.grad] if torch.is_grad_enabled() else [depths.total]
        iterations = [int(c.max()) if c.numel() else 0 for c in phases]
        if self.depth_sync is not None:  # same number of block calls on every rank (module docstring)
            iterations = [int(n) for n in self.depth_sync(iterations)]
        schedules = [PerSequence(c, n, h.device, record) for c, n in zip(phases, iterations)]
        if torch.is_grad_enabled():
            with torch.no_grad():
                h = self._iterate(h, drive, schedules[0], rope, value_embeddings)
            h = self._iterate(h, drive, schedules[1], rope, value_embeddings)
        else:  # nothing to backpropagate: the split is irrelevant
            h = self._iterate(h, drive, schedules[0], rope, value_embeddings)
        return h, (record.summary(self.injection) if record else None)

    def recurrent_step(self, h: Tensor, drive: Tensor, rope: Tensor, value_embeddings: dict[int, Tensor],
                       caches: Optional[list] = None) -> Tensor:
        """One iteration: u = Ā h + B̄ e, then the R recurrent blocks (block r reading/writing ``caches[r]``)."""
        u = self.injection(h, drive)
        for r, block in enumerate(self.recurrent):
            u = block(u, rope, value_embeddings.get(block.index), caches[r] if caches else None)
        return u

    def _iterate(self, h: Tensor, drive: Tensor, schedule: Schedule, rope: Tensor,
                 value_embeddings: dict[int, Tensor], cache=None) -> Tensor:
        """Run the iterations of ``schedule``, computing only the rows it names for each (cost ∝ Σ depths).

        The rows' slices (state, drive, RoPE, value embeddings) are gathered when the schedule names a different
        set of rows and the state is scattered back only then, so a schedule whose rows change only when some
        leave (the engine's exit rules) pays for the gather/scatter once per change, not per iteration."""
        step = self.recurrent_step
        if self.checkpoint_iterations and torch.is_grad_enabled():
            step = partial(checkpoint, self.recurrent_step, use_reentrant=False)
        current, h_in, drive_in, rope_in, ve_in = None, h, drive, rope, value_embeddings  # slices of rows `current`
        for t in range(schedule.first, schedule.iterations):
            if schedule.finished:
                break
            rows, write = schedule.rows(t), schedule.writes(t)
            if rows is not current:
                h = h_in if current is None else h.index_copy(0, current, h_in)
                h_in, drive_in, rope_in = pick(h, rows), pick(drive, rows), pick(rope, rows) if rope.dim() == 4 else rope
                ve_in = value_embeddings if rows is None else \
                    {i: v.index_select(0, rows) for i, v in value_embeddings.items()}
                current = rows
            caches = None if cache is None else [cache.loop(r, t, rows, write) for r in range(len(self.recurrent))]
            h_out = step(h_in, drive_in, rope_in, ve_in, caches) if caches else step(h_in, drive_in, rope_in, ve_in)
            schedule.done(t, h_in, h_out, rows,
                          lambda x, w, rope_in=rope_in, ve_in=ve_in: self.read_out(x, rope_in, ve_in, cache, rows, w))
            h_in = h_out
        return h_in if current is None else h.index_copy(0, current, h_in)

    # ----------------------------------------------------------------------------------------------
    def _check_input(self, input_ids: Tensor) -> tuple[int, int]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        V = self.config.padded_vocab_size
        # Reading min/max is a host sync; callers that validated their ids where they entered (the data module
        # checks the shards' vocabulary, generation checks the prompt) switch it off for the hot path.
        if self.check_token_ids and input_ids.numel() and not input_ids.is_meta:
            lo, hi = input_ids.min().item(), input_ids.max().item()
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {V}) of model {self.config.name!r}")
        return input_ids.shape

    def _rope_at(self, positions: Tensor, cache) -> Tensor:
        """[B, S, hd/2, 2] RoPE rows of each token's position; a cache's capacity bounds them (no device read)."""
        length = cache.capacity if cache is not None else int(positions.max()) + 1
        return self._rope(length)[positions]

    def _rope(self, seq_len: int) -> Tensor:
        if seq_len > self.rope.shape[0]:
            # Longer than block_size: extend the table. Rows for earlier positions are bit-identical.
            self.rope = rope_table(seq_len, self.config.head_dim, self.config.rope_base, self.rope.device)
        return self.rope

    def _resolve_depths(self, batch_size: int, loops: Optional[int], depths: Optional[Depths]) -> Depths:
        if depths is not None:
            if loops is not None:
                raise ValueError("pass either loops or depths, not both")
            if len(depths) != batch_size:
                raise ValueError(f"depths has {len(depths)} entries for a batch of {batch_size} sequences")
            return depths
        if loops is None:
            loops = self.config.mean_recurrence
        if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
            raise ValueError(f"loops must be an integer >= 1, got {loops!r}")
        return Depths.split(loops, self.config.backprop_depth, batch_size)

    def _initial_state(self, e: Tensor, initial_state: Optional[Tensor], state_seed,
                       sequences: Optional[Tensor] = None, positions: Optional[Tensor] = None) -> Tensor:
        if initial_state is not None:
            if initial_state.shape != e.shape:
                raise ValueError(f"initial_state must have shape {tuple(e.shape)}, got {tuple(initial_state.shape)}")
            return initial_state.to(device=e.device, dtype=e.dtype)
        if self.config.state_init == "zero":
            return torch.zeros_like(e)
        std = self.config.state_std
        if not self.training or positions is not None:
            # Evaluation (and every cached step): noise is a function of (seed, sequence, position) only, so a
            # token gets the same h₀ whether it is computed alone, with its prefix (the KV-cached generator) or
            # beside other rows. Every row is sequence 0 (its batch neighbours and its place in the batch change
            # nothing) unless the caller names the sequences, or gives a list of seeds: one identity per row.
            B, S = e.shape[:2]
            if isinstance(state_seed, (list, tuple)):
                if len(state_seed) != B:
                    raise ValueError(f"state_seed has {len(state_seed)} seeds for a batch of {B} sequences")
                seed, sequences = 0, torch.tensor([int(s) for s in state_seed], device=e.device)
            else:
                seed = 0 if state_seed is None else int(state_seed)
                sequences = torch.zeros(B, dtype=torch.long, device=e.device) if sequences is None else sequences
            if positions is None:
                positions = torch.arange(S, device=e.device).expand(B, S)
            return positional_noise(seed, sequences, positions, e.shape[-1], std, e.dtype)  # like-init: truncated normal with the embedding std, cut at ±3σ
        h = torch.empty(e.shape, device=e.device, dtype=torch.float32)
        if isinstance(state_seed, (list, tuple)):  # one seed per sequence: noise independent of batch layout
            if len(state_seed) != e.shape[0]:
                raise ValueError(f"state_seed has {len(state_seed)} seeds for a batch of {e.shape[0]} sequences")
            for row, seed in zip(h, state_seed):
                nn.init.trunc_normal_(row, 0.0, std, -3 * std, 3 * std,
                                      generator=torch.Generator(e.device).manual_seed(int(seed)))
        else:
            generator = None if state_seed is None else torch.Generator(e.device).manual_seed(state_seed)
            nn.init.trunc_normal_(h, 0.0, std, -3 * std, 3 * std, generator=generator)
        return h.to(e.dtype)

    # ----------------------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part of the model (for summaries and the paper's tables)."""
        parts = {"embeddings": self.wte, "value_embeddings": self.value_embeds, "prelude": self.prelude,
                 "recurrent": self.recurrent, "coda": self.coda, "injection": self.injection,
                 "readout": self.readout, "norms": nn.ModuleList(m for m in (self.prelude_norm, self.final_norm) if m)}
        counts = {k: sum(p.numel() for p in m.parameters()) if m is not None else 0 for k, m in parts.items()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
        return counts
