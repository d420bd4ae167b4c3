#!/usr/bin/env python3
"""Attributes heaptrack's heap (folded stacks, `heaptrack_print -F ... --flamegraph-cost-type
peak`, or `leaked` for the heap when the process was killed) to an idle connection's owners: bytes
per connection, by the first rule whose frames all appear in an allocation's stack.
Usage: idle-breakdown.py HEAP.folded CONNECTIONS [WHEN]  (WHEN names the moment: "at the peak")"""
import sys

# (owner, frames that must all be in the stack); the first rule that matches wins.
RULES = [
    ("session task (tokio's task cell holding the session's future)",
     ["bind_new_task", "(http.rs)"]),
    ("`ConnShared` (the handle plugins and the hub share)", ["new (conn.rs)", "open (mod.rs)"]),
    ("tungstenite's read buffer", ["from_raw_socket", "with_capacity (bytes_mut.rs)"]),
    ("tokio-tungstenite's two waker proxies", ["new<> (compat.rs)"]),
    ("the open socket's box (`Active`: tungstenite's stream and the writer)", ["(link.rs)"]),
    ("socket registration (tokio's `ScheduledIo`)", ["add_source"]),
    ("the connection's span: its extensions map", ["new_span", "(extensions.rs)"]),
    ("the connection's span: its formatted fields", ["new_span", "format_fields"]),
    ("the connection's span: tracing-subscriber's slab slot", ["new_span", "(pool.rs)"]),
    ("other session setup (`open`: partial-message tracker, plugin handle, facts)",
     ["open (mod.rs)"]),
    ("a received frame's buffer (shared by the first read)", ["read_frame"]),
]


def main():
    path, conns = sys.argv[1], int(sys.argv[2])
    when = sys.argv[3] if len(sys.argv) > 3 else "at the peak"
    totals = {name: 0 for name, _ in RULES}
    rest = 0
    for line in open(path):
        stack, cost = line.rstrip("\n").rsplit(" ", 1)
        cost = int(cost)
        for name, frames in RULES:
            if all(f in stack for f in frames):
                totals[name] += cost
                break
        else:
            rest += cost
    whole = sum(totals.values()) + rest
    print(f"| owner | bytes per connection ({conns:,} idle connections) |")
    print("| --- | ---: |")
    for name, _ in RULES:
        print(f"| {name} | {totals[name] / conns:,.0f} |")
    print(f"| everything else (the host's fixed heap spread over the connections, included) | "
          f"{rest / conns:,.0f} |")
    print(f"| **heap {when}, per connection** | **{whole / conns:,.0f}** |")


if __name__ == "__main__":
    main()
