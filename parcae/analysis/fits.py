"""The paper's fits: test-time scaling (§5.3, Tables 12-14) and training scaling laws (§5.2, Table 11, Eq. 4/7/8).

Every fit minimises the Huber loss (δ = 1e-3) between log predicted and log observed loss with L-BFGS from many
starting points and keeps the best, as the paper does (after Hoffmann et al.'s "approach 3").

    from parcae.analysis.fits import fit_test_time, fit_parametric_law, isoflop_optima
    fit = fit_test_time(loops=[1, 2, 4, 8, 16], losses=[...])        # L(T) = L∞ + Z·exp(−z·T)
    fit.params            # {"L_inf": ..., "Z": ..., "z": ...};  fit.huber: mean Huber of the fit

    python -m parcae.analysis.fits checkpoints/mini/test_time/mini_tts_mu4/test_loops.json   # = parcae fit-loops
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from scipy.optimize import minimize

from parcae.errors import UsageError
from parcae.runs import TEST_LOOPS_JSON, write_text_atomically

HUBER_DELTA = 1e-3


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _huber_grad(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    return np.clip(r, -delta, delta)


@dataclass
class Fit:
    form: str
    params: dict[str, float]
    huber: float                  # mean Huber of log residuals on the fitted points
    predict: Callable = field(repr=False)
    extrapolation_huber: Optional[float] = None

    def to_dict(self) -> dict:
        d = {"form": self.form, "params": self.params, "huber": self.huber}
        if self.extrapolation_huber is not None:
            d["extrapolation_huber"] = self.extrapolation_huber
        return d


def _best_lbfgs(objective: Callable, starts: Sequence[np.ndarray], bounds: Sequence[tuple[float, float]],
                max_iter: int = 10_000) -> tuple[np.ndarray, float]:
    """Best L-BFGS-B solution over the starting points. Parameters live in generous boxes, so the optimiser
    cannot wander into values whose exponentials overflow."""
    best_x, best_f = None, math.inf
    for x0 in starts:
        x0 = np.clip(np.asarray(x0, dtype=float), [b[0] for b in bounds], [b[1] for b in bounds])
        res = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": max_iter, "gtol": 1e-14, "ftol": 1e-16})
        if np.isfinite(res.fun) and res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    if best_x is None:
        raise ValueError("no starting point gave a finite fit")
    return best_x, best_f


# ---------------------------------------------------------------------------------------------------------------
# Test-time scaling: loss as a function of the loop count T (paper §5.3, Table 12's four forms)
#   exp            L∞ + Z·exp(−z·T)        (the paper's choice)
#   shifted_power  L∞ + Z·(1 + T)^(−z)
#   power          L∞ + Z·T^(−z)
#   pure_power     Z·T^(−z)                (no floor)
# Parameters are optimised in log space (L∞, Z, z > 0): the objective is in log-loss space, so the terms are
# combined with log-sum-exp exactly.
TEST_TIME_FORMS = ("exp", "shifted_power", "power", "pure_power")


def _tt_terms(form: str, theta: np.ndarray, T: np.ndarray):
    """log-terms [k, n] whose exp-sum is the prediction, and for each parameter (its term, d term / d param)."""
    if form == "pure_power":
        log_z_amp, log_rate = theta
        rate = math.exp(log_rate)
        return (log_z_amp - rate * np.log(T))[None], [(0, 1.0), (0, -rate * np.log(T))]
    log_floor, log_z_amp, log_rate = theta
    rate = math.exp(log_rate)
    x = {"exp": T, "shifted_power": np.log1p(T), "power": np.log(T)}[form]
    terms = np.stack([np.full(len(T), log_floor), log_z_amp - rate * x])
    return terms, [(0, 1.0), (1, 1.0), (1, -rate * x)]


def _lse_objective(terms_fn: Callable, log_y: np.ndarray) -> Callable:
    """Mean Huber of log(Σ_k exp(term_k)) − log y, with its gradient. ``terms_fn(theta)`` returns the terms
    [k, n] and, per parameter, (index of the one term it enters, derivative of that term)."""
    def objective(theta):
        terms, derivs = terms_fn(theta)
        top = terms.max(0)
        weights = np.exp(terms - top)
        total = weights.sum(0)
        r = top + np.log(total) - log_y
        gs = (_huber_grad(r) / len(r)) * (weights / total)     # d mean Huber / d term_k, [k, n]
        grad = np.array([float(np.sum(gs[k] * d)) for k, d in derivs])
        return float(huber(r).mean()), grad
    return objective


def law_at_loops(form: str, params: dict[str, float], T) -> np.ndarray:
    """The loss one of Table 12's forms predicts at loop counts T, from its parameters (as fitted or stored)."""
    T = np.asarray(T, dtype=float)
    if form == "pure_power":
        return params["Z"] * T ** (-params["z"])
    x = {"exp": T, "shifted_power": np.log1p(T), "power": np.log(T)}[form]
    return params["L_inf"] + params["Z"] * np.exp(-params["z"] * x)


def fit_test_time(loops: Sequence[float], losses: Sequence[float], form: str = "exp",
                  fit_upto: Optional[float] = None) -> Fit:
    """Fit one of Table 12's forms to (loops, loss). ``fit_upto``: fit only T <= fit_upto and report the Huber
    error on the rest as ``extrapolation_huber`` (Table 12's "Extrap." rows use fit_upto = μ_rec)."""
    if form not in TEST_TIME_FORMS:
        raise ValueError(f"form must be one of {TEST_TIME_FORMS}, got {form!r}")
    T_all, L_all = np.asarray(loops, dtype=float), np.asarray(losses, dtype=float)
    if len(T_all) != len(L_all) or (L_all <= 0).any() or (T_all < 1).any():
        raise ValueError("loops and losses must have the same length, loops >= 1 and losses > 0")
    keep = T_all <= fit_upto if fit_upto is not None else np.ones(len(T_all), bool)
    T, L = T_all[keep], L_all[keep]
    if len(T) < (2 if form == "pure_power" else 3):
        raise ValueError(f"need at least {2 if form == 'pure_power' else 3} points to fit {form!r}, got {len(T)}")
    objective = _lse_objective(lambda th: _tt_terms(form, th, T), np.log(L))
    lo, spread = L.min(), max(L.max() - L.min(), 1e-6 * L.min())
    rates = [0.05, 0.2, 0.5, 1.0, 2.0]
    if form == "pure_power":
        starts = [np.array([math.log(L.max()), math.log(r)]) for r in [0.01, 0.05, 0.2, 0.5]]
    else:
        starts = [np.array([math.log(lo * f), math.log(spread * s), math.log(r)])
                  for f in (0.9, 0.97, 0.995) for s in (0.5, 2.0, 10.0) for r in rates]
    # log L∞, log Z within e^±30 of 1; the decay rate z within [e^-20, e^6]
    bounds = [(-30.0, 30.0), (-20.0, 6.0)] if form == "pure_power" else [(-30.0, 30.0), (-30.0, 30.0), (-20.0, 6.0)]
    theta, _ = _best_lbfgs(objective, starts, bounds)
    if form == "pure_power":
        params = {"Z": math.exp(theta[0]), "z": math.exp(theta[1])}
    else:
        params = {"L_inf": math.exp(theta[0]), "Z": math.exp(theta[1]), "z": math.exp(theta[2])}

    def predict(t):
        return law_at_loops(form, params, t)

    fit = Fit(form, params, float(huber(np.log(predict(T)) - np.log(L)).mean()), predict)
    if fit_upto is not None and (~keep).any():
        fit.extrapolation_huber = float(huber(np.log(predict(T_all[~keep])) - np.log(L_all[~keep])).mean())
    return fit


def floor_error(fit: Fit, loss_at_mu: float) -> float:
    """Table 13: |L∞ − L(T = μ_rec)| as a percentage of L(T = μ_rec)."""
    return 100.0 * abs(fit.params["L_inf"] - loss_at_mu) / loss_at_mu


# ---------------------------------------------------------------------------------------------------------------
# Training scaling laws (§5.2)
def fit_parabola(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """y = a·x² + b·x + c by least squares."""
    a, b, c = np.polyfit(np.asarray(x, float), np.asarray(y, float), 2)
    return float(a), float(b), float(c)


def isoflop_optima(runs: Sequence[dict]) -> list[dict]:
    """Per FLOP budget, the loss-minimising μ_rec and tokens from parabolas in log μ and log D (isoFLOP curves).

    ``runs``: dicts with ``flops``, ``mean_recurrence``, ``tokens``, ``loss``. Budgets with fewer than 3 runs
    are skipped. An upward-opening parabola gives its vertex; otherwise the best observed point is used.
    """
    out = []
    for flops in sorted({r["flops"] for r in runs}):
        group = [r for r in runs if r["flops"] == flops]
        if len(group) < 3:
            continue
        logs = {k: np.log([r[k] for r in group]) for k in ("mean_recurrence", "tokens")}
        loss = np.array([r["loss"] for r in group])
        best = {}
        for key, name in (("mean_recurrence", "mu_opt"), ("tokens", "tokens_opt")):
            a, b, c = fit_parabola(logs[key], loss)
            if a > 0:
                x = -b / (2 * a)
                best[name], best[f"{name}_loss"] = math.exp(x), a * x * x + b * x + c
                best[f"{name}_parabola"] = (a, b, c)
            else:
                i = int(loss.argmin())
                best[name], best[f"{name}_loss"] = math.exp(logs[key][i]), float(loss[i])
        out.append({"flops": flops, **best})
    return out


def power_law(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """y = k·x^exponent by least squares in log-log space."""
    exponent, log_k = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return {"exponent": float(exponent), "prefactor": float(math.exp(log_k))}


def _law_starts(with_decay: bool) -> list[np.ndarray]:
    """Starting points (log E, log A, a, log B, b [, log Z, z]) spread over the plausible range: 72 for Eq. 7,
    288 for the unified law (the paper keeps the best of 500 restarts; the optimum is reached from far fewer)."""
    grid = [np.log([1.5, 3.0]), [0.0, 7.0, 14.0], [0.3, 0.8], [0.0, 7.0, 14.0], [0.3, 0.8]]
    if with_decay:
        grid += [[-2.0, 0.0], [0.5, 3.0]]
    return [np.array(p, dtype=float) for p in itertools.product(*grid)]


def fit_parametric_law(N: Sequence[float], D: Sequence[float], losses: Sequence[float],
                       T: Optional[Sequence[float]] = None, mu: Optional[Sequence[float]] = None,
                       starts: Optional[list[np.ndarray]] = None) -> Fit:
    """L = E + A·N^(−a) + B·D^(−b) (Eq. 7), or with ``T`` and ``mu`` the unified law (Eq. 4/8)
    L = E + A·N(μ)^(−a) + B·D^(−b) + Z·exp(−z·T/μ). N is the unrolled parameter count N(μ_rec)."""
    logN, logD = np.log(np.asarray(N, float)), np.log(np.asarray(D, float))
    log_y = np.log(np.asarray(losses, float))
    unified = T is not None
    if unified:
        ratio = np.asarray(T, float) / np.asarray(mu, float)
    n = len(log_y)

    def terms(theta):
        e, la, a, lb, b = theta[:5]
        t = [np.full(n, e), la - a * logN, lb - b * logD]
        derivs = [(0, 1.0), (1, 1.0), (1, -logN), (2, 1.0), (2, -logD)]
        if unified:
            lz, z = theta[5:]
            t.append(lz - z * ratio)
            derivs += [(3, 1.0), (3, -ratio)]
        return np.stack(t), derivs

    # log E, log A, a, log B, b [, log Z, z]: wide boxes (exponents in [0, 5], amplitudes up to e^60)
    bounds = [(-10.0, 10.0), (-30.0, 60.0), (0.0, 5.0), (-30.0, 60.0), (0.0, 5.0)]
    if unified:
        bounds += [(-30.0, 10.0), (0.0, 100.0)]
    theta, _ = _best_lbfgs(_lse_objective(terms, log_y), starts or _law_starts(unified), bounds, max_iter=10_000)
    names = ["E", "A", "a", "B", "b"] + (["Z", "z"] if unified else [])
    values = [math.exp(theta[0]), math.exp(theta[1]), theta[2], math.exp(theta[3]), theta[4]]
    if unified:
        values += [math.exp(theta[5]), theta[6]]
    params = dict(zip(names, map(float, values)))

    def predict(N_, D_, T_=None, mu_=None):
        p = params
        out = p["E"] + p["A"] * np.asarray(N_, float) ** -p["a"] + p["B"] * np.asarray(D_, float) ** -p["b"]
        if unified:
            out = out + p["Z"] * np.exp(-p["z"] * np.asarray(T_, float) / np.asarray(mu_, float))
        return out

    fitted = predict(N, D, T, mu) if unified else predict(N, D)
    return Fit("unified" if unified else "parametric", params, float(huber(np.log(fitted) - log_y).mean()), predict)


# ---------------------------------------------------------------------------------------------------------------
def fit_loops_file(path: str | Path, mean_recurrence: Optional[int] = None, plot: bool = True) -> dict:
    """Fit every Table 12 form to a ``test_loops.json`` (from ``parcae test --loops``); write the fit JSON and PNG."""
    path = Path(path)
    if path.is_dir():
        path = path / TEST_LOOPS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (run `parcae test --loops 1-8` first)")
    try:
        data = json.loads(path.read_text())
        T = [r["loops"] for r in data["results"]]
        L = [r["loss"] for r in data["results"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ValueError(f"{path} is not a test_loops.json of `parcae test --loops`") from None
    mu = mean_recurrence or data.get("mean_recurrence")
    if len(set(T)) < 3:
        raise ValueError(f"{path} holds losses at {len(set(T))} loop count(s) ({data.get('model', 'model')}); a "
                         "fit needs at least 3 (`parcae test --loops 1-8` on a looped model)")
    fits = {}
    for form in TEST_TIME_FORMS:
        try:
            fit = fit_test_time(T, L, form)
            entry = fit.to_dict()
            if mu and sum(t <= mu for t in T) >= 3 and any(t > mu for t in T):
                entry["extrapolation_huber"] = fit_test_time(T, L, form, fit_upto=mu).extrapolation_huber
            fits[form] = entry
        except ValueError as err:
            fits[form] = {"error": str(err)}
    result = {"source": str(path), "mean_recurrence": mu, "loops": T, "losses": L, "fits": fits}
    exp = fits.get("exp", {})
    if mu in T and "params" in exp:
        result["floor_error_percent"] = floor_error(Fit("exp", exp["params"], 0, None), L[T.index(mu)])
    out = path.with_name(path.stem + "_fit.json")
    write_text_atomically(out, json.dumps(result, indent=2) + "\n")
    if plot and "params" in exp:
        plot_test_time(T, L, exp, mu, path.with_name(path.stem + "_fit.png"), title=data.get("model", ""))
    return result


def plot_test_time(T, L, fit: Optional[dict], mu: Optional[int], out: Path, title: str = "",
                   measured: str = "measured") -> Path:
    """The loss-by-loops plot: measured losses at each loop count, the fitted L∞ + Z·e^(−zT) (``fit``: an entry of
    ``fit_loops_file``'s ``fits``, i.e. ``Fit.to_dict()``; None draws the points alone) and μ_rec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(T, L, "o", label=measured)
    if fit is not None:
        grid, p = np.linspace(min(T), max(T), 200), fit["params"]
        ax.plot(grid, law_at_loops(fit.get("form", "exp"), p, grid), "-",
                label=f"L∞ + Z·e^(−zT): L∞={p['L_inf']:.4f}, Z={p['Z']:.3g}, z={p['z']:.3g}")
        ax.axhline(p["L_inf"], color="grey", lw=0.8, ls=":")
    if mu:
        ax.axvline(mu, color="grey", ls="--", label=f"μ_rec = {mu}")
    ax.set_xlabel("loops T at test time")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def fit_loops(results: str, /, *, mean_recurrence: Optional[int] = None) -> None:
    """Fit L(T) = L∞ + Z·exp(−zT) and Table 12's other forms to a loop sweep.

    Args:
        results: test_loops.json from `parcae test --loops`, or its run directory.
        mean_recurrence: μ_rec (default: read from the file).
    """
    try:
        result = fit_loops_file(results, mean_recurrence)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"test-time scaling fits (μ_rec = {result['mean_recurrence']})")
    for col in ("form", "parameters", "Huber (×1e-7)", "extrapolation Huber (×1e-7)"):
        table.add_column(col)
    for form, fit in result["fits"].items():
        if "error" in fit:
            table.add_row(form, fit["error"], "-", "-")
            continue
        params = ", ".join(f"{k} {v:.4g}" for k, v in fit["params"].items())
        extra = fit.get("extrapolation_huber")
        table.add_row(form, params, f"{fit['huber'] * 1e7:.3g}", "-" if extra is None else f"{extra * 1e7:.3g}")
    Console().print(table)
    if "floor_error_percent" in result:
        Console().print(f"|L∞ − L(T = μ_rec)| = {result['floor_error_percent']:.3f}% (paper Table 13: 0.16% mean at 140M)")
