#!/usr/bin/env bash
# Issue 8's GPU figures in one run on a lent GPU machine (about 5-8 minutes on an H200), from the repo root:
#
#   here:   scripts/gpu/fetch-wheels.sh
#   there:  bash scripts/gpu/perf.sh            (device tool: carry [".whl"], timeout_s 600)
#
# Installs the carried wheels and this checkout into /tmp/vlmguard-site, then runs the perf commands of
# docs/performance.md on the full-width random-weight shapes in bf16 and writes each report to $OUT
# (at most 8 files come back): prefill of llava-1.5-7b (SDPA, and FlashAttention-2 when flash_attn
# imports; batch 1, and batch 8 at 64 tokens), prefill of llava-next-7b and of qwen2-vl-7b (FlowCut with
# and without its ViT stage), and per-token decode of every decoder at batch 1 and 8, and at batch 1 with
# FlowCut@64 composed, and shared prefixes and a warm prefix cache on POPE-style batches. Every
# command has its own time limit, so one that hangs or fails leaves the others' reports.
#
# Smoke test without a GPU: DEVICE=cpu DTYPE=float32 SUFFIX=-cpu REPEATS=1 PYTHON=.venv/bin/python NO_WHEELS=1
# Nine commands at LIMIT=70 s plus the install can take close to the 600 s of one device call: to rerun only
# some, set STEPS to their names (space-separated): prefill-sdpa prefill-flash_attention_2 prefill-next
# prefill-qwen decode prefill-b8 decode-flowcut prefix, e.g. `STEPS="prefill-qwen decode" bash scripts/gpu/perf.sh`;
# decode-nf4 (4-bit weights, needs bitsandbytes there) runs only when STEPS names it.
set -uo pipefail
OUT=${OUT:-/tmp/vlmguard-gpu}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
SUFFIX=${SUFFIX:-}
REPEATS=${REPEATS:-10}
LIMIT=${LIMIT:-70}  # seconds per command: all eight fit the device tool's 600 s a call
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/vlmguard-site}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu-perf.log") 2>&1

step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
want() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }

step "install"
if [ -z "${NO_WHEELS:-}" ] && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$REPO"/.whl/*.whl || exit 1
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$REPO" || exit 1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
cd /tmp  # import the installed package, not the source tree
VG=("$PY" -c "import sys; from vlmguard.cli import main; sys.argv[0] = 'vlmguard'; sys.exit(main())")

step "environment"
command -v nvidia-smi >/dev/null && nvidia-smi -L
"$PY" - <<'PY'
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    import flash_attn
    print("flash_attn", flash_attn.__version__)
except Exception as e:
    print("flash_attn not available:", type(e).__name__)
PY
ATTNS=(sdpa)
"$PY" -c "import flash_attn" 2>/dev/null && [ "$DEVICE" = cuda ] && ATTNS+=(flash_attention_2)

common=(--device "$DEVICE" --dtype "$DTYPE" --warmup 2 --repeats "$REPEATS" --quiet)
for attn in "${ATTNS[@]}"; do
  want "prefill-$attn" || continue
  step "prefill llava-1.5-7b$SUFFIX $attn"
  timeout "$LIMIT" "${VG[@]}" perf prefill --shape "llava-1.5-7b$SUFFIX" --attn "$attn" "${common[@]}" \
    --methods none,flowcut,adaptinfer,fastv,random --budgets 192,128,64 \
    --out "$OUT/perf-prefill-llava-1.5-7b$SUFFIX-$DEVICE-$attn.json" || echo "FAILED (exit $?)"
done
want prefill-next && {
step "prefill llava-next-7b$SUFFIX sdpa"
timeout "$LIMIT" "${VG[@]}" perf prefill --shape "llava-next-7b$SUFFIX" --attn sdpa "${common[@]}" \
  --methods none,flowcut,adaptinfer,fastv,random --budgets 640,320,160 \
  --out "$OUT/perf-prefill-llava-next-7b$SUFFIX-$DEVICE-sdpa.json" || echo "FAILED (exit $?)"
}
want prefill-qwen && {
step "prefill qwen2-vl-7b$SUFFIX sdpa"
timeout "$LIMIT" "${VG[@]}" perf prefill --shape "qwen2-vl-7b$SUFFIX" --attn sdpa "${common[@]}" \
  --methods "none,flowcut,flowcut[qwen_vit_keep=0],adaptinfer,fastv,random" --budgets 85,57,28 \
  --out "$OUT/perf-prefill-qwen2-vl-7b$SUFFIX-$DEVICE-sdpa.json" || echo "FAILED (exit $?)"
}
want decode && {
step "decode llava-1.5-7b$SUFFIX sdpa"
timeout "$LIMIT" "${VG[@]}" perf decode --shape "llava-1.5-7b$SUFFIX" --attn sdpa --device "$DEVICE" --dtype "$DTYPE" \
  --decoders greedy,vcd,m3id,vista,iava,lqcd --batch 1,8 --new-tokens 32 --warmup 1 --repeats 3 --quiet \
  --out "$OUT/perf-decode-llava-1.5-7b$SUFFIX-$DEVICE-sdpa.json" || echo "FAILED (exit $?)"
}
want prefill-b8 && {
step "prefill llava-1.5-7b$SUFFIX sdpa, batch 8"
timeout "$LIMIT" "${VG[@]}" perf prefill --shape "llava-1.5-7b$SUFFIX" --attn sdpa "${common[@]}" --batch 8 \
  --methods none,flowcut,adaptinfer,fastv,random --budgets 64 \
  --out "$OUT/perf-prefill-llava-1.5-7b$SUFFIX-$DEVICE-sdpa-b8.json" || echo "FAILED (exit $?)"
}
want decode-flowcut && {
step "decode llava-1.5-7b$SUFFIX sdpa with flowcut@64"
timeout "$LIMIT" "${VG[@]}" perf decode --shape "llava-1.5-7b$SUFFIX" --attn sdpa --device "$DEVICE" --dtype "$DTYPE" \
  --decoders greedy,vcd,m3id,vista,iava,lqcd --batch 1 --pruning flowcut --budget 64 --new-tokens 32 --warmup 1 \
  --repeats 3 --quiet --out "$OUT/perf-decode-llava-1.5-7b$SUFFIX-$DEVICE-sdpa-flowcut64.json" || echo "FAILED (exit $?)"
}
want prefix && {
step "prefix sharing and a warm prefix cache llava-1.5-7b$SUFFIX sdpa, 12 requests of 6 questions per image"
timeout "$LIMIT" "${VG[@]}" perf prefix --shape "llava-1.5-7b$SUFFIX" --attn sdpa "${common[@]}" \
  --decoders greedy,lqcd,iava --batch 12 --questions-per-image 6 --cache \
  --out "$OUT/perf-prefix-llava-1.5-7b$SUFFIX-$DEVICE-sdpa.json" || echo "FAILED (exit $?)"
}
# Opt-in (only when STEPS names it; the default run's time is spent above): decode with the language model's weights
# in 4-bit NF4, which needs bitsandbytes on the machine (its wheel, 125 MB with its CUDA libraries, is too large to
# carry) and saves the full-width shape to /tmp first (about 14 GB in bf16); QLIMIT seconds (default 300).
[ -n "${STEPS:-}" ] && want decode-nf4 && {
step "decode llava-1.5-7b$SUFFIX sdpa, weights in bnb-nf4"
if "$PY" -c "import bitsandbytes, accelerate" 2>/dev/null; then
  timeout "${QLIMIT:-300}" "${VG[@]}" perf decode --shape "llava-1.5-7b$SUFFIX" --attn sdpa --device "$DEVICE" \
    --dtype "$DTYPE" --quantization bnb-nf4 --decoders greedy,vcd,vista --batch 1,8 --new-tokens 32 --warmup 1 \
    --repeats 3 --quiet --out "$OUT/perf-decode-llava-1.5-7b$SUFFIX-$DEVICE-sdpa-nf4.json" || echo "FAILED (exit $?)"
else
  echo "skipped: bitsandbytes and accelerate are not installed here"
fi
}
step "done"
ls -la "$OUT"
