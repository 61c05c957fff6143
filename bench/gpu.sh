#!/usr/bin/env bash
# s2d vs TRL on one GPU, random-init Qwen3-0.6B shape (bf16), sized for about 8 minutes on one H100.
#
#     make gpu-wheels                      # here: the wheels the GPU image lacks, into .whl/
#     bash bench/gpu.sh                    # from the repo root on the GPU machine, with .whl/ carried
#     REPEATS=3 bash bench/gpu.sh          # 3 processes a side for every row: min / median / max (the issue's report)
#     STEP_VARIANTS=plain,compile bash bench/gpu.sh    # which s2d variants the training-step row runs
#     ONLY="check step" bash bench/gpu.sh  # some sections only (check head norms step decode rows): at
#                                          # REPEATS=3 the whole script outlasts one 10-minute device call
#
# The machine's image has torch, transformers and accelerate but not trl, datasets or math-verify:
# their wheels (and the few dependencies the image lacks) travel in .whl/ and are installed into a
# private --target directory, put first on PYTHONPATH together with the repo (s2d is not installed).
# Then: versions, the lm-head fast-path check and the speed switches' bf16 check (bench/gpu_check.py), the hf engine's samplers (CUDA-graph
# decode step, eager steps, transformers generate: bench/gpu_probe.py check + decode), and bench/run.py
# --profile gpu: each row's sides in their own processes with a per-process timeout; a failing row is
# reported in the table and the next one runs. Results: $OUT/gpu_results.md (table), $OUT/gpu_results.log
# (children's stderr), $OUT/gpu_check.txt, $OUT/gpu_head*.md, $OUT/gpu_norms.txt, $OUT/gpu_decode.txt,
# $OUT/gpu_step.md (bench/bench_step.py: the training step alone, s2d with and without S2D_LIGER / S2D_COMPILE
# against transformers + liger-kernel, tokens/s, MFU, peak memory). With liger-kernel in .whl/ the table of
# rows 2-4 also has TRL + liger lines ("2L" ...). OUT defaults to bench/gpu-out.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/gpu-out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
SITE="${SITE:-/tmp/s2d-site}"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
else
    echo "bench/gpu.sh: no .whl/ here; using whatever trl/datasets/math-verify the image has" >&2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error

# ONLY="step rows" bash bench/gpu.sh: just those sections (check head norms step decode rows); default all
want() { [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]]; }

echo "== versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF' || true
import platform
from importlib.metadata import PackageNotFoundError, version
import torch
print("python", platform.python_version(), "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
for name in ("torch", "transformers", "accelerate", "trl", "datasets", "math-verify", "flash-attn", "liger-kernel"):
    try:
        print(f"  {name} {version(name)}")
    except PackageNotFoundError:
        print(f"  {name} (not installed)")
EOF

if want check; then
echo "== lm-head fast path check"
timeout 300 "$PY" bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt" || echo "gpu_check failed (exit $?); continuing"

fi
if want head; then
echo "== token log-prob head vs TRL's"
timeout 150 "$PY" bench/bench_head.py --device cuda --positions 16384 --hidden 1024 --dtype bfloat16 \
    --out "$OUT/gpu_head.md" 2>&1 | tail -n 8 || echo "bench_head failed; continuing"
timeout 120 "$PY" bench/bench_head.py --loss topk --device cuda --positions 16384 --hidden 1024 --dtype bfloat16 \
    --out "$OUT/gpu_head_topk.md" 2>&1 | tail -n 8 || echo "bench_head --loss topk failed; continuing"

fi
if want norms; then
echo "== fused RMSNorm vs transformers' (trunk forward + backward)"
timeout 60 "$PY" bench/gpu_norms.py 2>&1 | grep -v Warn | tee "$OUT/gpu_norms.txt" || echo "gpu_norms failed; continuing"

fi
if want step; then
echo "== training step alone: s2d trunk + head (4 variants) vs transformers + liger-kernel, 8 and 16 x 2,048 tokens"
S2D_COMPILE_CACHE="${S2D_COMPILE_CACHE:-/tmp/s2d-compile-cache}" timeout "${STEP_TIMEOUT:-900}" "$PY" bench/bench_step.py \
    --repeats "${REPEATS:-1}" --variants "${STEP_VARIANTS:-plain,liger,compile,liger+compile}" --out "$OUT/gpu_step.md" \
    2>&1 | grep -v Warn | tee "$OUT/gpu_step.txt" || echo "bench_step failed; continuing"

fi
if want decode; then
echo "== hf engine samplers"
{ timeout 90 "$PY" bench/gpu_probe.py check && timeout 120 "$PY" bench/gpu_probe.py decode; } 2>&1 \
    | grep -v Warning | tee "$OUT/gpu_decode.txt" || echo "gpu_probe failed; continuing"

fi
if want rows; then
echo "== comparisons"
timeout "${BENCH_TIMEOUT:-$((600 * ${REPEATS:-1}))}" "$PY" bench/run.py --profile gpu --repeats "${REPEATS:-1}" --out "$OUT/gpu_results.md" \
    --log "$OUT/gpu_results.log" \
    || echo "bench/run.py exit $? (the table holds the rows finished before it)"
if [[ -f "$OUT/gpu_results.md" ]]; then cat "$OUT/gpu_results.md"; fi
fi
