# One rule per paper item: a papermill-executed notebook writes the tidy CSV and figure; the
# executed notebook is kept under results/<profile>/notebooks/. Which runs feed which item is in
# the profile (config/workflow/<profile>.yaml, `tables:`). Each rule's inputs are everything its
# notebook reads: the notebook itself and the lrc_src modules it imports, the run folders
# (run.json marks a finished run), the eval CSVs, the paper's numbers (reference/) and other tables.

PAPERMILL = "papermill --cwd . --no-progress-bar --log-level WARNING"
THROUGHPUT_CSV = f"{R}/tables/table8_throughput.csv"  # rule table8_throughput's output; Table 7's speeds


def _table_evals(name, teacher=True):
    """Eval CSVs of the item's runs (and the teacher's) that the profile evaluates; the profile may
    evaluate other models (e.g. the data-mix runs of Table 4), which belong to other items."""
    models = ["teacher", *table_runs(name)] if teacher else table_runs(name)
    return {m: f"{R}/evals/{m}.csv" for m in models if m in P["eval"]["models"]}


def _table_inputs(name, notebook, paper=None, evals=False):
    """A table notebook's inputs; `paper`: which of the paper's CSVs it shows (PAPER_FILES key)."""
    ins = {"notebook": notebook, "code": lrc_imports(notebook), "assets": f"{R}/assets/assets.json",
           "runs": [run_done(r) for r in table_runs(name)]}
    if paper:
        ins["paper"] = PAPER_FILES[paper]
    if evals:
        ins["evals"] = list(_table_evals(name).values())
    if TABLES.get(name, {}).get("speed"):
        ins["throughput"] = THROUGHPUT_CSV
    return ins


def _speed_params(name):
    """The ablation notebook's speed inputs: Table 8's CSV and which of its methods each run is."""
    speed = TABLES.get(name, {}).get("speed", {})
    return {"speed": speed, "throughput": THROUGHPUT_CSV if speed else ""}


rule table1_main:
    input:
        **_table_inputs("table1_main", "notebooks/table1_main.ipynb", paper="benchmarks", evals=True),
        samples=[f"{R}/tables/samples.csv"] if P.get("samples") else [],
    output:
        csv="results/{profile}/tables/table1_main.csv",
        png="results/{profile}/figures/table1_main.png",
        nb="results/{profile}/notebooks/table1_main.ipynb",
    log:
        "results/{profile}/logs/table1_main.log",
    params:
        p=lambda w, input: notebook_params("table1_main", paper_csv=input.paper,
                                           evals=_table_evals("table1_main"),
                                           samples_csv=input.samples[0] if input.samples else ""),
    shell:
        "{PAPERMILL} {input.notebook} {output.nb} -y {params.p} > {log} 2>&1"


rule figure3_loss_curves:
    input:
        **_table_inputs("figure3_loss_curves", "notebooks/figure3_loss_curves.ipynb"),
    output:
        csv="results/{profile}/tables/figure3_loss_curves.csv",
        png="results/{profile}/figures/figure3_loss_curves.png",
        nb="results/{profile}/notebooks/figure3_loss_curves.ipynb",
    log:
        "results/{profile}/logs/figure3_loss_curves.log",
    params:
        p=lambda w: notebook_params("figure3_loss_curves"),
    shell:
        "{PAPERMILL} {input.notebook} {output.nb} -y {params.p} > {log} 2>&1"


# Ablations whose measurement is the final loss of a set of runs share one parametrised notebook.
for _name in ("table3_clone_terms", "table7_io_sharing", "figure6_alpha", "kl_temperature_sweep",
              "figure7_clone_layers"):

    rule:
        name:
            _name
        input:
            **_table_inputs(_name, "notebooks/ablation.ipynb", paper="ablations"),
        output:
            csv=f"results/{{profile}}/tables/{_name}.csv",
            png=f"results/{{profile}}/figures/{_name}.png",
            nb=f"results/{{profile}}/notebooks/{_name}.ipynb",
        log:
            f"results/{{profile}}/logs/{_name}.log",
        params:
            p=lambda w, input, _n=_name: notebook_params(_n, paper_csv=input.paper, **_speed_params(_n)),
        shell:
            "{PAPERMILL} {input.notebook} {output.nb} -y {params.p} > {log} 2>&1"


BENCH = P.get("benchmark", {})  # the profile's benchmark section (schema.yaml)
BENCH_SCRIPT = "benchmarks/throughput.py"


def _bench_inputs():
    """The benchmark script, the lrc_src modules it imports and the train config of its profile
    (benchmarks/throughput.py PROFILES)."""
    from benchmarks.throughput import PROFILES

    if BENCH["profile"] not in PROFILES:
        raise ValueError(f"profile {PROFILE}: benchmark.profile {BENCH['profile']!r} is not one of "
                         f"{BENCH_SCRIPT}'s profiles {sorted(PROFILES)}")
    return {"script": BENCH_SCRIPT, "code": lrc_imports(BENCH_SCRIPT),
            "config": os.path.relpath(PROFILES[BENCH["profile"]])}


rule table8_throughput:
    input:
        **(_bench_inputs() if BENCH else {}),
    output:
        csv="results/{profile}/tables/table8_throughput.csv",
    log:
        "results/{profile}/logs/table8_throughput.log",
    threads: workflow.cores
    resources:
        gpu=gpus(BENCH.get("device", "cpu")),
    params:
        bench=BENCH,
        shape=" ".join(f"--{k.replace('_', '-')} {BENCH[k]}" for k in ("batch_size", "grad_accum") if k in BENCH)
        + (" --compile" if BENCH.get("compile") else ""),
    shell:
        "OMP_NUM_THREADS={threads} python {input.script} --profile {params.bench[profile]} "
        "--device {params.bench[device]} --steps {params.bench[steps]} --warmup {params.bench[warmup]} "
        "{params.shape} --threads {threads} --output {output.csv} > {log} 2>&1"


def _claims_tables():
    """The tables the claims notebook reads: every item's, and the budget trend's when the sweep is
    part of the profile's default target."""
    tables = {t: f"{R}/tables/{t}.csv" for t in TABLES if t != "claims"}
    if SWEEP and P.get("budget_trend") and P["budget_sweep"]["in_all"]:
        tables["budget_trend"] = f"{R}/tables/budget_trend.csv"
    return tables


rule claims:
    input:
        notebook="notebooks/claims.ipynb",
        code=lrc_imports("notebooks/claims.ipynb"),
        tables=list(_claims_tables().values()),
    output:
        csv="results/{profile}/tables/claims.csv",
        png="results/{profile}/figures/claims.png",
        nb="results/{profile}/notebooks/claims.ipynb",
    log:
        "results/{profile}/logs/claims.log",
    params:
        p=lambda w: notebook_params("claims", tables=_claims_tables()),
    shell:
        "{PAPERMILL} {input.notebook} {output.nb} -y {params.p} > {log} 2>&1"
