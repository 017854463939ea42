# Tables: every (model, setting, steps) run in one tidy CSV, plus Markdown and LaTeX renderings.


rule tables:
    input:
        metrics=metric_files(),
        infos=quantize_infos(),
    output:
        csv=report("results/{preset}/tables/metrics.csv", caption="../report/metrics_table.rst", category="Tables"),
        md="results/{preset}/tables/metrics.md",
        tex="results/{preset}/tables/metrics.tex",
    params:
        cfg_scale=SAMPLING["cfg_scale"],
    log:
        "logs/{preset}/tables.log",
    benchmark:
        "results/{preset}/benchmarks/tables.tsv"
    localrule: True
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit tables --metrics {input.metrics} --infos {input.infos} --cfg-scale {params.cfg_scale}"
        " --csv {output.csv} --markdown {output.md} --latex {output.tex} > {log} 2>&1"
