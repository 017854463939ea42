# Plots: the bits/size vs FID trade-off, and sample grids with the same seeds for every setting.


rule tradeoff_plot:
    input:
        "results/{preset}/tables/metrics.csv",
    output:
        png=report("results/{preset}/plots/tradeoff.png", caption="../report/tradeoff.rst", category="Figures"),
        pdf="results/{preset}/plots/tradeoff.pdf",
    log:
        "logs/{preset}/tradeoff_plot.log",
    benchmark:
        "results/{preset}/benchmarks/tradeoff_plot.tsv"
    localrule: True
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit plots tradeoff --table {input} --png {output.png} --pdf {output.pdf} > {log} 2>&1"


rule sample_grid:
    input:
        expand(
            "results/{{preset}}/samples/{{model}}/{setting}/steps{{steps}}/shard0.npz",
            setting=SETTINGS,
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
        names=list(SETTINGS),
    log:
        "logs/{preset}/sample_grid/{model}-steps{steps}.log",
    benchmark:
        "results/{preset}/benchmarks/sample_grid/{model}-steps{steps}.tsv"
    localrule: True
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit plots samples --shards {input} --names {params.names} --title '{wildcards.model}, {wildcards.steps} steps'"
        " --png {output.png} --pdf {output.pdf} > {log} 2>&1"
