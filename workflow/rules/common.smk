# Profile loading, validation and the helpers the rules share.
import json
import os
import re
import shlex
from pathlib import Path

import yaml
from snakemake.utils import validate

from lrc_src.config import load_config
from lrc_src.report import PAPER_FILES  # the paper's numbers (reference/), read by the table notebooks

# The keys `--config` takes (a misspelt one would be ignored, and the default profile run).
CONFIG_KEYS = ("profile", "sweep_max_tokens")
_unknown = sorted(set(config) - set(CONFIG_KEYS))
if _unknown:
    raise ValueError(f"unknown --config key(s) {_unknown}; known: {list(CONFIG_KEYS)}")
PROFILE = str(config.get("profile", "tiny"))
_profile_path = Path("config/workflow") / f"{PROFILE}.yaml"
if not _profile_path.is_file():
    _known = sorted(p.stem for p in Path("config/workflow").glob("*.yaml") if p.stem not in ("default", "schema"))
    raise ValueError(f"unknown profile {PROFILE!r}: no {_profile_path}; known profiles: {_known}")
P = yaml.safe_load(_profile_path.read_text())


def _schema_error(profile, path):
    """The schema's most relevant complaint about a profile, as one line naming its file and key."""
    import jsonschema

    schema = yaml.safe_load(Path("config/workflow/schema.yaml").read_text())
    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(profile))
    where = ".".join(str(k) for k in error.absolute_path) or "(top level)"
    return f"{path}: {where}: {error.message}"


try:
    # set_default: fills in each key the schema gives a `default:`, so the rules read those keys
    # directly (P["eval"]["batch_size"]) and the defaults live in one place
    validate(P, "../../config/workflow/schema.yaml", set_default=True)
except Exception as e:  # snakemake's WorkflowError carries the whole schema; name the key instead
    raise ValueError(_schema_error(P, _profile_path)) from None
if P["name"] != PROFILE:
    raise ValueError(f"profile {PROFILE}: name is {P['name']!r}, not the file's stem {PROFILE!r}")
RUNS = P["runs"]
TABLES = P["tables"]
R = f"results/{PROFILE}"


# Keys of a run entry that the workflow consumes itself (the rest are `lrc train --set` overrides):
#   config:     the run's own train config (default: the profile's train_config)
#   after:      a run whose exported student this run fine-tunes (sets sft.model, adds the dependency)
#   handoff:    {run: <an LRC run>, fraction: f}: the LRC -> KD hand-off. The LRC run, re-trained with
#               its own schedule on the first f of this run's tokens (whole steps), then this run's
#               method from its exported student on the batches after them: equal total tokens
#   start_from: (set by the hand-off) a run whose exported student this run starts from
#               (sets baseline.init_from, adds the dependency)
WORKFLOW_KEYS = ("config", "after", "handoff", "start_from")


def overrides(run):
    """The `key=value` overrides of a run (values as YAML flow), its workflow keys resolved."""
    spec = dict(RUNS[run])
    if spec.get("after"):
        spec["sft.model"] = f"{R}/runs/{spec['after']}/student"
    if spec.get("start_from"):
        spec["baseline.init_from"] = f"{R}/runs/{spec['start_from']}/student"
    out = []
    for key, value in spec.items():
        if key in WORKFLOW_KEYS:
            continue
        v = yaml.safe_dump(value, default_flow_style=True).strip()
        v = v[:-4].strip() if v.endswith("\n...") or v.endswith("...") else v
        out.append(f"{key}={v}")
    return out


def resolved(run):
    """The run's typed config (lrc_src.config), as `lrc train` will see it; a bad key or value is
    an error naming the run."""
    try:
        return load_config(RUNS[run].get("config", P["train_config"]), overrides(run))
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"profile {PROFILE}: run {run}: {e}") from None


def budget(cfg):
    """The tokens a run trains on: train.max_tokens, else train.max_steps whole steps (of one
    process: the workflow's budgets count tokens per process)."""
    return cfg.train.max_tokens or cfg.train.max_steps * cfg.step_tokens()


def variant(base, tokens, seed):
    """The run `base` re-trained with its own schedule at `tokens` and `seed` (named
    <base>__t<tokens>_s<seed>); `base` itself when those are its own budget and seed, whether its
    config gives the budget in tokens or in steps (the same training: it is trained once)."""
    own = resolved(base)
    if (budget(own), own.train.seed) == (tokens, seed):
        return base
    name = f"{base}__t{tokens}_s{seed}"
    RUNS.setdefault(name, {**RUNS[base], "train.max_tokens": int(tokens), "train.seed": int(seed)})
    return name


# budget_sweep: every base run re-trained at each token budget and seed (its own full schedule).
SWEEP = {}  # run name -> {"method": base run, "tokens": int, "seed": int}
if P.get("budget_sweep"):
    _bs = P["budget_sweep"]
    for _b in _bs["runs"]:
        if _b not in RUNS:
            raise ValueError(f"profile {PROFILE}: budget_sweep uses undefined run {_b!r}")
    if _bs["small"] not in _bs["runs"]:
        raise ValueError(f"profile {PROFILE}: budget_sweep.small is {_bs['small']!r}, which is not one of "
                         f"budget_sweep.runs {_bs['runs']}")
    # --config sweep_max_tokens=N: this invocation builds the sweep's tables from the budgets up to N
    # only (a long sweep in parts; the evaluations of the largest budget wait for the last part)
    _max = int(config.get("sweep_max_tokens", max(_bs["tokens"])))
    for _b in _bs["runs"]:
        for _t in [t for t in _bs["tokens"] if t <= _max]:
            for _s in _bs["seeds"]:
                SWEEP[variant(_b, _t, _s)] = {"method": _b, "tokens": int(_t), "seed": int(_s)}

# budget_trend.fractions: hand-off runs at one budget, at budget_sweep's seeds (shared with the
# sweep where a run is in both).
FRACTIONS = {}  # run name -> {"method", "fraction", "tokens", "seed"}
if P.get("budget_trend"):
    if not P.get("budget_sweep"):
        raise ValueError(f"profile {PROFILE}: budget_trend needs a budget_sweep")
    _bt = P["budget_trend"]
    for _pair in _bt["compare"]:
        _missing = [m for m in _pair if m not in P["budget_sweep"]["runs"]]
        if _missing:
            raise ValueError(f"profile {PROFILE}: budget_trend.compare uses {_missing}, not in budget_sweep.runs")
    _fr = _bt.get("fractions")
    for _b in (_fr or {}).get("runs", []) if (_fr or {}).get("tokens", 0) <= _max else []:
        if not (RUNS.get(_b) or {}).get("handoff"):
            raise ValueError(f"profile {PROFILE}: budget_trend.fractions run {_b!r} is not a hand-off run")
        for _s in P["budget_sweep"]["seeds"]:
            FRACTIONS[variant(_b, _fr["tokens"], _s)] = {"method": _b, "fraction": float(RUNS[_b]["handoff"]["fraction"]),
                                                        "tokens": int(_fr["tokens"]), "seed": int(_s)}

# The hand-offs, last: every run above with a `handoff` key becomes its second phase.
for _r in [r for r, spec in RUNS.items() if spec.get("handoff")]:
    _h = RUNS[_r]["handoff"]
    if _h.get("run") not in RUNS or set(_h) != {"run", "fraction"} or not 0 < float(_h["fraction"]) < 1:
        raise ValueError(f"profile {PROFILE}: run {_r}: handoff must be {{run: <a defined run>, fraction: 0 < f < 1}}, "
                         f"got {_h!r}")
    _c = resolved(_r)
    _step, _total = _c.step_tokens(), budget(_c)
    _first = round(float(_h["fraction"]) * _total / _step) * _step
    if not 0 < _first < _total:
        raise ValueError(f"profile {PROFILE}: run {_r}: a hand-off at {_h['fraction']} of {_total} tokens "
                         f"leaves a phase without a whole step of {_step} tokens")
    _lrc = variant(_h["run"], _first, _c.train.seed)
    _l = resolved(_lrc)
    if (_l.data, _l.train.batch_size, _l.train.grad_accum) != (_c.data, _c.train.batch_size, _c.train.grad_accum):
        raise ValueError(f"profile {PROFILE}: run {_r}: the hand-off needs the same data and batches as {_h['run']}")
    RUNS[_r] = {**{k: v for k, v in RUNS[_r].items() if k != "handoff"},
                "train.max_tokens": _total - _first, "train.skip_tokens": _first, "start_from": _lrc}
for _t, _spec in TABLES.items():
    _missing = [r for r in _spec.get("runs", []) if r not in RUNS]
    if _missing:
        raise ValueError(f"profile {PROFILE}: table {_t} uses undefined run(s) {_missing}")
    _missing = [r for r in _spec.get("speed", {}) if r not in _spec.get("runs", [])]
    if _missing:
        raise ValueError(f"profile {PROFILE}: table {_t} gives a speed for run(s) {_missing} that it does not list")
    if _spec.get("speed") and "benchmark" not in P:
        raise ValueError(f"profile {PROFILE}: table {_t} takes speeds from the benchmark, but the profile has no benchmark section")
    _missing = [r for r in _spec.get("runs", []) if _spec.get("x") and r not in _spec["x"]]
    if _missing:
        raise ValueError(f"profile {PROFILE}: table {_t} gives x values, but none for run(s) {_missing}")
if "table8_throughput" in TABLES and "benchmark" not in P:
    raise ValueError(f"profile {PROFILE}: table8_throughput needs the profile's benchmark section")
if P.get("samples") and not P["samples"]["heldout_prompts"] + P["samples"]["instructions"]:
    raise ValueError(f"profile {PROFILE}: samples needs heldout_prompts or instructions above 0")
_missing = [m for m in P.get("samples", {}).get("models", []) if m != "teacher" and m not in RUNS]
if _missing:
    raise ValueError(f"profile {PROFILE}: samples.models uses undefined run(s) {_missing}")
_missing = [m for m in P["eval"]["models"] if m != "teacher" and m not in RUNS]
if _missing:
    raise ValueError(f"profile {PROFILE}: eval.models uses undefined run(s) {_missing}")
for _r in RUNS:  # every run's config as `lrc train` will read it: a misspelt key fails here, not in its job
    resolved(_r)
LAUNCHER = P["launcher"]


def lrc_imports(path):
    """The lrc_src modules a notebook (.ipynb) or script (.py) imports (`from lrc_src import a, b`,
    `from lrc_src.c import ...`, at any indent): inputs of its rule, so that a change to what
    computes a table makes it again. What those modules import in turn, the training code among
    it, is not (config/README.md, "What runs again", says how to retrain a run under changed code)."""
    source = Path(path).read_text()
    if path.endswith(".ipynb"):
        source = "\n".join("".join(c["source"]) for c in json.loads(source)["cells"])
    names = set()
    for dotted, imported in re.findall(r"^\s*from lrc_src(\.\w+)? import ([\w, ]+)", source, flags=re.M):
        names |= {dotted[1:]} if dotted else {n.strip() for n in imported.split(",")}
    return sorted(f"lrc_src/{n}.py" for n in names)


def gpus(device):
    """Snakemake resource `gpu` of a job on `device`: jobs share a node's GPUs when snakemake runs
    with --resources gpu=<GPUs>, and the SLURM executor asks for them (--gpus)."""
    return 1 if str(device).startswith("cuda") else 0


wildcard_constraints:
    profile=PROFILE,


def run_dir(run):
    return f"{R}/runs/{run}"


def run_done(run):
    return f"{R}/runs/{run}/run.json"


for _r, _spec in RUNS.items():
    for _key in ("after", "start_from"):
        if _spec.get(_key) is not None and _spec[_key] not in RUNS:
            raise ValueError(f"profile {PROFILE}: run {_r}: {_key} names undefined run {_spec[_key]!r}")


def run_config(run):
    return RUNS[run].get("config", P["train_config"])


def run_inputs(run):
    ins = [f"{R}/assets/assets.json", run_config(run)]
    for key in ("after", "start_from"):
        if RUNS[run].get(key):
            ins.append(run_done(RUNS[run][key]))
    return ins


def set_args(run):
    """`--set key=value` arguments of a run's overrides."""
    return " ".join("--set " + shlex.quote(o) for o in overrides(run))


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
    outs += [f"{R}/evals/{m}__{s}.csv" for m in P["eval"]["models"] for s in P["eval"]["extra_suites"]]
    if P.get("samples"):
        outs.append(f"{R}/tables/samples.csv")
    if SWEEP and P["budget_sweep"]["in_all"]:
        outs.append(f"{R}/tables/budget_sweep.csv")
        if P.get("budget_trend"):
            outs.append(f"{R}/tables/budget_trend.csv")
    return outs
