# Tables: every run in one tidy table (metrics; the `baselines` target's: main and baseline settings); per model
# the paper's layout next to the paper's numbers; the candidate-count ablation; Snakemake's per-job benchmark
# records. CSV, Markdown, LaTeX and HTML each.


rule tables:
    input:
        metrics=tidy_metric_files,
        infos=tidy_quantize_infos,
    output:
        csv="results/{preset}/tables/{tidy}.csv",
        md="results/{preset}/tables/{tidy}.md",
        tex="results/{preset}/tables/{tidy}.tex",
        html=report("results/{preset}/tables/{tidy}.html", caption="../report/metrics_table.rst", category="Tables"),
    params:
        notice=NOTICE,
        cfg_scale=SAMPLING["cfg_scale"],
    log:
        "logs/{preset}/tables/{tidy}.log",
    benchmark:
        "results/{preset}/benchmarks/tables/{tidy}.tsv"
    wildcard_constraints:
        tidy="metrics|baselines",
    localrule: True
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit tables metrics --metrics {input.metrics} --infos {input.infos} --cfg-scale {params.cfg_scale}"
        " --csv {output.csv} --md {output.md} --tex {output.tex} --html {output.html} {params.notice} > {log} 2>&1"


rule paper_table:
    input:
        metrics=model_metric_files,
        infos=model_quantize_infos,
        paper=config["paper_results"],
    output:
        runs="results/{preset}/tables/runs-{model}.csv",
        csv="results/{preset}/tables/paper-{model}.csv",
        md="results/{preset}/tables/paper-{model}.md",
        tex="results/{preset}/tables/paper-{model}.tex",
        html=report(
            "results/{preset}/tables/paper-{model}.html",
            caption="../report/paper_table.rst",
            category="Tables",
            labels={"table": "paper layout", "model": "{model}"},
        ),
    params:
        notice=NOTICE,
        cfg_scale=SAMPLING["cfg_scale"],
        resolution=paper_resolution,
        paper_count=paper_count_arg,
    log:
        "logs/{preset}/tables/paper-{model}.log",
    benchmark:
        "results/{preset}/benchmarks/tables/paper-{model}.tsv"
    localrule: True
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit tables paper --metrics {input.metrics} --infos {input.infos} --cfg-scale {params.cfg_scale}"
        " --paper {input.paper} {params.resolution} {params.paper_count} --runs {output.runs}"
        " --csv {output.csv} --md {output.md} --tex {output.tex} --html {output.html} {params.notice} > {log} 2>&1"


rule ablation_table:
    input:
        metrics=ablation_metric_files,
        infos=ablation_quantize_infos,
        paper=config["paper_results"],
    output:
        csv="results/{preset}/tables/ablation-candidates.csv",
        md="results/{preset}/tables/ablation-candidates.md",
        tex="results/{preset}/tables/ablation-candidates.tex",
        html=report(
            "results/{preset}/tables/ablation-candidates.html",
            caption="../report/ablation_table.rst",
            category="Tables",
            labels={"table": "candidate ablation", "model": ABLATION.get("model", "")},
        ),
    params:
        notice=NOTICE,
        cfg_scale=SAMPLING["cfg_scale"],
        resolution=ablation_resolution,
        paper_count=paper_count_arg,
    log:
        "logs/{preset}/tables/ablation-candidates.log",
    benchmark:
        "results/{preset}/benchmarks/tables/ablation-candidates.tsv"
    localrule: True
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit tables ablation --metrics {input.metrics} --infos {input.infos}"
        " --cfg-scale {params.cfg_scale} --paper {input.paper} {params.resolution} {params.paper_count}"
        " --csv {output.csv} --md {output.md} --tex {output.tex} --html {output.html} {params.notice} > {log} 2>&1"


rule benchmark_table:
    input:
        report_inputs,
    output:
        csv="results/{preset}/tables/benchmarks.csv",
        md="results/{preset}/tables/benchmarks.md",
        tex="results/{preset}/tables/benchmarks.tex",
        html=report("results/{preset}/tables/benchmarks.html", caption="../report/benchmarks.rst", category="Job records"),
    params:
        notice=NOTICE,
        records="results/{preset}/benchmarks",
    log:
        "logs/{preset}/tables/benchmarks.log",
    benchmark:
        "results/{preset}/benchmarks/tables/benchmarks.tsv"
    localrule: True
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit tables benchmarks --records {params.records}"
        " --csv {output.csv} --md {output.md} --tex {output.tex} --html {output.html} {params.notice} > {log} 2>&1"
