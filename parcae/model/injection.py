"""How the prelude output e enters the loop: h ← Ā h + B̄ e (paper §2, Eq. 1-3, Table 1).

Every injection is split into the two halves of that update so the loop reads like the equation:

    drive = injection.input_term(e)    # B̄ e: constant over iterations, computed once per forward
    h     = injection(h, drive)        # Ā h + B̄ e, before the recurrent blocks on every iteration

| injection      | Ā h                           | B̄ e                        | ρ(Ā)                 |
|----------------|-------------------------------|----------------------------|----------------------|
| add            | h                             | e                          | 1 (marginal)         |
| concat (RDM)   | W_h h                         | W_e e,  W = [W_h W_e]      | unconstrained        |
| diagonal       | exp(−Δ⊙a) ⊙ h                 | Δ ⊙ (B e)                  | max exp(−Δ⊙a) < 1    |
| diagonal_zoh   | exp(−Δ⊙a) ⊙ h                 | (1−exp(−Δ⊙a))/a ⊙ (B e)    | max exp(−Δ⊙a) < 1    |

with a = exp(A_log) > 0 and Δ = softplus(dt_bias) > 0, so the diagonal Ā = exp(ΔA), A = −diag(a), is
stable by construction. Computing B̄e once is exact: the official code recomputes the same product on
every iteration.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


class Injection(nn.Module):
    def input_term(self, e: Tensor) -> Tensor:
        """B̄ e."""
        raise NotImplementedError

    def forward(self, h: Tensor, drive: Tensor) -> Tensor:
        """Ā h + drive."""
        raise NotImplementedError

    def bound(self) -> Callable[[Tensor, Tensor], Tensor]:
        """(h, drive) -> Ā h + drive, the same numbers as :meth:`forward`, with what depends on the parameters
        alone computed once here: for a run of iterations without gradient (a cached step)."""
        return self

    @torch.no_grad()
    def spectral_radius(self) -> Tensor:
        """ρ(Ā), the largest |eigenvalue| of the state transition (stable iff < 1)."""
        raise NotImplementedError

    @torch.no_grad()
    def mean_decay(self) -> Tensor:
        """Mean |eigenvalue| of Ā (the official "contraction factor")."""
        raise NotImplementedError


class AddInjection(Injection):
    """h + e (Yang et al.): Ā = I, marginally stable."""

    def input_term(self, e: Tensor) -> Tensor:
        return e

    def forward(self, h: Tensor, drive: Tensor) -> Tensor:
        return h + drive

    def spectral_radius(self) -> Tensor:
        return torch.ones(())

    def mean_decay(self) -> Tensor:
        return torch.ones(())


class ConcatInjection(Injection):
    """W [h; e] (the RDM / Huginn adapter): Ā = W_h is unconstrained, so ρ(Ā) can exceed 1."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.proj = nn.Linear(2 * d_model, d_model, bias=False)  # applied to cat[h, e], h first

    def input_term(self, e: Tensor) -> Tensor:
        return F.linear(e, self.proj.weight[:, self.d_model:])

    def forward(self, h: Tensor, drive: Tensor) -> Tensor:
        return F.linear(h, self.proj.weight[:, : self.d_model]) + drive

    def _eigenvalue_moduli(self) -> Tensor:
        state_matrix = self.proj.weight[:, : self.d_model].detach().double()
        return torch.linalg.eigvals(state_matrix).abs()

    def spectral_radius(self) -> Tensor:
        return self._eigenvalue_moduli().max().float()

    def mean_decay(self) -> Tensor:
        return self._eigenvalue_moduli().mean().float()


class DiagonalInjection(Injection):
    """Parcae: Ā = exp(−Δ⊙a) (zero-order hold), B̄ = Δ⊙B (Euler) or the exact ZOH gain (1−Ā)/a.

    ``zoh=True`` is the third-party "exact input write" (B. Huang, github.com/huskydoge/parcae-zoh-exact):
    g = −expm1(−Δa)/a, which is ∫₀^Δ exp(−τa) dτ, lies in (0, Δ], and reduces to Euler's Δ to first order.
    """

    def __init__(self, d_model: int, zoh: bool = False) -> None:
        super().__init__()
        self.zoh = zoh
        self.A_log = nn.Parameter(torch.zeros(d_model))    # a = exp(A_log) > 0
        self.dt_bias = nn.Parameter(torch.zeros(d_model))  # Δ = softplus(dt_bias) > 0
        self.B = nn.Parameter(torch.empty(d_model, d_model))

    def reset_parameters(self) -> None:
        # Official init (parcae_lm/models/parcae/init.py): A = −1, Δ = ½ ln 5 so Ā = 1/√5 ≈ 0.447·I, B = I.
        nn.init.zeros_(self.A_log)
        self.dt_bias.data.fill_(math.log(math.expm1(0.5 * math.log(5.0))))
        nn.init.eye_(self.B)

    def decay(self) -> Tensor:
        """The diagonal of Ā = exp(−Δ⊙a), in (0, 1)."""
        return torch.exp(-F.softplus(self.dt_bias) * torch.exp(self.A_log))

    def gain(self) -> Tensor:
        delta = F.softplus(self.dt_bias)
        if not self.zoh:
            return delta
        a = torch.exp(self.A_log)
        return -torch.expm1(-delta * a) / a  # expm1 keeps precision when Δa is small

    def input_term(self, e: Tensor) -> Tensor:
        return self.gain() * F.linear(e, self.B)

    def forward(self, h: Tensor, drive: Tensor) -> Tensor:
        return self.decay() * h + drive

    def bound(self) -> Callable[[Tensor, Tensor], Tensor]:
        decay = self.decay()
        return lambda h, drive: decay * h + drive

    def spectral_radius(self) -> Tensor:
        return self.decay().detach().max()

    def mean_decay(self) -> Tensor:
        return self.decay().detach().mean()


def make_injection(config: ModelConfig) -> Injection:
    kind = config.injection
    if kind == "add":
        return AddInjection()
    if kind == "concat":
        return ConcatInjection(config.d_model)
    if kind in ("diagonal", "diagonal_zoh"):
        return DiagonalInjection(config.d_model, zoh=kind == "diagonal_zoh")
    raise ValueError(f"ModelConfig.injection={kind!r} has no injection module")
