"""The replication DAG: the ci profile end to end, dry runs of tiny and paper, profile validation,
notebook hygiene, environment.yml agreeing with pyproject.toml."""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake(*args, timeout=1800):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(
        [str(BIN / "snakemake"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("profile", ["tiny", "paper", "ci", "cpu-full"])
def test_dry_run(profile):
    r = snakemake("-n", "--cores", "2", "--config", f"profile={profile}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rule all" in r.stdout or "Nothing to be done" in r.stdout


def test_paper_benchmark_times_the_authors_step():
    """The paper profile's Table 8 passes its micro-batch and accumulation to the benchmark; ci,
    which sets neither, keeps the benchmark profile's defaults."""
    # the target first: --forcerun and --config take several values and would swallow it
    r = snakemake(
        "-n",
        "-p",
        "--cores",
        "2",
        "results/paper/tables/table8_throughput.csv",
        "--forcerun",
        "table8_throughput",
        "--config",
        "profile=paper",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    commands = [line for line in r.stdout.splitlines() if "python benchmarks/throughput.py" in line]
    assert len(commands) == 1, r.stdout[-3000:]
    assert "--profile paper-1.5b --device cuda --steps 5 --warmup 2 --batch-size 3 --grad-accum 8 " in commands[0]
    r = snakemake(
        "-n",
        "-p",
        "--cores",
        "1",
        "results/ci/tables/table8_throughput.csv",
        "--forcerun",
        "table8_throughput",
        "--config",
        "profile=ci",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    commands = [line for line in r.stdout.splitlines() if "python benchmarks/throughput.py" in line]
    assert len(commands) == 1 and "--warmup 1  --threads 1" in commands[0], r.stdout[-3000:]
    assert "--batch-size" not in commands[0] and "--grad-accum" not in commands[0]
    assert "--compile" not in commands[0]  # eager unless the profile says benchmark.compile: true


def test_paper_jobs_hold_their_gpus():
    """Each paper training job holds the launcher's 8 GPUs and each cuda evaluation one (snakemake
    resource gpu), so `--resources gpu=8` runs one training at a time; CPU profiles hold none."""
    r = snakemake("-n", "--cores", "16", "--config", "profile=paper")
    assert r.returncode == 0, r.stderr[-3000:]
    held = {}
    for block in r.stdout.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        m = re.search(r"resources: .*gpu=(\d+)", block)
        held.setdefault(rule, set()).add(int(m.group(1)) if m else 0)
    assert held["train"] == {8} and held["evaluate"] == {1} and held["table8_throughput"] == {1}, held
    r = snakemake("-n", "--cores", "2", "--forceall", "--config", "profile=ci")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gpu=" not in r.stdout.replace("gpu=0", "")


def test_tiny_notebook_parameters_are_the_profiles():
    """Every notebook parameter a profile leaves unset must not fall back to the notebook's ci
    default: the tiny analysis items run without the suite, and the budget sweep is planned."""
    r = snakemake("-n", "-p", "--cores", "2", "--forceall", "--config", "profile=tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    for item in ("table5_neuron_masking", "figure4_tokens"):
        cmd = next(line for line in r.stdout.splitlines() if f"notebooks/{item}.ipynb" in line and "papermill" in line)
        assert '"suite": false' in cmd and "results/ci" not in cmd, cmd
    sweep = snakemake("-n", "--cores", "2", "--config", "profile=tiny", "--", "results/tiny/tables/budget_sweep.csv")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "budget_sweep" in sweep.stdout


def test_suite_items_score_every_item_when_the_profile_asks():
    """`params: {suite: true}` alone scores each model on the whole tiny suite: not the notebook's
    ci default of 4 items per task."""
    prof = yaml.safe_load((ROOT / "config/workflow/ci.yaml").read_text())
    prof["name"] = "_test_suite"
    prof["tables"]["figure4_tokens"]["params"] = {"suite": True}
    path = ROOT / "config/workflow/_test_suite.yaml"
    try:
        path.write_text(yaml.safe_dump(prof))
        target = "results/_test_suite/tables/figure4_tokens.csv"
        r = snakemake("-n", "-p", "--cores", "1", "--config", "profile=_test_suite", "--", target)
    finally:
        path.unlink(missing_ok=True)
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = next(
        line for line in r.stdout.splitlines() if "notebooks/figure4_tokens.ipynb" in line and "papermill" in line
    )
    params = json.loads(shlex.split(cmd.split(" > ", 1)[0])[-1])
    assert params["suite"] is True and params["suite_limit"] is None, params


def test_claims_take_the_roles_from_the_profiles_labels(tmp_path):
    """A profile whose runs have other names (the paper's LRC-1.5B, abl_tinybert) gives the claims
    their roles through `labels`; claims without a run to compare are left out, not a crash."""
    source = "this replication (paper)"
    pd.DataFrame(
        [
            {"source": source, "model": "teacher", "task": "heldout_lm", "metric": "loss_nats", "value": 2.0},
            {"source": source, "model": "LRC-1.5B", "task": "heldout_lm", "metric": "loss_nats", "value": 2.3},
        ]
    ).to_csv(tmp_path / "table1_main.csv", index=False)
    pd.DataFrame(
        [
            {"kind": "summary", "run": "abl_lrc", "metric": "final_train_lm_loss", "value": 3.0},
            {"kind": "summary", "run": "abl_tinybert", "metric": "final_train_lm_loss", "value": 3.5},
        ]
    ).to_csv(tmp_path / "figure3_loss_curves.csv", index=False)
    import papermill

    papermill.execute_notebook(
        str(ROOT / "notebooks/claims.ipynb"),
        str(tmp_path / "claims.ipynb"),
        parameters={
            "profile": "paper",
            "labels": {"LRC-1.5B": "lrc", "abl_lrc": "lrc", "abl_tinybert": "tinybert"},
            "tables": {t: str(tmp_path / f"{t}.csv") for t in ("table1_main", "figure3_loss_curves")},
            "output_csv": str(tmp_path / "claims.csv"),
            "output_png": str(tmp_path / "claims.png"),
        },
        cwd=str(ROOT),
        progress_bar=False,
    )
    claims = pd.read_csv(tmp_path / "claims.csv").set_index("claim")
    assert claims.loc["LRC comes within 0.5 nats of the teacher (teacher-level quality)", "verdict"] == "holds"
    assert claims.loc["LRC beats TinyBERT-style distillation", "margin"] == pytest.approx(0.5)
    assert len(claims) == 2  # no baseline beside LRC in the main table: no "beats every baseline" row


def notebook_defaults(path):
    """The values a notebook's `parameters` cell assigns, as JSON would carry them."""
    nb = json.loads(Path(path).read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    ns = {}
    exec("".join(cell["source"]), ns)
    return {k: json.loads(json.dumps(v)) for k, v in ns.items() if not k.startswith("__")}


def test_notebook_defaults_are_the_ci_dags_parameters():
    """nbval re-runs each notebook with its own defaults after the ci DAG, and some notebooks write
    the tables others read: defaults that drifted from the ci profile would overwrite its outputs
    with another job's. So each notebook's defaults are exactly what one of its ci jobs passes."""
    r = snakemake("-n", "-p", "--cores", "2", "--forceall", "--config", "profile=ci")
    assert r.returncode == 0, r.stderr[-3000:]
    passed = {}
    for line in r.stdout.splitlines():
        if "papermill" in line and " -y " in line:
            words = shlex.split(line.split(" > ", 1)[0])
            notebook = next(w for w in words if w.startswith("notebooks/") and w.endswith(".ipynb"))
            passed.setdefault(notebook, []).append(json.loads(words[words.index("-y") + 1]))
    assert "notebooks/budget_sweep.ipynb" in passed and "notebooks/budget_trend.ipynb" in passed, sorted(passed)
    for notebook, params in sorted(passed.items()):
        defaults = notebook_defaults(ROOT / notebook)
        diffs = [
            {k: (defaults.get(k), v) for k, v in p.items() if k not in defaults or defaults[k] != v} for p in params
        ]
        closest = min(diffs, key=len)
        assert not closest, f"{notebook}: defaults (left) differ from the ci job's parameters (right): {closest}"


def make_recipe(target, profile):
    """The commands `make TARGET PROFILE=profile` would run (make -n; the venv taken as built)."""
    r = subprocess.run(
        ["make", "-n", "-o", "venv", target, f"PROFILE={profile}", f"VENV={BIN.parent}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.replace("\\\n", " ")


def test_make_replicate_recomputes_the_committed_results_of_a_fresh_checkout():
    """results/tiny/ is committed, so snakemake alone would keep it (a fresh clone's `make replicate`
    would train nothing): until `make replicate` has finished in a checkout, every output rule is
    forced, so all 13 training runs and 7 evaluations happen; after it (the stamp), nothing is."""
    if (ROOT / "results" / "tiny" / ".replicated").exists():
        pytest.skip("this checkout has already run make replicate")
    cmd = next(line for line in make_recipe("replicate", "tiny").splitlines() if "snakemake" in line)
    forced = cmd.split("--forcerun", 1)[1].split()
    assert {"evaluate", "table1_main", "claims", "budget_sweep"} <= set(forced)
    assert not {"train", "prepare", "tiny_suite"} & set(forced)  # uncommitted assets and run folders
    r = snakemake("-n", "--cores", "2", "--config", "profile=tiny", "--forcerun", *forced)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = dict(re.findall(r"^(train|evaluate|table1_main)\s+(\d+)$", r.stdout, re.M))
    assert counts == {"train": "13", "evaluate": "7", "table1_main": "1"}, r.stdout[-2000:]
    sweep = make_recipe("sweep", "tiny")
    assert "--forcerun budget_sweep evaluate" in sweep
    stamp = ROOT / "results" / "ci" / ".replicated"  # results/ci/ is not committed
    made = not stamp.exists()
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.touch()
    try:
        assert "--forcerun" not in make_recipe("replicate", "ci")
    finally:
        if made:
            stamp.unlink()


def test_unknown_profile_is_a_clear_error():
    r = snakemake("-n", "--cores", "1", "--config", "profile=huge")
    assert r.returncode != 0
    assert "unknown profile 'huge'" in r.stderr + r.stdout
    # a misspelt --config key would otherwise be ignored, and the default profile planned
    r = snakemake("-n", "--cores", "1", "--config", "profle=ci")
    assert r.returncode != 0
    assert "unknown --config key(s) ['profle']; known: ['profile', 'sweep_max_tokens']" in r.stderr + r.stdout


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda P: P["tables"]["table7_io_sharing"]["speed"].update(lrc_small="lrc"),
            "gives a speed for run(s) ['lrc_small'] that it does not list",
        ),
        (lambda P: P.pop("benchmark"), "takes speeds from the benchmark, but the profile has no benchmark section"),
        (
            lambda P: P["budget_sweep"].update(small="lrc"),
            "budget_sweep.small is 'lrc', which is not one of budget_sweep.runs "
            "['lrc_small', 'prune_kd', 'lrc_then_kd']",
        ),
        (lambda P: P["budget_sweep"].pop("small"), "'small' is a required property"),
        (lambda P: P["benchmark"].update(profile="huge"), "benchmark.profile 'huge' is not one of"),
        (
            lambda P: P["runs"]["lrc_then_kd"].update(handoff={"run": "nope", "fraction": 0.5}),
            "run lrc_then_kd: handoff must be {run: <a defined run>, fraction: 0 < f < 1}",
        ),
        (
            lambda P: P["runs"]["lrc_then_kd"].update(handoff={"run": "lrc_small", "fraction": 0.01}),
            "leaves a phase without a whole step of 256 tokens",
        ),
        (
            lambda P: P["budget_trend"].update(compare=[["lrc", "prune_kd"]]),
            "budget_trend.compare uses ['lrc'], not in budget_sweep.runs",
        ),
        (
            lambda P: P["budget_trend"]["fractions"].update(runs=["prune_kd"]),
            "budget_trend.fractions run 'prune_kd' is not a hand-off run",
        ),
        (lambda P: P.update(name="ci"), "name is 'ci', not the file's stem '_test_bad'"),
        (lambda P: P["tables"].update(table9_main={}), "'table9_main' is not one of"),
        (
            lambda P: (P.pop("benchmark"), P["tables"]["table7_io_sharing"].pop("speed")),
            "table8_throughput needs the profile's benchmark section",
        ),
        (lambda P: P["eval"].update(limit=0), "0 is less than the minimum of 1"),
        (
            lambda P: P["tables"]["figure6_alpha"].update(x={"lrc": 0.2}),
            "table figure6_alpha gives x values, but none for run(s) ['lrc_alpha_1']",
        ),
        (lambda P: P["tables"]["table1_main"].update(params={"k": 5}), "table table1_main takes no params"),
        (
            lambda P: P["tables"]["table5_neuron_masking"]["params"].update(suite_limt=4),
            "table table5_neuron_masking: params ['suite_limt'] are not parameters of notebooks/",
        ),
        (
            lambda P: P["tables"]["table22_gram_mse"].update(runs=["lrc", "kd"]),
            "table table22_gram_mse measures one run; it lists ['lrc', 'kd']",
        ),
        (
            lambda P: P["samples"].update(heldout_prompts=0, instructions=0),
            "samples needs heldout_prompts or instructions above 0",
        ),
        (  # one line naming the file and the key, not snakemake's message with the whole schema
            lambda P: P.update(descripton="x"),
            "config/workflow/_test_bad.yaml: (top level): Additional properties are not allowed "
            "('descripton' was unexpected)\n",
        ),
        (lambda P: P["eval"].update(limt=4), "config/workflow/_test_bad.yaml: eval: Additional properties"),
        (  # a run's own key, found when the DAG is built, not when its training job starts
            lambda P: P["runs"]["lrc_alpha_1"].update({"lrc.alpah": 1.0}),
            "profile _test_bad: run lrc_alpha_1: unknown config key(s) ['lrc.alpah'] in lrc",
        ),
        (  # the same in a run the budget sweep trains again at other budgets
            lambda P: P["runs"]["prune_kd"].update({"train.sed": 1}),
            "profile _test_bad: run prune_kd: unknown config key(s) ['train.sed'] in train",
        ),
    ],
)
def test_bad_profile_is_a_clear_error(change, message):
    prof = yaml.safe_load((ROOT / "config/workflow/ci.yaml").read_text())
    prof["name"] = "_test_bad"
    change(prof)
    path = ROOT / "config/workflow/_test_bad.yaml"  # profiles are looked up by name in this folder
    try:
        path.write_text(yaml.safe_dump(prof))
        r = snakemake("-n", "--cores", "1", "--config", "profile=_test_bad")
    finally:
        path.unlink(missing_ok=True)
    assert r.returncode != 0
    assert message in r.stderr + r.stdout


def _planned_jobs(stdout):
    """(rule, declared inputs, shell command) of every job in a `snakemake -n -p` listing."""
    jobs, rule, inputs = [], None, []
    for line in stdout.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            rule, inputs = m.group(1), []
        elif line.startswith("    input: "):
            inputs = line[len("    input: ") :].split(", ")
        elif line.startswith("Shell command: ") and rule:
            jobs.append((rule, set(inputs), line[len("Shell command: ") :]))
    return jobs


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _imported_modules(notebook):
    """lrc_src/<module>.py of each lrc_src module a notebook's code cells import."""
    found = set()
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.ImportFrom) and node.module == "lrc_src":
                found |= {f"lrc_src/{a.name}.py" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lrc_src."):
                found.add(f"lrc_src/{node.module.split('.')[1]}.py")
    assert found, notebook  # every notebook computes with lrc_src
    return found


@pytest.mark.parametrize("profile", ["ci", "tiny"])
def test_every_file_a_rule_reads_is_declared(profile):
    """Each papermill rule declares the notebook it executes, the lrc_src modules it imports, and
    every file its parameters name (the paper's numbers, eval CSVs, the tiny suite, other tables,
    finished runs); lrc eval reads the tiny suite from a declared folder that rule tiny_suite
    builds, never as a side effect."""
    r = snakemake(
        "-n",
        "-p",
        "--forceall",
        "--cores",
        "2",
        "--config",
        f"profile={profile}",
        "--",
        "all",
        f"results/{profile}/tables/budget_sweep.csv",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = _planned_jobs(r.stdout)
    suite = f"results/{profile}/assets/tiny_suite"
    notebooks = 0
    for rule, inputs, cmd in jobs:
        heldout = f"results/{profile}/assets/heldout.jsonl"
        assert "lrc eval" not in cmd or "--heldout" not in cmd, cmd  # the suite is never built on the side
        if "--heldout " in cmd:  # the suite's builder, and the samples' prompts: a declared input
            assert rule in ("tiny_suite", "samples") and heldout in inputs, (rule, cmd)
        if rule == "tiny_suite":
            assert inputs == {heldout}, inputs
        if rule == "samples":
            for model in re.findall(r"--model \w+=(\S+)", cmd):
                assert model.endswith("assets/teacher") or model.replace("/student", "/run.json") in inputs, cmd
        if " lrc eval " in cmd:  # these profiles evaluate on the tiny suite only
            assert f"--data-dir {suite} " in cmd and suite in inputs, (rule, cmd)
        if "papermill" not in cmd:
            continue
        notebooks += 1
        notebook = re.search(r"(notebooks/\w+\.ipynb) results/", cmd).group(1)
        assert notebook in inputs, (rule, notebook)
        assert _imported_modules(ROOT / notebook) <= inputs, (rule, notebook, inputs)
        params = json.loads(re.search(r"-y '(.*)' >", cmd).group(1))
        for key, value in params.items():
            if key.startswith("output") or key == "assets":
                continue
            for path in _strings(value):
                if "/runs/" in path:
                    assert f"{path}/run.json" in inputs, (rule, key, path)
                elif "/" in path:
                    assert path in inputs, (rule, key, path)
        if "paper_frame(paper_csv)" in (ROOT / notebook).read_text():
            assert params["paper_csv"] in inputs and params["paper_csv"].startswith("reference/"), rule
    assert notebooks >= 7


@pytest.mark.parametrize("profile", ["cpu-full", "paper"])
def test_main_table_reads_the_evals_of_the_teacher_and_its_runs(profile):
    """A profile may evaluate models that belong to other items (cpu-full's data-mix runs); the
    main table's notebook asserts its rows are the teacher and its runs, so only their evals go in."""
    target = f"results/{profile}/tables/table1_main.csv"
    r = snakemake("-n", "-p", "--forceall", "--cores", "2", "--config", f"profile={profile}", "--", target)
    assert r.returncode == 0, r.stderr[-3000:]
    (cmd,) = [cmd for rule, _, cmd in _planned_jobs(r.stdout) if rule == "table1_main"]
    params = json.loads(re.search(r"-y '(.*)' >", cmd).group(1))
    assert set(params["evals"]) == {"teacher", *params["runs"]}, params["evals"]


def test_a_sweep_point_at_a_runs_own_budget_and_seed_is_that_run():
    """ci's runs give their budget in steps (8 x 4 x 64 = 2,048 tokens, seed 0): the sweep's
    2,048-token seed-0 points are those runs, trained once, not a second copy of each."""
    target = "results/ci/tables/budget_sweep.csv"
    r = snakemake("-n", "-p", "--forceall", "--cores", "2", "--config", "profile=ci", "--", target)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = _planned_jobs(r.stdout)
    out_dir = r"--output-dir results/ci/runs/(\S+)"
    trained = {re.search(out_dir, cmd).group(1) for rule, _, cmd in jobs if rule == "train"}
    assert {"lrc_small", "prune_kd", "lrc_then_kd", "lrc_small__t2048_s1", "lrc_small__t1024_s0"} <= trained
    assert not {n for n in trained if n.endswith("__t2048_s0")}, sorted(trained)
    (cmd,) = [cmd for rule, _, cmd in jobs if rule == "budget_sweep"]
    runs = json.loads(re.search(r"-y '(.*)' >", cmd).group(1))["runs"]
    assert runs["lrc_small"] == {"dir": "results/ci/runs/lrc_small", "method": "lrc_small", "tokens": 2048, "seed": 0}


def _schema_defaults(schema: dict, prefix: str = "") -> dict:
    """{dotted key: default} of every property the profile schema gives a `default:`."""
    out = {}
    for name, spec in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        if "default" in spec:
            out[key] = spec["default"]
        out |= _schema_defaults(spec, f"{key}.")
    return out


def test_config_readme_gives_the_schemas_defaults():
    """The profile keys table of config/README.md states the defaults the validation fills in."""
    schema = yaml.safe_load((ROOT / "config" / "workflow" / "schema.yaml").read_text())
    defaults = _schema_defaults(schema)
    rows = re.findall(r"^\| `([\w.]+)` \| [^|]+ \| ([^|]+) \|", (ROOT / "config" / "README.md").read_text(), re.M)
    documented = {key: yaml.safe_load(cell.split()[0].strip("`")) for key, cell in rows}
    assert defaults and set(defaults) <= set(documented), sorted(set(defaults) - set(documented))
    assert {k: documented[k] for k in defaults} == defaults


def test_the_papers_numbers_are_apart_from_the_profiles_outputs():
    """reference/ holds the paper's CSVs (documented in its README); results/<profile>/ only
    what a profile produced, so the `paper` profile's folder holds none of them."""
    from lrc_src import report

    readme = (ROOT / "reference" / "README.md").read_text()
    for name, path in report.PAPER_FILES.items():
        assert path.startswith("reference/") and (ROOT / path).is_file(), path
        assert Path(path).name in readme, path
        assert len(report.paper_frame(name, ROOT)) > 0
        assert report.paper_frame(ROOT / path).equals(report.paper_frame(name, ROOT))
    assert not list((ROOT / "results" / "paper").glob("paper_*.csv"))


def test_lrc_tiny_suite_builds_the_suite_lrc_eval_reads(tmp_path):
    """`lrc tiny-suite` writes a suite that load_tiny_manifest accepts, with the seed lrc eval's
    --heldout used (0), and the same data as build_tiny_suite; a bad input is one error line."""
    from lrc_src.tiny_suite import build_tiny_suite, load_tiny_manifest

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(json.dumps({"text": " ".join(f"w{d}_{i}" for i in range(120))}) + "\n" for d in range(60))
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cli = [sys.executable, "-m", "lrc_src.cli", "tiny-suite"]
    r = subprocess.run(
        [*cli, "--heldout", str(heldout), "--output", str(tmp_path / "suite")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    manifest = load_tiny_manifest(tmp_path / "suite")
    assert manifest["seed"] == 0
    other = build_tiny_suite(heldout, tmp_path / "other", seed=0)
    for name in manifest["tasks"]:
        assert (tmp_path / "suite" / f"{name}.jsonl").read_bytes() == (other / f"{name}.jsonl").read_bytes()
    r = subprocess.run(
        [*cli, "--heldout", str(heldout), "--output", str(tmp_path / "seed1"), "--seed", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and load_tiny_manifest(tmp_path / "seed1")["seed"] == 1, r.stderr
    for bad in (
        ["--heldout", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "x")],
        ["--heldout", str(heldout), "--output", str(heldout)],
    ):
        r = subprocess.run([*cli, *bad], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("lrc: error: "), r.stderr
    assert not (tmp_path / "x").exists()


def test_ci_dag_end_to_end():
    """The whole ci DAG: every table rule writes its CSV, figure and executed notebook."""
    r = snakemake("--cores", "2", "--config", "profile=ci")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    prof = yaml.safe_load((ROOT / "config/workflow/ci.yaml").read_text())
    for table in prof["tables"]:
        csv = ROOT / "results/ci/tables" / f"{table}.csv"
        assert csv.is_file(), table
        df = pd.read_csv(csv)
        assert len(df) > 0, table
        if table != "table8_throughput":
            assert (ROOT / "results/ci/figures" / f"{table}.png").is_file(), table
            assert (ROOT / "results/ci/notebooks" / f"{table}.ipynb").is_file(), table
    main = pd.read_csv(ROOT / "results/ci/tables/table1_main.csv")
    ours = main[main.source.str.startswith("this replication")]
    assert set(ours.model) == {"teacher", "lrc", "scratch", "kd", "tinybert", "prune_kd", "lrc_small"}
    # the analysis items
    t5 = pd.read_csv(ROOT / "results/ci/tables/table5_neuron_masking.csv")
    assert {"unmasked", "important_top50_masked", "random_masked"} <= set(t5.condition)
    t22 = pd.read_csv(ROOT / "results/ci/tables/table22_gram_mse.csv")
    assert {"teacher_vs_student", "teacher_vs_random"} <= set(t22.comparison)
    from lrc_src.tiny_suite import load_tiny_manifest

    assert load_tiny_manifest(ROOT / "results/ci/assets/tiny_suite")["seed"] == 0  # rule tiny_suite
    assert (ROOT / "results/ci/logs/tiny_suite.log").is_file()
    f4 = pd.read_csv(ROOT / "results/ci/tables/figure4_tokens.csv")
    assert set(f4[f4.run == "lrc"].step) == {2, 4, 8}
    assert (ROOT / "results/ci/runs/lrc/exports/step_2/projections.safetensors").is_file()
    # the budget sweep: every method x budget x seed has a held-out loss; evals at the largest
    sweep = pd.read_csv(ROOT / "results/ci/tables/budget_sweep.csv")
    assert list(sweep.columns) == ["method", "seed", "tokens", "metric", "value"]
    held = sweep[sweep.metric == "heldout_loss"]
    assert len(held) == 3 * 2 * 2 and held.value.notna().all()
    assert set(held.method) == {"lrc_small", "prune_kd", "lrc_then_kd"} and set(held.tokens) == {1024, 2048}
    assert set(sweep[sweep.metric != "heldout_loss"].tokens) == {2048}
    margins = pd.read_csv(ROOT / "results/ci/tables/budget_sweep_margins.csv")
    assert set(margins.versus) == {"prune_kd", "lrc_then_kd"} and len(margins) == 4
    # the hand-off: its LRC phase is the sweep's own lrc_small run where the budgets meet, and the
    # second phase trains the rest of the tokens on the batches after it
    handoff = yaml.safe_load((ROOT / "results/ci/runs/lrc_then_kd__t2048_s1/config.yaml").read_text())
    assert handoff["baseline"]["init_from"] == "results/ci/runs/lrc_small__t1024_s1/student"
    assert handoff["train"]["skip_tokens"] == 1024 and handoff["train"]["max_tokens"] == 1024
    trend = pd.read_csv(ROOT / "results/ci/tables/budget_trend.csv")
    assert list(trend.comparison) == ["lrc_small vs prune_kd", "lrc_then_kd vs prune_kd"]
    assert (trend.slope_lo <= trend.slope_hi).all()
    fractions = pd.read_csv(ROOT / "results/ci/tables/handoff_fraction.csv")
    assert sorted(set(fractions.fraction)) == [0.25, 0.5] and len(fractions) == 4
    suite = pd.read_csv(ROOT / "results/ci/tables/budget_endpoint_suite.csv")
    assert set(suite.method) == {"lrc_small", "prune_kd", "lrc_then_kd"} and "stderr" in suite.columns
    claims = pd.read_csv(ROOT / "results/ci/tables/claims.csv")
    assert set(claims.verdict) <= {"holds", "does not hold", "inconclusive", "n/a"}
    assert claims.claim.str.contains("grows with training tokens").sum() == 2
    # Table 7's speed column: the benchmark's tokens/s of lrc and lrc_io (table8_throughput.csv)
    t7 = pd.read_csv(ROOT / "results/ci/tables/table7_io_sharing.csv")
    speed = t7[t7.source.str.endswith("benchmarks/throughput.py")].pivot(index="run", columns="metric", values="value")
    t8 = pd.read_csv(ROOT / "results/ci/tables/table8_throughput.csv").set_index("method").tokens_per_s
    assert speed.benchmark_tokens_per_s.to_dict() == pytest.approx({"lrc": t8["lrc"], "lrc_io": t8["lrc_io"]})
    assert speed.speedup.to_dict() == pytest.approx({"lrc": 1.0, "lrc_io": t8["lrc_io"] / t8["lrc"]})
    assert claims.claim.str.startswith("sharing projections (lrc_io)").sum() == 1
    # a second invocation has nothing to do (outputs are up to date)
    again = snakemake("-n", "--cores", "2", "--config", "profile=ci")
    assert "Nothing to be done" in again.stdout + again.stderr
    # a forced rerun of a finished run (snakemake deletes run.json first) rewrites its record and
    # student from the checkpoint: no step is taken again, nothing trained is lost
    target = "results/ci/runs/lrc_small/run.json"  # relative: the rules' own spelling
    run = ROOT / "results/ci/runs/lrc_small"
    metrics, student = (run / "metrics.csv").read_bytes(), (run / "student/model.safetensors").read_bytes()
    forced = snakemake("--cores", "2", "--config", "profile=ci", "--forcerun", "train", "--", target)
    assert forced.returncode == 0, (forced.stdout[-2000:], forced.stderr[-4000:])
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert (run / "metrics.csv").read_bytes() == metrics and (run / "student/model.safetensors").read_bytes() == student
    again = snakemake("-n", "--cores", "2", "--config", "profile=ci")
    assert "Nothing to be done" in again.stdout + again.stderr  # the same record: nothing reads it again
    # a run trained again to another result (another record) is read again by what reads it
    record = ROOT / "results/ci/runs/kd/run.json"
    kept = record.read_bytes()
    try:
        info = json.loads(kept)
        record.write_text(json.dumps({**info, "trainable_sha256": "0" * 64}, indent=2))
        planned = {
            rule for rule, _, _ in _planned_jobs(snakemake("-n", "-p", "--cores", "2", "--config", "profile=ci").stdout)
        }
        assert {"evaluate", "table1_main", "claims"} <= planned and "train" not in planned, planned
    finally:
        record.write_bytes(kept)
    again = snakemake("-n", "--cores", "2", "--config", "profile=ci")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_notebook_sources_are_output_free_and_parametrised():
    for nb_path in (ROOT / "notebooks").glob("*.ipynb"):
        nb = json.loads(nb_path.read_text())
        assert nb["cells"][0]["cell_type"] == "markdown" and nb["cells"][0]["source"], nb_path
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, nb_path
        for c in nb["cells"]:
            if c["cell_type"] == "code":
                assert not c.get("outputs") and c.get("execution_count") is None, nb_path


def test_papermill_reads_every_parameter_of_every_notebook():
    """papermill skips a parameters-cell line it cannot parse (one with a second `=`, e.g. in its
    comment) with only a warning in the rule's log; every assignment must reach `inspect_notebook`."""
    import papermill

    for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assigned = list(notebook_defaults(nb_path))
        assert assigned, nb_path
        assert list(papermill.inspect_notebook(str(nb_path))) == assigned, nb_path


def test_every_table_rule_has_a_log():
    text = "".join(p.read_text() for p in (ROOT / "workflow/rules").glob("*.smk"))
    rules = re.findall(r"^rule (\w+):", text, flags=re.M)
    assert rules
    for block in re.split(r"^rule ", text, flags=re.M)[1:]:
        name = block.split(":")[0]
        assert "log:" in block, f"rule {name} has no log"


def _pip_pins():
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"dependencies = \[(.*?)\]", text, re.S).group(1)
    pins = {}
    for spec in re.findall(r'"([^"]+)"', deps):
        name = re.split(r"[<>=!\[ ]", spec, maxsplit=1)[0].lower()
        pins[name] = spec.replace(" ", "")
    return pins


def test_environment_yml_agrees_with_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_pins = {re.split(r"[<>=!\[ ]", s, maxsplit=1)[0].lower(): s.replace(" ", "") for s in pip_list}
    for name, spec in _pip_pins().items():
        assert name in env_pins, f"{name} missing from environment.yml"
        assert env_pins[name] == spec, (name, env_pins[name], spec)


def _requirements(text: str, *extras: str) -> list:
    """pyproject.toml's dependencies and those of the named extras, as packaging Requirements."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads(text)["project"]
    specs = project["dependencies"] + [s for e in extras for s in project["optional-dependencies"][e]]
    return [Requirement(s) for s in specs]


def test_constraints_pin_what_pyproject_allows():
    """constraints.txt (make venv installs with it) pins every package exactly, once, and each of
    pyproject.toml's dependencies of the venv's extras to a version its range allows, so a
    widened or narrowed range cannot leave the lock installing what pyproject.toml forbids."""
    from packaging.utils import canonicalize_name

    lines = (ROOT / "constraints.txt").read_text().splitlines()
    assert re.fullmatch(r"# python 3\.\d+\.\d+ .*", lines[0]), lines[0]  # the Makefile reads it
    pins = {}
    for line in lines:
        if line.startswith("#") or not line.strip():
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([0-9][A-Za-z0-9.]*)", line)
        assert m, f"not an exact pin without a local label: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins and name != "lrc-src", line
        pins[name] = m.group(2)
    for req in _requirements((ROOT / "pyproject.toml").read_text(), "test", "workflow"):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
    makefile = (ROOT / "Makefile").read_text()
    for wheel in re.findall(r"'([\w-]+==[\w.]+)'", makefile.split("ASSET_WHEELS =")[1].splitlines()[0]):
        name, version = wheel.split("==")
        assert pins.get(canonicalize_name(name)) == version, wheel


def test_each_promise_of_a_run_folder_names_tests_that_exist():
    """docs/reliability.md points each promise at the tests that hold it: every test it names is
    defined in tests/, so a renamed or removed test cannot leave a promise pointing at nothing."""
    doc = (ROOT / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(test_\w+)`", doc))
    assert len(named) >= 10, named
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)\(", path.read_text(), flags=re.M))
    assert named <= defined, sorted(named - defined)
