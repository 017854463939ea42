#!/usr/bin/env bash
# Runs once after Snakemake creates envs/vq4dit.yaml, in the working directory (the repository root).
set -euo pipefail
pip install --no-deps -e .
