# Claims: one verdict per claim of the paper this preset can test, from the tables, the quantize infos, the
# paper's numbers and the preset's seed spread (config/seed_spread/<preset>.csv, written by benchmarks/seed_variation.py).
# claims-baselines: the same from tables/metrics.csv and tables/baselines.csv (the `baselines` target's).


rule claims_table:
    input:
        metrics=claims_tidy_tables,
        infos=claims_quantize_infos,
        settings=config["settings_table"],
        paper=config["paper_results"],
        spread=seed_spread,
    output:
        csv="results/{preset}/{claims}.csv",
        md="results/{preset}/{claims}.md",
        html=report("results/{preset}/{claims}.html", caption="../report/claims.rst", category="Claims"),
    params:
        config=config_json,
        spread=seed_spread_arg,
        notice=NOTICE,
    log:
        "logs/{preset}/{claims}.log",
    benchmark:
        "results/{preset}/benchmarks/{claims}.tsv"
    wildcard_constraints:
        claims="claims|claims-baselines",
    localrule: True
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit claims --metrics {input.metrics} --infos {input.infos} --settings-table {input.settings}"
        " --paper {input.paper} {params.spread} --config {params.config:q}"
        " --csv {output.csv} --md {output.md} --html {output.html} {params.notice} > {log} 2>&1"
