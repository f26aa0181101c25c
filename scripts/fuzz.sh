#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (default 60s each) and prints the executions and
# crashes. Needs cargo-fuzz (`cargo install cargo-fuzz`); rbee builds on stable Rust, so the
# fuzzer's unstable flags are enabled with RUSTC_BOOTSTRAP. Crashes land in fuzz/artifacts/.
#   ./scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(signature_header nodes_toml sse_stream)
export RUSTC_BOOTSTRAP=1
target_dir="${CARGO_TARGET_DIR:-$HOME/.cache/rbee/target}-fuzz"
status=0
for t in "${targets[@]}"; do
    log=$(mktemp)
    if cargo fuzz run --sanitizer none --target-dir "$target_dir" "$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result=CRASH
        status=1
    fi
    execs=$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}')
    echo "fuzz: $t: ${execs:-?} executions in ${seconds}s: $result"
    [ "$result" = ok ] || tail -n 30 "$log"
    rm -f "$log"
done
exit $status
