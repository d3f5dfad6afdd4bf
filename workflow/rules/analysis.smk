# Analysis items (issue 5): measurements on trained models rather than on their loss logs. Each
# rule runs its own parametrised notebook (notebooks/<item>.ipynb), whose logic is in
# lrc_src/analysis.py. Which runs feed an item, and its extra notebook parameters (`params:`),
# are in the profile's `tables:` entry.
#   figure4_tokens           held-out loss (+ tiny suite) of the exports at train.export_at and the final student
#   table4_data_mix          runs differing only in data.corpus, scored on each corpus's held-out set
#   table5_neuron_masking    mask the top-k FFN neurons vs k random ones, teacher and LRC student
#   table21_singular_values  spectrum of P_up at the exports and at the end of training
#   table22_gram_mse         FFN Gram matrices: teacher vs student vs a random model


def _analysis_params(name):
    return dict(TABLES.get(name, {}).get("params", {}))


def _suite_evals(name):
    """Eval CSVs an item needs: the teacher's when it runs the tiny suite itself (its rule builds
    results/<profile>/assets/tiny_suite), and those of its runs that the profile evaluates."""
    evals = {m: f"{R}/evals/{m}.csv" for m in table_runs(name) if m in P["eval"]["models"]}
    if _analysis_params(name).get("suite"):
        evals["teacher"] = f"{R}/evals/teacher.csv"
    return evals


SUITE_ITEMS = ("figure4_tokens", "table5_neuron_masking")  # notebooks that can run the tiny suite themselves


def _analysis_notebook_params(name):
    extra = _analysis_params(name)
    if name in SUITE_ITEMS:
        extra.setdefault("suite", False)  # explicit: never the notebook's (ci) default
    if extra.get("suite"):
        extra["suite_dir"] = f"{R}/assets/tiny_suite"
    if name == "table4_data_mix":
        extra["evals"] = {m: p for m, p in _suite_evals(name).items() if m != "teacher"}
    return notebook_params(name, **extra)


for _name in ("figure4_tokens", "table4_data_mix", "table5_neuron_masking", "table21_singular_values",
              "table22_gram_mse"):

    rule:
        name:
            _name
        input:
            **_table_inputs(_name),
            evals=list(_suite_evals(_name).values()),
        output:
            csv=f"results/{{profile}}/tables/{_name}.csv",
            png=f"results/{{profile}}/figures/{_name}.png",
            nb=f"results/{{profile}}/notebooks/{_name}.ipynb",
        log:
            f"results/{{profile}}/logs/{_name}.log",
        threads: 1
        params:
            p=lambda w, _n=_name: _analysis_notebook_params(_n),
            nb=f"notebooks/{_name}.ipynb",
        shell:
            "OMP_NUM_THREADS={threads} {PAPERMILL} {params.nb} {output.nb} -y {params.p} > {log} 2>&1"
