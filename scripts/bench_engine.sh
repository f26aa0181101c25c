#!/usr/bin/env bash
# Builds the raw engine benchmark (`cargo bench --bench engine`, llama-cpp-2 in-process with no
# rbee code) and prints its executable, for the scripts that alternate it with other runs
# (bench.sh, bench_llama.sh). Uses CARGO_TARGET_DIR as the caller set it.
set -euo pipefail
cd "$(dirname "$0")/.."
nice -n 10 cargo bench --quiet --bench engine --no-run 2>/dev/null
cargo bench --quiet --bench engine --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="engine" and m.get("executable"): print(m["executable"])'
