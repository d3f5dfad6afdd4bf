# Profile loading, validation and the helpers the rules share.
import json
import os
import shlex
from pathlib import Path

import yaml
from snakemake.utils import validate

from lrc_src.report import PAPER_FILES  # the paper's numbers (reference/), read by the table notebooks

PROFILE = str(config.get("profile", "tiny"))
_profile_path = Path("config/workflow") / f"{PROFILE}.yaml"
if not _profile_path.is_file():
    _known = sorted(p.stem for p in Path("config/workflow").glob("*.yaml") if p.stem not in ("default", "schema"))
    raise ValueError(f"unknown profile {PROFILE!r}: no {_profile_path}; known profiles: {_known}")
P = yaml.safe_load(_profile_path.read_text())
validate(P, "../../config/workflow/schema.yaml")
RUNS = P["runs"]
TABLES = P["tables"]


def _train_setting(run, key):
    """train.<key> of a run: its override, else its train config's value."""
    if f"train.{key}" in RUNS[run]:
        return RUNS[run][f"train.{key}"]
    base = yaml.safe_load(Path(RUNS[run].get("config", P["train_config"])).read_text())
    return (base.get("train") or {}).get(key, 0 if key == "seed" else None)


# budget_sweep: every base run re-trained at each token budget and seed (its own full schedule).
# A (budget, seed) equal to the base run's own is the base run itself (trained once).
SWEEP = {}  # run name -> {"method": base run, "tokens": int, "seed": int}
if P.get("budget_sweep"):
    _bs = P["budget_sweep"]
    for _b in _bs["runs"]:
        if _b not in RUNS:
            raise ValueError(f"profile {PROFILE}: budget_sweep uses undefined run {_b!r}")
    if _bs["small"] not in _bs["runs"]:
        raise ValueError(f"profile {PROFILE}: budget_sweep.small is {_bs['small']!r}, which is not one of "
                         f"budget_sweep.runs {_bs['runs']}")
    for _b in _bs["runs"]:
        _own = (_train_setting(_b, "max_tokens"), _train_setting(_b, "seed"))
        for _t in _bs["tokens"]:
            for _s in _bs["seeds"]:
                _name = _b if (_t, _s) == _own else f"{_b}__t{_t}_s{_s}"
                if _name != _b:
                    RUNS[_name] = {**RUNS[_b], "train.max_tokens": _t, "train.seed": _s}
                SWEEP[_name] = {"method": _b, "tokens": int(_t), "seed": int(_s)}
for _t, _spec in TABLES.items():
    _missing = [r for r in _spec.get("runs", []) if r not in RUNS]
    if _missing:
        raise ValueError(f"profile {PROFILE}: table {_t} uses undefined run(s) {_missing}")
    _missing = [r for r in _spec.get("speed", {}) if r not in _spec.get("runs", [])]
    if _missing:
        raise ValueError(f"profile {PROFILE}: table {_t} gives a speed for run(s) {_missing} that it does not list")
    if _spec.get("speed") and "benchmark" not in P:
        raise ValueError(f"profile {PROFILE}: table {_t} takes speeds from the benchmark, but the profile has no benchmark section")
_missing = [m for m in P.get("samples", {}).get("models", []) if m != "teacher" and m not in RUNS]
if _missing:
    raise ValueError(f"profile {PROFILE}: samples.models uses undefined run(s) {_missing}")
_missing = [m for m in P["eval"]["models"] if m != "teacher" and m not in RUNS]
if _missing:
    raise ValueError(f"profile {PROFILE}: eval.models uses undefined run(s) {_missing}")
LAUNCHER = P.get("launcher", "lrc")
R = f"results/{PROFILE}"


wildcard_constraints:
    profile=PROFILE,


def run_dir(run):
    return f"{R}/runs/{run}"


def run_done(run):
    return f"{R}/runs/{run}/run.json"


# Keys of a run entry that the workflow consumes itself (the rest are `lrc train --set` overrides):
#   config: the run's own train config (default: the profile's train_config)
#   after:  a run whose exported student this run fine-tunes (sets sft.model, adds the dependency)
WORKFLOW_KEYS = ("config", "after")
for _r, _spec in RUNS.items():
    if _spec.get("after") is not None and _spec["after"] not in RUNS:
        raise ValueError(f"profile {PROFILE}: run {_r} is after undefined run {_spec['after']!r}")


def run_config(run):
    return RUNS[run].get("config", P["train_config"])


def run_inputs(run):
    ins = [f"{R}/assets/assets.json", run_config(run)]
    if RUNS[run].get("after"):
        ins.append(run_done(RUNS[run]["after"]))
    return ins


def set_args(run):
    """`--set key=value` arguments of a run's overrides (values as YAML flow)."""
    args = []
    spec = dict(RUNS[run])
    if spec.get("after"):
        spec["sft.model"] = f"{R}/runs/{spec['after']}/student"
    for key, value in spec.items():
        if key in WORKFLOW_KEYS:
            continue
        v = yaml.safe_dump(value, default_flow_style=True).strip()
        v = v[:-4].strip() if v.endswith("\n...") or v.endswith("...") else v
        args.append("--set " + shlex.quote(f"{key}={v}"))
    return " ".join(args)


def model_dir(model):
    return f"{R}/assets/teacher" if model == "teacher" else f"{R}/runs/{model}/student"


TINY_SUITE = f"{R}/assets/tiny_suite"  # rule tiny_suite's output: the offline eval suite's data


def suite_data(suite):
    """The data `lrc eval --suite <suite>` reads besides the model: the built tiny suite, or
    nothing (the hub suites fetch their own)."""
    return [TINY_SUITE] if suite == "tiny" else []


def table_runs(name):
    return TABLES.get(name, {}).get("runs", [])


def notebook_params(name, **extra):
    """papermill -y YAML: the parameters every table notebook takes, plus extras."""
    spec = TABLES.get(name, {})
    params = {
        "profile": PROFILE,
        "table": name,
        "runs": {r: run_dir(r) for r in spec.get("runs", [])},
        "labels": spec.get("labels", {}),
        "x": spec.get("x", {}),
        "metric": spec.get("metric", "heldout_loss"),
        "assets": f"{R}/assets/assets.json",
        "output_csv": f"{R}/tables/{name}.csv",
        "output_png": f"{R}/figures/{name}.png",
        **extra,
    }
    return shlex.quote(json.dumps(params))


def all_outputs():
    outs = [f"{R}/tables/{t}.csv" for t in TABLES]
    outs += [f"{R}/evals/{m}.csv" for m in P["eval"]["models"]]
    outs += [f"{R}/evals/{m}__{s}.csv" for m in P["eval"]["models"] for s in P["eval"].get("extra_suites", [])]
    if P.get("samples"):
        outs.append(f"{R}/tables/samples.csv")
    if SWEEP and P["budget_sweep"].get("in_all", True):
        outs.append(f"{R}/tables/budget_sweep.csv")
    return outs
