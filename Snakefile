# Low-Rank Clone replication: the table of contents.
#   snakemake --cores all                       # default profile (tiny)
#   snakemake --cores all --config profile=ci   # micro teacher, minutes
#   snakemake results/tiny/tables/table1_main.csv --cores 2
# Profiles live in config/workflow/<profile>.yaml (validated against config/workflow/schema.yaml,
# keys in config/README.md); everything a profile produces goes to results/<profile>/. The paper's
# own numbers, which the table notebooks show beside ours, are in reference/.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/workflow/default.yaml"


include: "workflow/rules/common.smk"  # profile loading and validation, shared helpers
include: "workflow/rules/train.smk"  # prepare (teacher, corpus, held-out documents), train
include: "workflow/rules/eval.smk"  # tiny_suite, evaluate, evaluate_extra_suite, samples
include: "workflow/rules/tables.smk"  # Tables 1, 3, 7, 8, Figures 3, 6, 7, KL sweep, claims
include: "workflow/rules/budget.smk"  # budget_sweep, budget_trend
include: "workflow/rules/analysis.smk"  # Figure 4, Tables 4, 5, 21, 22


rule all:
    input:
        all_outputs(),
