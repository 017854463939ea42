# Prepare: train the smoke preset's models and reference, or download and convert the paper's.


rule train_transformer:
    output:
        config="results/{preset}/models/{model}/transformer/config.json",
        weights="results/{preset}/models/{model}/transformer/diffusion_pytorch_model.safetensors",
    wildcard_constraints:
        model=alternation(TRAINED),
    params:
        train=lambda wc: MODELS[wc.model]["train"],
    log:
        "logs/{preset}/train_transformer/{model}.log",
    benchmark:
        "results/{preset}/benchmarks/train_transformer/{model}.tsv"
    threads: rule_threads("train_transformer")
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit prepare digits-transformer --steps {params.train[steps]}"
        " --batch-size {params.train[batch_size]} --lr {params.train[lr]} --seed {params.train[seed]}"
        " --output $(dirname {output.config}) > {log} 2>&1"


rule train_feature_network:
    output:
        "results/{preset}/models/feature_network.pt",
    params:
        train=config["feature_extractor"].get("train", {}),
    log:
        "logs/{preset}/train_feature_network.log",
    benchmark:
        "results/{preset}/benchmarks/train_feature_network.tsv"
    threads: rule_threads("train_feature_network")
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit prepare digits-features --steps {params.train[steps]}"
        " --batch-size {params.train[batch_size]} --lr {params.train[lr]} --seed {params.train[seed]}"
        " --output {output} > {log} 2>&1"


rule digits_reference:
    output:
        "results/{preset}/reference/digits.npz",
    log:
        "logs/{preset}/digits_reference.log",
    benchmark:
        "results/{preset}/benchmarks/digits_reference.tsv"
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit prepare digits-reference --output {output} > {log} 2>&1"


rule download:
    input:
        local_source,
    output:
        protected("resources/{download}"),
    wildcard_constraints:
        download=alternation(DOWNLOADS),
    params:
        url=lambda wc: DOWNLOADS[wc.download]["url"],
        sha256=lambda wc: DOWNLOADS[wc.download].get("sha256") or "",
        size=lambda wc: DOWNLOADS[wc.download].get("size", 0),
    localrule: True
    retries: 3
    log:
        "logs/download/{download}.log",
    benchmark:
        "results/download-benchmarks/{download}.tsv"
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit prepare download --url {params.url:q} --sha256 '{params.sha256}' --size {params.size}"
        " --output {output} > {log} 2>&1"


rule verify_download:
    input:
        "resources/{download}",
    output:
        "resources/verified/{download}.json",
    wildcard_constraints:
        download=alternation(DOWNLOADS),
    params:
        sha256=lambda wc: DOWNLOADS[wc.download].get("sha256") or "",
        size=lambda wc: DOWNLOADS[wc.download].get("size", 0),
    localrule: True
    log:
        "logs/verify/{download}.log",
    benchmark:
        "results/download-benchmarks/verify/{download}.tsv"
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit prepare verify --file {input} --sha256 '{params.sha256}' --size {params.size}"
        " --output {output} > {log} 2>&1"


rule convert_checkpoint:
    input:
        checkpoint="resources/checkpoints/{model}.pt",
    output:
        config="results/{preset}/models/{model}/transformer/config.json",
        weights="results/{preset}/models/{model}/transformer/diffusion_pytorch_model.safetensors",
    wildcard_constraints:
        model=alternation(DOWNLOADED),
    params:
        arch=lambda wc: MODELS[wc.model]["arch"],
        image_size=lambda wc: MODELS[wc.model]["image_size"],
        sha256=lambda wc: MODELS[wc.model]["checkpoint"].get("sha256") or "",
    log:
        "logs/{preset}/convert_checkpoint/{model}.log",
    benchmark:
        "results/{preset}/benchmarks/convert_checkpoint/{model}.tsv"
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit prepare convert-dit --checkpoint {input.checkpoint} --sha256 '{params.sha256}'"
        " --arch {params.arch:q} --image-size {params.image_size} --output $(dirname {output.config}) > {log} 2>&1"
