"""parcae.inference: KV-cached generation and scoring at fixed or adaptive depth (plain PyTorch, no Lightning).

    from parcae.inference import Engine, Sampling
    engine = Engine(model, loops=8)                                   # or exit="kl", max_loops=32, kv_policy="latest"
    out = engine.generate([[bos, *ids]], max_new_tokens=64, sampling=Sampling(temperature=0.8, top_p=0.9))

See docs/inference.md for the design, the exit rules and the KV policies.
"""

from .cache import KVPolicy, LoopKVCache
from .engine import (DecodeStep, Engine, Generation, Sampling, SpeculationStats, StepEvent, decode_step,
                     generator_seed, sample, sample_from_probs, sampling_probs)
from .exits import AUTO_THRESHOLDS, ExitRule
from .options import DepthOptions

__all__ = ["AUTO_THRESHOLDS", "DecodeStep", "DepthOptions", "Engine", "ExitRule", "Generation", "KVPolicy",
           "LoopKVCache", "Sampling", "SpeculationStats", "StepEvent", "decode_step", "generator_seed", "sample",
           "sample_from_probs", "sampling_probs"]
