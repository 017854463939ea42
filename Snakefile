# vq4dit-bench: quantize -> sample -> features -> metrics -> tables/plots for one preset.
# Wiring only: every rule calls `python -m vq4dit <stage>`; one rule file per stage in workflow/rules/,
# helpers (no rules) in workflow/helpers/: config.smk (validation, globals), targets.smk (target lists),
# inputs.smk (input/param functions); method names come from vq4dit.methods.REGISTRY.
from snakemake.utils import min_version

min_version("9.20")


# The paper preset unless --configfile names another: cluster jobs get the --configfile but not the
# profile's replace-workflow-config, and would otherwise merge the paper preset into the smoke one.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# GPU tokens are a per-submission budget on clusters (a grouped job shares one GPU), global locally.
resource_scopes:
    gpu="local",


report: "workflow/report/workflow.rst"


include: "workflow/helpers/config.smk"
include: "workflow/helpers/targets.smk"
include: "workflow/helpers/inputs.smk"
include: "workflow/helpers/resources.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/rehearsal.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/plots.smk"
include: "workflow/rules/claims.smk"
include: "workflow/rules/manifest.smk"


# Named targets (README, "Claims -> targets -> outputs").
rule all:
    default_target: True
    input:
        final_outputs(),


rule smoke:
    input:
        smoke_outputs,


rule baselines:
    input:
        baselines_outputs,


rule claims:
    input:
        claims_outputs,


rule review:
    input:
        review_outputs,


rule table_256:
    input:
        paper_tables(256),


rule table_512:
    input:
        paper_tables(512),


rule ablation_candidates:
    input:
        ablation_outputs,


rule figure_tradeoff:
    input:
        tradeoff_figures,
