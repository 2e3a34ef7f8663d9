#!/usr/bin/env bash
# The flow-matching families at full size on one GPU, a 15-minute device slot of its own (benchmarks/run_gpu.sh fills
# one with SD1.5 and SDXL): SD3.5 Medium full fine-tuning and LoRA, FLUX.1 [dev] LoRA, each the reference step against
# ours (dpo and rpo, latent cache), bf16, AdamW, gradient checkpointing, eager; step time, pairs/s and peak memory.
#   bash benchmarks/run_gpu_flow.sh [results_dir] [extra benchmark_step.py flags]
# Extra flags go to every run (tests/test_benchmarks.py runs these command lines with --size tiny on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results}}
shift $(($# > 0 ? 1 : 0))
mkdir -p "$out"
source benchmarks/gpu_env.sh
# SD3.5 Medium: 2 pairs at 1024 px (T5 256 tokens), full transformer and LoRA rank 8.
python3 benchmarks/benchmark_step.py --family sd3 --compile off --steps 5 --warmup 2 --data_pairs 0 \
  --variants reference_dpo_adamw_ckpt,ours_dpo_adamw_ckpt_cached,ours_rpo_adamw_ckpt_cached,reference_dpo_lora_adamw_ckpt,ours_dpo_lora_adamw_ckpt_cached,ours_rpo_lora_adamw_ckpt_cached \
  --out "$out/sd35m_${gpu}_${stamp}.json" "$@"
# FLUX.1 [dev]: 2 pairs at 512 px (the script's default; T5 512 tokens), LoRA rank 8 (the script's default).
python3 benchmarks/benchmark_step.py --family flux --compile off --steps 5 --warmup 2 --data_pairs 0 \
  --variants reference_dpo_lora_adamw_ckpt,ours_dpo_lora_adamw_ckpt_cached,ours_rpo_lora_adamw_ckpt_cached \
  --out "$out/flux1dev_${gpu}_${stamp}.json" "$@"
