#!/usr/bin/env bash
# Every regional_variants.py variant of both testbeds as side-by-side processes on one GPU (one process per
# variant and testbed, k = 2 and 3, a process's output in OUT/<arch>/<n>/), then combined into OUT/<arch>.md:
#   bash testbed/regional_variants.sh OUT [SECONDS]       # each process stops at SECONDS (default 540)
set -uo pipefail
out=${1:?output folder}
seconds=${2:-540}
py=${PYTHON:-python3}
variants=$("$py" -c "import ast,sys; t=open('testbed/regional_variants.py').read(); \
print(' '.join(ast.literal_eval(t.split('DEFAULT_VARIANTS = ',1)[1].split(')',1)[0]+')')))")
for arch in unet dit; do
    n=0
    for v in $variants; do
        mkdir -p "$out/$arch/$n"
        OMP_NUM_THREADS=1 timeout "$seconds" "$py" testbed/regional_variants.py --arch "$arch" --out "$out/$arch/$n" \
            --variants "$v" > "$out/$arch/$n/log.txt" 2>&1 &
        n=$((n + 1))
    done
done
wait
for arch in unet dit; do "$py" testbed/regional_variants.py --arch "$arch" --out "$out/$arch" --combine; done
