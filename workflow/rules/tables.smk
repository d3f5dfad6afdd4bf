# One rule per paper item: a papermill-executed notebook writes the tidy CSV and figure; the
# executed notebook is kept under results/<profile>/notebooks/. Which runs feed which item is in
# the profile (config/workflow/<profile>.yaml, `tables:`).

PAPERMILL = "papermill --cwd . --no-progress-bar --log-level WARNING"
THROUGHPUT_CSV = f"{R}/tables/table8_throughput.csv"  # rule table8_throughput's output; Table 7's speeds


def _table_inputs(name, evals=False):
    ins = {"assets": f"{R}/assets/assets.json", "runs": [run_done(r) for r in table_runs(name)]}
    if evals:
        ins["evals"] = [f"{R}/evals/{m}.csv" for m in P["eval"]["models"]]
    if TABLES.get(name, {}).get("speed"):
        ins["throughput"] = THROUGHPUT_CSV
    return ins


def _speed_params(name):
    """The ablation notebook's speed inputs: Table 8's CSV and which of its methods each run is."""
    speed = TABLES.get(name, {}).get("speed", {})
    return {"speed": speed, "throughput": THROUGHPUT_CSV if speed else ""}


rule table1_main:
    input:
        **_table_inputs("table1_main", evals=True),
    output:
        csv="results/{profile}/tables/table1_main.csv",
        png="results/{profile}/figures/table1_main.png",
        nb="results/{profile}/notebooks/table1_main.ipynb",
    log:
        "results/{profile}/logs/table1_main.log",
    params:
        p=lambda w: notebook_params("table1_main", evals={m: f"{R}/evals/{m}.csv" for m in P["eval"]["models"]}),
    shell:
        "{PAPERMILL} notebooks/table1_main.ipynb {output.nb} -y {params.p} > {log} 2>&1"


rule figure3_loss_curves:
    input:
        **_table_inputs("figure3_loss_curves"),
    output:
        csv="results/{profile}/tables/figure3_loss_curves.csv",
        png="results/{profile}/figures/figure3_loss_curves.png",
        nb="results/{profile}/notebooks/figure3_loss_curves.ipynb",
    log:
        "results/{profile}/logs/figure3_loss_curves.log",
    params:
        p=lambda w: notebook_params("figure3_loss_curves"),
    shell:
        "{PAPERMILL} notebooks/figure3_loss_curves.ipynb {output.nb} -y {params.p} > {log} 2>&1"


# Ablations whose measurement is the final loss of a set of runs share one parametrised notebook.
for _name in ("table3_clone_terms", "table7_io_sharing", "figure6_alpha", "kl_temperature_sweep",
              "figure7_clone_layers"):

    rule:
        name:
            _name
        input:
            **_table_inputs(_name),
        output:
            csv=f"results/{{profile}}/tables/{_name}.csv",
            png=f"results/{{profile}}/figures/{_name}.png",
            nb=f"results/{{profile}}/notebooks/{_name}.ipynb",
        log:
            f"results/{{profile}}/logs/{_name}.log",
        params:
            p=lambda w, _n=_name: notebook_params(_n, **_speed_params(_n)),
        shell:
            "{PAPERMILL} notebooks/ablation.ipynb {output.nb} -y {params.p} > {log} 2>&1"


BENCH = P.get("benchmark", {})  # the profile's benchmark section (schema.yaml)


rule table8_throughput:
    output:
        csv="results/{profile}/tables/table8_throughput.csv",
    log:
        "results/{profile}/logs/table8_throughput.log",
    threads: workflow.cores
    params:
        bench=BENCH,
        shape=" ".join(f"--{k.replace('_', '-')} {BENCH[k]}" for k in ("batch_size", "grad_accum") if k in BENCH)
        + (" --compile" if BENCH.get("compile") else ""),
    shell:
        "OMP_NUM_THREADS={threads} python benchmarks/throughput.py --profile {params.bench[profile]} "
        "--device {params.bench[device]} --steps {params.bench[steps]} --warmup {params.bench[warmup]} "
        "{params.shape} --threads {threads} --output {output.csv} > {log} 2>&1"


rule claims:
    input:
        tables=[f"{R}/tables/{t}.csv" for t in TABLES if t != "claims"],
    output:
        csv="results/{profile}/tables/claims.csv",
        png="results/{profile}/figures/claims.png",
        nb="results/{profile}/notebooks/claims.ipynb",
    log:
        "results/{profile}/logs/claims.log",
    params:
        p=lambda w: notebook_params("claims", tables={t: f"{R}/tables/{t}.csv" for t in TABLES if t != "claims"}),
    shell:
        "{PAPERMILL} notebooks/claims.ipynb {output.nb} -y {params.p} > {log} 2>&1"
