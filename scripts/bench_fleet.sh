#!/usr/bin/env bash
# SSH rows of the benchmark, runnable alone (scripts/bench.sh runs it too): over real sshd
# instances on loopback,
#   a. warm `rbee infer --max-tokens 1` on `local`, on an SSH node through its persistent
#      connection (`persist`, the default), and on a node behind the same sshd with
#      `persist = "0"` (a login per invocation); alternating runs, ROUNDS rounds of LATENCY_RUNS each
#   b. `hive status` over 1 SSH node and over FLEET_NODES (default 32), persistent connections,
#      alternating, ROUNDS x 5 runs: with only ssh1's hive running, with every hive running, and
#      with every hive stopped
#   c. the CPU per node of that status over every running hive, by process
#      (scripts/fleet_cpu.py): this machine's side (invocation, holder) and the nodes' (sshd,
#      hive), which on loopback share this machine's cores, and the least time that leaves
#   (LATENCY_RUNS=0 skips a.; STRACE=FILE also traces one status over every running hive)
# Prints medians with their range (min-max over the rounds' medians).
#   RBEE=path/to/rbee (default: the release build), ROUNDS=3, LATENCY_RUNS=10, FLEET_NODES=32
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rbee/target}"
RBEE="${RBEE:-$CARGO_TARGET_DIR/release/rbee}"
ROUNDS="${ROUNDS:-3}"
LATENCY_RUNS="${LATENCY_RUNS:-10}"
FLEET_NODES="${FLEET_NODES:-32}"
MODEL="${RBEE_TEST_MODEL:-$HOME/.cache/rbee/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
[ -x "$RBEE" ] || { echo "bench: no rbee at $RBEE (run scripts/setup.sh)" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "bench: no model at $MODEL (run scripts/setup.sh)" >&2; exit 1; }
say() { printf 'bench: %s\n' "$*" >&2; }

work=$(mktemp -d)
pids=()
cleanup() {
    "$RBEE" hive stop --all >/dev/null 2>&1 || true
    "$RBEE" nodes disconnect >/dev/null 2>&1 || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
export RBEE_CONFIG="$work/nodes.toml" RBEE_HOME="$work/state"
[ "$(id -u)" -eq 0 ] && mkdir -p /run/sshd
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }
timed() { local t0 t1; t0=$(now_ms); "$@" >"$work/last" 2>"$work/last.err" || true; t1=$(now_ms); echo $((t1 - t0)); }
median() { python3 -c 'import sys,statistics; print(round(statistics.median(float(x) for x in sys.argv[1:]),1))' "$@"; }

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
models = ["smollm2"]
TOML
for i in $(seq "$FLEET_NODES"); do
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
models = ["smollm2"]
TOML
    # A second node behind the same sshd (its own hive), with a login per invocation.
    if [ "$i" -eq 1 ]; then
        cat >> "$work/nodes.toml" <<TOML

[nodes.direct1]
host = "127.0.0.1"
port = $port
remote_dir = "$work/node-direct1"
models = ["smollm2"]
persist = "0"
TOML
    fi
done
sleep 1

say "warming up: local, ssh1 and direct1 hives, the model loaded on each"
"$RBEE" hive start local ssh1 direct1 >/dev/null
"$RBEE" infer --node local --prompt hi --max-tokens 1 >/dev/null
"$RBEE" infer --node ssh1 --prompt hi --max-tokens 1 >/dev/null
"$RBEE" infer --node direct1 --prompt hi --max-tokens 1 >/dev/null

out=()
for round in $(seq "$ROUNDS"); do
    [ "$LATENCY_RUNS" -gt 0 ] || break
    say "round $round of $ROUNDS: warm 1-token infer, local / SSH persistent / SSH persist=0"
    loc=(); per=(); dir=()
    for _ in $(seq "$LATENCY_RUNS"); do
        loc+=("$(timed "$RBEE" infer --node local --prompt hi --max-tokens 1 --temperature 0)")
        per+=("$(timed "$RBEE" infer --node ssh1 --prompt hi --max-tokens 1 --temperature 0)")
        dir+=("$(timed "$RBEE" infer --node direct1 --prompt hi --max-tokens 1 --temperature 0)")
    done
    out+=("local $(median "${loc[@]}")" "persist $(median "${per[@]}")" "direct $(median "${dir[@]}")")
done

all=()
for i in $(seq "$FLEET_NODES"); do all+=("ssh$i"); done
say "hive status over all $FLEET_NODES nodes once (their holders start)"
"$RBEE" hive status "${all[@]}" >/dev/null 2>&1 || true
status_rounds() { # $1: the rows' suffix
    for round in $(seq "$ROUNDS"); do
        say "round $round of $ROUNDS: hive status over 1 and $FLEET_NODES SSH nodes ($1)"
        one=(); many=()
        for _ in 1 2 3 4 5; do
            one+=("$(timed "$RBEE" hive status ssh1)")
            many+=("$(timed "$RBEE" hive status "${all[@]}")")
        done
        out+=("status1$1 $(median "${one[@]}")" "statusN$1 $(median "${many[@]}")")
    done
}
status_rounds ""
say "starting every node's hive, 4 at a time (each installs the binary and checks the model)"
for ((i = 0; i < ${#all[@]}; i += 4)); do
    "$RBEE" hive start "${all[@]:i:4}" >/dev/null
done
status_rounds "_running"
say "CPU per node of a status over every running hive, by process ($((ROUNDS * 10)) runs)"
cpu=$(python3 scripts/fleet_cpu.py "$RBEE" $((ROUNDS * 10)) "${all[@]}") \
    || { say "scripts/fleet_cpu.py failed (above)"; exit 1; }
cpu=${cpu#cpu_per_node_ms }
out+=("cpu ${cpu// /,}")
if [ -n "${STRACE:-}" ]; then
    # Where the time of one status over every node goes: each syscall of the invocation and
    # its threads, timestamped (`strace -f -tt`), and a summary.
    strace -f -tt -o "$STRACE" "$RBEE" hive status "${all[@]}" >/dev/null 2>&1 || true
    strace -f -c -o "$STRACE.summary" "$RBEE" hive status "${all[@]}" >/dev/null 2>&1 || true
    "$RBEE" -vv hive status "${all[@]}" >/dev/null 2>"$STRACE.vv" || true
fi
say "stopping every node's hive"
"$RBEE" hive stop "${all[@]}" >/dev/null
status_rounds "_stopped"

python3 - "$FLEET_NODES" "${out[@]}" <<'PY'
import statistics, sys
nodes, pairs = sys.argv[1], sys.argv[2:]
runs, cpu = {}, {}
for p in pairs:
    k, v = p.split()
    if k == "cpu":
        cpu = {a: float(b) for a, b in (x.split("=") for x in v.split(","))}
        continue
    runs.setdefault(k, []).append(float(v))
def fig(k):
    v = runs[k]
    return f"{round(statistics.median(v), 1)} ms ({min(v)}-{max(v)})"
m = {k: statistics.median(v) for k, v in runs.items()}
if "local" in runs:
    print(f"13. warm infer --max-tokens 1, local: {fig('local')}")
    print(f"13. the same over SSH, persistent connection: {fig('persist')}, "
          f"{round(m['persist'] - m['local'], 1)} ms over local")
    print(f"13. the same over SSH, persist = \"0\": {fig('direct')}, "
          f"{round(m['direct'] - m['local'], 1)} ms over local")
for suffix, what in [("", "only ssh1's hive running"), ("_running", "every hive running"),
                     ("_stopped", "every hive stopped")]:
    print(f"14. hive status, 1 SSH node ({what}): {fig('status1' + suffix)}")
    print(f"14. hive status, {nodes} SSH nodes ({what}): {fig('statusN' + suffix)}, "
          f"{round(m['statusN' + suffix] / m['status1' + suffix], 2)}x of one node")
if cpu:
    here, there = cpu["invocation"] + cpu["holder"], cpu["sshd"] + cpu["hive"]
    print(f"14. CPU per node of that status: invocation {cpu['invocation']} + holder "
          f"{cpu['holder']} ms (this machine's side) + sshd {cpu['sshd']} + hive {cpu['hive']} ms "
          f"(the nodes' side, here on the same cores): {round(here + there, 3)} ms")
    one = m["status1_running"]
    print(f"14. so {nodes} nodes on this machine's {__import__('os').cpu_count()} cores need at least "
          f"{round((int(nodes) - 1) * (here + there) / __import__('os').cpu_count(), 1)} ms more than one; "
          f"within 2x of one node ({round(one, 1)} ms) leaves {round(one, 1)} ms")
PY
