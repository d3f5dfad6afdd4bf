# Low-Rank Clone replication: the table of contents.
#   snakemake --cores all                       # default profile (tiny)
#   snakemake --cores all --config profile=ci   # micro teacher, minutes
#   snakemake results/tiny/tables/table1_main.csv --cores 2
# Profiles live in config/workflow/<profile>.yaml (validated against config/workflow/schema.yaml).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/workflow/default.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/budget.smk"
include: "workflow/rules/analysis.smk"


rule all:
    input:
        all_outputs(),
