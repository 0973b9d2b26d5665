#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (.venv by default).
#
#   scripts/setup_env.sh          # runtime dependencies
#   scripts/setup_env.sh test     # plus the test extras
#
# The exact versions come from constraints.txt (the lock; pyproject.toml holds the
# supported ranges). mmcv has no wheel for the locked torch: it is built once from its
# source archive (two fixes: setuptools<70 for pkg_resources, and -std=c++20 for torch's
# headers) and the wheel is cached under $KD_HARNESS_CACHE (default ~/.cache/kd-harness)
# so later set-ups take seconds. Where a GPU and nvcc are present the build includes the
# CUDA kernels for the visible GPUs (scripts/mmcv_build.py says how, and what to install
# when nvcc is missing); the cache is keyed by torch, CUDA and the GPUs' architectures.
# A stamp keyed by the hash of pyproject.toml, constraints.txt and the set-up scripts
# makes a second call a no-op.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
venv="${KD_HARNESS_VENV:-$root/.venv}"
cache="${KD_HARNESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kd-harness}"
wheels="$cache/wheels"
mkdir -p "$wheels"

constraints="$root/constraints.txt"
hash="$(cat "$root/pyproject.toml" "$constraints" "$root/scripts/setup_env.sh" "$root/scripts/mmcv_build.py" \
        | sha256sum | cut -c1-16)"
stamp_key="$hash-${extras:-base}"
stamp="$venv/.kd-harness-stamp"   # one line per installed set; a set with extras includes base
if [[ -f "$stamp" ]] && grep -qx -- "$stamp_key" "$stamp" 2>/dev/null; then
    exit 0
fi

log() { printf '[setup] %s\n' "$*" >&2; }

if [[ ! -x "$venv/bin/python" ]]; then
    log "creating virtual environment $venv"
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)

pin() {  # pin NAME -> the locked requirement string for NAME from constraints.txt
    local line
    line="$(grep -i -E "^$1(\[[^]]*\])?==" "$constraints" | head -1)"
    [[ -n "$line" ]] || { log "constraints.txt locks no version of $1"; exit 1; }
    printf '%s\n' "$line"
}

log "torch and torchvision"
"${pip[@]}" "$(pin torch)" "$(pin torchvision)"
mmcv_req="$(pin mmcv)"
mmcv_version="${mmcv_req#mmcv==}"
# CPU ops, or CUDA ops for the visible GPUs (FORCE_CUDA, TORCH_CUDA_ARCH_LIST, MMCV_CACHE_TAG)
build_env="$("$py" "$root/scripts/mmcv_build.py")" || exit 3
eval "$build_env"
mmcv_dir="$wheels/mmcv-$mmcv_version-$MMCV_CACHE_TAG"
if ! ls "$mmcv_dir"/mmcv-*.whl >/dev/null 2>&1; then
    kind="CPU ops"; [[ "$FORCE_CUDA" == 1 ]] && kind="CUDA ops for sm ${TORCH_CUDA_ARCH_LIST}"
    log "building mmcv $mmcv_version with $kind ($MMCV_CACHE_TAG; about 20 min on 2 cores, once)"
    # mmcv's setup.py imports pkg_resources (gone from current setuptools) and builds
    # without isolation against the torch just installed; torch itself wants a newer
    # setuptools, which the project install below brings back.
    "${pip[@]}" "setuptools<70" wheel ninja
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    "$py" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
        "$mmcv_req" -d "$work"
    tar -xzf "$work"/mmcv-"$mmcv_version".tar.gz -C "$work"
    src="$work/mmcv-$mmcv_version"
    # torch >= 2.10 headers: "#error C++20 or later compatible compiler is required"
    sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$src/setup.py"
    grep -q -- '-std=c++20' "$src/setup.py" || { log "mmcv setup.py has no -std flag to patch"; exit 1; }
    mkdir -p "$mmcv_dir.tmp"
    (cd "$src" && export FORCE_CUDA ${TORCH_CUDA_ARCH_LIST:+TORCH_CUDA_ARCH_LIST} ${CUDA_HOME:+CUDA_HOME} \
        && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$py" -m pip wheel --disable-pip-version-check -q --no-build-isolation --no-deps . -w "$mmcv_dir.tmp")
    rm -rf "$mmcv_dir" && mv "$mmcv_dir.tmp" "$mmcv_dir"   # never leave a half-built cache
fi

log "project and remaining dependencies"
target="$root"
[[ -n "$extras" ]] && target="$root[$extras]"
"${pip[@]}" -c "$constraints" --find-links "$mmcv_dir" -e "$target"
"$py" -c 'import mmcv.ops, mmdet, mmseg, ray, pyarrow, pycocotools' \
    || { log "import check failed"; exit 1; }

if [[ "$extras" == *test* ]] && ! command -v chromium >/dev/null 2>&1; then
    # the HTML report's browser test drives the system's headless Chromium through
    # Playwright; Debian's package, where this machine may install packages
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
        log "Chromium for the browser test (Debian package)"
        apt-get install -y -q chromium >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
            || log "could not install chromium: the browser test will be skipped, saying why"
    else
        log "no chromium and no way to install it here: the browser test will be skipped, saying why"
    fi
fi

{ grep -s -- "^$hash-" "$stamp" || true; echo "$stamp_key"; echo "$hash-base"; } | sort -u > "$stamp.new"
mv "$stamp.new" "$stamp"
log "environment ready: $venv"
