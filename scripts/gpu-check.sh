#!/usr/bin/env bash
# GPU offload on a machine with an NVIDIA GPU: builds rbee's `cuda` variant (llama-cpp-2's
# `cuda` feature; CMAKE_CUDA_ARCHITECTURES is passed to llama.cpp's CMake, 90 for an H200 by
# default to keep the build short), then runs the default model on a local node twice, with
# `gpu_layers = 0` (CPU) and `gpu_layers = "all"`, and prints prefill and decode tokens/s of
# each, the layers offloaded and the devices the worker reports, and the device memory the
# worker uses (nvidia-smi). Fails with a message where there is no GPU or no CUDA toolkit.
#
#   CUDA_ARCH=90 (CMAKE_CUDA_ARCHITECTURES), TOKENS=128, RUNS=3, PROMPT_WORDS=400,
#   CARGO_TARGET_DIR (default ~/.cache/rbee/target-cuda)
set -euo pipefail

cd "$(dirname "$0")/.."
say() { printf 'gpu-check: %s\n' "$*" >&2; }
fail() { say "$*"; exit 1; }

command -v nvidia-smi >/dev/null 2>&1 \
    || fail "no nvidia-smi here: this check needs a machine with an NVIDIA GPU and its driver"
gpus=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap \
    --format=csv,noheader 2>/dev/null || true)
[ -n "$gpus" ] || fail "nvidia-smi lists no GPU: this check needs a machine with an NVIDIA GPU"
command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] \
    || fail "no nvcc: install the CUDA toolkit (or put /usr/local/cuda/bin on PATH) to build the cuda variant"
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rbee/target-cuda}"
export CMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}"
TOKENS="${TOKENS:-128}"
RUNS="${RUNS:-3}"
PROMPT_WORDS="${PROMPT_WORDS:-400}"
MODEL="${RBEE_TEST_MODEL:-$HOME/.cache/rbee/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
[ -f "$MODEL" ] || fail "no model at $MODEL (run scripts/setup.sh)"

say "GPU: $gpus"
say "building the cuda variant (CMAKE_CUDA_ARCHITECTURES=$CMAKE_CUDA_ARCHITECTURES) into $CARGO_TARGET_DIR"
cargo build --release --features cuda 2>&1 | tail -n 3 >&2
RBEE="$CARGO_TARGET_DIR/release/rbee"
"$RBEE" version
"$RBEE" version --json | grep -q '"variant":"cuda"' || fail "the build is not the cuda variant"
"$RBEE" version --json | grep -q '"CUDA"' \
    || fail "the cuda build's llama.cpp registry lists no CUDA backend (driver or device missing?)"

work=$(mktemp -d)
cleanup() {
    for c in "$work"/*.toml; do [ -f "$c" ] && "$RBEE" --config "$c" hive stop --all >/dev/null 2>&1; done
    rm -rf "$work"
}
trap cleanup EXIT
export RBEE_HOME="$work/state"

prompt=$(python3 -c "print(' '.join(['The quick brown fox jumps over the lazy dog.'] * ($PROMPT_WORDS // 9)))")

# One local node per setting, each with its own hive.
run_with() {
    local name=$1 layers=$2 config="$work/$1.toml"
    cat > "$config" <<TOML
[models.smollm2]
path = "$MODEL"
sha256 = "$SHA"
gpu_layers = $layers

[nodes.$name]
transport = "local"
remote_dir = "$work/$name"
models = ["smollm2"]
TOML
    # Warm: the model loaded, then RUNS measured generations (median).
    "$RBEE" --config "$config" infer --prompt hi --max-tokens 1 >/dev/null
    for _ in $(seq "$RUNS"); do
        "$RBEE" --config "$config" --json infer --temperature 0 --max-tokens "$TOKENS" \
            --prompt "$prompt" | tail -n 1
    done > "$work/$name.jsonl"
    "$RBEE" --config "$config" --json worker list > "$work/$name.workers.json"
    if [ "$name" = gpu ]; then
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits \
            > "$work/gpu.mem" 2>/dev/null || true
    fi
}

say "CPU: gpu_layers = 0"
run_with cpu 0
say "GPU: gpu_layers = \"all\""
run_with gpu '"all"'

python3 - "$work" <<'PY'
import json, os, statistics, sys
work = sys.argv[1]
def figures(name):
    runs = [json.loads(l) for l in open(f"{work}/{name}.jsonl") if l.strip()]
    done = [r for r in runs if r.get("event") == "done"]
    if not done:
        sys.exit(f"gpu-check: no finished generation for {name}: {runs}")
    pre = statistics.median(d["tokens_in"] / (d["timings_ms"]["prefill"] / 1000) for d in done)
    dec = statistics.median((d["tokens_out"] - 1) / (d["timings_ms"]["decode"] / 1000) for d in done)
    workers = [json.loads(l) for l in open(f"{work}/{name}.workers.json") if l.strip()]
    return pre, dec, done[0]["tokens_in"], workers
cpu = figures("cpu")
gpu = figures("gpu")
print(f"prompt: {cpu[2]} tokens; medians of the runs")
print(f"{'':24}{'CPU':>14}{'GPU':>14}{'GPU/CPU':>10}")
print(f"{'prefill tokens/s':24}{cpu[0]:14.1f}{gpu[0]:14.1f}{gpu[0]/cpu[0]:10.1f}")
print(f"{'decode tokens/s':24}{cpu[1]:14.1f}{gpu[1]:14.1f}{gpu[1]/cpu[1]:10.1f}")
for name, fig in (("CPU", cpu), ("GPU", gpu)):
    for listing in fig[3]:
        for w in listing.get("workers", []):
            off = w.get("offload") or {}
            print(f"{name} run: layers offloaded {off.get('gpu_layers')}, devices {off.get('devices')}")
mem = open(f"{work}/gpu.mem").read().strip() if os.path.exists(f"{work}/gpu.mem") else ""
print("device memory used (pid, MiB):", mem or "none reported")
PY
