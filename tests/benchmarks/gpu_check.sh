#!/usr/bin/env bash
# CAMEO cost at paper scale on one GPU, random weights: the two paper recipes as written
# (gin/experiments/cat3d_sd21.gin: SD-2.1 UNet at 512 px; mvdit_xl2.gin: DiT-XL/2 at 256 px) and the
# SD-2.1-layout mv_unet / DiT-B/2 at 64x64 latents, each with and without CAMEO (step time, peak
# memory, CAMEO overhead, tokens/s; bf16, gradient checkpointing, 4 views), and the chunked
# alignment loss vs the naive full map.
#
# Command:   bash tests/benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--dry-run] [-- EXTRA]
#            EXTRA goes to every part, e.g. `-- --batch-size 6 --steps 12`.
# Output:    DIR/gpu_check.json, DIR/gpu_check.md (tables), DIR/parts/*.json, DIR/logs/*.log
#            (default DIR: reports/benchmarks/gpu_check_<UTC time>).
# Runtime:   about 6-8 min on one H100 (random init of the 0.9 B / 0.7 B models on the CPU and the
#            random SD-shaped VAE dominate); every part has a timeout and the whole run stops
#            starting parts after --budget seconds (default 540), so it stays under 10 min; the
#            recipes run first, the built-in choices last. A part that runs out of memory, fails
#            or times out is recorded as such and the others still run.
# --dry-run: micro shapes on CPU (the recipes shrunk), all parts in one process (what CI runs).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CALLER_DIR="$PWD"

OUT=""
BUDGET=540
DRY_RUN=0
EXTRA=()
while (($#)); do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
OUT="${OUT:-$ROOT/reports/benchmarks/gpu_check_$(date -u +%Y%m%d_%H%M%S)}"
[[ "$OUT" = /* ]] || OUT="$CALLER_DIR/$OUT"  # relative to where it was called from
cd "$ROOT"

if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python3)"
fi
export HF_HUB_OFFLINE=1
# Fewer fragmentation OOMs when parts allocate very differently sized tensors.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

mkdir -p "$OUT/parts" "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
echo "gpu_check: python $PY"
echo "gpu_check: results -> $OUT (gpu_check.json, gpu_check.md; per part: parts/, logs/)"

# One part in its own process: a crash, a hang or a fragmented allocator cannot touch the next
# part, and the peak memory counters start clean. The Python side records handled failures (out
# of memory included) itself; this records what it could not (timeout, killed, crashed).
DEADLINE=$((SECONDS + BUDGET))
run_part() {
    local name="$1" limit="$2"
    shift 2
    local left=$((DEADLINE - SECONDS - 15))
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "gpu_check: $name skipped (time budget of ${BUDGET}s spent)"
        printf '{"part": "%s", "status": "skipped", "error": "time budget of %ss spent"}\n' "$name" "$BUDGET" \
            > "$OUT/parts/$name.json"
        return 0
    fi
    rm -f "$OUT/parts/$name.json"
    echo "gpu_check: part $name (timeout ${limit}s)"
    local rc=0
    timeout --kill-after=15 "$limit" "$PY" "$HERE/gpu_check.py" --part "$name" --out "$OUT" "$@" \
        2>&1 | tee "$OUT/logs/$name.log" || rc=$?
    if ((rc != 0)) && [[ ! -s "$OUT/parts/$name.json" ]]; then
        local status="crashed"
        ((rc == 124)) && status="timeout"
        ((rc == 137)) && status="killed"
        printf '{"part": "%s", "status": "%s", "error": "exit code %s after at most %ss; see logs/%s.log"}\n' \
            "$name" "$status" "$rc" "$limit" "$name" > "$OUT/parts/$name.json"
        echo "gpu_check: part $name $status (exit code $rc)"
    fi
    return 0
}

if ((DRY_RUN)); then
    # CI: every part in one process (one interpreter start-up), summarised there, and any part
    # that is not ok fails the run.
    timeout --kill-after=15 300 "$PY" "$HERE/gpu_check.py" --dry-run --part all --summarize --strict \
        --out "$OUT" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$OUT/logs/dry_run.log"
    echo "gpu_check: wrote $OUT/gpu_check.json and $OUT/gpu_check.md in ${SECONDS}s"
    exit 0
fi

"$PY" -c 'import torch, diffusers, timm, einops, backbones, cameo_bench.engine.build, cameo_bench.engine.step
print("gpu_check: torch", torch.__version__, "| cuda:", torch.cuda.is_available() and torch.cuda.get_device_name(0))' \
    || { echo "gpu_check: $PY cannot import the project (torch, diffusers, timm, einops): run 'make install' or 'pip install -e .'" >&2; exit 1; }

# Timeouts: model and VAE build + scene rendering + 2 warm-up + 8 timed steps, with a wide margin.
run_part cat3d_sd21_baseline 150 ${EXTRA[@]+"${EXTRA[@]}"}
run_part cat3d_sd21_cameo 150 ${EXTRA[@]+"${EXTRA[@]}"}
run_part mvdit_xl2_baseline 120 ${EXTRA[@]+"${EXTRA[@]}"}
run_part mvdit_xl2_cameo 120 ${EXTRA[@]+"${EXTRA[@]}"}
run_part loss_chunked 45 ${EXTRA[@]+"${EXTRA[@]}"}
run_part loss_naive 60 ${EXTRA[@]+"${EXTRA[@]}"}
run_part loss_sparse 45 ${EXTRA[@]+"${EXTRA[@]}"}
run_part loss_sparse_mean 30 ${EXTRA[@]+"${EXTRA[@]}"}
run_part loss_chunked_mean 30 ${EXTRA[@]+"${EXTRA[@]}"}
run_part loss_naive_mean 45 ${EXTRA[@]+"${EXTRA[@]}"}
run_part unet_baseline 120 ${EXTRA[@]+"${EXTRA[@]}"}
run_part unet_cameo 120 ${EXTRA[@]+"${EXTRA[@]}"}
run_part dit_baseline 75 ${EXTRA[@]+"${EXTRA[@]}"}
run_part dit_cameo 75 ${EXTRA[@]+"${EXTRA[@]}"}

# A recorded OOM or timeout is a result, not a failure of the check.
"$PY" "$HERE/gpu_check.py" --summarize --out "$OUT"
echo "gpu_check: wrote $OUT/gpu_check.json and $OUT/gpu_check.md in ${SECONDS}s"
