# Analysis items: measurements on trained models rather than on their loss logs. Each rule runs
# its own parametrised notebook (notebooks/<item>.ipynb), whose logic is in lrc_src/analysis.py.
# Which runs feed an item, and its extra notebook parameters (`params:`), are in the profile's
# `tables:` entry.
#   figure4_tokens           held-out loss (+ tiny suite) of the exports at train.export_at and the final student
#   table4_data_mix          runs differing only in data.corpus, scored on each corpus's held-out set
#   table5_neuron_masking    mask the top-k FFN neurons vs k random ones, teacher and LRC student
#   table21_singular_values  spectrum of P_up at the exports and at the end of training
#   table22_gram_mse         FFN Gram matrices: teacher vs student vs a random model

ANALYSIS = {  # item -> the paper's CSV its notebook shows beside ours (PAPER_FILES key), if any
    "figure4_tokens": None,
    "table4_data_mix": "ablations",
    "table5_neuron_masking": "ablations",
    "table21_singular_values": "ablations",
    "table22_gram_mse": "ablations",
}
SUITE_ITEMS = ("figure4_tokens", "table5_neuron_masking")  # notebooks that can run the tiny suite themselves
ONE_RUN = ("table5_neuron_masking", "table22_gram_mse")  # items that measure one LRC student


def _notebook_parameters(name):
    """The names the item's notebook assigns in its `parameters` cell."""
    cells = json.loads(Path(f"notebooks/{name}.ipynb").read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return set(re.findall(r"^(\w+)\s*=", source, flags=re.M))


for _t, _spec in TABLES.items():
    if "params" in _spec and _t not in ANALYSIS:
        raise ValueError(f"profile {PROFILE}: table {_t} takes no params (only {sorted(ANALYSIS)} do)")
    _unknown = sorted(set(_spec.get("params", {})) - _notebook_parameters(_t)) if _t in ANALYSIS else []
    if _unknown:
        raise ValueError(f"profile {PROFILE}: table {_t}: params {_unknown} are not parameters of notebooks/{_t}.ipynb")
    if _t in ONE_RUN and len(_spec.get("runs", [])) != 1:
        raise ValueError(f"profile {PROFILE}: table {_t} measures one run; it lists {_spec.get('runs', [])}")


def _analysis_params(name):
    """The item's notebook parameters from the profile; the suite is off unless the profile says so,
    and scores every item when it does (never the notebook's ci defaults)."""
    params = dict(TABLES.get(name, {}).get("params", {}))
    if name in SUITE_ITEMS:
        params.setdefault("suite", False)
        if params["suite"]:
            params.setdefault("suite_limit", None)
    return params


def _analysis_inputs(name):
    ins = _table_inputs(name, f"notebooks/{name}.ipynb", paper=ANALYSIS[name])
    if name == "table4_data_mix":
        ins["evals"] = list(_table_evals(name, teacher=False).values())
    if _analysis_params(name).get("suite"):
        ins["suite_data"] = TINY_SUITE
    return ins


def _analysis_notebook_params(name, input):
    extra = _analysis_params(name)
    if extra.get("suite"):
        extra["suite_dir"] = input.suite_data
    if ANALYSIS[name]:
        extra["paper_csv"] = input.paper
    if name == "table4_data_mix":
        extra["evals"] = _table_evals(name, teacher=False)
    return notebook_params(name, **extra)


for _name in ANALYSIS:

    rule:
        name:
            _name
        input:
            **_analysis_inputs(_name),
        output:
            csv=f"results/{{profile}}/tables/{_name}.csv",
            png=f"results/{{profile}}/figures/{_name}.png",
            nb=f"results/{{profile}}/notebooks/{_name}.ipynb",
        log:
            f"results/{{profile}}/logs/{_name}.log",
        threads: 1
        params:
            p=lambda w, input, _n=_name: _analysis_notebook_params(_n, input),
        shell:
            "OMP_NUM_THREADS={threads} {PAPERMILL} {input.notebook} {output.nb} -y {params.p} > {log} 2>&1"
