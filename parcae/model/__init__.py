"""parcae.model: the looped language model in plain PyTorch (no Lightning).

    from parcae.model import LoopedLM, preset, DepthSampler
    model = LoopedLM(preset("parcae-140m"))
    out = model(input_ids, labels, loops=8)                  # exactly 8 iterations
    out = model(input_ids, labels, depths=DepthSampler.from_config(model.config)(step, batch_size))
"""

from .config import PAPER_PARAMETER_COUNTS, PRESET_PARAMETER_COUNTS, PRESETS, ModelConfig, preset
from .depth import DepthSampler, Depths, parse_loops
from .flops import FlopBreakdown, effective_parameters, flops_per_token, tokens_for_budget
from .injection import AddInjection, ConcatInjection, DiagonalInjection, Injection
from .layers import Block, RMSNorm
from .looped import LoopedLM, LoopOutput
from .loss import IGNORE_INDEX, real_logits, token_nll
from .official import config_from_official, from_official, to_official

__all__ = [
    "AddInjection", "Block", "ConcatInjection", "DepthSampler", "Depths", "DiagonalInjection", "FlopBreakdown", "effective_parameters",
    "IGNORE_INDEX", "Injection", "LoopOutput", "LoopedLM", "ModelConfig", "PAPER_PARAMETER_COUNTS",
    "PRESETS", "PRESET_PARAMETER_COUNTS", "RMSNorm", "config_from_official", "flops_per_token", "from_official",
    "parse_loops", "preset", "real_logits", "to_official", "token_nll", "tokens_for_budget",
]
