# The budget sweep: each base run of `budget_sweep:` in the profile, re-trained at every token
# budget and seed (runs expanded in common.smk as <run>__t<tokens>_s<seed>), scored by held-out
# loss; the eval suite on the largest budget's students when `eval_largest` is set. The margins
# are those of `budget_sweep.small` (LRC's small-budget preset) over each other method.


def _sweep_evals():
    """Eval CSVs of sweep runs: those the profile evaluates anyway (eval.models), plus every
    seed's largest-budget student when `eval_largest` is set."""
    if not SWEEP:
        return {}
    top = max(P["budget_sweep"]["tokens"])
    every = P["budget_sweep"]["eval_largest"]
    return {n: f"{R}/evals/{n}.csv" for n, r in SWEEP.items()
            if n in P["eval"]["models"] or (every and r["tokens"] == top)}


def _sweep_params():
    runs = {n: {"dir": run_dir(n), **r} for n, r in SWEEP.items()}
    params = {"profile": PROFILE, "runs": runs, "evals": _sweep_evals(), "small": P["budget_sweep"]["small"],
              "assets": f"{R}/assets/assets.json", "output_csv": f"{R}/tables/budget_sweep.csv",
              "output_margins_csv": f"{R}/tables/budget_sweep_margins.csv",
              "output_png": f"{R}/figures/budget_sweep.png"}
    return shlex.quote(json.dumps(params))


rule budget_sweep:
    input:
        notebook="notebooks/budget_sweep.ipynb",
        code=lrc_imports("notebooks/budget_sweep.ipynb"),
        assets="results/{profile}/assets/assets.json",
        runs=[run_done(n) for n in SWEEP],
        evals=list(_sweep_evals().values()),
    output:
        csv="results/{profile}/tables/budget_sweep.csv",
        margins="results/{profile}/tables/budget_sweep_margins.csv",
        png="results/{profile}/figures/budget_sweep.png",
        nb="results/{profile}/notebooks/budget_sweep.ipynb",
    log:
        "results/{profile}/logs/budget_sweep.log",
    params:
        p=lambda w: _sweep_params(),
    shell:
        "{PAPERMILL} {input.notebook} {output.nb} -y {params.p} > {log} 2>&1"


# Where the clone pays off (budget_trend:): each compared pair's held-out-loss difference against
# log(tokens) with a seed-bootstrap interval and crossover (lrc_src.trend), the hand-off fraction
# runs at one budget, and the eval suite's per-task scores of the largest budget's students.


def _endpoint_evals():
    top = max(P["budget_sweep"]["tokens"])
    return {n: {"csv": csv, **SWEEP[n]} for n, csv in _sweep_evals().items() if SWEEP[n]["tokens"] == top}


def _trend_params():
    bt = P["budget_trend"]
    params = {"profile": PROFILE, "sweep_csv": f"{R}/tables/budget_sweep.csv", "compare": bt["compare"],
              "fractions": {n: {"dir": run_dir(n), **r} for n, r in FRACTIONS.items()},
              "endpoint_evals": _endpoint_evals(), "n_boot": bt["bootstrap"],
              "assets": f"{R}/assets/assets.json", "output_csv": f"{R}/tables/budget_trend.csv",
              "output_differences_csv": f"{R}/tables/budget_trend_differences.csv",
              "output_fractions_csv": f"{R}/tables/handoff_fraction.csv",
              "output_suite_csv": f"{R}/tables/budget_endpoint_suite.csv",
              "output_png": f"{R}/figures/budget_trend.png"}
    return shlex.quote(json.dumps(params))


rule budget_trend:
    input:
        notebook="notebooks/budget_trend.ipynb",
        code=lrc_imports("notebooks/budget_trend.ipynb"),
        assets="results/{profile}/assets/assets.json",
        sweep="results/{profile}/tables/budget_sweep.csv",
        runs=[run_done(n) for n in FRACTIONS],
        evals=[e["csv"] for e in (_endpoint_evals().values() if SWEEP else [])],
    output:
        csv="results/{profile}/tables/budget_trend.csv",
        differences="results/{profile}/tables/budget_trend_differences.csv",
        fractions="results/{profile}/tables/handoff_fraction.csv",
        suite="results/{profile}/tables/budget_endpoint_suite.csv",
        png="results/{profile}/figures/budget_trend.png",
        nb="results/{profile}/notebooks/budget_trend.ipynb",
    log:
        "results/{profile}/logs/budget_trend.log",
    params:
        p=lambda w: _trend_params(),
    shell:
        "{PAPERMILL} {input.notebook} {output.nb} -y {params.p} > {log} 2>&1"
