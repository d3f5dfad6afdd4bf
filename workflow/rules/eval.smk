# lm-eval on the teacher and on exported students (lrc eval), one CSV per model.


rule evaluate:
    input:
        assets="results/{profile}/assets/assets.json",
        run=lambda w: [] if w.model == "teacher" else [run_done(w.model)],
    output:
        "results/{profile}/evals/{model}.csv",
    log:
        "results/{profile}/logs/eval_{model}.log",
    threads: P["threads_per_run"]
    params:
        model=lambda w: model_dir(w.model),
        suite=P["eval"]["suite"],
        limit=("--limit %d" % P["eval"]["limit"]) if P["eval"].get("limit") else "",
        batch=P["eval"].get("batch_size", 8),
        device=P["eval"].get("device", "cpu"),
        heldout=lambda w: f"--heldout results/{w.profile}/assets/heldout.jsonl" if P["eval"]["suite"] == "tiny" else "",
    shell:
        "OMP_NUM_THREADS={threads} lrc eval --model {params.model} --suite {params.suite} {params.limit} "
        "--batch-size {params.batch} {params.heldout} --model-name {wildcards.model} --device {params.device} "
        "--output {output} > {log} 2>&1"


rule evaluate_extra_suite:
    input:
        assets="results/{profile}/assets/assets.json",
        run=lambda w: [] if w.model == "teacher" else [run_done(w.model)],
    output:
        "results/{profile}/evals/{model}__{suite}.csv",
    log:
        "results/{profile}/logs/eval_{model}__{suite}.log",
    threads: P["threads_per_run"]
    params:
        model=lambda w: model_dir(w.model),
        batch=P["eval"].get("batch_size", 8),
        device=P["eval"].get("device", "cpu"),
    wildcard_constraints:
        suite="|".join(P["eval"].get("extra_suites", []) or ["__none__"]),
    shell:
        "OMP_NUM_THREADS={threads} lrc eval --model {params.model} --suite {wildcards.suite} "
        "--batch-size {params.batch} --model-name {wildcards.model} --device {params.device} "
        "--output {output} > {log} 2>&1"
