"""Checks of numeric command-line options, shared by every verb, so each refuses a bad value the same way
(one line naming the flag, before any work starts).

    check_options(batch_size=(cfg.data.batch_size, 1), temperature=(t, 0), top_k=(k, 1, None))
"""

from __future__ import annotations

from typing import Any, Optional

from parcae.errors import UsageError

LARGE_LOOPS = 64  # beyond this a --loops value prints its expected cost before running


class OptionError(UsageError):
    """A command-line option outside its allowed range; one line."""


def at_least(flag: str, value: Any, minimum: float, allowed_none: bool = True, meaning: Optional[str] = None) -> None:
    """``--flag`` must be >= ``minimum`` (``None`` passes when ``allowed_none``)."""
    if value is None:
        if allowed_none:
            return
        raise OptionError(f"--{flag} must be given")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < minimum:
        extra = f" ({meaning})" if meaning else ""
        raise OptionError(f"--{flag} must be >= {minimum}{extra}, got {value!r}")


def check_options(**checks: tuple) -> None:
    """``name=(value, minimum)`` or ``name=(value, minimum, meaning)`` for each option; raises the first problem."""
    for flag, spec in checks.items():
        value, minimum, *rest = spec
        at_least(flag, value, minimum, meaning=rest[0] if rest else None)


def loop_cost_note(loops: list[int], mean_recurrence: int) -> Optional[str]:
    """A line stating the cost of loop counts far beyond training depth (None when all are modest)."""
    top = max(loops)
    if top <= LARGE_LOOPS:
        return None
    return (f"--loops up to {top}: each forward runs the recurrent block {top} times, about "
            f"{top / max(mean_recurrence, 1):.0f}x the compute of the trained depth μ_rec = {mean_recurrence}")
