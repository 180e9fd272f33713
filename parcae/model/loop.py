"""Which rows run each iteration of the loop, and the cache interface of a cached step (helpers of looped.py).

``LoopedLM._iterate`` runs iteration t on the rows a *schedule* names and tells the schedule what came out:

    rows(t)   -> None (every row) or an index tensor of the rows that compute iteration t (may be empty)
    writes(t) -> None or a bool mask [rows, S] of the tokens whose keys/values iteration t stores in the cache
    output(h) -> (the state to read out, its logits if done() already computed them)
    done(t, h_before, h_after, rows, read_out)   after iteration t (telemetry, exit checks); ``read_out(h, write)``
                 gives the logits of those rows' states through readout, coda and head (writing the coda's cache
                 entries of the tokens in ``write``)

Two schedules live here: :class:`PerSequence` (training and eval: sequence i runs counts[i] iterations, counts on
the CPU so picking the rows costs no device sync) and :class:`Uniform` (every row the same number, no bookkeeping).
The inference engine brings a third (``parcae.inference.engine``): rows leave when their exit rule fires.

A cached step also takes a cache (``parcae.inference.cache.LoopKVCache`` is the one the engine uses). The model
asks it, per attention layer, for a view whose ``update(k, v)`` stores the new keys/values and returns everything
the queries may read (keys, values, mask):

    cache.once(block_index, rows, write)            prelude / coda blocks (and a fixed-depth GPT's middle stack)
    cache.loop(recurrent_block, iteration, rows, write)   the recurrent blocks, per (iteration, block)

``rows`` is None or an index into the rows of the current step; ``write`` [rows, S] marks the tokens that store.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

from .depth import Depths

ReadOut = Callable[[Tensor, Optional[Tensor]], Tensor]


class Schedule(Protocol):
    first: int        # the first iteration to run (0, or later when the given state is already that deep)
    iterations: int   # up to this many
    finished: bool    # True: no row runs any further iteration (the loop ends early)

    def rows(self, t: int) -> Optional[Tensor]: ...

    def writes(self, t: int) -> Optional[Tensor]: ...

    def done(self, t: int, h_before: Tensor, h_after: Tensor, rows: Optional[Tensor], read_out: ReadOut) -> None: ...

    def output(self, h: Tensor) -> tuple[Tensor, Optional[Tensor]]: ...


class Uniform:
    """Every row runs ``iterations`` iterations; ``write`` (e.g. the non-padding tokens) stores keys/values."""

    finished = False

    def __init__(self, iterations: int, write: Optional[Tensor] = None, first: int = 0) -> None:
        self.iterations, self.write, self.first = iterations, write, first

    def rows(self, t: int) -> Optional[Tensor]:
        return None

    def writes(self, t: int) -> Optional[Tensor]:
        return self.write

    def done(self, t, h_before, h_after, rows, read_out) -> None:
        pass

    def output(self, h: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return h, None


class PerSequence:
    """Sequence i runs counts[i] iterations (counts on the CPU); ``iterations`` >= counts.max() (sharded training
    may ask for more: the extra iterations call the blocks on zero rows)."""

    finished = False  # sharded training calls the blocks even with no row left (module docstring of looped.py)
    first = 0

    def __init__(self, counts: Tensor, iterations: int, device, record: Optional["LoopRecorder"] = None) -> None:
        self.counts, self.iterations, self.device, self.record = counts, iterations, device, record
        self._active: Optional[Tensor] = None
        self._rows: Optional[Tensor] = None

    def rows(self, t: int) -> Optional[Tensor]:
        active = (self.counts > t).nonzero().flatten()
        if active.numel() == self.counts.numel():
            self._active = active
            return None
        # The set only shrinks with t, so the same size is the same set: hand back the same tensor, and the loop
        # keeps its gathered rows instead of scattering and gathering them again (parcae.model.looped._iterate).
        if self._rows is None or active.numel() != self._active.numel():
            self._active, self._rows = active, active.to(self.device, non_blocking=True)
        return self._rows

    def writes(self, t: int) -> Optional[Tensor]:
        return None

    def done(self, t, h_before, h_after, rows, read_out) -> None:
        if self.record is not None and self._active.numel():
            self.record.update(h_before, h_after, self._active)

    def output(self, h: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return h, None


class LoopRecorder:
    """Cheap loop telemetry, accumulated on the device: ‖h_t‖ per iteration and each sequence's last step."""

    def __init__(self, h0: Tensor, depths: Depths) -> None:
        self.depths = depths
        B, T = len(depths), int(depths.total.max())
        self.done = torch.zeros(B, dtype=torch.long)  # iterations completed per sequence (CPU)
        self.norm_sum = torch.zeros(T + 1, device=h0.device)
        self.norm_count = torch.zeros(T + 1, device=h0.device)
        self.norm_sum[0] = h0.detach().float().norm(dim=-1).mean()
        self.norm_count[0] = 1
        self.last_residual = torch.zeros(B, device=h0.device)
        self.last_norm = torch.zeros(B, device=h0.device)

    @torch.no_grad()
    def update(self, h_old: Tensor, h_new: Tensor, active: Tensor) -> None:
        idx = active.to(h_new.device)
        norms = h_new.float().norm(dim=-1).mean(-1)                   # per sequence, mean over tokens
        residuals = (h_new.float() - h_old.float()).norm(dim=-1).mean(-1)
        self.done[active] += 1
        step = self.done[active].to(h_new.device)
        self.norm_sum.index_add_(0, step, norms)
        self.norm_count.index_add_(0, step, torch.ones_like(norms))
        self.last_norm.index_copy_(0, idx, norms)
        self.last_residual.index_copy_(0, idx, residuals)

    def summary(self, injection) -> dict:
        return {
            "spectral_radius": injection.spectral_radius(),
            "mean_decay": injection.mean_decay(),
            "state_norm": self.norm_sum / self.norm_count.clamp(min=1),   # [T_max + 1], index 0 is h₀
            "final_state_norm": self.last_norm.mean(),                    # ‖h_T‖
            "residual": self.last_residual.mean(),                        # ‖h_T − h_{T−1}‖
            "rel_residual": (self.last_residual / self.last_norm.clamp(min=1e-12)).mean(),
            "depth": self.depths.total.clone(),
            "no_grad_iterations": self.depths.no_grad.clone(),
            "grad_iterations": self.depths.grad.clone(),
        }


def pick(x: Optional[Tensor], rows: Optional[Tensor]) -> Optional[Tensor]:
    """Rows ``rows`` of x (x itself when rows is None or x is shared by every row)."""
    return x if rows is None or x is None else x.index_select(0, rows)


def put(x: Tensor, rows: Optional[Tensor], value: Tensor) -> Tensor:
    """x with rows ``rows`` replaced by value (value itself when rows is None)."""
    return value if rows is None else x.index_copy(0, rows, value.to(x.dtype))
