#!/usr/bin/env bash
# The GPU checks of the unified LLM issue as one script for a lent GPU machine (repo root, the machine's own
# python3 with PyTorch): the small preset's LLM training step in bf16 at a few batch sizes (step time,
# tokens/s, MFU against the measured bf16 matmul peak), then NBP against flat decoding at the small
# preset's sizes (N = 8) on the GPU. Results (text and JSON) go to the folder given as $1.
#
#   bash benchmarks/gpu_checks.sh gpu-results
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
if ! python3 -c "import kelix.llm.model" 2>/dev/null; then
  # The machine's transformers does not fit the project: use the project's, carried as a wheel in .whl/.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/transformers-*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
for bs in ${BATCH_SIZES:-64 256 512}; do
  timeout 150 python3 benchmarks/gpu_llm_mfu.py --batch-size "$bs" --json "$out/mfu_bs$bs.json" 2>&1 | tee "$out/mfu_bs$bs.txt"
done
# The same step with torch.compile of each decoder layer and the Block Decoder (it traces whole since the causal
# flag stopped depending on the traced length): does fusing the elementwise work move the MFU?
timeout 300 python3 benchmarks/gpu_llm_mfu.py --batch-size 256 --compile --json "$out/mfu_bs256_compile.json" 2>&1 \
  | tee "$out/mfu_bs256_compile.txt"
timeout 150 python3 benchmarks/bench_nbp.py --preset small --codebooks 8 --batch-sizes 1,16 --repeats 3 --device cuda \
  --bf16 --json "$out/nbp.json" 2>&1 | tee "$out/nbp.txt"
