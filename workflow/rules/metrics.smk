# Metrics: FID, sFID, IS, Precision, Recall of one sample set against its reference.


rule metrics:
    input:
        features="results/{preset}/features/{model}/{setting}/steps{steps}.npz",
        reference=reference_features,
    output:
        "results/{preset}/metrics/{model}/{setting}/steps{steps}.json",
    params:
        split_size=config["metrics"]["split_size"],
        k=config["metrics"]["k"],
        device=config["device"],
    log:
        "logs/{preset}/metrics/{model}/{setting}/steps{steps}.log",
    benchmark:
        "results/{preset}/benchmarks/metrics/{model}/{setting}/steps{steps}.tsv"
    threads: 1
    resources:
        gpu=gpu,
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit metrics --features {input.features} --reference {input.reference}"
        " --split-size {params.split_size} --k {params.k} --device {params.device} --output {output} > {log} 2>&1"
