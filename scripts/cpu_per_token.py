"""CPU time per generated token of each process a local `rbee infer` runs through, as
scripts/bench_llama.sh measures it: the hive (the on-CPU nanoseconds of its threads, from
/proc/PID/task/*/schedstat: /proc/PID/stat counts in 10 ms ticks), the CLI (getrusage of the
finished child) and the worker. A 1-token infer is taken from a TOKENS-token
one, so what a request costs once (connect, audit records, prefill) cancels out; prints
`HIVE_US CLI_US WORKER_US` per token.

    python3 cpu_per_token.py RBEE HIVE_PIDFILE TOKENS PROMPT
"""

import json
import os
import resource
import subprocess
import sys

rbee, pidfile, tokens, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
hive = int(open(pidfile).read().split()[0])


def cpu(pid):
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(open(f"/proc/{pid}/task/{task}/schedstat").read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended in between
    return total / 1e9


def children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def infer(n, worker):
    h0, c0 = cpu(hive), children()
    w0 = cpu(worker) if worker else 0.0
    out = subprocess.run([rbee, "--json", "infer", "--node", "local", "--prompt", prompt,
                          "--max-tokens", str(n), "--temperature", "0", "--timeout", "10m"],
                         capture_output=True, text=True, check=True).stdout
    done = json.loads(out.splitlines()[-1])
    worker = worker or done["worker_pid"]
    w = cpu(worker) - w0 if w0 else 0.0
    return done["tokens_out"], cpu(hive) - h0, children() - c0, w, done["worker_pid"]


_, _, _, _, worker = infer(1, None)
one = infer(1, worker)
many = infer(tokens, worker)
n = many[0] - one[0]
print(" ".join(str(round((many[i] - one[i]) / n * 1e6)) for i in (1, 2, 3)))
