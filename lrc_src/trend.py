"""Where the clone pays off: one method's held-out-loss advantage over another across token
budgets, its trend against log(tokens), and where that trend would cross zero.

For a method M and a baseline B trained at budgets t_1 < ... < t_K with the same seeds:

    d_{k,s} = loss_B(t_k, s) - loss_M(t_k, s)      (nats/token; > 0: M is ahead)
    mean_k  = mean_s d_{k,s}
    mean_k ~ a + b * ln(t_k)                        (least squares over the K budgets)

The slope is reported per doubling of tokens (b * ln 2). Its interval is a percentile bootstrap
over seeds: each replicate redraws every budget's seeds with replacement (each budget's runs are
separate trainings; deviations scaled so that a redrawn mean has the unbiased variance),
recomputes the K means and refits. With 3 seeds such an interval is still narrower than its
nominal level (tests/test_trend.py measures its coverage on synthetic sweeps). Where the fitted line changes sign above
the smallest budget, the crossover is t* = exp(-a / b): inside the measured range, or beyond it
(labelled extrapolation); its interval comes from the same replicates, a replicate whose line
never turns in M's favour counting as no crossover (an open upper end).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd


def paired_differences(sweep: pd.DataFrame, method: str, versus: str, metric: str = "heldout_loss") -> pd.DataFrame:
    """d = versus - method per (tokens, seed) present for both (budget_sweep.csv rows): tokens, seed, difference."""
    s = sweep[sweep.metric == metric]
    a = s[s.method == method].set_index(["tokens", "seed"])["value"]
    b = s[s.method == versus].set_index(["tokens", "seed"])["value"]
    both = a.index.intersection(b.index)
    if len(both) == 0:
        raise ValueError(f"no (tokens, seed) has both {method!r} and {versus!r} in the sweep")
    d = (b.loc[both] - a.loc[both]).rename("difference").reset_index()
    return d.sort_values(["tokens", "seed"], ignore_index=True)


def difference_summary(d: pd.DataFrame) -> pd.DataFrame:
    """Per budget: mean difference, its min and max over seeds, the spread (max - min) and n seeds."""
    g = d.groupby("tokens")["difference"]
    out = g.agg(mean="mean", min="min", max="max", n="count").reset_index()
    out["spread"] = out["max"] - out["min"]
    return out


def log_fit(tokens: np.ndarray, means: np.ndarray) -> tuple[float, float]:
    """(a, b) of means ~ a + b ln(tokens), least squares."""
    b, a = np.polyfit(np.log(np.asarray(tokens, dtype=float)), np.asarray(means, dtype=float), 1)
    return float(a), float(b)


def crossover(a: float, b: float, smallest: float) -> float:
    """The budget where a + b ln(t) changes sign, when that is above `smallest` and the line turns
    positive there (the method gets ahead with more tokens); nan otherwise. A nearly flat line that
    crosses beyond any representable budget gives inf (a bootstrap replicate's open upper end)."""
    if b <= 0:
        return math.nan
    log_t = -a / b
    t = math.exp(log_t) if log_t < math.log(sys.float_info.max) else math.inf
    return t if t > smallest else math.nan


def bootstrap_fits(d: pd.DataFrame, n: int = 2000, seed: int = 0) -> np.ndarray:
    """[n, 2] array of (a, b): refits on every budget's seeds redrawn with replacement."""
    rng = np.random.default_rng(seed)
    groups = [(t, g["difference"].to_numpy()) for t, g in d.groupby("tokens")]
    tokens = np.array([t for t, _ in groups], dtype=float)
    fits = np.empty((n, 2))
    for i in range(n):
        means = [_resampled_mean(v, rng) for _, v in groups]
        fits[i] = log_fit(tokens, np.array(means))
    return fits


def _resampled_mean(v: np.ndarray, rng: np.random.Generator) -> float:
    """The mean of v's values redrawn with replacement, their deviations scaled by sqrt(n / (n - 1)):
    the plain bootstrap's variance of a mean is (n - 1) / n of the unbiased one, 2/3 at 3 seeds."""
    m, k = v.mean(), len(v)
    draw = v[rng.integers(0, k, k)]
    scale = math.sqrt(k / (k - 1)) if k > 1 else 1.0
    return float(m + scale * (draw.mean() - m))


def _quantiles(x: np.ndarray, qs: list[float]) -> list[float]:
    """Order-statistic quantiles (no interpolation, so infinite values stay infinite)."""
    x = np.sort(x)
    return [float(x[min(len(x) - 1, max(0, math.ceil(q * len(x)) - 1))]) for q in qs]


def trend(
    sweep: pd.DataFrame,
    method: str,
    versus: str,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    metric: str = "heldout_loss",
) -> dict:
    """One row of budget_trend.csv: the fit of versus - method against ln(tokens), its bootstrap
    interval, and the crossover (none, within the measured range, or extrapolation)."""
    d = paired_differences(sweep, method, versus, metric)
    summ = difference_summary(d)
    if len(summ) < 2:
        raise ValueError(f"{method} vs {versus}: a trend needs at least two budgets, got {len(summ)}")
    a, b = log_fit(summ.tokens, summ["mean"])
    fits = bootstrap_fits(d, n_boot, seed)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    slopes = fits[:, 1] * math.log(2)
    lo, hi = _quantiles(slopes, [lo_q, hi_q])
    smallest, largest = float(summ.tokens.min()), float(summ.tokens.max())
    t_star = crossover(a, b, smallest)
    row = {
        "comparison": f"{method} vs {versus}",
        "method": method,
        "versus": versus,
        "budgets": len(summ),
        "seeds": int(summ.n.min()),
        "difference_at_largest": float(summ["mean"].iloc[-1]),
        "slope_per_doubling": b * math.log(2),
        "slope_lo": float(lo),
        "slope_hi": float(hi),
        "level": level,
        "intercept": a,
        "crossover_tokens": t_star,
        "crossover_lo": math.nan,
        "crossover_hi": math.nan,
        "crossover": "none",
    }
    if not math.isnan(t_star):
        boot = np.array([crossover(fa, fb, smallest) for fa, fb in fits])
        boot = np.where(np.isnan(boot), np.inf, boot)  # no crossover in a replicate: an open upper end
        row["crossover_lo"], row["crossover_hi"] = _quantiles(boot, [lo_q, hi_q])
        row["crossover"] = "within the measured range" if t_star <= largest else "extrapolation"
    return row


def slope_verdict_margin(row: dict | pd.Series) -> float:
    """A claim margin for "the method's advantage grows with tokens": the interval's lower end when
    it is above 0, its upper end when below 0, else 0 (inconclusive)."""
    if row["slope_lo"] > 0:
        return float(row["slope_lo"])
    if row["slope_hi"] < 0:
        return float(row["slope_hi"])
    return 0.0
