#!/usr/bin/env bash
# Download, here (a machine that reaches PyPI), the wheels the bundle needs that the GPU machine's image lacks, into
# .gpu_wheels/ at the repository root (git-ignored). The GPU machine has no network: these wheels travel with a
# device call (carry [".gpu_wheels"]) and bench/gpu/setup.sh installs them there offline into /tmp/qsm_site.
#
# What the image lacks (the package list in the device docs, KINDS.md) and the bundle needs:
#   monai, pytorch-ignite, nibabel, fire (+ termcolor, its only dependency): imported at training/inference time
#     (fire by `python -m monai.bundle`);
#   nilearn: never imported, only its MNI152 data files are read by the brain phantom (scripts/phantoms/brain.py),
#     so its own dependencies are not needed (they are on the image anyway);
#   jsonschema (+ jsonschema-specifications, referencing, rpds-py; attrs and typing-extensions are on the image):
#     tests/test_packaging.py imports it at module level, and tests/test_export.py imports test_packaging.
#   itk is NOT fetched: nothing in bundle/scripts or the configs imports it (grep -rn itk bundle/scripts).
# Versions: those of requirements.txt; the dependencies not listed there at the versions the tests ran with.
# rpds-py is the only compiled wheel: fetched for CPython 3.12 on manylinux x86_64 (the image's python3).
#
# Usage (from anywhere): bash bench/gpu/fetch_wheels.sh      (PYTHON=... to use another interpreter's pip)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${WHEELS_DIR:-$ROOT/.gpu_wheels}"
PY="${PYTHON:-python3}"
REQ="$ROOT/requirements.txt"

pin() {  # version of package $1 in requirements.txt (extras such as monai[fire] allowed)
    local v
    v="$(grep -iE "^$1(\[[^]]*\])?==" "$REQ" | head -n1 | sed -E 's/.*==([^ ;#]+).*/\1/')"
    [ -n "$v" ] || { echo "fetch_wheels: $1 is not pinned in requirements.txt" >&2; exit 1; }
    echo "$v"
}

PACKAGES=(
    "monai==$(pin monai)"
    "pytorch-ignite==$(pin pytorch-ignite)"
    "nibabel==$(pin nibabel)"
    "fire==$(pin fire)"
    "nilearn==$(pin nilearn)"
    "jsonschema==$(pin jsonschema)"
    # not in requirements.txt: dependencies of the above, at the versions the tests ran with
    "termcolor==3.3.0"
    "jsonschema-specifications==2025.9.1"
    "referencing==0.37.0"
    "rpds-py==2026.9.1"
)

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done

rm -rf "$DEST"
mkdir -p "$DEST"
echo "fetch_wheels: ${PACKAGES[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"

count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#PACKAGES[@]}" ]; then
    echo "fetch_wheels: expected ${#PACKAGES[@]} wheels, got $count" >&2
    exit 1
fi
ls -l "$DEST"
bytes=$(du -cb "$DEST"/*.whl | tail -n1 | cut -f1)
echo "fetch_wheels: $count wheels, total $(awk -v b="$bytes" 'BEGIN{printf "%.1f", b/1048576}') MiB in $DEST"
if [ "$bytes" -gt $((40 * 1048576)) ]; then
    echo "fetch_wheels: over 40 MiB, too large to carry beside the tree" >&2
    exit 1
fi
