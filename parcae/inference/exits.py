"""Adaptive-depth exit rules: when a token may stop looping.

Each rule looks at the state after a checked iteration (and, for the output-based ones, at the next-token
distribution read out from it) and says, per token, whether it has converged. The rules and their default ("auto")
thresholds are the ones Huginn ships (seal-rg/recurrent-pretraining, ``recpre/raven_modeling_minimal.py``, the
``*ExitEvaluator`` classes):

| rule               | value at a check (prev = the previous check's)     | exit when   | auto  |
|--------------------|----------------------------------------------------|-------------|-------|
| `latent-diff`      | ‖h − h_prev‖ / ‖h‖                                 | < threshold | 0.03  |
| `cosine`           | 1 − cos(h, h_prev)                                 | < threshold | 1e-3  |
| `kl`               | KL(p_prev ‖ p) of next-token distributions         | < threshold | 1e-3  |
| `minp-kl`          | the same KL after min-p filtering both (below)     | < threshold | 1e-5  |
| `entropy-diff`     | |H(p) − H(p_prev)|                                 | < threshold | 1e-3  |
| `argmax-stability` | checks the argmax has stayed the same              | >= N        | 5     |

Before the first check, h_prev is the initial state, p_prev the uniform distribution and H(p_prev) = +∞ (so
entropy-diff never exits at the first check). min-p filtering (Huginn's ``MinKLExitEvaluator``): every probability
below 0.1 × the largest becomes 1/V, then the distribution is renormalised. ``--exit RULE:THRESHOLD`` overrides the
threshold. Checks happen after iterations min_loops, min_loops + N, min_loops + 2N, ... (``exit_every`` N, default 1),
as Huginn's ``min_steps`` / ``check_criterion_every_n_steps`` place them; see the engine.

    rule = ExitRule.parse("kl:1e-4")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from parcae.model.loop import pick, put
from parcae.model.loss import real_logits

AUTO_THRESHOLDS = {"latent-diff": 0.03, "cosine": 1e-3, "kl": 1e-3, "minp-kl": 1e-5, "entropy-diff": 1e-3,
                   "argmax-stability": 5}
NEEDS_LOGITS = {"latent-diff": False, "cosine": False, "kl": True, "minp-kl": True, "entropy-diff": True,
                "argmax-stability": True}
MIN_P = 0.1  # minp-kl: probabilities below MIN_P × the largest are flattened to 1/V


@dataclass(frozen=True)
class ExitRule:
    name: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> "ExitRule":
        name, _, thr = str(text).strip().partition(":")
        if name not in AUTO_THRESHOLDS:
            raise ValueError(f"unknown exit rule {name!r}; choose one of {', '.join(AUTO_THRESHOLDS)} "
                             "(optionally RULE:THRESHOLD)")
        if not thr or thr == "auto":
            return cls(name, AUTO_THRESHOLDS[name])
        try:
            value = float(thr)
        except ValueError:
            raise ValueError(f"exit rule {text!r}: threshold {thr!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"exit rule {text!r}: the threshold must be > 0, got {thr}")
        if name == "argmax-stability" and value != int(value):
            raise ValueError(f"exit rule {text!r}: argmax-stability counts iterations, give an integer")
        return cls(name, value)

    @property
    def needs_logits(self) -> bool:
        return NEEDS_LOGITS[self.name]

    def __str__(self) -> str:
        return f"{self.name}:{self.threshold:g}"

    def start(self, h0: Tensor, vocab_size: int) -> "ExitTracker":
        return ExitTracker(self, h0, vocab_size)


class ExitTracker:
    """The running quantities of one rule over one loop (per token, shape [B, S]); an update may cover only some
    rows (the ones still looping)."""

    def __init__(self, rule: ExitRule, h0: Tensor, vocab_size: int) -> None:
        self.rule = rule
        self.prev_h = h0
        shape = h0.shape[:-1]
        self.vocab_size = vocab_size
        # p_{-1}: uniform (the KL rules' previous distribution at the first check)
        self.prev_log_probs = torch.full((*shape, vocab_size), -math.log(vocab_size), device=h0.device) \
            if rule.name in ("kl", "minp-kl") else None
        self.prev_entropy = torch.full(shape, math.inf, device=h0.device)
        self.prev_argmax = torch.full(shape, -1, dtype=torch.long, device=h0.device)
        self.stable = torch.zeros(shape, dtype=torch.long, device=h0.device)

    def restart(self, rows: Tensor, h0: Tensor) -> None:
        """Rows ``rows`` begin a new loop from h0 [rows, S, d] (depth-level batching: a new token enters a slot
        whose previous token exited): their quantities are those of :meth:`ExitRule.start`."""
        self.prev_h = put(self.prev_h, rows, h0)
        if self.prev_log_probs is not None:
            self.prev_log_probs = self.prev_log_probs.index_fill(0, rows, -math.log(self.vocab_size))
        self.prev_entropy = self.prev_entropy.index_fill(0, rows, math.inf)
        self.prev_argmax = self.prev_argmax.index_fill(0, rows, -1)
        self.stable = self.stable.index_fill(0, rows, 0)

    def update(self, h: Tensor, logits: Optional[Tensor], rows: Optional[Tensor] = None,
               h_before: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(converged [b, S] bool, rule value [b, S]) after one more iteration of rows ``rows`` (None: all).

        ``h_before`` (the state before this iteration) says the previous check was the previous iteration, so the
        state rules compare against it and keep no copy of their own (checks every iteration cost no bookkeeping)."""
        name, thr = self.rule.name, self.rule.threshold
        if name in ("latent-diff", "cosine"):
            prev, now = (pick(self.prev_h, rows) if h_before is None else h_before).float(), h.float()
            if name == "latent-diff":
                value = (now - prev).norm(dim=-1) / now.norm(dim=-1).clamp(min=1e-12)
            else:
                value = 1 - F.cosine_similarity(now, prev, dim=-1, eps=1e-12)
            if h_before is None:
                self.prev_h = put(self.prev_h, rows, h)
            return value < thr, value
        log_probs = F.log_softmax(real_logits(logits, self.vocab_size), dim=-1)
        if name == "minp-kl":
            probs = log_probs.exp()
            probs = torch.where(probs < MIN_P * probs.amax(-1, keepdim=True), 1.0 / self.vocab_size, probs)
            log_probs = (probs / probs.sum(-1, keepdim=True)).log()
        if name in ("kl", "minp-kl"):
            prev = pick(self.prev_log_probs, rows)
            value = (prev.exp() * (prev - log_probs)).sum(-1)
            self.prev_log_probs = put(self.prev_log_probs, rows, log_probs)
            return value < thr, value
        if name == "entropy-diff":
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            value = (entropy - pick(self.prev_entropy, rows)).abs()
            self.prev_entropy = put(self.prev_entropy, rows, entropy)
            return value < thr, value
        argmax = log_probs.argmax(-1)
        stable = torch.where(argmax == pick(self.prev_argmax, rows), pick(self.stable, rows) + 1,
                             torch.zeros_like(argmax))
        self.stable, self.prev_argmax = put(self.stable, rows, stable), put(self.prev_argmax, rows, argmax)
        return stable >= thr, stable.float()



class ForcedDepth:
    """Not a convergence rule: row r of the n-th adaptive step exits after depth(n, r) iterations. It forces the
    depths where a test or a benchmark needs them known (a stand-in for an :class:`ExitRule`)."""

    name = "forced"

    def __init__(self, depth, needs_logits: bool = False) -> None:
        self.depth, self.needs_logits, self.steps = depth, needs_logits, 0

    def start(self, h0: Tensor, vocab_size: int) -> "_ForcedTracker":
        n, self.steps = self.steps, self.steps + 1
        target = torch.tensor([self.depth(n, r) for r in range(h0.shape[0])], device=h0.device)
        return _ForcedTracker(target[:, None].expand(h0.shape[:-1]))


class _ForcedTracker:
    def __init__(self, target: Tensor) -> None:
        self.target, self.done = target, torch.zeros_like(target)

    def update(self, h: Tensor, logits: Optional[Tensor], rows: Optional[Tensor] = None,
               h_before: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        done = pick(self.done, rows) + 1
        self.done = put(self.done, rows, done)
        return done >= pick(self.target, rows), done.float()


class ScriptedDepth:
    """Not a convergence rule: each token exits at the ``depth(h0)``-th check (with the default min_loops 1 and
    exit_every 1: after depth(h0) iterations), ``depth`` mapping initial states [b, S, d] to counts [b, S]. The
    depth is a function of the token's own initial state, so a token exits at the same iteration alone, in a
    token-level batch or at a depth-level tick: mixed depths forced where a test or a benchmark needs them known.

        rule = ScriptedDepth.spread(8)      # depths 1..8 from h₀'s sign pattern, mean ≈ 4.5
    """

    name = "scripted"

    def __init__(self, depth: Callable[[Tensor], Tensor], needs_logits: bool = False) -> None:
        self.depth, self.needs_logits = depth, needs_logits

    @classmethod
    def spread(cls, most: int, needs_logits: bool = False) -> "ScriptedDepth":
        """Depths 1..``most``, about uniform over tokens (mean (most + 1) / 2), from the signs of h₀'s first 16
        channels (a random-noise h₀; a zero h₀ gives every token depth 1)."""
        weights = 2 ** torch.arange(16)

        def depth(h0: Tensor) -> Tensor:
            bits = (h0[..., :16] > 0).long()
            return 1 + (bits * weights[: bits.shape[-1]].to(h0.device)).sum(-1) % most
        return cls(depth, needs_logits)

    def __str__(self) -> str:
        return self.name

    def start(self, h0: Tensor, vocab_size: int) -> "_ScriptedTracker":
        return _ScriptedTracker(self.depth, h0)


class _ScriptedTracker(_ForcedTracker):
    """Checks done per token against its target depth(h₀); :meth:`restart` begins new tokens in some rows."""

    def __init__(self, depth: Callable[[Tensor], Tensor], h0: Tensor) -> None:
        super().__init__(depth(h0).to(h0.device))
        self.depth_of = depth

    def restart(self, rows: Tensor, h0: Tensor) -> None:
        self.target = self.target.index_copy(0, rows, self.depth_of(h0).to(self.target.device))
        self.done = self.done.index_fill(0, rows, 0)
