#!/usr/bin/env bash
# Figures of rbee on this machine: the raw engine's decode speed and rbee's against it, cold and
# warm `infer`, the SSH tunnel against the local node, `hive status` over 1 and 4 nodes, and how
# far past `--timeout` an invocation ends.
# Nodes are real sshd instances on loopback. Prints a table and writes bench.json.
#   RBEE=path/to/rbee (default: the release build), RUNS=20 (deadline runs per node kind)
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rbee/target}"
RBEE="${RBEE:-$CARGO_TARGET_DIR/release/rbee}"
RUNS="${RUNS:-20}"
MODEL="${RBEE_TEST_MODEL:-$HOME/.cache/rbee/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
[ -x "$RBEE" ] || { echo "bench: no rbee at $RBEE (run scripts/setup.sh)" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "bench: no model at $MODEL (run scripts/setup.sh)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
    RBEE_CONFIG="$work/nodes.toml" RBEE_HOME="$work/state" "$RBEE" hive stop --all >/dev/null 2>&1 || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
export RBEE_CONFIG="$work/nodes.toml" RBEE_HOME="$work/state"
[ "$(id -u)" -eq 0 ] && mkdir -p /run/sshd

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }

ssh-keygen -q -t ed25519 -N '' -f "$work/client"
cat > "$work/nodes.toml" <<TOML
[models.smollm2]
path = "$MODEL"
sha256 = "$SHA"

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
for i in 1 2 3 4; do
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

# One timed command: prints milliseconds of wall time; its output goes to $work/last.
timed() { local t0 t1; t0=$(now_ms); "$@" >"$work/last" 2>"$work/last.err" || true; t1=$(now_ms); echo $((t1 - t0)); }
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(round(statistics.median(v),1))' "$@"; }
worst() { python3 -c 'import sys; print(max(float(x) for x in sys.argv[1:]))' "$@"; }

echo "bench: raw engine (cargo bench --bench engine)" >&2
raw=$(RBEE_TEST_MODEL="$MODEL" cargo bench --quiet --bench engine 2>/dev/null | grep '^raw engine')
raw_tps=$(echo "$raw" | sed -E 's/.*decode ([0-9.]+) tokens.*/\1/')

echo "bench: cold and warm infer on local" >&2
cold=$(timed "$RBEE" --json infer --node local --prompt "Why is the sky blue?" --max-tokens 16 --temperature 0)
second=$(timed "$RBEE" --json infer --node local --prompt "Why is the sky blue?" --max-tokens 16 --temperature 0)
long=$(timed "$RBEE" --json infer --node local --prompt "Write a long essay about bicycles." --max-tokens 128 --temperature 0)
tps=$(tail -1 "$work/last" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["decode_tokens_per_s"],1))')

echo "bench: warm 1-token infer, local and through the SSH tunnel" >&2
"$RBEE" hive start ssh1 >/dev/null
"$RBEE" infer --node ssh1 --prompt hi --max-tokens 1 >/dev/null
loc=(); tun=()
for _ in 1 2 3 4 5 6 7 8 9 10; do
    loc+=("$(timed "$RBEE" infer --node local --prompt hi --max-tokens 1 --temperature 0)")
    tun+=("$(timed "$RBEE" infer --node ssh1 --prompt hi --max-tokens 1 --temperature 0)")
done

echo "bench: hive status over 1 and 4 SSH nodes" >&2
"$RBEE" hive start ssh2 ssh3 ssh4 >/dev/null
s1=(); s4=()
for _ in 1 2 3 4 5; do
    s1+=("$(timed "$RBEE" hive status ssh1)")
    s4+=("$(timed "$RBEE" hive status ssh1 ssh2 ssh3 ssh4)")
done

echo "bench: deadline overshoot, $RUNS runs each" >&2
endless=(--prompt "Tell me a story." --temperature 5 --top-p 1 --max-tokens 100000 --timeout 1s)
ol=(); os=()
for _ in $(seq "$RUNS"); do
    ol+=("$(( $(timed "$RBEE" infer --node local "${endless[@]}") - 1000 ))")
    os+=("$(( $(timed "$RBEE" infer --node ssh1 "${endless[@]}") - 1000 ))")
done

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
cat <<TABLE
machine: $cpu, $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB
figure                                              value
infer --max-tokens 16, first call (hive start+load) $cold ms
infer --max-tokens 16, second call                  $second ms
raw engine decode (llama-cpp-2 in-process)          $raw_tps tokens/s
decode speed reported by rbee (128 tokens)          $tps tokens/s ($(python3 -c "print(round(100*$tps/$raw_tps,1))")% of raw)
warm infer --max-tokens 1, local (median of 10)     $(median "${loc[@]}") ms
warm infer --max-tokens 1, SSH tunnel (median)      $(median "${tun[@]}") ms
hive status, 1 SSH node (median of 5)               $(median "${s1[@]}") ms
hive status, 4 SSH nodes (median of 5)              $(median "${s4[@]}") ms
--timeout 1s overshoot, local: median / worst       $(median "${ol[@]}") / $(worst "${ol[@]}") ms
--timeout 1s overshoot, SSH: median / worst         $(median "${os[@]}") / $(worst "${os[@]}") ms
TABLE
python3 - "$cold" "$second" "$tps" "$(median "${loc[@]}")" "$(median "${tun[@]}")" \
    "$(median "${s1[@]}")" "$(median "${s4[@]}")" "$(median "${ol[@]}")" "$(worst "${ol[@]}")" \
    "$(median "${os[@]}")" "$(worst "${os[@]}")" "$raw_tps" "$cpu" > bench.json <<'PY'
import json, sys
a = sys.argv[1:]
keys = ["cold_infer16_ms", "second_infer16_ms", "decode_tokens_per_s", "warm_infer1_local_ms",
        "warm_infer1_ssh_ms", "status_1_node_ms", "status_4_nodes_ms", "overshoot_local_median_ms",
        "overshoot_local_worst_ms", "overshoot_ssh_median_ms", "overshoot_ssh_worst_ms",
        "raw_decode_tokens_per_s", "cpu"]
print(json.dumps({k: (v if k == "cpu" else float(v)) for k, v in zip(keys, a)}, indent=2))
PY
echo "bench: wrote bench.json" >&2
