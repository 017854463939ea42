# Manifest: the run's provenance (sha256 of every artifact in DAG order, settings, versions, devices, numerics).


rule manifest:
    input:
        prepare=prepared_files(),
        quantize=packed_models(),
        sample=kept_shards(),
        features=feature_files(),
        metrics=metric_files(),
    output:
        "results/{preset}/manifest.json",
    params:
        config=config_json,
        settings=json.dumps(SETTINGS, sort_keys=True),
    log:
        "logs/{preset}/manifest.log",
    benchmark:
        "results/{preset}/benchmarks/manifest.tsv"
    localrule: True
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit manifest --preset {wildcards.preset} --config {params.config:q} --settings {params.settings:q}"
        " --prepare {input.prepare} --quantize {input.quantize} --sample {input.sample} --features {input.features}"
        " --metrics {input.metrics} --output {output} > {log} 2>&1"
