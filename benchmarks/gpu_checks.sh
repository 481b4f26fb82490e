#!/usr/bin/env bash
# The GPU checks of the unified LLM issue as one script for a lent GPU machine (repo root, the machine's own
# python3 with PyTorch): the small preset's LLM training step in bf16, eager against torch.compile
# (runtime.compile) side by side in one run, with step time, tokens/s, MFU against the measured bf16 matmul
# peak and a profile of the compiled step. Results go to the folder given as $1: log.txt and one JSON per run.
#
#   bash benchmarks/gpu_checks.sh gpu-results
#
# The project's transformers travels as a wheel in .whl/ where one is there (the machine's own is older);
# `python3 -m pip download --no-deps -d .whl transformers==<the venv's version>` puts it there.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/transformers-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/transformers-*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
log=$out/log.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$log"
mfu() {  # name, timeout, arguments of gpu_llm_mfu.py (MFU_ARGS adds more, e.g. --tiny to try the script on a CPU)
  local name=$1 limit=$2; shift 2
  echo "== $name: $* ${MFU_ARGS:-}" | tee -a "$log"
  timeout "$limit" python3 benchmarks/gpu_llm_mfu.py --json "$out/$name.json" "$@" ${MFU_ARGS:-} 2>&1 | tee -a "$log"
}
# Most important first: the eager step and the compiled one at the same batch, then larger batches.
mfu eager_bs256 120 --batch-size 256
mfu compile_bs256 300 --batch-size 256 --compile --profile
mfu compile_bs512 200 --batch-size 512 --compile
mfu compile_bs1024 200 --batch-size 1024 --compile
echo "== done" | tee -a "$log"
