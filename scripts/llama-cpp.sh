#!/usr/bin/env bash
# Builds llama.cpp's own tools (`llama-server`, `llama-bench`) once, for scripts/bench.sh to
# measure rbee against, and prints the folder holding them. The source is the llama.cpp tree
# vendored in the PyPI sdist of llama-cpp-python (PyPI is reachable where GitHub may not be).
# Idempotent: an existing build in the cache folder is reused.
#
#   scripts/llama-cpp.sh default   llama.cpp's own CMake defaults (GGML_NATIVE=ON: every
#                                  instruction set of this machine), as a user builds it
#   scripts/llama-cpp.sh matched   the CPU flags of the llama.cpp inside rbee: llama-cpp-sys-2
#                                  sets GGML_NATIVE=OFF, which leaves ggml's x86 defaults (SSE4.2,
#                                  AVX, AVX2, FMA, F16C, BMI2) on and AVX-512 off; spelled out so
#                                  that both run the same kernels and the comparison measures the
#                                  orchestration around the engine, not the compiler flags
#   scripts/llama-cpp.sh amx-fix   the defaults, with GCC's RTL dead-store elimination off
#                                  (-fno-dse), which rbee's native build also sets: GCC
#                                  drops the stores that fill ggml's AMX tile configuration
#   scripts/llama-cpp.sh crate     llama-bench alone, llama.cpp's defaults, on the llama.cpp
#                                  libraries vendored in the llama-cpp-sys-2 crate that rbee is
#                                  built with (a newer llama.cpp than the sdist's; llama-bench's
#                                  own source from the sdist): against `default`, what the
#                                  version alone changes
#   scripts/llama-cpp.sh crate-matched
#                                  the same tree with the `matched` flags: the engine rbee runs,
#                                  built by llama.cpp's own CMake, so that rbee against it is
#                                  rbee's loop and relay alone
#   scripts/llama-cpp.sh server MODEL
#                                  the folder whose llama-server to measure against: the
#                                  default build's, unless that build dies on a prompt of MODEL
#                                  here; then the amx-fix build's, else the matched build's,
#                                  saying why on stderr
#   LLAMA_CPP_CACHE (default ~/.cache/rbee/llama-cpp)
set -euo pipefail

FLAVOR="${1:-default}"
# Whether the llama.cpp build in folder $1 can run a prompt of model $2. An 8-token prompt takes
# the batched matrix path that a plain decode does not: on a CPU with AMX, GCC's build of
# llama.cpp's defaults (GGML_NATIVE=ON) dies there with SIGSEGV in ggml_backend_amx_mul_mat
# (llama.cpp issue 20824) while its batch-1 decode runs, so llama-bench tg works and
# llama-server crashes while it warms up.
runs_a_prompt() {
    local rc=0
    "$1/llama-bench" -m "$2" -p 8 -n 0 -r 1 >/dev/null 2>&1 || rc=$?
    [ "$rc" -eq 0 ] && return 0
    why="exit $rc"
    [ "$rc" -gt 128 ] && why="signal $((rc - 128))"
    return 1
}
if [ "$FLAVOR" = server ]; then
    model="${2:?usage: llama-cpp.sh server MODEL}"
    default=$("$0" default)
    runs_a_prompt "$default" "$model" && { echo "$default"; exit 0; }
    first="$why"
    # Only a crash (a signal) is the miscompile; any other failure is the build's or the model's.
    if [ "$first" = "${first#signal}" ]; then
        echo "llama-cpp: llama.cpp's default build cannot run a prompt of $model ($first)" >&2
        exit 1
    fi
    fixed=$("$0" amx-fix)
    if runs_a_prompt "$fixed" "$model"; then
        echo "llama-cpp: llama.cpp's default build dies on a prompt here ($first): the llama-server rows use it built with -fno-dse, as rbee's native build is" >&2
        echo "$fixed"
        exit 0
    fi
    echo "llama-cpp: llama.cpp's default build dies on a prompt here ($first, and $why with -fno-dse): the llama-server rows use the matched build" >&2
    "$0" matched
    exit 0
fi
VERSION=0.3.36
CACHE="${LLAMA_CPP_CACHE:-$HOME/.cache/rbee/llama-cpp}"
DIR="$CACHE/llama-cpp-python-$VERSION-$FLAVOR"
BIN="$DIR/build/bin"

flags=()
matched_flags() {
    flags+=(-DGGML_NATIVE=OFF)
    if [ "$(uname -m)" = x86_64 ]; then
        flags+=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_SSE42=ON)
    fi
}
case "$FLAVOR" in
    default) ;;
    amx-fix) flags+=("-DCMAKE_CXX_FLAGS_RELEASE=-O3 -DNDEBUG -fno-dse") ;;
    matched) matched_flags ;;
    crate | crate-matched)
        [ "$FLAVOR" = crate-matched ] && matched_flags
        # The crate's version from the lock file; its source is in cargo's registry once the
        # project has been built (scripts/setup.sh).
        here="$(cd "$(dirname "$0")/.." && pwd)"
        crate_version=$(awk '/^name = "llama-cpp-sys-2"$/ { getline; gsub(/"/, "", $3); print $3 }' "$here/Cargo.lock")
        src=""
        for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"llama-cpp-sys-2-$crate_version/llama.cpp"; do
            [ -f "$d/CMakeLists.txt" ] && src="$d"
        done
        if [ -z "$src" ]; then
            echo "llama-cpp: no source of llama-cpp-sys-2 $crate_version in cargo's registry (build rbee first: scripts/setup.sh)" >&2
            exit 1
        fi
        DIR="$CACHE/llama-cpp-sys-2-$crate_version-$FLAVOR"
        BIN="$DIR/build/bin"
        if [ ! -x "$BIN/llama-bench" ]; then
            echo "llama-cpp: building llama-bench ($FLAVOR) on llama-cpp-sys-2 $crate_version's vendored llama.cpp (once, a few minutes)" >&2
            mkdir -p "$CACHE"
            tmp=$(mktemp -d)
            trap 'rm -rf "$tmp"' EXIT
            rm -rf "$DIR.part"
            mkdir -p "$DIR.part"
            cp -r "$src/." "$DIR.part"
            # The crate ships llama.cpp's libraries without its tools' sources: llama-bench's
            # comes from the sdist (a slightly older llama.cpp whose llama-bench builds against
            # these libraries), and it is the only tool built.
            python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" "llama-cpp-python==$VERSION"
            tar -xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp" \
                "llama_cpp_python-$VERSION/vendor/llama.cpp/tools/llama-bench"
            rm -rf "$DIR.part/tools/llama-bench"
            cp -r "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp/tools/llama-bench" "$DIR.part/tools/"
            printf 'llama_add_compile_flags()\nadd_subdirectory(llama-bench)\n' > "$DIR.part/tools/CMakeLists.txt"
            cmake -S "$DIR.part" -B "$DIR.part/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
                -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
                -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF ${flags[@]+"${flags[@]}"} >&2
            cmake --build "$DIR.part/build" --target llama-bench -j "$(nproc)" >&2
            rm -rf "$DIR"
            mv "$DIR.part" "$DIR"
        fi
        echo "$BIN"
        exit 0
        ;;
    *) echo "llama-cpp: unknown flavor \`$FLAVOR\` (default, amx-fix, matched, crate or crate-matched)" >&2; exit 2 ;;
esac

if [ ! -x "$BIN/llama-server" ] || [ ! -x "$BIN/llama-bench" ]; then
    echo "llama-cpp: building llama-server and llama-bench ($FLAVOR flags) from llama-cpp-python==$VERSION's vendored llama.cpp (once, a few minutes)" >&2
    mkdir -p "$CACHE"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" "llama-cpp-python==$VERSION"
    rm -rf "$DIR.part"
    mkdir -p "$DIR.part"
    tar -xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$DIR.part" --strip-components=3 \
        "llama_cpp_python-$VERSION/vendor/llama.cpp"
    cmake -S "$DIR.part" -B "$DIR.part/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DBUILD_SHARED_LIBS=OFF ${flags[@]+"${flags[@]}"} >&2
    cmake --build "$DIR.part/build" --target llama-server llama-bench -j "$(nproc)" >&2
    rm -rf "$DIR"
    mv "$DIR.part" "$DIR"
fi
echo "$BIN"
