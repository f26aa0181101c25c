"""Where the CPU of `hive status` over many SSH nodes goes, per node and process class: the
invocation and the holders (this machine's side of a real fleet) and sshd and the hives (the
nodes' side, which on loopback share this machine's cores). Prints one line for
scripts/bench_fleet.sh:

    cpu_per_node_ms invocation=... holder=... sshd=... hive=...

    python3 fleet_cpu.py RBEE RUNS NODE...

Process CPU is read from /proc before and after RUNS invocations over every node: each
thread's run time in nanoseconds (schedstat; utime and stime count whole clock ticks, which
a holder's or hive's share of a few runs rounds to nothing), and for the children that ended
meanwhile (sshd's per-session processes), their utime + stime; the invocations' own from
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
    """The run time so far of every thread of every holder, sshd and hive, and of their ended
    children, keyed so that a thread or process is only ever compared with itself."""
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
        # stat[19] is the start time: a pid reused meanwhile is another process.
        seen[("children", pid, stat[19])] = (kind, sum(int(x) for x in stat[13:15]) * 1e9 / tick)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            ns = thread_ns(pid, tid)
            if ns is not None:
                seen[("thread", pid, tid, ns[1])] = (kind, ns[0])
    return seen


def thread_ns(pid, tid):
    """A thread's run time in nanoseconds (schedstat; its utime + stime where the kernel has no
    schedstat) and its start time, or None once it has ended."""
    try:
        stat = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    try:
        return int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[0]), stat[19]
    except (OSError, ValueError, IndexError):
        return sum(int(x) for x in stat[11:13]) * 1e9 / tick, stat[19]


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
for key, (kind, ns) in after.items():
    # A thread that ended between the snapshots is missing from `after`: its time is lost
    # (a hive's or holder's threads live as long as they do, but tokio's blocking ones).
    ms[kind] += max(0.0, ns - before.get(key, (kind, 0))[1]) / 1e6
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
