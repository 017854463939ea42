# Features: one feature-network pass per sample set and per reference set.


rule features:
    input:
        shards=sample_shards,
        weights=feature_weights(),
        verified=feature_inputs_verified,
    output:
        "results/{preset}/features/{model}/{setting}/steps{steps}.npz",
    params:
        extractor=config["feature_extractor"]["name"],
        batch_size=config["metrics"]["batch_size"],
        device=config["device"],
    log:
        "logs/{preset}/features/{model}/{setting}/steps{steps}.log",
    benchmark:
        "results/{preset}/benchmarks/features/{model}/{setting}/steps{steps}.tsv"
    threads: 1
    resources:
        gpu=gpu,
        runtime=runtime("features"),
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit features --inputs {input.shards} --extractor {params.extractor}"
        " --weights {input.weights} --batch-size {params.batch_size} --device {params.device}"
        " --output {output} > {log} 2>&1"


rule reference_features:
    input:
        images=reference_images,
        weights=feature_weights(),
        verified=reference_inputs_verified,
    output:
        "results/{preset}/features/reference/{reference}.npz",
    params:
        extractor=config["feature_extractor"]["name"],
        batch_size=config["metrics"]["batch_size"],
        device=config["device"],
        made_by="reference_features",
    log:
        "logs/{preset}/reference_features/{reference}.log",
    benchmark:
        "results/{preset}/benchmarks/reference_features/{reference}.tsv"
    threads: 1
    resources:
        gpu=gpu,
        runtime=runtime("reference_features"),
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit features --inputs {input.images} --extractor {params.extractor}"
        " --weights {input.weights} --batch-size {params.batch_size} --device {params.device}"
        " --made-by {params.made_by} --output {output} > {log} 2>&1"
