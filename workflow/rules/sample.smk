# Sample: one shard of images per (model, setting, steps, shard); image i depends on (seed, i) only.


rule sample:
    input:
        transformer=transformer_config,
        packed="results/{preset}/quantized/{model}/{setting}.safetensors",
        quantize_info=QUANTIZE_INFO,
        vae=vae_config,
        vae_verified=vae_verified,
    output:
        sample_output("results/{preset}/samples/{model}/{setting}/steps{steps}/shard{shard}.npz"),
    params:
        vae=vae_folder,
        range=shard_range,
        cfg_scale=SAMPLING["cfg_scale"],
        cfg_channels=f"--cfg-channels {SAMPLING['cfg_channels']}" if SAMPLING.get("cfg_channels") else "",
        seed=SAMPLING["seed"],
        batch_size=SAMPLING["batch_size"],
        precision=SAMPLING["precision"],
        compile="--compile" if SAMPLING.get("compile") else "",
        device=config["device"],
    log:
        "logs/{preset}/sample/{model}/{setting}/steps{steps}/shard{shard}.log",
    benchmark:
        "results/{preset}/benchmarks/sample/{model}/{setting}/steps{steps}/shard{shard}.tsv"
    threads: 1
    resources:
        gpu=gpu,
        runtime=runtime("sample"),
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit sample --transformer {input.transformer} --quantized {input.packed}"
        " --quantize-info {input.quantize_info}"
        " --vae '{params.vae}' --steps {wildcards.steps} --cfg-scale {params.cfg_scale} {params.cfg_channels}"
        " --seed {params.seed} --start {params.range[0]} --count {params.range[1]}"
        " --batch-size {params.batch_size} --precision {params.precision} {params.compile}"
        " --device {params.device} --output {output} > {log} 2>&1"
