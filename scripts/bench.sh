#!/usr/bin/env bash
# rbee against the engine it wraps and against llama.cpp's own llama-server, on this machine,
# in one run. Nodes are real sshd instances on loopback. Prints a table and writes bench.json.
#
#   1. raw engine (llama-cpp-2 in-process, `cargo bench --bench engine`): prefill, decode
#   2. `rbee infer` on a local node, warm: decode tokens/s, and its ratio to (1), taken pair by
#      pair (a raw run, then an rbee run of the same prompt) so that the machine's drift cancels
#   3. warm `rbee infer --max-tokens 1`, local and through an SSH node, minus the raw engine's
#      time to the first token: rbee's fixed cost per invocation
#   4. aggregate decode tokens/s of 1, 2, 4 and 8 concurrent `rbee infer` on one node, and
#      whether each text at temperature 0 is the one the request gives alone
#   5. cold: `hive start` until ready; the first `infer` including the model load
#   6. `hive status` wall time over 1 and 8 SSH nodes
#   7. resident memory of an idle hive and of a worker with the model loaded
#   8. llama-server --parallel 4, built with llama.cpp's own CMake defaults (scripts/llama-cpp.sh
#      builds it once; where that build dies on a prompt, the one `llama-cpp.sh server` names on
#      stderr): 1-token request
#      latency (curl) and 4-way streamed aggregate throughput
#   9. how far past `--timeout 1s` an invocation ends, local and SSH (OVERSHOOT_RUNS each)
#  10. rbee batch of 16 items over one node against the same 16 as waves of 4 concurrent infer
#  11. routing: warm `infer --max-tokens 1 --model M` (every node a candidate, probed at once)
#      against `--node local`
#  13, 14. scripts/bench_fleet.sh, run at the end (and runnable alone): warm 1-token infer over
#      SSH with the persistent connection against `local`, and `hive status` over 32 SSH
#      nodes against 1
#  12. the OpenAI API with the openai SDK (scripts/bench_serve.py), `rbee serve` over the local
#      node against llama-server --parallel 4: time to the first streamed token, and 4-way
#      streamed aggregate decode
#  13. scripts/bench_llama.sh (BENCH_LLAMA=0 skips it): rbee against llama-bench and
#      llama-server --parallel 4 and 8 built with llama.cpp's defaults (or as row 8 says), in
#      alternating rounds
# Figures that move with the machine's load (1-4, 8) are measured in ROUNDS interleaved rounds
# and reported as medians; latencies are medians of LATENCY_RUNS per round.
#   RBEE=path/to/rbee (default: the release build), ROUNDS=3, DECODE_PAIRS=4 (per round),
#   LATENCY_RUNS=10, TOKENS=128, OVERSHOOT_RUNS=10
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rbee/target}"
RBEE="${RBEE:-$CARGO_TARGET_DIR/release/rbee}"
ROUNDS="${ROUNDS:-3}"
DECODE_PAIRS="${DECODE_PAIRS:-4}"
LATENCY_RUNS="${LATENCY_RUNS:-10}"
TOKENS="${TOKENS:-128}"
OVERSHOOT_RUNS="${OVERSHOOT_RUNS:-10}"
MODEL="${RBEE_TEST_MODEL:-$HOME/.cache/rbee/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SSH_NODES=8
[ -x "$RBEE" ] || { echo "bench: no rbee at $RBEE (run scripts/setup.sh)" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "bench: no model at $MODEL (run scripts/setup.sh)" >&2; exit 1; }
command -v curl >/dev/null || { echo "bench: needs curl" >&2; exit 1; }

say() { printf 'bench: %s\n' "$*" >&2; }

# llama.cpp's defaults, or where that build dies on a prompt the defaults with -fno-dse, else the
# matched build (scripts/llama-cpp.sh says which).
LLAMA_SERVER="$(scripts/llama-cpp.sh server "$MODEL")/llama-server"
say "building the raw engine benchmark"
ENGINE=$(scripts/bench_engine.sh)

work=$(mktemp -d)
pids=()
cleanup() {
    "$RBEE" hive stop --all >/dev/null 2>&1 || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
export RBEE_CONFIG="$work/nodes.toml" RBEE_HOME="$work/state"
[ "$(id -u)" -eq 0 ] && mkdir -p /run/sshd

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }
threads=$(nproc)

ssh-keygen -q -t ed25519 -N '' -f "$work/client"
cat > "$work/nodes.toml" <<TOML
[models.smollm2]
path = "$MODEL"
sha256 = "$SHA"
# The rows below compare waves of 4 with batch over 4 slots (scripts/bench_slots.sh measures
# auto slots).
slots = 4

[defaults]
user = "$(id -un)"
identity_file = "$work/client"
known_hosts = "$work/known_hosts"

[nodes.local]
transport = "local"
remote_dir = "$work/node-local"
hive_port = $(free_port)
models = ["smollm2"]
TOML
for i in $(seq "$SSH_NODES"); do
    d="$work/sshd$i"; mkdir -p "$d"
    ssh-keygen -q -t ed25519 -N '' -f "$d/host"
    cp "$work/client.pub" "$d/authorized_keys"
    port=$(free_port)
    cat > "$d/config" <<CFG
Port $port
ListenAddress 127.0.0.1
HostKey $d/host
AuthorizedKeysFile $d/authorized_keys
PidFile $d/pid
UsePAM no
StrictModes no
PasswordAuthentication no
PermitRootLogin prohibit-password
LogLevel ERROR
CFG
    /usr/sbin/sshd -D -e -f "$d/config" 2>"$d/log" &
    pids+=($!)
    echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$d/host.pub")" >> "$work/known_hosts"
    cat >> "$work/nodes.toml" <<TOML

[nodes.ssh$i]
host = "127.0.0.1"
port = $port
remote_dir = "$work/node-ssh$i"
hive_port = $(free_port)
models = ["smollm2"]
TOML
done
sleep 1

# Figures go to $work/figures as `name value` lines, one per measurement; medians at the end.
fig() { echo "$1 $2" >> "$work/figures"; }
# Wall milliseconds of a command; its stdout goes to $work/last.
timed() { local t0 t1; t0=$(now_ms); "$@" >"$work/last" 2>"$work/last.err" || true; t1=$(now_ms); echo $((t1 - t0)); }
median() { python3 -c 'import sys,statistics; print(round(statistics.median(float(x) for x in sys.argv[1:]),1))' "$@"; }

PROMPTS=("Write a long story about a dragon." "Write a long essay about bicycles."
         "Write a long story about the sea." "Write a long essay about copper.")
done_field() { python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])[sys.argv[2]])" "$@"; }
# Milliseconds the worker spent in llama.cpp (prefill and decode) for a `--json infer` output.
engine_ms() { python3 -c "import json,sys; t=json.loads(open(sys.argv[1]).read().splitlines()[-1])['timings_ms']; print(t['prefill']+t['decode'])" "$1"; }
text_of() { python3 -c "import json,sys; print(''.join(json.loads(l).get('text','') for l in open(sys.argv[1]) if json.loads(l)['event']=='token'), end='')" "$1"; }

say "cold: hive start, first infer with the model load"
fig cold_hive_start_ms "$(timed "$RBEE" hive start local)"
hive_pid=$(head -1 "$work/node-local/hive.pid")
fig hive_idle_rss_mb "$(awk '/VmRSS/ {print $2/1024}' "/proc/$hive_pid/status")"
fig cold_first_infer_ms "$(timed "$RBEE" infer --node local --prompt hi --max-tokens 1)"

say "alone at temperature 0: the reference texts"
for i in 0 1 2 3; do
    "$RBEE" --json infer --node local --prompt "${PROMPTS[$i]}" --max-tokens "$TOKENS" --temperature 0 > "$work/alone$i.json"
    text_of "$work/alone$i.json" > "$work/alone$i.txt"
done
worker_pid=$(done_field "$work/alone0.json" worker_pid)
fig worker_loaded_rss_mb "$(awk '/VmRSS/ {print $2/1024}' "/proc/$worker_pid/status")"

say "llama-server --parallel 4"
ls_port=$(free_port)
"$LLAMA_SERVER" -m "$MODEL" -c $((4096 * 4)) --parallel 4 -t "$threads" --host 127.0.0.1 \
    --port "$ls_port" >"$work/llama-server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ls_port/health" >/dev/null && break; sleep 0.2; done
ls_one() {
    curl -sf "http://127.0.0.1:$ls_port/v1/chat/completions" -H 'content-type: application/json' \
        -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":1,"temperature":0}'
}
ls_one >/dev/null
# N concurrent streamed requests; prints the tokens they generated and the wall milliseconds.
ls_many() {
    python3 scripts/ls_many.py "$ls_port" "$1" "$TOKENS" "${PROMPTS[@]}"
}

"$RBEE" hive start ssh1 >/dev/null

say "rbee serve over the local node"
# Its own nodes.toml: the local node alone (the same hive), so that no SSH node is probed.
sed -n '1,/^\[nodes.local\]/p' "$work/nodes.toml" > "$work/serve.toml"
sed -n '/^\[nodes.local\]/,/^$/p' "$work/nodes.toml" | tail -n +2 >> "$work/serve.toml"
sv_key=$(RBEE_CONFIG="$work/serve.toml" "$RBEE" --json serve key create bench \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
sv_port=$(free_port)
RBEE_CONFIG="$work/serve.toml" "$RBEE" serve --listen "127.0.0.1:$sv_port" 2>"$work/serve.log" &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$sv_port/health" >/dev/null && break; sleep 0.2; done
"$RBEE" infer --node ssh1 --prompt hi --max-tokens 1 >/dev/null

for round in $(seq "$ROUNDS"); do
    say "round $round of $ROUNDS: raw engine"
    raw=$(RBEE_TEST_MODEL="$MODEL" "$ENGINE" --bench 2>/dev/null)
    fig raw_prefill_tps "$(echo "$raw" | sed -nE 's/^raw engine: prefill ([0-9.]+) tokens.*/\1/p')"
    fig raw_prefill_tokens "$(echo "$raw" | sed -nE 's/^raw engine: prefill [0-9.]+ tokens\/s \(([0-9]+) tokens.*/\1/p')"
    fig raw_first_token_ms "$(echo "$raw" | sed -nE 's/^raw engine first token: ([0-9.]+) ms.*/\1/p')"
    for n in 2 4 8; do
        fig "raw_batched_${n}_tps" "$(echo "$raw" | sed -nE "s/^raw engine batched: $n sequences, aggregate decode ([0-9.]+).*/\1/p")"
    done

    say "round $round: raw engine and rbee decode, $DECODE_PAIRS pairs"
    # Output goes to a file: a pipe would add a process that wakes at every token.
    for _ in $(seq "$DECODE_PAIRS"); do
        r=$(RBEE_TEST_MODEL="$MODEL" "$ENGINE" --bench --decode 1 2>/dev/null | sed -nE 's/^raw engine decode: ([0-9.]+).*/\1/p')
        "$RBEE" --json infer --node local --prompt "${PROMPTS[1]}" --max-tokens "$TOKENS" --temperature 0 > "$work/one.json"
        b=$(done_field "$work/one.json" decode_tokens_per_s)
        fig raw_decode_tps "$r"
        fig rbee_decode_tps "$b"
        fig decode_ratio_pct "$(python3 -c "print(round(100 * $b / $r, 1))")"
    done

    say "round $round: rbee concurrency 1 2 4 8"
    for n in 1 2 4 8; do
        t0=$(now_ms)
        clients=()
        for i in $(seq 0 $((n - 1))); do
            "$RBEE" --json infer --node local --prompt "${PROMPTS[$((i % 4))]}" --max-tokens "$TOKENS" --temperature 0 > "$work/c$i.json" &
            clients+=($!)
        done
        wait "${clients[@]}"
        t1=$(now_ms)
        total=0
        for i in $(seq 0 $((n - 1))); do
            total=$((total + $(done_field "$work/c$i.json" tokens_out)))
            text_of "$work/c$i.json" > "$work/c$i.txt"
            if ! cmp -s "$work/c$i.txt" "$work/alone$((i % 4)).txt"; then fig "differs_${n}" 1; fi
        done
        fig "rbee_concurrent_${n}_tps" "$(python3 -c "print(round($total / (($t1 - $t0) / 1000), 1))")"
    done

    say "round $round: rbee batch over one node against 4 concurrent infer"
    printf '%s\n' "${PROMPTS[@]:0:4}" > "$work/prompts"
    python3 -c "import json; [print(json.dumps({'id': i, 'prompt': p, 'max_tokens': $TOKENS, 'temperature': 0})) for i, p in enumerate(open('$work/prompts').read().splitlines() * 4)]" > "$work/batch.jsonl"
    rm -f "$work/batch.out"
    t0=$(now_ms)
    "$RBEE" batch --node local --output "$work/batch.out" "$work/batch.jsonl" 2>/dev/null || true
    t1=$(now_ms)
    total=$(python3 -c "import json; print(sum(json.loads(l).get('tokens_out', 0) for l in open('$work/batch.out')))")
    fig batch_16_tps "$(python3 -c "print(round($total / (($t1 - $t0) / 1000), 1))")"
    t0=$(now_ms); total=0
    for wave in 0 1 2 3; do
        clients=()
        for i in 0 1 2 3; do
            "$RBEE" --json infer --node local --prompt "${PROMPTS[$i]}" --max-tokens "$TOKENS" --temperature 0 > "$work/w$i.json" &
            clients+=($!)
        done
        wait "${clients[@]}"
        for i in 0 1 2 3; do total=$((total + $(done_field "$work/w$i.json" tokens_out))); done
    done
    t1=$(now_ms)
    fig infer_waves_16_tps "$(python3 -c "print(round($total / (($t1 - $t0) / 1000), 1))")"

    say "round $round: llama-server 4-way"
    read -r ls_tokens ls_ms < <(ls_many 4)
    fig llama_server_4_tps "$(python3 -c "print(round($ls_tokens / ($ls_ms / 1000), 1))")"

    say "round $round: the OpenAI API with the openai SDK: rbee serve, llama-server"
    read -r sv_ttft sv_tps < <(python3 scripts/bench_serve.py "http://127.0.0.1:$sv_port/v1" \
        "$sv_key" smollm2 4 "$TOKENS" "$LATENCY_RUNS" "${PROMPTS[@]}")
    read -r lss_ttft lss_tps < <(python3 scripts/bench_serve.py "http://127.0.0.1:$ls_port/v1" \
        none smollm2 4 "$TOKENS" "$LATENCY_RUNS" "${PROMPTS[@]}")
    fig serve_ttft_ms "$sv_ttft"; fig serve_4_tps "$sv_tps"
    fig llama_server_sdk_ttft_ms "$lss_ttft"; fig llama_server_sdk_4_tps "$lss_tps"

    say "round $round: warm 1-token latency, local, SSH, llama-server"
    loc=(); tun=(); lsl=(); eng=(); rtd=()
    for _ in $(seq "$LATENCY_RUNS"); do
        loc+=("$(timed "$RBEE" --json infer --node local --prompt hi --max-tokens 1 --temperature 0)")
        eng+=("$(engine_ms "$work/last")")
        tun+=("$(timed "$RBEE" --json infer --node ssh1 --prompt hi --max-tokens 1 --temperature 0)")
        eng+=("$(engine_ms "$work/last")")
        lsl+=("$(timed ls_one)")
        # Routed: every node serving the model is a candidate, the loaded local one is chosen.
        rtd+=("$(timed "$RBEE" --json infer --model smollm2 --prompt hi --max-tokens 1 --temperature 0)")
    done
    fig infer1_routed_ms "$(median "${rtd[@]}")"
    fig infer1_local_ms "$(median "${loc[@]}")"
    fig infer1_ssh_ms "$(median "${tun[@]}")"
    fig infer1_engine_ms "$(median "${eng[@]}")"
    fig llama_server_1_ms "$(median "${lsl[@]}")"
done

say "hive status over 1 and $SSH_NODES SSH nodes"
all=()
for i in $(seq "$SSH_NODES"); do all+=("ssh$i"); done
for _ in 1 2 3 4 5; do
    fig status_1_ms "$(timed "$RBEE" hive status ssh1)"
    fig "status_${SSH_NODES}_ms" "$(timed "$RBEE" hive status "${all[@]}")"
done

say "deadline overshoot, $OVERSHOOT_RUNS runs each, local and SSH"
endless=(--prompt "Tell me a story." --temperature 5 --top-p 1 --max-tokens 100000 --timeout 1s)
for _ in $(seq "$OVERSHOOT_RUNS"); do
    fig overshoot_local_ms "$(( $(timed "$RBEE" infer --node local "${endless[@]}") - 1000 ))"
    fig overshoot_ssh_ms "$(( $(timed "$RBEE" infer --node ssh1 "${endless[@]}") - 1000 ))"
done

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
python3 - "$work/figures" "$cpu" "$(nproc)" "$(free -g | awk '/Mem:/ {print $2}')" "$ROUNDS" "$TOKENS" "$SSH_NODES" <<'PY'
import json, statistics, sys
figures = {}
for line in open(sys.argv[1]):
    name, value = line.split()
    figures.setdefault(name, []).append(float(value))
m = {k: round(statistics.median(v), 1) for k, v in figures.items()}
cpu, cores, mem, rounds, tokens, nodes = sys.argv[2:]
ratio = lambda a, b: round(100 * m[a] / m[b], 1)
rows = [
    (f"1. raw engine prefill ({int(m['raw_prefill_tokens'])}-token prompt)", f"{m['raw_prefill_tps']} tokens/s"),
    ("1. raw engine decode", f"{m['raw_decode_tps']} tokens/s"),
    ("2. rbee infer decode, local, warm", f"{m['rbee_decode_tps']} tokens/s ({m['decode_ratio_pct']}% of raw: median of {len(figures['decode_ratio_pct'])} pairs, {min(figures['decode_ratio_pct'])}-{max(figures['decode_ratio_pct'])}%)"),
    ("3. raw engine time to first token (\"hi\")", f"{m['raw_first_token_ms']} ms"),
    ("3. warm infer --max-tokens 1, local", f"{m['infer1_local_ms']} ms (minus raw: {round(m['infer1_local_ms'] - m['raw_first_token_ms'], 1)} ms)"),
    ("3. warm infer --max-tokens 1, SSH", f"{m['infer1_ssh_ms']} ms (minus raw: {round(m['infer1_ssh_ms'] - m['raw_first_token_ms'], 1)} ms)"),
    (f"3. routed: infer --model, {int(nodes) + 1} candidates (probed at once)", f"{m['infer1_routed_ms']} ms ({round(m['infer1_routed_ms'] - m['infer1_local_ms'], 1)} ms over --node local)"),
    ("3. of which in llama.cpp (cached prompt prefix)", f"{m['infer1_engine_ms']} ms: rbee's own cost is {round(m['infer1_local_ms'] - m['infer1_engine_ms'], 1)} ms local, {round(m['infer1_ssh_ms'] - m['infer1_engine_ms'], 1)} ms SSH"),
]
for n in (1, 2, 4, 8):
    raw = f", raw engine {m[f'raw_batched_{n}_tps']}" if f"raw_batched_{n}_tps" in m else ""
    same = "differ from alone" if f"differs_{n}" in m else "texts as alone"
    rows.append((f"4. {n} concurrent infer, aggregate", f"{m[f'rbee_concurrent_{n}_tps']} tokens/s ({same}{raw})"))
rows += [
    ("4. rbee batch, 16 items over one node (4 slots)", f"{m['batch_16_tps']} tokens/s ({ratio('batch_16_tps', 'infer_waves_16_tps')}% of the same 16 as 4 waves of 4 concurrent infer: {m['infer_waves_16_tps']} tokens/s)"),
    ("5. cold: hive start until ready", f"{m['cold_hive_start_ms']} ms"),
    ("5. cold: first infer incl. model load", f"{m['cold_first_infer_ms']} ms"),
    ("6. hive status, 1 SSH node", f"{m['status_1_ms']} ms"),
    (f"6. hive status, {nodes} SSH nodes", f"{m[f'status_{nodes}_ms']} ms"),
    ("7. RSS, hive", f"{m['hive_idle_rss_mb']} MB"),
    ("7. RSS, worker with the model loaded", f"{m['worker_loaded_rss_mb']} MB"),
    ("8. llama-server 1-token request (curl)", f"{m['llama_server_1_ms']} ms (rbee SSH is {round(m['infer1_ssh_ms'] - m['llama_server_1_ms'], 1)} ms slower)"),
    ("8. llama-server --parallel 4, 4-way aggregate", f"{m['llama_server_4_tps']} tokens/s (rbee: {ratio('rbee_concurrent_4_tps', 'llama_server_4_tps')}%)"),
    ("9. --timeout 1s: end minus deadline, local (median / worst)", f"{m['overshoot_local_ms']} / {max(figures['overshoot_local_ms'])} ms"),
    ("9. the same through SSH", f"{m['overshoot_ssh_ms']} / {max(figures['overshoot_ssh_ms'])} ms"),
    ("12. openai SDK: time to first token, rbee serve (local node)", f"{m['serve_ttft_ms']} ms ({round(m['serve_ttft_ms'] - m['llama_server_sdk_ttft_ms'], 1)} ms over llama-server's {m['llama_server_sdk_ttft_ms']} ms)"),
    ("12. openai SDK: 4-way streamed aggregate, rbee serve", f"{m['serve_4_tps']} tokens/s ({ratio('serve_4_tps', 'llama_server_sdk_4_tps')}% of llama-server's {m['llama_server_sdk_4_tps']} tokens/s)"),
]
print(f"machine: {cpu}, {cores} cores, {mem} GiB; {rounds} rounds, medians; {tokens} tokens per generation")
width = max(len(r[0]) for r in rows)
for name, value in rows:
    print(f"{name:<{width}}  {value}")
json.dump({"machine": {"cpu": cpu, "cores": int(cores), "memory_gib": int(mem)},
           "rounds": int(rounds), "tokens": int(tokens), "medians": m, "runs": figures},
          open("bench.json", "w"), indent=2)
PY
say "wrote bench.json"
say "SSH rows: persistent connection, fan-out (scripts/bench_fleet.sh)"
scripts/bench_fleet.sh
if [ "${BENCH_LLAMA:-1}" != 0 ]; then
    cleanup
    trap - EXIT
    ROUNDS="${LLAMA_ROUNDS:-7}" RBEE="$RBEE" scripts/bench_llama.sh
fi
