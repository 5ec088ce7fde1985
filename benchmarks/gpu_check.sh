#!/usr/bin/env bash
# The GPU checks (docs/gpu.md), in one run on a machine with an NVIDIA GPU:
#   bash benchmarks/gpu_check.sh        logs and results under $OUT (default /tmp/gpu-check)
# Python packages the machine lacks may lie as wheels in .whl/ (installed to /tmp/site); the
# engine needs xgrammar (+ apache-tvm-ffi, pydantic, pydantic-core, annotated-types,
# typing-inspection), opentelemetry-api and gguf beyond torch, triton and transformers.
# Each part has its own time limit, so one that fails or hangs leaves the others' figures.
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LITELLM_LOCAL_MODEL_COST_MAP=True TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

part() {  # part NAME SECONDS COMMAND...: runs it with a limit, log in $OUT/NAME.log, prints its tail
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: rc $rc, $((SECONDS - start)) s"
  tail -n "${TAIL:-12}" "$OUT/$name.log"
}
PYTEST="python3 -m pytest -q -p no:cacheprovider --timeout 90 -rfE"
part kernel-tests 120 $PYTEST tests/kernels/test_triton_kernels.py tests/engine/test_cuda_graphs.py
part kernels 100 python3 -m benchmarks kernels --batches 1,8,64,256 --contexts 512,4096,32768
TAIL=30 part e2e 180 python3 -m benchmarks gpu-e2e
part engine-tests "${ENGINE_TESTS_LIMIT:-150}" $PYTEST tests/engine/test_sharp_random_models.py \
  tests/engine/test_prefix_cache.py tests/engine/test_preemption.py tests/engine/test_scheduler.py \
  tests/engine/test_parallel_sampling.py tests/engine/test_model_families.py tests/engine/test_kv_cache_int8.py \
  tests/engine/test_async_llm.py tests/engine/test_sampling.py tests/engine/test_structured_output.py
cp benchmarks/results/*.json "$OUT"/ 2>/dev/null
ls "$OUT"
