#!/usr/bin/env python3
"""Where a server's CPU time goes, from folded stacks (inferno-collapse-perf): each sample goes
to the first category whose test matches its stack, top to bottom. Prints a Markdown table with
one column per file.   profile-categories.py wshost.folded bare.folded"""
import sys


def leaf(s):
    return s.split(";")[-1]


CATEGORIES = [
    ("kernel: send (TCP, with loopback's receive side)", lambda s: "__sys_sendto" in s),
    ("kernel: receive", lambda s: "__sys_recvfrom" in s),
    ("kernel: epoll, parking and waking threads", lambda s: "epoll_wait" in s or "futex" in s),
    ("plugin call: `on_text` and its `send_text` across the ABI",
     lambda s: "libecho" in s or "HostFfi" in s or "ConnFfi" in s or "on_text" in s),
    ("tracing: the connection's span", lambda s: "tracing" in leaf(s) or "Instrumented" in leaf(s)),
    ("tungstenite: reading frames (buffers, header, UTF-8)",
     lambda s: "WebSocketContext::read" in s or "poll_next" in s or "read_frame" in s),
    ("tungstenite: writing frames (encode, flush)",
     lambda s: "poll_flush" in s or "start_send" in s or "WebSocketContext::write" in s
     or "Writer::feed" in s),
    ("clock reads and timers", lambda s: "Sleep" in s or "clock_gettime" in s or "Instant" in leaf(s)
     or "time::" in leaf(s)),
    ("shutdown's cancellation future", lambda s: "cancellation" in s),
    ("tokio: scheduler, task state, wakers",
     lambda s: "scheduler" in leaf(s) or "task::state" in leaf(s) or "waker" in leaf(s).lower()
     or "Harness" in leaf(s) or "LocalKey" in leaf(s)),
    ("wshost's session loop (select, flags, counts)", lambda s: "session" in s),
    ("malloc, free, memcpy", lambda s: any(x in leaf(s) for x in ("malloc", "free", "memmove", "memcpy", "memset"))),
]


def load(path):
    total, parts = 0, {}
    for line in open(path):
        stack, n = line.rstrip().rsplit(" ", 1)
        n = int(n)
        total += n
        name = next((c for c, test in CATEGORIES if test(stack)), "other")
        parts[name] = parts.get(name, 0) + n
    return total, parts


files = sys.argv[1:]
loaded = [load(f) for f in files]
print("| where | " + " | ".join(f.rsplit("/", 1)[-1].removesuffix(".folded") for f in files) + " |")
print("| --- |" + " --- |" * len(files))
for name in [c for c, _ in CATEGORIES] + ["other"]:
    print(f"| {name} | " + " | ".join(f"{100 * p.get(name, 0) / t:.1f}%" for t, p in loaded) + " |")
