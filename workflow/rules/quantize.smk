# Quantize: one packed model per (model, setting). A calibration killed mid-run resumes from its checkpoint
# (params.checkpoint, deleted once the job succeeds).


rule quantize:
    input:
        transformer=transformer_config,
    output:
        packed="results/{preset}/quantized/{model}/{setting}.safetensors",
        info="results/{preset}/quantized/{model}/{setting}.json",
    params:
        setting=setting_json,
        calibration=json.dumps(config.get("calibration", {}), sort_keys=True),
        baselines=baselines_json,
        device=config["device"],
        checkpoint="results/{preset}/quantized/{model}/{setting}.resume.pt",
    log:
        "logs/{preset}/quantize/{model}/{setting}.log",
    benchmark:
        "results/{preset}/benchmarks/quantize/{model}/{setting}.tsv"
    threads: rule_threads("quantize")
    resources:
        gpu=gpu,
        runtime=runtime("quantize"),
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit quantize --transformer {input.transformer} --setting {params.setting:q}"
        " --calibration {params.calibration:q} --baselines {params.baselines:q} --device {params.device}"
        " --output {output.packed} --info {output.info} --checkpoint {params.checkpoint} > {log} 2>&1"
