"""Weight initialisation (paper Tables 17-18; official parcae_lm/models/parcae/init.py, parcae_lm/utils/init.py).

``scaled-zero`` (Transformer setup, official Parcae): std σ = √(2/(5d)); Q/K/V, MLP input, readout C and
the embedding are "trunc-ortho" (a truncated-normal matrix orthogonalised by QR with a sign fix, scaled
by σ·√max(rows, cols)); output projections start at exactly zero; A_log = 0, Δ = ½ ln 5 (Ā = 0.447·I),
B = I; value-embedding tables N(0, 1); gates keep PyTorch's default.

``scaled`` (Takase, Huginn setup): truncated normal with σ everywhere, output projections
σ/√(2·L_eff) with L_eff = P + μ_rec·R + C the unrolled depth; the injection as above.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .injection import ConcatInjection, DiagonalInjection
from .layers import RMSNorm


def _trunc_normal_(w: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)


@torch.no_grad()
def trunc_ortho_(w: torch.Tensor, std: float) -> None:
    """Orthogonal matrix (QR of a truncated normal, sign-fixed) with gain std·√max(rows, cols)."""
    rows, cols = w.shape
    a = torch.empty(max(rows, cols), min(rows, cols), dtype=torch.float32, device=w.device)
    nn.init.trunc_normal_(a, mean=0.0, std=1.0, a=-2.0, b=2.0)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if rows < cols:
        q = q.T
    w.copy_(q * (std * math.sqrt(max(rows, cols))))


OUTPUT_PROJECTIONS = ("out_proj", "down_proj")


@torch.no_grad()
def initialize(model: nn.Module, config: ModelConfig) -> None:
    """Initialise every parameter of a :class:`parcae.model.LoopedLM` in place."""
    if any(p.is_meta for p in model.parameters()):
        return  # shape-only model (parameter counting, FLOPs): nothing to initialise
    std = config.state_std
    unrolled = config.effective_depth()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, DiagonalInjection):
            module.reset_parameters()
        elif isinstance(module, ConcatInjection):
            _trunc_normal_(module.proj.weight, std)
        elif isinstance(module, nn.Embedding):
            if leaf == "wte":
                (trunc_ortho_ if config.init == "scaled-zero" else _trunc_normal_)(module.weight, std)
            else:  # value-embedding tables: N(0, 1), as nn.Embedding's default (official keeps it)
                nn.init.normal_(module.weight)
        elif isinstance(module, nn.Linear):
            if name == "injection.proj":
                continue  # the concat adapter was initialised with its injection above
            if leaf == "ve_gate":
                module.reset_parameters()  # kaiming-uniform default, as the official gate
            elif leaf in OUTPUT_PROJECTIONS:
                if config.init == "scaled-zero":
                    nn.init.zeros_(module.weight)
                else:
                    _trunc_normal_(module.weight, std / math.sqrt(2 * unrolled))
            elif config.init == "scaled-zero":
                trunc_ortho_(module.weight, std)
            else:
                _trunc_normal_(module.weight, std)
