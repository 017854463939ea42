# Metrics: FID, sFID, IS, Precision, Recall of one sample set against its reference, on all samples and on
# the first N of them for each N of metrics.sample_counts.


rule metrics:
    input:
        features="results/{preset}/features/{model}/{setting}/steps{steps}.npz",
        reference=reference_features,
    output:
        "results/{preset}/metrics/{model}/{setting}/steps{steps}.json",
    params:
        split_size=config["metrics"]["split_size"],
        k=config["metrics"]["k"],
        sample_counts=" ".join(map(str, SAMPLE_COUNTS)),
        device=config["device"],
    log:
        "logs/{preset}/metrics/{model}/{setting}/steps{steps}.log",
    benchmark:
        "results/{preset}/benchmarks/metrics/{model}/{setting}/steps{steps}.tsv"
    threads: 1
    resources:
        gpu=gpu,
        runtime=runtime("metrics"),
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit metrics --features {input.features} --reference {input.reference}"
        " --split-size {params.split_size} --k {params.k} --sample-counts {params.sample_counts}"
        " --device {params.device} --output {output} > {log} 2>&1"
