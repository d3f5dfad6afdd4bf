# Assets (teacher, tokenised corpus) once per profile, then one training run per entry of `runs`.


rule prepare:
    output:
        "results/{profile}/assets/assets.json",
    log:
        "results/{profile}/logs/prepare.log",
    threads: workflow.cores
    params:
        config=P["train_config"],
    shell:
        "OMP_NUM_THREADS={threads} lrc prepare --config {params.config} "
        "--output-dir results/{wildcards.profile}/assets --threads {threads} > {log} 2>&1"


rule train:
    input:
        lambda w: run_inputs(w.run),
    output:
        "results/{profile}/runs/{run}/run.json",
    log:
        "results/{profile}/logs/train_{run}.log",
    threads: P["threads_per_run"]
    params:
        config=lambda w: run_config(w.run),
        sets=lambda w: set_args(w.run),
        launcher=LAUNCHER,
    wildcard_constraints:
        run="|".join(RUNS),
    shell:
        "OMP_NUM_THREADS={threads} {params.launcher} train --config {params.config} {params.sets} "
        "--threads {threads} --output-dir results/{wildcards.profile}/runs/{wildcards.run} --no-progress --restart-on-config-change "
        "> {log} 2>&1"
