# Rehearsal: the paper preset's downloads stood in for by full-size files with random weights, written
# deterministically from a seed (config/rehearsal.yaml fetches them through file: URLs, sha256-pinned).


rule rehearsal_dit:
    output:
        "resources/rehearsal-assets/DiT-XL-2-{size}x{size}.pt",
    wildcard_constraints:
        size="256|512",
    params:
        seed=REHEARSAL_SEED,
    log:
        "logs/rehearsal/dit-{size}.log",
    benchmark:
        "results/rehearsal-asset-benchmarks/dit-{size}.tsv"
    resources:
        mem_mb=4000,
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit rehearsal --asset dit --image-size {wildcards.size} --seed {params.seed}"
        " --output {output} > {log} 2>&1"


rule rehearsal_vae:
    output:
        config="resources/rehearsal-assets/vae/config.json",
        weights="resources/rehearsal-assets/vae/diffusion_pytorch_model.safetensors",
    params:
        seed=REHEARSAL_SEED,
    log:
        "logs/rehearsal/vae.log",
    benchmark:
        "results/rehearsal-asset-benchmarks/vae.tsv"
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "(python -m vq4dit rehearsal --asset vae-config --output {output.config}"
        " && python -m vq4dit rehearsal --asset vae-weights --seed {params.seed} --output {output.weights}) > {log} 2>&1"


rule rehearsal_inception:
    output:
        "resources/rehearsal-assets/weights-inception-2015-12-05-6726825d.pth",
    params:
        seed=REHEARSAL_SEED,
    log:
        "logs/rehearsal/inception.log",
    benchmark:
        "results/rehearsal-asset-benchmarks/inception.tsv"
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit rehearsal --asset inception --seed {params.seed} --output {output} > {log} 2>&1"


rule rehearsal_reference:
    output:
        "resources/rehearsal-assets/VIRTUAL_imagenet{size}.npz",
    wildcard_constraints:
        size="256|512",
    params:
        seed=REHEARSAL_SEED,
        n_images=config.get("rehearsal", {}).get("reference_images", 8),
    log:
        "logs/rehearsal/reference-{size}.log",
    benchmark:
        "results/rehearsal-asset-benchmarks/reference-{size}.tsv"
    conda:
        "../../envs/vq4dit.yaml"
    shell:
        "python -m vq4dit rehearsal --asset reference --image-size {wildcards.size} --n-images {params.n_images}"
        " --seed {params.seed} --output {output} > {log} 2>&1"
