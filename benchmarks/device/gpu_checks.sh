#!/usr/bin/env bash
# GPU checks on a bare device machine (docs/gpu.md "Running the GPU checks"): install the payload carried to
# /tmp/payload, then run each check under its own time limit, logs and JSON results to $OUT.
#   bash benchmarks/device/gpu_checks.sh [checks...]     checks: enc embed embed_intactor vllm_test llm_tput
#   (default: all but embed_intactor, the Ray stage tokenizing inside the GPU actor, for comparison)
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
P=/tmp/payload
REPO=$PWD
t0=$(date +%s)
if [ ! -d /tmp/site/vllm ]; then
  (cd $P && cat part.* | tar x && rm -f part.*) || { echo "payload incomplete"; ls -l $P; exit 1; }
  for w in $P/override/*.whl; do  # a wheel here replaces the payload's wheel of the same package
    [ -e "$w" ] && rm -f "$P/$(basename "$w" | cut -d- -f1)"-*.whl && cp "$w" $P/
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $P/*.whl \
    > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$P/site:$REPO HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LANE_MODEL_CACHE=/tmp/models
# carried installs have no flashinfer (a pip install of vllm brings it): use vLLM's own top-k/top-p sampler
python3 -c 'import sys; sys.path[:0] = ["/tmp/site"]; import flashinfer' 2>/dev/null || export VLLM_USE_FLASHINFER_SAMPLER=0
echo "install: $(( $(date +%s) - t0 )) s"
nvidia-smi -L
python3 -c "import vllm, ray, torch; print('vllm', vllm.__version__, 'ray', ray.__version__, 'torch', torch.__version__)" 2>&1 | tail -2

step() {  # name limit_s command...
  local name=$1 lim=$2 s rc; shift 2; s=$(date +%s)
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - s )) s"; tail -4 "$OUT/$name.log"
}
CHECKS=${*:-enc embed vllm_test llm_tput}
for c in $CHECKS; do case $c in
  enc) step enc 90 python3 -m pytest -x -q -p no:cacheprovider tests/gpu/test_encoder_gpu.py ;;
  embed) step embed 170 python3 benchmarks/embed_throughput.py --device cuda --items 200000 --batch-size 1024 \
           --rows-per-batch 16384 --threads 16 --json --out-json "$OUT/embed.json" ;;
  embed_intactor) step embed_intactor 120 python3 benchmarks/embed_throughput.py --device cuda --items 200000 \
           --batch-size 1024 --rows-per-batch 16384 --threads 16 --skip-direct --tokenize-stage off --json \
           --out-json "$OUT/embed_intactor.json" ;;
  vllm_test) step vllm_test 200 env LANE_TEST_LLM=$P/tiny-llama python3 -m pytest -x -q -p no:cacheprovider \
           -k "constrained or extraction" tests/gpu/test_vllm_backend.py ;;
  llm_tput) step llm_tput 200 python3 benchmarks/llm_throughput.py --dataset $P/mldata --users 943 \
           --batch-sizes 943 --set llm.backend=vllm --set llm.enforce_eager=true --set preferences.max_retries=1 \
           --json --out-json "$OUT/llm.json" ;;
esac; done
