# Assets (teacher, tokenised corpus, held-out documents) once per profile, then one training run
# per entry of `runs`. prepare also links assets/teacher to the teacher's folder in the asset
# cache ($LRC_CACHE); that link is not an output (snakemake would delete or timestamp the cached
# folder behind it), so the rules that read it take assets.json, which prepare writes last.


rule prepare:
    input:
        config=P["train_config"],
    output:
        assets="results/{profile}/assets/assets.json",
        heldout="results/{profile}/assets/heldout.jsonl",  # the documents no run trains on
    log:
        "results/{profile}/logs/prepare.log",
    threads: workflow.cores
    shell:
        "OMP_NUM_THREADS={threads} lrc prepare --config {input.config} "
        "--output-dir results/{wildcards.profile}/assets --threads {threads} > {log} 2>&1"


rule train:
    input:
        lambda w: run_inputs(w.run),
    output:
        "results/{profile}/runs/{run}/run.json",
    log:
        "results/{profile}/logs/train_{run}.log",
    threads: P["threads_per_run"]
    resources:
        gpu=P["gpus_per_run"],
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
