# Plots: size/bits vs quality trade-offs with the paper's points, sample grids with the same seeds for
# every setting, calibration curves.


rule tradeoff_plot:
    input:
        table="results/{preset}/tables/runs-{model}.csv",
        paper=config["paper_results"],
    output:
        png=report(
            "results/{preset}/plots/tradeoff-{model}.png",
            caption="../report/tradeoff.rst",
            category="Figures",
            labels={"figure": "trade-off", "model": "{model}"},
        ),
        pdf="results/{preset}/plots/tradeoff-{model}.pdf",
    params:
        notice=NOTICE,
        resolution=paper_resolution,
    log:
        "logs/{preset}/plots/tradeoff-{model}.log",
    benchmark:
        "results/{preset}/benchmarks/plots/tradeoff-{model}.tsv"
    localrule: True
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit plots tradeoff --table {input.table} --model {wildcards.model} --paper {input.paper}"
        " {params.resolution} --png {output.png} --pdf {output.pdf} {params.notice} > {log} 2>&1"


rule sample_grid:
    input:
        expand(
            "results/{{preset}}/samples/{{model}}/{setting}/steps{{steps}}/shard0.npz",
            setting=MAIN_SETTINGS,
        ),
    output:
        png=report(
            "results/{preset}/plots/samples/{model}-steps{steps}.png",
            caption="../report/samples.rst",
            category="Samples",
            labels={"model": "{model}", "steps": "{steps}"},
        ),
        pdf="results/{preset}/plots/samples/{model}-steps{steps}.pdf",
    params:
        notice=NOTICE,
        names=MAIN_SETTINGS,
    log:
        "logs/{preset}/plots/samples/{model}-steps{steps}.log",
    benchmark:
        "results/{preset}/benchmarks/plots/samples/{model}-steps{steps}.tsv"
    localrule: True
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit plots samples --shards {input} --names {params.names} --title '{wildcards.model}, {wildcards.steps} steps'"
        " --png {output.png} --pdf {output.pdf} {params.notice} > {log} 2>&1"


rule calibration_plot:
    input:
        model_calibrated_infos,
    output:
        png=report(
            "results/{preset}/plots/calibration-{model}.png",
            caption="../report/calibration.rst",
            category="Figures",
            labels={"figure": "calibration curves", "model": "{model}"},
        ),
        pdf="results/{preset}/plots/calibration-{model}.pdf",
    params:
        notice=NOTICE,
    log:
        "logs/{preset}/plots/calibration-{model}.log",
    benchmark:
        "results/{preset}/benchmarks/plots/calibration-{model}.tsv"
    localrule: True
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit plots calibration --infos {input} --png {output.png} --pdf {output.pdf} {params.notice} > {log} 2>&1"
