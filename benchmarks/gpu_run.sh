#!/usr/bin/env bash
# One GPU session's work in one call: bash benchmarks/gpu_run.sh STAGE... (logs and JSON under $OUT).
# Stages: tests (gpu-marked kernel + engine tests), quicktests (the kernel, GPU-path, sampler and structured-output
# ones), structured (TPOT with and without a JSON schema), goodput1 (S1 on one GPU: 0P1D at 8 and 12 req/s),
# profile (GPU time per kernel class of a prefill, mixed and decode step), async | sync (W1, W2, batch-1 latency with async scheduling
# on | off), kernels (attention micro-benchmark), w1 | w2 | latency |
# prefill | preempt (throughput.py on the 8B shape), small (SmolLM2 shape W1+W2), hf (HF baseline on W1),
# vllm (the peer, after the bundle is unpacked to /tmp/vllm-site), gateway (router vs direct gRPC streams),
# goodput | goodput-s2 (benchmarks/pd_goodput.py on S1 | S2: Tandem 1P1D, 0P2D and vLLM DP2 when /tmp/vllm-site is
# there; PD_RATES, PD_DURATION_S, PD_LAYOUTS override; the S1 defaults fit one ~9-minute call), spec (n-gram
# speculative decoding: TPOT on SmolLM2, verify-step cost on the 8B shape, idle cost; benchmarks/spec_decode.py).
# A stage that fails is reported and the next one still runs.
set -uo pipefail
source benchmarks/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
summary=()
run() {  # run NAME TIMEOUT_S CMD...: log to $OUT/NAME.log, keep the last lines for the summary
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("== $name rc=$rc $((SECONDS - started))s")
  echo "== $name rc=$rc $((SECONDS - started))s"; tail -n 25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for stage in "$@"; do
  case $stage in
    tests) run tests 420 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/kernels tests/common/engine/test_gpu_path.py tests/common/transfer ;;
    gpupath) run gpupath 300 python3 -m pytest -q -s -p no:cacheprovider tests/common/engine/test_gpu_path.py ;;
    breakdown) run breakdown 300 python3 -m benchmarks.throughput --shape llama8b --workloads W1-breakdown --json "$OUT/breakdown.json" ;;
    quicktests) run quicktests 300 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/kernels/test_activation.py \
                  tests/kernels/test_paged_attention.py tests/common/engine/test_gpu_path.py \
                  tests/common/engine/test_sampler.py tests/common/engine/test_structured.py ;;
    structured) run structured 300 python3 benchmarks/structured_bench.py --engine --batches 1,64 ;;
    goodput1)
      model=smollm2; [ -d /tmp/carry/.gpu_model/smollm2 ] && model=/tmp/carry/.gpu_model/smollm2
      run goodput1 400 python3 benchmarks/pd_goodput.py --workloads S1 --rates "${PD_RATES:-8,12}" \
        --duration-s "${PD_DURATION_S:-20}" --layouts "${PD_LAYOUTS:-0p1d}" --no-engine-step --model "$model" \
        --run-dir "$OUT/goodput1-logs" --result-json "$OUT/goodput1.json" ;;
    profile) run profile 300 python3 -m benchmarks.step_profile --shape llama8b --json "$OUT/profile.json" ;;
    kernels) run kernels 240 python3 benchmarks/attention_kernels.py --json "$OUT/kernels.json" ;;
    w1|w2|latency|prefill|preempt)
      wl=$stage; case $stage in w1|w2) wl=$(echo "$stage" | sed "s/^w/W/")-breakdown ;; esac
      run "$stage" 480 python3 -m benchmarks.throughput --shape llama8b --workloads "$wl" --json "$OUT/$stage.json" ;;
    sync) run sync 480 python3 -m benchmarks.throughput --shape llama8b --workloads W1-breakdown,W2,latency \
            --no-async-scheduling --json "$OUT/sync.json" ;;
    async) run async 480 python3 -m benchmarks.throughput --shape llama8b --workloads W1-breakdown,W2,latency \
             --json "$OUT/async.json" ;;
    fast) run fast 560 python3 -m benchmarks.throughput --shape llama8b --workloads W1-breakdown,latency,prefill --json "$OUT/fast.json" ;;
    fp8) run fp8 560 python3 -m benchmarks.throughput --shape llama8b --workloads W1,latency --quantization fp8 \
      --json "$OUT/fp8.json" ;;  # issue 16: W1 >= 1.4x the bf16 W1 of the same call (stage fast)
    fp8kv) run fp8kv 560 python3 -m benchmarks.throughput --shape llama8b --workloads W1,latency --kv-cache-dtype fp8 \
      --json "$OUT/fp8kv.json" ;;  # issue 16: twice the KV tokens, <= 5% slower decode than bf16 KV
    newtests) run newtests 420 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_fp8.py \
      tests/kernels/test_kv_cache.py tests/kernels/test_paged_attention.py tests/kernels/test_lora.py ;;
    small) run small 300 python3 -m benchmarks.throughput --shape smollm2 --workloads W1,W2 --json "$OUT/small.json" ;;
    vllm) run vllm 560 env PYTHONPATH="/tmp/vllm-site:$PYTHONPATH" VLLM_USE_FLASHINFER_SAMPLER=0 \
            python3 -m benchmarks.vllm_peer --shape llama8b --json "$OUT/vllm.json" ;;
    gateway) run gateway 560 python3 benchmarks/gateway_overhead.py --model /tmp/carry/.gpu_model/smollm2 \
               --load-format dummy --dtype bfloat16 --num-requests 800 --concurrency 200 --input-len 128 \
               --output-len 128 --warmup 8 --client-procs 2 --router-arg=--processes --router-arg="${ROUTER_PROCESSES:-1}" \
               --json "$OUT/gateway.json" ;;
    goodput|goodput-s2)
      wl=S1; rates=${PD_RATES:-8,16,24}; duration=${PD_DURATION_S:-12}
      [ "$stage" = goodput-s2 ] && { wl=S2; rates=${PD_RATES:-2,4,6}; duration=${PD_DURATION_S:-12}; }
      model=smollm2; [ -d /tmp/carry/.gpu_model/smollm2 ] && model=/tmp/carry/.gpu_model/smollm2
      echo "pd_goodput $wl: rates $rates, ${duration}s each, layouts ${PD_LAYOUTS:-1p1d,0p2d,vllm-dp2}"
      run "$stage" 570 python3 benchmarks/pd_goodput.py --workloads "$wl" --rates "$rates" --duration-s "$duration" \
        --layouts "${PD_LAYOUTS:-1p1d,0p2d,vllm-dp2}" --model "$model" --run-dir "$OUT/$stage-logs" \
        --result-json "$OUT/$stage.json"
      grep -m1 "estimated runtime" "$OUT/$stage.log" ;;
    spec)  # the real SmolLM2 weights (the GGUF that gpu_env.sh joins); SPEC_PARTS picks parts
      run spec 560 python3 -m benchmarks.spec_decode --model smollm2 --part "${SPEC_PARTS:-tpot,verify,idle}" \
        --json "$OUT/spec.json" ;;
    spectests) run spectests 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/common/engine/spec \
                 tests/common/engine/test_gpu_path.py ;;
    hf) run hf 560 python3 -m benchmarks.hf_baseline --shape llama8b --json "$OUT/hf.json" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
printf '%s\n' "${summary[@]}"
