#!/bin/sh
# Everything issue 18 measures on a lent GPU, in two device runs of the lead's checkout (the device
# tool sends the session's checkout; the wheels come from benchmarks/gpu_wheels.sh, run there first):
#   1. sh benchmarks/gpu_wheels.sh && run(command="sh benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#      CUDA-graph tests (tests/test_decode_graphs_cuda.py; the quantized ones skip) and the bf16 figures:
#      span decode at 128/2048 tokens, batch 8, transformers' generate() eager and static+compile,
#      the 32-block server + client -> $OUT/tests.log, $OUT/gpu_engine_check.none.json
#   2. sh benchmarks/gpu_wheels.sh quant && run(command="sh benchmarks/gpu_check.sh quant", carry=[".whl-bnb"],
#      timeout_s=300; right after run 1, while the machine is warm, if 5 minutes of device time are
#      left): int8 and nf4 -> $OUT/tests_quant.log, $OUT/gpu_engine_check.int8-nf4.json
export PYTHONUNBUFFERED=1
wheels=.whl
[ "${1:-}" = quant ] && wheels=.whl-bnb
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/app:$PWD"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
if [ "${1:-}" = quant ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_decode_graphs_cuda.py -k quantized 2>&1 | tee "$OUT/tests_quant.log"
  python3 benchmarks/gpu_engine_check.py --quants int8 nf4 --skip correctness hf e2e --budget-s 150
else
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_decode_graphs_cuda.py 2>&1 | tee "$OUT/tests.log"
  python3 benchmarks/gpu_engine_check.py --quants none --budget-s 300
fi
