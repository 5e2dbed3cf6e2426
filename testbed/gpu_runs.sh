#!/usr/bin/env bash
# The testbed v3's GPU work as device calls of < 10 min each, run from the repository root with
# PYTHONPATH=$PWD/.device/site COMFYUI_PATH=$PWD/.device/comfyui (carry [".device"]):
#
#   bash testbed/gpu_runs.sh base OUT    # call 1: detector + UNet base + DiT base side by side (BASE_SECONDS each),
#                                        # then each base's caption following and class drawing (16 prompts)
#   bash testbed/gpu_runs.sh loras OUT W # call 2: the 10 LoRAs (5 per testbed) side by side on the bases in W
#                                        # (LORA_SECONDS each), then each LoRA alone at k = 1 (20 prompts)
#   bash testbed/gpu_runs.sh all OUT     # one call: base, then loras on it (what the committed v3 weights had, with
#                                        # BASE_SECONDS=230 LORA_SECONDS=140: the session had ~11 min of device left)
#   bash testbed/gpu_runs.sh resume OUT W
#                                        # one call: both bases continued from W (BASE_SECONDS; SEED, default 1: give
#                                        # each continuation its own so the batches differ), then the 10 LoRAs on
#                                        # them (LORA_SECONDS; 0 = bases only)
#   bash testbed/gpu_runs.sh profile OUT # each base alone: steps/s at batch 256 (PROFILE_STEPS, default 20) and
#                                        # the operators taking the device time (train.py --profile); saves nothing;
#                                        # COMPILE=1: then the same under torch.compile (resume takes COMPILE=1 too)
#   bash testbed/gpu_runs.sh eval-both OUT [W]
#                                        # eval on both testbeds in one call (EVAL_SECONDS per job, default 480;
#                                        # ONLY_UNET / ONLY_DIT: job indices to re-run, the rest merged as found)
#   bash testbed/gpu_runs.sh eval OUT W ARCH
#                                        # every method, k = 1..4, 40 prompts × 4 seeds, as parallel processes
#                                        # (evaluate_parallel.py) on testbed ARCH (unet or dit); OUT/eval-ARCH
#
# base/loras leave OUT/w.tar (the weights, the layout of testbed/weights) and OUT/logs.tar; with COPY_TO=$OUT they
# are copied there, the weights split in 12 MB parts (the device tool brings back at most 8 files of 16 MiB). Unpack w.tar over testbed/weights.
set -euo pipefail
stage=${1:?base, loras, all, resume, profile, eval or eval-both}
out=${2:?output folder}
mkdir -p "$out/w" "$out/logs"
w="$out/w"
py=${PYTHON:-python3}
# every stage runs up to 10 processes side by side: each gets its share of the CPU's threads (16 torch threads
# per process on 16 cores oversubscribe it)
threads() { echo $(( $(nproc) / $1 > 0 ? $(nproc) / $1 : 1 )); }
check() {  # arch, ks, methods, prompts
    "$py" testbed/evaluate.py --arch "$1" --weights "$w" --out "$out/logs/check_$1" --ks $2 --methods $3 \
        --prompts "$4" --max-seconds 60 > "$out/logs/check_$1.log" 2>&1 || true
}
pack() {
    tar -C "$w" -cf "$out/w.tar" .
    tar -C "$out" -cf "$out/logs.tar" logs
    # the device tool brings back files of at most 16 MiB: the weights come back in 12 MB parts
    # (cat w.tar.part.* > w.tar)
    if [ -n "${COPY_TO:-}" ]; then
        rm -f "$COPY_TO"/w.tar.part.*
        split -b 12000000 "$out/w.tar" "$COPY_TO/w.tar.part."
        cp "$out/logs.tar" "$COPY_TO"/
    fi
}
train_bases() {
    OMP_NUM_THREADS=$(threads 3) "$py" testbed/train.py --stage detector --out "$w" --detector-steps "${DETECTOR_STEPS:-4000}" \
        > "$out/logs/detector.log" 2>&1 &
    for arch in unet dit; do
        OMP_NUM_THREADS=$(threads 3) "$py" testbed/train.py --stage base --arch "$arch" --out "$w" --base-seconds "${BASE_SECONDS:-450}" \
            > "$out/logs/base_$arch.log" 2>&1 &
    done
    wait
    tail -n 2 "$out"/logs/*.log
}
train_loras() {
    for arch in unet dit; do
        for category in character clothing background object style; do
            OMP_NUM_THREADS=$(threads 10) "$py" testbed/train.py --stage loras --arch "$arch" --out "$w" --resume "$w" --loras-only "$category" \
                --lora-seconds "${LORA_SECONDS:-400}" --lora-lr "${LORA_LR:-1e-3}" > "$out/logs/lora_${arch}_$category.log" 2>&1 &
        done
    done
    wait
    tail -n 1 "$out"/logs/lora_*.log
}
case "$stage" in
resume)
    src=${3:?weights folder with the bases}
    cp -r "$src"/. "$w"/
    for arch in unet dit; do
        # with COMPILE=1 a failed compilation falls back to an eager run of the same budget
        { OMP_NUM_THREADS=$(threads 2) "$py" testbed/train.py --stage base --arch "$arch" --out "$w" --resume "$w" \
              --seed "${SEED:-1}" --base-seconds "${BASE_SECONDS:-250}" ${COMPILE:+--compile} \
              > "$out/logs/base_$arch.log" 2>&1 ||
          { [ -n "${COMPILE:-}" ] && OMP_NUM_THREADS=$(threads 2) "$py" testbed/train.py --stage base --arch "$arch" \
              --out "$w" --resume "$w" --seed "${SEED:-1}" --base-seconds "${BASE_SECONDS:-250}" \
              > "$out/logs/base_${arch}_eager.log" 2>&1; }; } &
    done
    wait
    tail -n 2 "$out"/logs/base_*.log
    pack
    if [ "${LORA_SECONDS:-1}" != 0 ]; then
        train_loras
        pack
    fi
    ;;
all)
    train_bases
    pack
    train_loras
    pack
    ;;
base)
    train_bases
    check unet "1" base 16 & check dit "1" base 16 & wait
    grep -h -A 4 "### k = 1\|Base model" "$out"/logs/check_*/results.md || true
    pack
    ;;
loras)
    src=${3:?weights folder with the bases}
    cp -r "$src"/. "$w"/
    train_loras
    check unet "1" "base merge" 20 & check dit "1" "base merge" 20 & wait
    grep -h -A 5 "### k = 1" "$out"/logs/check_*/results.md || true
    pack
    ;;
profile)
    for arch in unet dit; do
        "$py" testbed/train.py --stage base --arch "$arch" --out "$w" --profile "${PROFILE_STEPS:-20}" \
            ${COMPILE:+--compile} > "$out/logs/profile_$arch.log" 2>&1 || true
        grep -v "^WARNING" "$out/logs/profile_$arch.log" | head -n 90
    done
    if [ -n "${COPY_TO:-}" ]; then cp "$out"/logs/profile_*.log "$COPY_TO"/; fi
    ;;
eval-both)
    # both testbeds in one call: the 20 jobs side by side, each within EVAL_SECONDS (default 480); results and
    # sheets come back as eval-unet.tar / eval-dit.tar with COPY_TO
    for arch in unet dit; do
        only=ONLY_${arch^^}  # ONLY_UNET / ONLY_DIT="2 5": re-run only those jobs (evaluate_parallel.py --only)
        "$py" testbed/evaluate_parallel.py --arch "$arch" --out "$out/eval-$arch" --max-seconds "${EVAL_SECONDS:-480}" \
            ${3:+--weights "$3"} ${!only:+--only ${!only}} > "$out/eval_$arch.log" 2>&1 &
    done
    wait
    for arch in unet dit; do
        grep -v "^WARNING" "$out/eval_$arch.log" | tail -n 60
        if [ -n "${COPY_TO:-}" ]; then
            tar -C "$out" -cf "$COPY_TO/eval-$arch.tar" "eval-$arch" "eval_$arch.log"
        fi
    done
    ;;
eval)
    "$py" testbed/evaluate_parallel.py --arch "${4:?unet or dit}" --out "$out/eval-$4" --max-seconds 500 \
        ${3:+--weights "$3"}
    ;;
*)
    echo "unknown stage '$stage': use base, loras, all, resume, profile, eval or eval-both" >&2
    exit 2
    ;;
esac
