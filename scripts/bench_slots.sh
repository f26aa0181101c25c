#!/usr/bin/env bash
# What the slot count buys on this machine, in alternating rounds (medians and ranges); prints
# a table and writes bench-slots.json. scripts/bench_llama.sh runs it with CAPS=0.
#
#   a. aggregate decode of 8 concurrent streamed `rbee infer`: the model with `slots` left out
#      (auto: the count the hive derives, shown) against `slots = 4` (the former default)
#   b. (CAPS=1, the default) aggregate decode with 4, 8 and 16 slots under 8 and 16 concurrent
#      requests: where more slots stop adding tokens per second, which sets auto's cap
#   RBEE=path/to/rbee (default: the release build), ROUNDS=5, TOKENS=128, BUDGET=10m, CAPS=1
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rbee/target}"
RBEE="${RBEE:-$CARGO_TARGET_DIR/release/rbee}"
ROUNDS="${ROUNDS:-5}"
TOKENS="${TOKENS:-128}"
BUDGET="${BUDGET:-10m}"
CAPS="${CAPS:-1}"
MODEL="${RBEE_TEST_MODEL:-$HOME/.cache/rbee/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
[ -x "$RBEE" ] || { echo "bench: no rbee at $RBEE (run scripts/setup.sh)" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "bench: no model at $MODEL (run scripts/setup.sh)" >&2; exit 1; }

say() { printf 'bench: %s\n' "$*" >&2; }

work=$(mktemp -d)
cleanup() {
    "$RBEE" hive stop --all >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
export RBEE_CONFIG="$work/nodes.toml" RBEE_HOME="$work/state"
now_ms() { date +%s%3N; }

{
    printf '[models.auto]\npath = "%s"\nsha256 = "%s"\n\n' "$MODEL" "$SHA"
    for s in 4 8 16; do printf '[models.s%s]\npath = "%s"\nsha256 = "%s"\nslots = %s\n\n' "$s" "$MODEL" "$SHA" "$s"; done
    printf '[nodes.local]\ntransport = "local"\nremote_dir = "%s"\nmodels = ["auto", "s4", "s8", "s16"]\n' "$work/node-local"
} > "$work/nodes.toml"

fig() { echo "$1 $2" >> "$work/figures"; }
. scripts/bench_rbee_many.sh
# N concurrent `rbee infer` of MODEL; prints aggregate tokens/s.
rbee_tps() {
    local total ms
    read -r total ms < <(rbee_many "$1" "$2")
    python3 -c "print(round($total / ($ms / 1000), 1))"
}
pct() { python3 -c "print(round(100 * $1 / $2, 1))"; }

"$RBEE" hive start local >/dev/null
models=(auto s4)
[ "$CAPS" = 1 ] && models+=(s8 s16)
for m in "${models[@]}"; do "$RBEE" infer --node local --timeout "$BUDGET" --model "$m" --prompt hi --max-tokens 1 >/dev/null; done
auto_slots=$("$RBEE" --json worker list --node local | python3 -c 'import json,sys; print([w["slots"] for w in json.load(sys.stdin)["workers"] if w["model"] == "auto"][0])')
say "the hive chose $auto_slots slots for the model without \`slots\`"

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq "$ROUNDS"); do
    say "round $round of $ROUNDS: 8-way, auto and slots = 4"
    a=$(rbee_tps 8 auto)
    f=$(rbee_tps 8 s4)
    fig auto_8_tps "$a"; fig four_8_tps "$f"; fig auto_vs_four_8_pct "$(pct "$a" "$f")"
    if [ "$CAPS" = 1 ]; then
        for n in 8 16; do
            say "round $round: $n-way over 4, 8 and 16 slots"
            for s in 4 8 16; do fig "slots_${s}_${n}_tps" "$(rbee_tps "$n" "s$s")"; done
        done
    fi
done
echo "load average (1, 5, 15 min): $load_start at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end"
python3 - "$work/figures" "$ROUNDS" "$TOKENS" "$auto_slots" <<'PY'
import json, statistics, sys
figures = {}
for line in open(sys.argv[1]):
    name, value = line.split()
    figures.setdefault(name, []).append(float(value))
m = {k: round(statistics.median(v), 1) for k, v in figures.items()}
rng = lambda k: f"{min(figures[k])}-{max(figures[k])}"
rows = [(f"a. 8-way aggregate, auto ({sys.argv[4]} slots) / slots = 4",
         f"{m['auto_8_tps']} / {m['four_8_tps']} tokens/s: {m['auto_vs_four_8_pct']}% ({rng('auto_vs_four_8_pct')}%)")]
for n in (8, 16):
    if f"slots_4_{n}_tps" in m:
        rows.append((f"b. {n}-way aggregate over 4 / 8 / 16 slots",
                     " / ".join(f"{m[f'slots_{s}_{n}_tps']} ({rng(f'slots_{s}_{n}_tps')})" for s in (4, 8, 16)) + " tokens/s"))
print(f"{sys.argv[2]} alternating rounds, medians (range); {sys.argv[3]} tokens per generation")
width = max(len(r[0]) for r in rows)
for name, value in rows:
    print(f"{name:<{width}}  {value}")
json.dump({"rounds": int(sys.argv[2]), "auto_slots": int(sys.argv[4]), "medians": m, "runs": figures},
          open("bench-slots.json", "w"), indent=2)
PY
say "wrote bench-slots.json"
