"""Turn run folders and evaluation CSVs into the paper's tables, as tidy frames.

The notebooks in notebooks/ are thin: they call these functions, assert on what they read, plot,
and write `results/<profile>/tables/<name>.csv`. Every number comes from a run folder
(metrics.csv, run.json), an `lrc eval` CSV, or the paper's numbers in reference/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from lrc_src.fileio import write_csv_atomic

#: The paper's numbers transcribed from its tables (reference/README.md): name -> path from the
#: project root. The workflow declares them as inputs of the rules whose notebooks read them.
PAPER_FILES = {name: f"reference/paper_{name}.csv" for name in ("benchmarks", "ablations", "fewshot")}


def project_root(start: str | Path | None = None) -> Path:
    """The repository root (the folder holding Snakefile), from the cwd or a notebook's folder."""
    here = Path(start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if (p / "Snakefile").is_file() and (p / "lrc_src").is_dir():
            return p
    raise FileNotFoundError(f"no project root (a folder with Snakefile) above {here}")


# The notebooks write their tables with report.write_csv: the project's one CSV writer.
write_csv = write_csv_atomic


# ---------------------------------------------------------------- runs


def read_run(run_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """metrics.csv as a frame (numeric) and run.json; FileNotFoundError or ValueError naming run.json
    when the run is missing or not complete."""
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no run.json: the run is missing or incomplete")
    info = json.loads(info_path.read_text())
    if info.get("status") != "complete":
        raise ValueError(f"{info_path}: the run is not complete (status {info.get('status')!r})")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return metrics, info


def final_losses(runs: dict[str, str | Path], last_k: int = 5) -> pd.DataFrame:
    """One row per run: tokens, train LM loss (mean of the last `last_k` logged steps), final
    held-out LM loss, trainable parameters, median tokens/s. Long (tidy) format."""
    rows = []
    for name, d in runs.items():
        m, info = read_run(d)
        held = m["heldout_loss"].dropna()
        values = {
            "train_lm_loss": float(m["lm"].tail(last_k).mean()),
            "heldout_loss": float(held.iloc[-1]) if len(held) else np.nan,
            "trainable_parameters": float(info["trainable_parameters"]),
            "tokens_per_s": float(m["tokens_per_s"].median()),
            "tokens": float(m["tokens"].iloc[-1]),
        }
        rows += [{"run": name, "metric": k, "value": v} for k, v in values.items()]
    return pd.DataFrame(rows)


def loss_curves(runs: dict[str, str | Path]) -> pd.DataFrame:
    """Tidy curves: run, step, tokens, metric (lm, loss, heldout_loss, clone, ...), value."""
    frames = []
    for name, d in runs.items():
        m, _ = read_run(d)
        keep = [c for c in m.columns if c not in ("step", "tokens", "lr", "grad_norm", "tokens_per_s", "elapsed_s")]
        long = m.melt(id_vars=["step", "tokens"], value_vars=keep, var_name="metric", value_name="value")
        long.insert(0, "run", name)
        frames.append(long.dropna(subset=["value"]))
    return pd.concat(frames, ignore_index=True)


def tokens_to_reach(curves: pd.DataFrame, threshold: float, metric: str = "lm", smooth: int = 3) -> pd.DataFrame:
    """First token count at which each run's (rolling-mean) `metric` is <= threshold (NaN if never)."""
    rows = []
    for run, g in curves[curves.metric == metric].groupby("run", sort=False):
        g = g.sort_values("tokens")
        s = g["value"].rolling(smooth, min_periods=1).mean()
        hit = g["tokens"][s <= threshold]
        rows.append(
            {
                "run": run,
                "metric": f"tokens_to_{metric}_{threshold:g}",
                "value": float(hit.iloc[0]) if len(hit) else np.nan,
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- evaluations


def read_evals(evals: dict[str, str | Path]) -> pd.DataFrame:
    """Concatenate `lrc eval` CSVs, with the model column set to the given names."""
    frames = []
    for name, path in evals.items():
        df = pd.read_csv(path)
        missing = sorted({"task", "metric", "value"} - set(df.columns))
        if missing:
            raise ValueError(f"{path} is not an `lrc eval` CSV: it has no column {', '.join(missing)}")
        df["model"] = name
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def main_table(evals: pd.DataFrame, finals: pd.DataFrame, teacher_heldout_loss: float) -> pd.DataFrame:
    """Tidy main table: model, task, metric, value, stderr (benchmarks + held-out LM loss)."""
    bench = evals[["model", "task", "metric", "value", "stderr"]].copy()
    held = finals[finals.metric == "heldout_loss"].rename(columns={"run": "model"})
    held = held.assign(task="heldout_lm", metric="loss_nats", stderr=np.nan)[bench.columns]
    teacher = pd.DataFrame(
        [
            {
                "model": "teacher",
                "task": "heldout_lm",
                "metric": "loss_nats",
                "value": teacher_heldout_loss,
                "stderr": np.nan,
            }
        ]
    )
    return pd.concat([bench, held, teacher], ignore_index=True)


# ---------------------------------------------------------------- budget sweep


SWEEP_EVAL_METRICS = {("tiny_heldout_ppl", "bits_per_byte"), ("tiny_continuation", "acc_norm"), ("tiny_mmlu", "acc")}


def budget_sweep_frame(runs: dict[str, dict], evals: dict[str, str | Path] | None = None) -> pd.DataFrame:
    """Tidy sweep: method, seed, tokens, metric, value. runs: name -> {dir, method, seed, tokens};
    metric heldout_loss (final held-out LM loss) for every run, plus the eval suite's headline
    metrics ("<task>/<metric>") for the runs in `evals` (name -> `lrc eval` CSV)."""
    rows = []
    finals = final_losses({n: r["dir"] for n, r in runs.items()})
    held = finals[finals.metric == "heldout_loss"].set_index("run")["value"]
    for name, r in runs.items():
        key = {"method": r["method"], "seed": int(r["seed"]), "tokens": int(r["tokens"])}
        rows.append({**key, "metric": "heldout_loss", "value": float(held[name])})
        if evals and name in evals:
            ev = pd.read_csv(evals[name])
            for _, e in ev.iterrows():
                if (e.task, e.metric) in SWEEP_EVAL_METRICS:
                    rows.append({**key, "metric": f"{e.task}/{e.metric}", "value": float(e.value)})
    return pd.DataFrame(rows, columns=["method", "seed", "tokens", "metric", "value"])


def sweep_summary(sweep: pd.DataFrame, metric: str = "heldout_loss") -> pd.DataFrame:
    """Per method and budget: mean, min, max and spread (max - min) over seeds, and n seeds."""
    g = sweep[sweep.metric == metric].groupby(["method", "tokens"])["value"]
    out = g.agg(mean="mean", min="min", max="max", n="count").reset_index()
    out["spread"] = out["max"] - out["min"]
    return out


def sweep_margins(sweep: pd.DataFrame, method: str, others: list[str], metric: str = "heldout_loss") -> pd.DataFrame:
    """For each budget and each other method: margin = best of other's seeds - worst of method's
    seeds (lower is better, so margin > 0 means `method` wins on every seed pairing), the mean
    difference, and the larger of the two seed spreads."""
    s = sweep_summary(sweep, metric).set_index(["method", "tokens"])
    rows = []
    for t in sorted(sweep.tokens.unique()):
        if (method, t) not in s.index:
            continue
        me = s.loc[(method, t)]
        for o in others:
            if (o, t) not in s.index:
                continue
            ot = s.loc[(o, t)]
            rows.append(
                {
                    "tokens": int(t),
                    "method": method,
                    "versus": o,
                    "mean_difference": float(ot["mean"] - me["mean"]),
                    "margin_worst_case": float(ot["min"] - me["max"]),
                    "seed_spread": float(max(me["spread"], ot["spread"])),
                    "n_seeds": int(min(me["n"], ot["n"])),
                }
            )
    return pd.DataFrame(rows)


def endpoint_suite(evals: dict[str, dict]) -> pd.DataFrame:
    """Every task score with its stderr for sweep runs. evals: run name -> {csv, method, seed,
    tokens}; rows: method, seed, tokens, task, metric, value, stderr (lm-eval's, over items)."""
    frames = []
    for e in evals.values():
        ev = pd.read_csv(e["csv"])
        ev = ev.assign(method=e["method"], seed=int(e["seed"]), tokens=int(e["tokens"]))
        frames.append(ev[["method", "seed", "tokens", "task", "metric", "value", "stderr"]])
    cols = ["method", "seed", "tokens", "task", "metric", "value", "stderr"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def suite_summary(suite: pd.DataFrame) -> pd.DataFrame:
    """Per method, task and metric: mean over seeds, the seed standard deviation, the mean item
    stderr of one run, and n seeds."""
    g = suite.groupby(["method", "task", "metric"])
    out = g.agg(mean=("value", "mean"), seed_sd=("value", "std"), item_stderr=("stderr", "mean"), n=("value", "count"))
    return out.reset_index()


# ---------------------------------------------------------------- paper


def paper_frame(name: str | Path, root: str | Path | None = None) -> pd.DataFrame:
    """The paper's numbers: `name` is a key of PAPER_FILES (benchmarks, ablations, fewshot; found
    under the project root) or the path of such a CSV (as the workflow passes it)."""
    path = project_root(root) / PAPER_FILES[name] if name in PAPER_FILES else Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"paper table {path} is missing")
    return pd.read_csv(path)


def claim_row(claim: str, paper_evidence: str, measured: str, margin: float, tol: float) -> dict:
    """One claim. `margin` is signed so that > 0 supports the claim (e.g. baseline loss - LRC loss);
    |margin| <= tol (single seed, run-to-run noise) is 'inconclusive'."""
    if not np.isfinite(margin):
        verdict = "n/a"
    elif margin > tol:
        verdict = "holds"
    elif margin < -tol:
        verdict = "does not hold"
    else:
        verdict = "inconclusive"
    return {
        "claim": claim,
        "paper_evidence": paper_evidence,
        "measured_here": measured,
        "margin": margin,
        "tolerance": tol,
        "verdict": verdict,
    }
