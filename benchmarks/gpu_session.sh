#!/usr/bin/env bash
# One short GPU lease (BUDGET seconds, default 560): the `review` target end to end on CUDA, on the rehearsal's
# stand-in downloads (random weights at DiT-XL/2 size, sha256-pinned, written from a seed: no internet) with
# counts cut to fit (benchmarks/rehearsal_costs.py GPU_OVERRIDES["review"]: 32 samples at 50 steps, one teacher
# trajectory of 20 steps = 20 whole-model calibration steps, 10 k-means iterations), after the calibration's
# cost per optimiser step on all 28 blocks (calibration_cost.py: 256 px TF32 and bf16, 512 px TF32). Run from the repository root with the project
# installed (on a lent machine without our packages: carry their wheels and put them on PYTHONPATH,
# benchmarks/README.md "GPU"):
#
#     bash benchmarks/gpu_session.sh OUT_DIR            # MEASURE=1 also reruns the single-rate benchmarks
#
# Writes to OUT_DIR: env.txt (GPU, driver, versions, how each step ended), results.md (one section per step:
# the cost the rates predict for this cut run, then the review DAG's per-job wall time, host memory and peak
# GPU memory from Snakemake's records and the jobs' logs, the claims table of the run), stderr.log and
# review-logs.tar.gz (logs, infos, claims, manifest, tables). Each step has its own time limit (timeout ends
# the step's whole process group), so a slow one cannot take the rest with it; the DAG gets what is left of
# BUDGET after the others. With MEASURE=1 the per-rate benchmarks of benchmarks/rates.yaml run after it
# (k-means, sampling at 256 tf32/bf16 and 512 tf32, Inception features).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
repo=$(pwd)
budget=${BUDGET:-560}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, stdout into results.md, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    printf '\n## %s: %s\n\n' "$name" "$*" >>"$out/results.md"
    timeout "$limit" "$@" >>"$out/results.md" 2>>"$out/stderr.log"
    local status=$?
    echo "$name: exit $status after $((SECONDS - start)) s" | tee -a "$out/env.txt"
    return $status
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import torch, diffusers, torch_fidelity, snakemake; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, '| diffusers', diffusers.__version__, '| torch-fidelity', torch_fidelity.__version__, \
'| snakemake', snakemake.__version__)"
    nproc
} >"$out/env.txt" 2>&1

# the calibration's ms per whole-model optimiser step, its overhead over dense arithmetic, peak GPU memory
step calibration-256-tf32 100 python benchmarks/calibration_cost.py --device cuda --blocks 28 --precision tf32
step calibration-256-bf16 80 python benchmarks/calibration_cost.py --device cuda --blocks 28 --precision bf16
step calibration-512-tf32 100 python benchmarks/calibration_cost.py --device cuda --blocks 28 --image-size 512 \
    --precision tf32
work=$(mktemp -d)
config=config/review-rehearsal-gpu.yaml
# the workflow and the cut config, then what the rates say this run will cost (before any job)
python benchmarks/rehearsal_costs.py --base review --gpu --workdir "$work" --no-run >/dev/null 2>>"$out/stderr.log"
step cost-predicted 60 bash -c "cd '$work' && python -m vq4dit cost review --configfile $config --rates '$repo/benchmarks/rates.yaml'"
# the review DAG on CUDA: leave 40 s for the tables below and the archive
step review-dag $((budget - SECONDS - 40)) python benchmarks/rehearsal_costs.py --base review --target review --gpu \
    --cores "$(nproc)" --workdir "$work" \
    || step review-jobs-finished 20 python benchmarks/rehearsal_costs.py --base review --gpu --workdir "$work" --no-run
step claims 5 cat "$work/results/review/claims.md"
if [ "${MEASURE:-0}" = 1 ]; then
    step kmeans 60 python benchmarks/kmeans_bench.py --shape 4608 1152 --iters 20
    step sampling-256-tf32 60 python benchmarks/sampling_bench.py --precision tf32 --batch-sizes 1 16 64 125 256
    step sampling-256-bf16 50 python benchmarks/sampling_bench.py --precision bf16 --batch-sizes 1 16 64 125 256
    step features 40 python benchmarks/features_bench.py --device cuda --n 2000 --batch-size 250
    step sampling-512-tf32 45 python benchmarks/sampling_bench.py --image-size 512 --precision tf32 \
        --batch-sizes 1 16 64 --layer-batch-sizes 1 --repeats 3
fi
tar -czf "$out/review-logs.tar.gz" --exclude='*.safetensors' --exclude='*.npz' --exclude='*.pt' --exclude='*.pth' \
    --exclude='*.png' -C "$work" logs results config 2>>"$out/stderr.log"
