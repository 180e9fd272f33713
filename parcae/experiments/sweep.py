"""Expand a sweep definition (recipes/sweeps/*.yaml) into parcae runs; print them, or run them one by one.

    parcae sweep recipes/sweeps/isoflop_140m.yaml             # table of runs + the commands, nothing is run
    parcae sweep recipes/sweeps/isoflop_140m.yaml --run       # run them (each resumes if already started)

A sweep file names base recipes (relative to the sweep file) and how to vary them:

    recipes: [../isoflop_140m.yaml]
    set: {max_tokens: 1.12e10}                       # fixed overrides for every run (dotted keys)
    grid: {model.arch.mean_recurrence: [1, 2, 4]}    # cartesian product over dotted keys
    backprop_depth: half                             # μ_bwd = ceil(μ_rec / 2), paper Eq. 6
    flop_budgets: [1.0e+18, 2.0e+18]                 # each run also gets max_tokens = budget / FLOPs per token
    flop_convention: official                        # App. D counting (parcae/model/flops.py)
    run_name: "{recipe}_mu{model.arch.mean_recurrence}_C{flops}"
    test_loops: "1-24"                               # optional: `parcae test --loops` after each fit

Tokens for a FLOP budget use the training FLOPs per token of the run's own model (at its μ_rec, μ_bwd and
sequence length), as the paper's isoFLOP sweeps do (§5.2, App. D).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from parcae.errors import UsageError


@dataclass
class Run:
    name: str
    recipe: Path
    overrides: dict[str, Any]
    flops: Optional[float] = None
    tokens: Optional[int] = None
    test_loops: Optional[str] = None
    notes: dict[str, Any] = field(default_factory=dict)

    def fit_args(self) -> list[str]:
        args = ["fit", "--config", os.path.relpath(self.recipe), "--run_name", self.name, "--auto_resume", "true"]
        for key, value in self.overrides.items():
            args += [f"--{key}", _format(value)]
        return args

    def test_args(self, runs_dir: str = "checkpoints") -> Optional[list[str]]:
        """``parcae test`` of this run: given the run directory, so that the test takes the checkpoint runs' one
        rule picks (its newest good one, parcae.runs.newest_checkpoint), and writes its results into it."""
        if not self.test_loops:
            return None
        return ["test", "--ckpt_path", f"{runs_dir}/{self.name}", "--loops", str(self.test_loops)]


def _format(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1e6:
        return str(int(value))
    return str(value)


def _short(value: Any) -> str:
    if isinstance(value, float):
        if value >= 1e6:
            exponent = int(math.floor(math.log10(value)))
            return f"{value / 10**exponent:g}e{exponent}"
        return f"{value:g}"
    return str(value)


def expand(sweep_path: str | Path) -> list[Run]:
    """The runs a sweep file defines, with derived μ_bwd and token budgets."""
    sweep_path = Path(sweep_path)
    spec = yaml.safe_load(sweep_path.read_text())
    unknown = set(spec) - {"recipes", "set", "grid", "backprop_depth", "flop_budgets", "flop_convention",
                           "run_name", "test_loops", "title", "claim", "report"}
    if unknown:
        raise ValueError(f"{sweep_path}: unknown key(s) {', '.join(sorted(unknown))}")
    recipes = [(sweep_path.parent / r).resolve() for r in spec["recipes"]]
    for recipe in recipes:
        if not recipe.is_file():
            raise ValueError(f"{sweep_path}: recipe {recipe} does not exist")
    grid = spec.get("grid") or {}
    budgets = spec.get("flop_budgets") or [None]
    runs = []
    for recipe in recipes:
        for values in itertools.product(*grid.values()):
            for flops in budgets:
                overrides = {**(spec.get("set") or {}), **dict(zip(grid, values))}
                if spec.get("backprop_depth") == "half":
                    mu = overrides.get("model.arch.mean_recurrence")
                    if mu is None:
                        raise ValueError(f"{sweep_path}: backprop_depth: half needs model.arch.mean_recurrence")
                    overrides["model.arch.backprop_depth"] = math.ceil(mu / 2)
                fields = {"recipe": recipe.stem, "flops": _short(flops) if flops else "",
                          **{k: _short(v) for k, v in overrides.items()}}
                name = _render(spec.get("run_name", "{recipe}"), fields)
                run = Run(name, recipe, overrides, flops=flops, test_loops=spec.get("test_loops"))
                if flops:
                    run.tokens = _tokens_for(run, flops, spec.get("flop_convention", "official"))
                    run.overrides["max_tokens"] = run.tokens
                runs.append(run)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"{sweep_path}: run_name does not tell the runs apart (duplicates: "
                         f"{sorted({n for n in names if names.count(n) > 1})[:3]})")
    return runs


def _render(template: str, fields: dict[str, str]) -> str:
    """Fill {recipe}, {flops} and {dotted.keys} of the swept values into a run name."""
    def field_value(match: re.Match) -> str:
        key = match.group(1)
        if key not in fields:
            raise ValueError(f"run_name refers to {{{key}}}, which is neither recipe, flops nor a swept key")
        return fields[key]

    return re.sub(r"\{([^{}]+)\}", field_value, template)


def _tokens_for(run: Run, flops: float, convention: str) -> int:
    from parcae.training.run import model_config_of, parse_recipe
    from parcae.model import flops_per_token

    cfg = parse_recipe(run.recipe, [a for k, v in run.overrides.items() if k != "max_tokens"
                                    for a in (f"--{k}", _format(v))])
    arch = model_config_of(cfg)
    per_token = flops_per_token(arch, cfg.data.seq_len, convention=convention).per_token
    run.notes["flops_per_token"] = per_token
    return int(flops / per_token)


def expand_and_run(sweep: str, /, *, run: bool = False, only: Optional[str] = None) -> None:
    """Expand (and optionally run) a sweep definition.

    Args:
        sweep: recipes/sweeps/<name>.yaml
        run: run every fit (and test) one after another.
        only: run only runs whose name contains this text.
    """
    try:
        runs = expand(sweep)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if only:
        runs = [r for r in runs if only in r.name]
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{sweep}: {len(runs)} runs")
    for col in ("run", "overrides", "tokens"):
        table.add_column(col)
    for r in runs:
        table.add_row(r.name, " ".join(f"{k}={_short(v)}" for k, v in r.overrides.items() if k != "max_tokens"),
                      f"{r.tokens / 1e9:.3g}B" if r.tokens else "recipe")
    console = Console()
    console.print(table)
    for r in runs:
        commands = [r.fit_args()] + ([r.test_args()] if r.test_args() else [])
        for command in commands:
            line = "parcae " + " ".join(shlex.quote(a) for a in command)
            console.print(line, highlight=False, soft_wrap=True)
            if run:
                result = subprocess.run([sys.executable, "-m", "parcae", *command])
                if result.returncode != 0:
                    raise UsageError(f"{r.name} failed (exit {result.returncode}); re-run to resume the rest")
