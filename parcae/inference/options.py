"""The depth options of every verb that decodes: one frozen dataclass, normalised once, one way to build the engine.

    depth = DepthOptions(exit="kl:1e-3", max_loops=32, kv_policy="latest").resolved(model.config)
    engine = Engine.from_options(model, depth, seed=0)          # or depth.engine(model, seed=0)

``parcae generate``, ``parcae perplexity --exit``, ``parcae predict`` and the server's requests all take these
fields under the same names (``--loops``, ``--exit``, ``--min_loops``, ``--max_loops``, ``--kv_policy``,
``--continuous``); the command line reads the flags and their help from this class.

:meth:`DepthOptions.resolved` is the one place depth options are checked and their defaults filled: every
spelling of the same setting resolves to one value (``kl``, ``kl:1e-3`` and ``kl:0.001`` are ``kl:0.001``;
``kv_policy`` omitted is ``latest`` with an exit rule, ``full`` without; ``ring:04`` is ``ring:4``), so equal
resolved options compare (and hash) equal: the scheduler runs them in one lane.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Optional

from .cache import KVPolicy
from .exits import ExitRule

if TYPE_CHECKING:
    from parcae.model import ModelConfig

    from .engine import Engine


@dataclass(frozen=True)
class DepthOptions:
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

    def resolved(self, config: "ModelConfig") -> "DepthOptions":
        """These options for a model of ``config`` with every default filled and every spelling canonical, or
        ValueError (one line) for anything the model cannot take. Resolving resolved options returns them equal.

        Fixed depth: ``loops`` set (``max_loops`` alone is the loop count; default μ_rec, 1 for a fixed-depth
        model), ``max_loops`` = ``loops`` and the exit bounds at their defaults (a fixed depth has no checks).
        With an exit rule: ``loops`` None, ``max_loops`` default μ_rec. ``kv_policy`` default ``latest`` with an
        exit rule, else ``full``. An exit rule given as an object (a test's scripted rule) is kept as it is."""
        for name in ("loops", "min_loops", "max_loops", "exit_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.continuous, bool):
            raise ValueError(f"continuous must be true or false, got {self.continuous!r}")
        exit = _canonical_exit(self.exit)
        if not config.looped:
            if exit is not None:
                name = exit.split(":")[0] if isinstance(exit, str) else getattr(exit, "name", exit)
                raise ValueError(f"--exit {name}: {config.name} is a fixed-depth model (injection='none'); it has "
                                 "no loop to exit")
            if self.loops not in (None, 1):
                raise ValueError(f"loops={self.loops}: {config.name} is a fixed-depth model; it has no loops to set")
            if self.continuous:
                raise ValueError(f"continuous warm start needs a looped model; {config.name} has no recurrent state")
        if exit is not None and self.loops is not None:
            raise ValueError("give either a fixed loop count or an exit rule, not both")
        policy = str(KVPolicy.parse(self.kv_policy)) if self.kv_policy is not None else \
            ("latest" if exit is not None else "full")
        if exit is None:
            loops = 1 if not config.looped else self.loops or self.max_loops or config.mean_recurrence
            return DepthOptions(loops=loops, exit=None, min_loops=1, max_loops=loops, exit_every=1,
                                kv_policy=policy, continuous=self.continuous)
        max_loops = self.max_loops if self.max_loops is not None else config.mean_recurrence
        if max_loops < self.min_loops:
            raise ValueError(f"max_loops ({max_loops}) must be >= min_loops ({self.min_loops})")
        return DepthOptions(loops=None, exit=exit, min_loops=self.min_loops, max_loops=max_loops,
                            exit_every=self.exit_every, kv_policy=policy, continuous=self.continuous)

    def engine(self, model, seed: int = 0, **options: Any) -> "Engine":
        """The KV-cached engine for ``model`` at this depth (:meth:`Engine.from_options`); ``options``: the
        engine's other keyword arguments (``speculate``)."""
        from .engine import Engine  # (the engine builds on this module)

        return Engine.from_options(model, self, seed=seed, **options)

    def as_kwargs(self) -> dict:
        """The fields as keyword arguments (Engine's)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _canonical_exit(exit: Any) -> Any:
    """One spelling per exit rule: "NAME:THRESHOLD" with the threshold's shortest exact form (``kl``, ``kl:1e-3``,
    ``kl:0.001`` and ``kl:auto`` are all ``kl:0.001``); a rule object other than :class:`ExitRule` is kept."""
    if exit is None:
        return None
    rule = ExitRule.parse(exit) if isinstance(exit, str) else exit
    if not isinstance(rule, ExitRule):
        return rule
    value = float(rule.threshold)
    return f"{rule.name}:{int(value) if rule.name == 'argmax-stability' else repr(value)}"


__all__ = ["DepthOptions"]
