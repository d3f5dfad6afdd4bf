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
    every = P["budget_sweep"].get("eval_largest", False)
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
