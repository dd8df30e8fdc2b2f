#!/usr/bin/env bash
# AMD's speculative-decoding table in AMD's own setting: AMD-Llama-135m-code drafting for
# CodeLlama-7b over the 164 HumanEval prompts, each after AMD's one-shot [PYTHON] prefix;
# temperature 0.1, top-k 10, top-p 0.95 (and greedy), up to 512 new tokens ending at EOS, gamma 5
# adapted per round as transformers 4.37's default assistant schedule. Weights are the user's:
#
#   huggingface-cli download codellama/CodeLlama-7b-hf --local-dir ~/models/CodeLlama-7b-hf
#   huggingface-cli download amd/AMD-Llama-135m-code --local-dir ~/models/AMD-Llama-135m-code
#   experiments/paper_codellama.sh ~/models/CodeLlama-7b-hf ~/models/AMD-Llama-135m-code [OUT] \
#       [more amd135m.spec_eval flags, e.g. --prompts 20 --gammas 3 5 7 --no-adaptive]
#
# Writes OUT/spec_table.{csv,json,png} and OUT/completions.jsonl (each method's completion per
# HumanEval task, for pass@1) and prints our table beside AMD's. The weights load as stored
# (CodeLlama-7b's bf16: about 13.5 GB); every decode, target-only included, runs once untimed per
# prompt-length bucket first, so the run costs a little more than its timed part.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CODELLAMA_7B_DIR AMD_LLAMA_135M_CODE_DIR [OUT_DIR] [spec_eval flags...]" >&2
  exit 2
fi
target=$1
draft=$2
shift 2
out=workdirs/paper_codellama  # ignored by git
if [[ $# -gt 0 && $1 != -* ]]; then
  out=$1
  shift
fi

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
exec "$python" -m amd135m.spec_eval --paper --target "$target" --draft "$draft" --out "$out" "$@"
