"""Where the CPU of `hive status` over many SSH nodes goes, per node and process class: the
invocation and the holders (this machine's side of a real fleet) and sshd and the hives (the
nodes' side, which on loopback share this machine's cores). Prints one line for
scripts/bench_fleet.sh:

    cpu_per_node_ms invocation=... holder=... sshd=... hive=...

    python3 fleet_cpu.py RBEE RUNS NODE...

Process CPU is read from /proc before and after RUNS invocations over every node: each
thread's run time in nanoseconds (schedstat; utime and stime count whole clock ticks, which
a holder's or hive's share of a few runs rounds to nothing), and for the children that ended
meanwhile, their utime + stime; the invocations' own from
getrusage, less that of RUNS invocations over the first node only (what starting and ending
costs).
"""

import os
import resource
import subprocess
import sys

rbee, runs, nodes = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
tick = os.sysconf("SC_CLK_TCK")


def snapshot():
    seen = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if " nodes hold" in args:
            kind = "holder"
        elif " hive serve" in args:
            kind = "hive"
        elif "sshd" in args:
            kind = "sshd"
        else:
            continue
        seen[pid] = (kind, run_ns(pid) + sum(int(x) for x in stat[13:15]) * 1e9 / tick)
    return seen


def run_ns(pid):
    """The run time of every thread of `pid` now, in nanoseconds."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            total += int(open(f"/proc/{pid}/task/{task}/schedstat").read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def invocations(over):
    """The invocations' CPU ms, each over the nodes `over`."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(runs):
        subprocess.run([rbee, "hive", "status", *over], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1000


before = snapshot()
many = invocations(nodes)
after = snapshot()
ms = {"holder": 0.0, "sshd": 0.0, "hive": 0.0}
for pid, (kind, ns) in after.items():
    ms[kind] += (ns - before.get(pid, (kind, 0))[1]) / 1e6
per = {k: v / (runs * len(nodes)) for k, v in ms.items()}
# An invocation's start and end cost the same over one node as over many: what each further
# node adds is the difference.
if len(nodes) > 1:
    one = invocations(nodes[:1])
    per["invocation"] = (many - one) / (runs * (len(nodes) - 1))
else:
    # Over one node there is no further node to take the difference over: the whole
    # invocation is that node's, start and end included, which more nodes share.
    print("fleet_cpu: one node: invocation is the whole invocation's CPU", file=sys.stderr)
    per["invocation"] = many / runs
print("cpu_per_node_ms " + " ".join(f"{k}={v:.3f}" for k, v in per.items()))
