#!/usr/bin/env bash
# The GPU measurements of the paper preset at DiT-XL/2 size, in one command for a short GPU lease
# (BUDGET seconds, default 560). Run from the repository root with the project installed (on a lent
# machine without our packages: carry their wheels and put them on PYTHONPATH, benchmarks/README.md "GPU"):
#
#     bash benchmarks/gpu_session.sh OUT_DIR
#
# Writes to OUT_DIR: env.txt (GPU, driver, versions, how each step ended), results.md (one section
# per step: kmeans_bench.py, calibration_cost.py, sampling_bench.py at 256 tf32/bf16 and 512 tf32, features_bench.py,
# rehearsal_costs.py --gpu: the rehearsal DAG on CUDA with per-job time and peak GPU memory),
# stderr.log and rehearsal-logs.tar.gz (the DAG's logs, info files and tables). Each step has its own
# time limit (timeout ends the step's whole process group), so a slow one cannot take the rest with it;
# the DAG gets what is left of BUDGET seconds (default 560) after the others.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, stdout into results.md, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    printf '\n## %s: %s\n\n' "$name" "$*" >>"$out/results.md"
    timeout "$limit" "$@" >>"$out/results.md" 2>>"$out/stderr.log"
    echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$out/env.txt"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import torch, diffusers, torch_fidelity, snakemake; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, '| diffusers', diffusers.__version__, '| torch-fidelity', torch_fidelity.__version__, \
'| snakemake', snakemake.__version__)"
    nproc
} >"$out/env.txt" 2>&1

step kmeans 60 python benchmarks/kmeans_bench.py --shape 4608 1152 --iters 20
step calibration 120 python benchmarks/calibration_cost.py --blocks 2 --iterations 200 --kmeans-iters 20
step sampling-256-tf32 60 python benchmarks/sampling_bench.py --precision tf32 --batch-sizes 1 16 64 125 256
step sampling-256-bf16 50 python benchmarks/sampling_bench.py --precision bf16 --batch-sizes 1 16 64 125 256
step features 40 python benchmarks/features_bench.py --device cuda --n 2000 --batch-size 250
work=$(mktemp -d)
step rehearsal $((${BUDGET:-560} - SECONDS - 50)) python benchmarks/rehearsal_costs.py --target table_256 --gpu \
    --cores "$(nproc)" --workdir "$work"
step sampling-512-tf32 45 python benchmarks/sampling_bench.py --image-size 512 --precision tf32 \
    --batch-sizes 1 16 64 --layer-batch-sizes 1 --repeats 3
tar -czf "$out/rehearsal-logs.tar.gz" --exclude='*.safetensors' --exclude='*.npz' --exclude='*.pt' \
    --exclude='*.png' -C "$work" logs results 2>>"$out/stderr.log"
