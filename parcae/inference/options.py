"""The depth options of every verb that decodes: one dataclass, one way to build the engine from it.

    depth = DepthOptions(exit="kl:1e-3", max_loops=32, kv_policy="latest")
    engine = depth.engine(model, seed=0)

``parcae generate``, ``parcae perplexity --exit``, ``parcae predict`` and the server's requests all take these
fields under the same names (``--loops``, ``--exit``, ``--min_loops``, ``--max_loops``, ``--kv_policy``,
``--continuous``); the command line reads the flags and their help from this class.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Optional

from .engine import Engine


@dataclass
class DepthOptions:  # not frozen: Lightning's batch transfer rebuilds the dataclasses it carries
    """How many loop iterations each token runs: a fixed count, or an exit rule with bounds.

    Args:
        loops: fixed loop iterations per token (default: the model's μ_rec).
        exit: adaptive depth RULE[:THRESHOLD]: latent-diff (auto 0.03), cosine (1e-3), kl (1e-3), minp-kl (1e-5),
            entropy-diff (1e-3), argmax-stability (5).
        min_loops: with --exit: never exit before this many iterations.
        max_loops: with --exit: stop here at the latest (default μ_rec).
        exit_every: with --exit: check the rule every N iterations from --min_loops on (Huginn's
            check_criterion_every_n_steps).
        kv_policy: full | latest | ring:K: what later tokens read for iterations an exited token skipped (default
            latest with --exit).
        continuous: warm start: each token's initial state is the previous token's final state.
    """

    loops: Optional[int] = None
    exit: Optional[str] = None
    min_loops: int = 1
    max_loops: Optional[int] = None
    exit_every: int = 1
    kv_policy: Optional[str] = None
    continuous: bool = False

    @classmethod
    def of(cls, source: Any) -> "DepthOptions":
        """The depth options carried by an object with these attribute names (a parsed request, say); a field it
        lacks keeps its default."""
        return cls(**{f.name: getattr(source, f.name, f.default) for f in fields(cls)})

    def engine(self, model, seed: int = 0, **options: Any) -> Engine:
        """The KV-cached engine for ``model`` at this depth (the engine refuses options the model cannot take);
        ``options``: the engine's other keyword arguments (``speculate``)."""
        return Engine(model, seed=seed, **dataclasses.asdict(self), **options)
