#!/usr/bin/env bash
# rbee against llama.cpp's own tools built the way a user builds them (llama.cpp's CMake
# defaults, scripts/llama-cpp.sh default), on this machine, in alternating rounds; prints a
# table and writes bench-llama.json. Each ratio is taken within a round, so the machine's drift
# cancels; the table gives the median of the rounds' ratios and their range.
#
#   a. decode: llama-bench tg128 against rbee's decode rate taken as a user sees it, from wall
#      times: (tokens of a 128-token `infer` - 1) / (its wall time - a 1-token `infer`'s)
#   b. the same llama-bench built with the CPU flags of the llama.cpp inside rbee
#      (scripts/llama-cpp.sh matched): what llama-cpp-sys-2's build flags give up
#   b2. where the rest of a. goes, each in the same round: llama-bench built from the llama.cpp
#      inside rbee (llama-cpp-sys-2's vendored tree, a newer llama.cpp than the sdist's;
#      scripts/llama-cpp.sh crate and crate-matched) against the sdist's, with the defaults and
#      with rbee's flags: what the version changes; the raw engine decoding one sequence as rbee
#      drives it (`cargo bench --bench engine -- --decode 1`: 4096-token context, a greedy
#      sampler over the vocabulary, a token at a time) against that llama-bench with rbee's
#      flags: the engine's loop; and rbee against the raw engine: the worker's HTTP side, the
#      hive and the CLI
#   c. aggregate decode of 4 and 8 concurrent streamed requests: `rbee infer` against
#      `llama-server --parallel 4` and `--parallel 8`; rbee's model has 4 slots for the 4-way
#      row and 8 for the 8-way row, as many as llama-server's
#      and the same with `kv_unified = true` (one KV cache shared by the slots, as llama-server
#      has it) against the same servers: what bit-identical batching costs
#   d. the per-token cost of the hive's proof: signing and verifying one stream event
#      (`cargo bench --bench auth`)
#   e. CPU time per generated token of the hive, the CLI and the worker during a decode
#      (scripts/cpu_per_token.py): on 2 cores every CPU ms of the relay and the CLI is taken
#      from the 2 decode threads
#   f. 8-way aggregate with `slots` left out (auto) against `slots = 4` (scripts/bench_slots.sh
#      with CAPS=0, the same ROUNDS)
#   g. the ceiling of c.: the raw engine (llama-cpp-2 in-process, `cargo bench --bench engine
#      --batched N`) decoding N sequences in lockstep, no prefill, HTTP or relay, against the
#      same llama-server in the same round; rbee runs this engine, so its c. rows stay under it
#   h. decode under a JSON grammar (`--format json`) against free text, the worker's own
#      decode rate of each (`decode_tokens_per_s`), the same prompt and 64 tokens at most
#   RBEE=path/to/rbee (default: the release build; RBEE_NATIVE=1 scripts/setup.sh builds one for
#   this CPU into ~/.cache/rbee/target-native), ROUNDS=7, TOKENS=128, BUDGET=10m,
#   DECODE_ONLY=1 (rows a, b and b2 alone: a few seconds a round)
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rbee/target}"
RBEE="${RBEE:-$CARGO_TARGET_DIR/release/rbee}"
ROUNDS="${ROUNDS:-7}"
DECODE_ONLY="${DECODE_ONLY:-0}"
TOKENS="${TOKENS:-128}"
# Each request's budget: on a machine busy with other work a 128-token generation can outlast
# infer's default minute.
BUDGET="${BUDGET:-10m}"
MODEL="${RBEE_TEST_MODEL:-$HOME/.cache/rbee/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
[ -x "$RBEE" ] || { echo "bench: no rbee at $RBEE (run scripts/setup.sh)" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "bench: no model at $MODEL (run scripts/setup.sh)" >&2; exit 1; }

say() { printf 'bench: %s\n' "$*" >&2; }

DEFAULT_BIN=$(scripts/llama-cpp.sh default)
MATCHED_BIN=$(scripts/llama-cpp.sh matched)
# Rows b2 need llama-cpp-sys-2's source in cargo's registry; without it they are left out.
CRATE_BIN=$(scripts/llama-cpp.sh crate) || { say "rows b2 left out: no llama-bench on rbee's llama.cpp"; CRATE_BIN=""; }
CRATE_MATCHED_BIN=""
[ -z "$CRATE_BIN" ] || CRATE_MATCHED_BIN=$(scripts/llama-cpp.sh crate-matched) || { say "rows b2 left out"; CRATE_BIN=""; CRATE_MATCHED_BIN=""; }
SERVER_BIN=""
[ "$DECODE_ONLY" = 1 ] || SERVER_BIN=$(scripts/llama-cpp.sh server "$MODEL")
case "$SERVER_BIN" in
    "") server_build="not measured (DECODE_ONLY)" ;;
    "$DEFAULT_BIN") server_build="defaults" ;;
    *-amx-fix/*) server_build="defaults and -fno-dse (the default build dies on a prompt here)" ;;
    *) server_build="build with rbee's flags (the default build dies on a prompt here)" ;;
esac
say "building the signing and raw engine benchmarks"
nice -n 10 cargo bench --quiet --bench auth --no-run 2>/dev/null
ENGINE=$(scripts/bench_engine.sh)

work=$(mktemp -d)
cleanup() {
    "$RBEE" hive stop --all >/dev/null 2>&1 || true
    # The servers are started inside $(...), a subshell: their pids come back through a file.
    [ -f "$work/pids" ] && while read -r p; do kill "$p" 2>/dev/null || true; done < "$work/pids"
    rm -rf "$work"
}
trap cleanup EXIT
export RBEE_CONFIG="$work/nodes.toml" RBEE_HOME="$work/state"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }
threads=$(nproc)

cat > "$work/nodes.toml" <<TOML
[models.smollm2]
path = "$MODEL"
sha256 = "$SHA"
slots = 4

[models.smollm2-8]
path = "$MODEL"
sha256 = "$SHA"
slots = 8

[models.smollm2-u]
path = "$MODEL"
sha256 = "$SHA"
slots = 4
kv_unified = true

[models.smollm2-u8]
path = "$MODEL"
sha256 = "$SHA"
slots = 8
kv_unified = true

[nodes.local]
transport = "local"
remote_dir = "$work/node-local"
hive_port = $(free_port)
models = ["smollm2", "smollm2-8", "smollm2-u", "smollm2-u8"]
TOML

# A figure a round could not take (a failed run, a rate the worker did not report) is left out
# of that round and said; the summary shows the rounds that have it.
fig() {
    case "$2" in
        "" | None | null | nan) say "no figure for $1 in this round" ;;
        *) echo "$1 $2" >> "$work/figures" ;;
    esac
}
. scripts/bench_rbee_many.sh

"$RBEE" hive start local >/dev/null
warm=(smollm2 smollm2-8 smollm2-u smollm2-u8)
[ "$DECODE_ONLY" = 1 ] && warm=(smollm2)
for m in "${warm[@]}"; do "$RBEE" infer --node local --timeout "$BUDGET" --model "$m" --prompt hi --max-tokens 1 >/dev/null; done

start_server() {
    local port
    port=$(free_port)
    "$SERVER_BIN/llama-server" -m "$MODEL" -c $((4096 * $1)) --parallel "$1" -t "$threads" \
        --host 127.0.0.1 --port "$port" >"$work/llama-server-$1.log" 2>&1 &
    echo $! >> "$work/pids"
    for _ in $(seq 150); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
    echo "$port"
}
if [ "$DECODE_ONLY" != 1 ]; then
    ls4=$(start_server 4)
    ls8=$(start_server 8)
fi

# N concurrent streamed requests to llama-server at PORT; prints tokens generated and wall ms.
ls_many() {
    python3 scripts/ls_many.py "$1" "$2" "$TOKENS" "${PROMPTS[@]}"
}
llama_bench() {
    "$1/llama-bench" -m "$MODEL" -p 0 -n "$TOKENS" -r 3 -t "$threads" -o json 2>/dev/null \
        | python3 -c 'import json,sys; print(round(json.load(sys.stdin)[0]["avg_ts"], 1))'
}
# rbee's decode rate from wall times, as a user measures it.
rbee_decode() {
    local t0 t1 t2
    t0=$(now_ms)
    "$RBEE" --json infer --node local --timeout "$BUDGET" --prompt "${PROMPTS[0]}" --max-tokens 1 --temperature 0 >/dev/null
    t1=$(now_ms)
    "$RBEE" --json infer --node local --timeout "$BUDGET" --prompt "${PROMPTS[0]}" --max-tokens "$TOKENS" --temperature 0 > "$work/long.json"
    t2=$(now_ms)
    python3 -c "print(round(($(done_field "$work/long.json" tokens_out) - 1) / (($t2 - $t1 - ($t1 - $t0)) / 1000), 1))"
}
tps() { python3 -c "print(round($1 / ($2 / 1000), 1))"; }
pct() { python3 -c "print(round(100 * $1 / $2, 1))"; }

# The machine is shared: the load averages at the start and the end say how quiet it was.
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq "$ROUNDS"); do
    say "round $round of $ROUNDS: llama-bench (the sdist's and rbee's llama.cpp, default and matched flags), raw engine, rbee decode"
    lb=$(llama_bench "$DEFAULT_BIN")
    rb=$(rbee_decode)
    lbm=$(llama_bench "$MATCHED_BIN")
    lbc="" lbcm=""
    [ -z "$CRATE_BIN" ] || lbc=$(llama_bench "$CRATE_BIN")
    raw1=$({ RBEE_TEST_MODEL="$MODEL" "$ENGINE" --bench --decode 1 2>/dev/null || true; } \
        | sed -nE 's/^raw engine decode: ([0-9.]+) tokens.*/\1/p')
    [ -z "$CRATE_MATCHED_BIN" ] || lbcm=$(llama_bench "$CRATE_MATCHED_BIN")
    fig llama_bench_tps "$lb"; fig rbee_wall_decode_tps "$rb"; fig llama_bench_matched_tps "$lbm"
    fig llama_bench_crate_tps "$lbc"; fig llama_bench_crate_matched_tps "$lbcm"; fig raw_1_tps "$raw1"
    fig decode_vs_llama_bench_pct "$(pct "$rb" "$lb")"
    fig decode_vs_matched_pct "$(pct "$rb" "$lbm")"
    fig matched_vs_default_pct "$(pct "$lbm" "$lb")"
    if [ -n "$lbc" ] && [ -n "$lbcm" ]; then
        fig crate_vs_default_pct "$(pct "$lbc" "$lb")"
        fig crate_matched_vs_matched_pct "$(pct "$lbcm" "$lbm")"
        [ -z "$raw1" ] || fig raw_1_vs_crate_matched_pct "$(pct "$raw1" "$lbcm")"
    fi
    [ -z "$raw1" ] || fig decode_vs_raw_1_pct "$(pct "$rb" "$raw1")"
    [ "$DECODE_ONLY" = 1 ] && continue
    declare -A rate=()
    json_prompt="Describe a dragon as a JSON object with its name, color, age and a long story."
    for f in text json; do
        extra=(); [ "$f" = json ] && extra=(--format json)
        # `${extra[@]+...}`: an empty array is "unbound" to bash before 4.4 under `set -u`.
        "$RBEE" --json infer --node local --timeout "$BUDGET" --prompt "$json_prompt" --max-tokens 64 \
            --temperature 0 ${extra[@]+"${extra[@]}"} > "$work/$f.json" || say "the $f infer failed"
        rate[$f]=$(done_field "$work/$f.json" decode_tokens_per_s 2>/dev/null || true)
        fig "${f}_decode_tps" "$(python3 -c "print(round(float('${rate[$f]}'), 1))" 2>/dev/null || true)"
    done
    if [ -n "${rate[json]}" ] && [ -n "${rate[text]}" ]; then
        fig json_vs_text_pct "$(pct "${rate[json]}" "${rate[text]}" 2>/dev/null || true)"
    fi
    read -r hc cc wc < <(python3 scripts/cpu_per_token.py "$RBEE" "$work/node-local/hive.pid" "$TOKENS" "${PROMPTS[0]}")
    fig hive_cpu_us "$hc"; fig cli_cpu_us "$cc"; fig worker_cpu_us "$wc"
    for n in 4 8; do
        say "round $round: $n-way, rbee and llama-server --parallel $n"
        model=smollm2; [ "$n" -eq 8 ] && model=smollm2-8
        port=$ls4; [ "$n" -eq 8 ] && port=$ls8
        read -r rt rms < <(rbee_many "$n" "$model")
        read -r lt lms < <(ls_many "$port" "$n")
        fig "rbee_${n}_tps" "$(tps "$rt" "$rms")"; fig "llama_server_${n}_tps" "$(tps "$lt" "$lms")"
        fig "rbee_vs_llama_server_${n}_pct" "$(pct "$(tps "$rt" "$rms")" "$(tps "$lt" "$lms")")"
        model=smollm2-u; [ "$n" -eq 8 ] && model=smollm2-u8
        read -r ut ums < <(rbee_many "$n" "$model")
        fig "rbee_unified_${n}_tps" "$(tps "$ut" "$ums")"
        fig "rbee_unified_vs_llama_server_${n}_pct" "$(pct "$(tps "$ut" "$ums")" "$(tps "$lt" "$lms")")"
        raw=$({ RBEE_TEST_MODEL="$MODEL" "$ENGINE" --bench --batched "$n" 2>/dev/null || true; } \
            | sed -nE 's/^raw engine batched: [0-9]+ sequences, aggregate decode ([0-9.]+).*/\1/p')
        fig "raw_${n}_tps" "$raw"
        if [ -n "$raw" ]; then
            fig "raw_vs_llama_server_${n}_pct" "$(pct "$raw" "$(tps "$lt" "$lms")")"
        fi
    done
done
say "signing and verifying one stream event"
{ cargo bench --quiet --bench auth 2>/dev/null || say "cargo bench --bench auth failed"; } | sed -nE 's/^token event: sign +([0-9.]+) us, verify +([0-9.]+) us.*/\1 \2/p' \
    | { read -r s v; fig event_sign_us "$s"; fig event_verify_us "$v"; }

touch "$work/figures"
echo "load average (1, 5, 15 min): $load_start at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end"
# Which rbee: the portable build, or one for this CPU (RBEE_NATIVE=1); rows d and g are built
# into $CARGO_TARGET_DIR with its flags, whatever RBEE is.
"$RBEE" --json version | python3 -c 'import json,sys; v=json.load(sys.stdin); print("rbee:", "built for this CPU (-C target-cpu=native)" if v.get("native") else "the portable build (llama.cpp default x86-64 set)")'
python3 - "$work/figures" "$ROUNDS" "$TOKENS" "$server_build" "$DECODE_ONLY" <<'PY'
import json, statistics, sys
figures = {}
for line in open(sys.argv[1]):
    name, value = line.split()
    figures.setdefault(name, []).append(float(value))
m = {k: round(statistics.median(v), 1) for k, v in figures.items()}


class Missing(dict):
    """A figure no round took reads as n/a in its row rather than ending the summary."""

    def __missing__(self, key):
        return "n/a"


m = Missing(m)
rng = lambda k: f"{min(figures[k])}-{max(figures[k])}" if k in figures else "n/a"
rows = [
    (f"a. llama-bench tg{sys.argv[3]}, llama.cpp's defaults", f"{m['llama_bench_tps']} tokens/s"),
    ("a. rbee infer decode (wall times)", f"{m['rbee_wall_decode_tps']} tokens/s: {m['decode_vs_llama_bench_pct']}% of llama-bench (median of rounds, {rng('decode_vs_llama_bench_pct')}%)"),
    (f"b. llama-bench tg{sys.argv[3]}, rbee's llama.cpp flags", f"{m['llama_bench_matched_tps']} tokens/s: {m['matched_vs_default_pct']}% of the defaults ({rng('matched_vs_default_pct')}%)"),
    ("b. rbee infer decode / llama-bench with rbee's flags", f"{m['decode_vs_matched_pct']}% ({rng('decode_vs_matched_pct')}%)"),
    ("b2. llama-bench on rbee's llama.cpp / on the sdist's, defaults", f"{m['llama_bench_crate_tps']} tokens/s: {m['crate_vs_default_pct']}% ({rng('crate_vs_default_pct')}%)"),
    ("b2. the same with rbee's flags", f"{m['llama_bench_crate_matched_tps']} tokens/s: {m['crate_matched_vs_matched_pct']}% ({rng('crate_matched_vs_matched_pct')}%)"),
    ("b2. raw engine, one sequence / llama-bench on rbee's llama.cpp and flags", f"{m['raw_1_tps']} tokens/s: {m['raw_1_vs_crate_matched_pct']}% ({rng('raw_1_vs_crate_matched_pct')}%)"),
    ("b2. rbee infer decode / raw engine, one sequence", f"{m['decode_vs_raw_1_pct']}% ({rng('decode_vs_raw_1_pct')}%)"),
]
decode_only = sys.argv[5] == "1"
for n in () if decode_only else (4, 8):
    rows.append((f"c. {n}-way aggregate, rbee / llama-server --parallel {n}",
                 f"{m[f'rbee_{n}_tps']} / {m[f'llama_server_{n}_tps']} tokens/s: {m[f'rbee_vs_llama_server_{n}_pct']}% ({rng(f'rbee_vs_llama_server_{n}_pct')}%)"))
for n in () if decode_only else (4, 8):
    rows.append((f"c. {n}-way, rbee with kv_unified = true", f"{m[f'rbee_unified_{n}_tps']} tokens/s: {m[f'rbee_unified_vs_llama_server_{n}_pct']}% of llama-server ({rng(f'rbee_unified_vs_llama_server_{n}_pct')}%)"))
for n in () if decode_only else (4, 8):
    rows.append((f"g. {n}-way ceiling: raw engine in lockstep / llama-server", f"{m[f'raw_{n}_tps']} tokens/s: {m[f'raw_vs_llama_server_{n}_pct']}% ({rng(f'raw_vs_llama_server_{n}_pct')}%)"))
if not decode_only:
    rows.append(("h. decode under --format json / free text", f"{m['json_decode_tps']} / {m['text_decode_tps']} tokens/s: {m['json_vs_text_pct']}% ({rng('json_vs_text_pct')}%)"))
if "event_sign_us" in m:
    rows.append(("d. one stream event: sign / verify", f"{m['event_sign_us']} / {m['event_verify_us']} us"))
if not decode_only:
    rows.append(("e. CPU per token: hive / CLI / worker", f"{m['hive_cpu_us']} / {m['cli_cpu_us']} / {m['worker_cpu_us']} us ({rng('hive_cpu_us')} / {rng('cli_cpu_us')} us)"))
print(f"{sys.argv[2]} alternating rounds, medians of per-round ratios; {sys.argv[3]} tokens per generation")
if not decode_only:
    print(f"llama-server (rows c, g): llama.cpp's {sys.argv[4]}")
width = max(len(r[0]) for r in rows)
for name, value in rows:
    print(f"{name:<{width}}  {value}")
json.dump({"rounds": int(sys.argv[2]), "llama_server_build": sys.argv[4], "medians": m, "runs": figures}, open("bench-llama.json", "w"), indent=2)
PY
say "wrote bench-llama.json"
[ "$DECODE_ONLY" = 1 ] && exit 0
say "f. auto slots against slots = 4"
CAPS=0 ROUNDS="$ROUNDS" TOKENS="$TOKENS" BUDGET="$BUDGET" RBEE="$RBEE" scripts/bench_slots.sh
