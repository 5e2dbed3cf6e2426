#!/usr/bin/env bash
# Builds .device/ (git-ignored) so bench/ and testbed/ scripts run on the lent GPU machine, which has Python 3.12,
# torch and most scientific packages but no network and takes at most 64 MiB of the checkout per call:
#
#   bash bench/device_prep.sh [COMFYUI_TREE]      # default ../shared/comfyui/0.33.0; here, no device time
#   # then in each device call, carry [".device"]:
#   export PYTHONPATH=$PWD/.device/site COMFYUI_PATH=$PWD/.device/comfyui PYTHONUNBUFFERED=1
#
# .device/comfyui: the parts of the ComfyUI tree that the pack's import path loads (comfy, comfy_api,
# comfy_execution and the top-level modules; not its tests, API nodes, extras or blueprints).
# .device/site: the packages that path needs beyond the device's own (docs/benchmarking.md), unpacked from cp312
# manylinux wheels at the versions the tree's requirements.txt pins, with two cuts to fit the limit:
# - comfy_kitchen without its CUDA/HIP extension (168 + 56 MiB): it falls back to its eager and Triton backends;
# - av (PyAV, 101 MiB with FFmpeg) replaced by a stub with the names comfy_api imports: video nodes cannot run
#   there, nothing the bench or the testbed calls needs them.
set -euo pipefail
src=${1:-../shared/comfyui/0.33.0}
dst=.device
[ -f "$src/comfyui_version.py" ] || { echo "no ComfyUI tree at $src" >&2; exit 2; }
rm -rf "$dst"
mkdir -p "$dst/comfyui" "$dst/site" "$dst/wheels"
for part in comfy comfy_api comfy_execution models; do cp -r "$src/$part" "$dst/comfyui/"; done
cp "$src"/*.py "$dst/comfyui/"
find "$dst/comfyui" -name __pycache__ -prune -exec rm -rf {} +

pin() {  # NAME: NAME==version from the tree's requirements.txt, else NAME (the newest)
    local line
    line=$(grep -i -E "^$1([=<>~ ]|$)" "$src/requirements.txt" | head -n 1 | tr -d ' ' || true)
    if [[ "$line" == *"=="* ]]; then echo "$line"; else echo "$1"; fi
}
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dst/wheels" \
    "$(pin comfy-aimdo)" "$(pin comfy-kitchen)" "$(pin torchsde)" "$(pin trampoline)" "$(pin truststore)"
for wheel in "$dst"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$dst/site"  # a wheel is a zip of site-packages: no scripts to run
done
rm -rf "$dst/wheels" "$dst"/site/comfy_kitchen/backends/{cuda,hip}/_C.*

mkdir -p "$dst/site/av/container" "$dst/site/av/subtitles" "$dst/site/av/video"
cat > "$dst/site/av/__init__.py" <<'EOF'
"""Stand-in for PyAV on the device machine (bench/device_prep.sh): the names ComfyUI's comfy_api imports."""


class _Names(type):
    def __getattr__(cls, name):
        return f"{cls.__name__}.{name}"


class _Placeholder(metaclass=_Names):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("PyAV is not installed on this machine (bench/device_prep.sh)")


def __getattr__(name):
    return type(name, (_Placeholder,), {})
EOF
printf 'from .. import _Placeholder\n\n\nclass InputContainer(_Placeholder):\n    pass\n' \
    > "$dst/site/av/container/__init__.py"
mkdir -p "$dst/site/av/subtitles/stream"
printf 'from ... import _Placeholder\n\n\nclass SubtitleStream(_Placeholder):\n    pass\n' \
    > "$dst/site/av/subtitles/stream/__init__.py"
printf '' > "$dst/site/av/subtitles/__init__.py"
mkdir -p "$dst/site/av/video/reformatter"
printf 'from ... import _Placeholder\n\n\nclass ColorPrimaries(_Placeholder):\n    pass\n\n\nclass ColorRange(_Placeholder):\n    pass\n\n\nclass ColorTrc(_Placeholder):\n    pass\n' \
    > "$dst/site/av/video/reformatter/__init__.py"
printf '' > "$dst/site/av/video/__init__.py"
du -sh "$dst" "$dst/comfyui" "$dst/site"
