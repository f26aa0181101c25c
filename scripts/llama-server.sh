#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` once, for scripts/bench.sh to measure rbee against, and
# prints its path. The source is the llama.cpp tree vendored in the PyPI sdist of
# llama-cpp-python (PyPI is reachable where GitHub may not be). Idempotent: an existing build in
# the cache folder is reused.
#
# It is built with the same CPU flags as the llama.cpp inside rbee: llama-cpp-sys-2 sets
# GGML_NATIVE=OFF, which leaves ggml's x86 defaults (SSE4.2, AVX, AVX2, FMA, F16C, BMI2) on. They
# are spelled out here so both builds run the same kernels, and the comparison measures the
# orchestration around the engine, not the compiler flags.
#   LLAMA_SERVER_CACHE (default ~/.cache/rbee/llama-server)
set -euo pipefail

VERSION=0.3.36
CACHE="${LLAMA_SERVER_CACHE:-$HOME/.cache/rbee/llama-server}"
DIR="$CACHE/llama-cpp-python-$VERSION"
BIN="$DIR/build/bin/llama-server"

if [ ! -x "$BIN" ]; then
    echo "llama-server: building from llama-cpp-python==$VERSION's vendored llama.cpp (once, a few minutes)" >&2
    mkdir -p "$CACHE"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" "llama-cpp-python==$VERSION"
    rm -rf "$DIR.part"
    mkdir -p "$DIR.part"
    tar -xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$DIR.part" --strip-components=3 \
        "llama_cpp_python-$VERSION/vendor/llama.cpp"
    flags=(-DGGML_NATIVE=OFF)
    if [ "$(uname -m)" = x86_64 ]; then
        flags+=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_SSE42=ON)
    fi
    cmake -S "$DIR.part" -B "$DIR.part/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DBUILD_SHARED_LIBS=OFF "${flags[@]}" >&2
    cmake --build "$DIR.part/build" --target llama-server -j "$(nproc)" >&2
    rm -rf "$DIR"
    mv "$DIR.part" "$DIR"
fi
echo "$BIN"
