#!/usr/bin/env bash
# The testbed's GPU work as two device calls of < 10 min each (issue 9), run from the repository root:
#
#   bash testbed/gpu_runs.sh train OUT   # base +235 s from testbed/weights, then the 5 LoRAs side by side
#                                        # (rank 16, 255 s each); weights in OUT/w, logs in OUT/*.log
#   bash testbed/gpu_runs.sh eval OUT [WEIGHTS]
#                                        # every method, k = 1..4, 40 prompts × 4 seeds, as parallel
#                                        # processes (evaluate_parallel.py); OUT/eval/results.{json,md}
#
# After `train`, copy OUT/w over testbed/weights (the committed weights) before `eval`, or pass OUT/w.
# The device tool brings back at most 8 files from $OUT: pack OUT/w/loras and the logs into one tar there
# (as done for the committed weights), or run train into another folder and copy only what you need to $OUT.
set -euo pipefail
stage=${1:?train or eval}
out=${2:?output folder}
mkdir -p "$out"
case "$stage" in
train)
    w="$out/w"
    mkdir -p "$w"
    python testbed/train.py --out "$w" --resume testbed/weights --no-detector --no-loras \
        --base-steps 100000 --base-seconds 235 --base-lr 1.5e-4 > "$out/base.log" 2>&1
    tail -n 3 "$out/base.log"
    pids=()
    for category in character clothing background object style; do
        python testbed/train.py --out "$w" --resume "$w" --loras-only "$category" --rank 16 \
            --lora-steps 4000 --lora-seconds 255 > "$out/lora_$category.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    tail -n 1 "$out"/lora_*.log
    ;;
eval)
    python testbed/evaluate_parallel.py --out "$out/eval" --max-seconds 480 ${3:+--weights "$3"}
    ;;
*)
    echo "unknown stage '$stage': use train or eval" >&2
    exit 2
    ;;
esac
