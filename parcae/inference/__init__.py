"""parcae.inference: KV-cached generation and scoring at fixed or adaptive depth (plain PyTorch, no Lightning).

    from parcae.inference import Engine, Sampling
    engine = Engine(model, loops=8)                                   # or exit="kl", max_loops=32, kv_policy="latest"
    out = engine.generate([[bos, *ids]], max_new_tokens=64, sampling=Sampling(temperature=0.8, top_p=0.9))

See docs/inference.md for the design, the exit rules and the KV policies.
"""

from .cache import KVPolicy, LoopKVCache
from .engine import Engine, Generation, Sampling, StepEvent, generator_seed, sample
from .exits import AUTO_THRESHOLDS, ExitRule

__all__ = ["AUTO_THRESHOLDS", "Engine", "ExitRule", "Generation", "KVPolicy", "LoopKVCache", "Sampling", "StepEvent",
           "generator_seed", "sample"]
