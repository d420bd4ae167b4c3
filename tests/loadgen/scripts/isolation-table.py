#!/usr/bin/env python3
"""Turns the output of isolation-rounds.sh (stdin) into the README's markdown table: per load,
the median of each mode over the rounds, the spread (min-max), and process/inline per round."""
import re
import statistics
import sys

rows = {}
flags = ""
for line in sys.stdin:
    if line.startswith("# flags:"):
        flags = line[len("# flags:"):].strip()
        continue
    m = re.match(r"round (\d+) \| (.+?) \| (inline|process) \| (\d+) msgs/s \| cpu ([\d.]+) \| (\d+) msgs per cpu-s \| .*p50 ([\d.]+) ms, p99 ([\d.]+) ms", line)
    if not m:
        continue
    rnd, load, mode = int(m[1]), m[2], m[3]
    rows.setdefault(load, {}).setdefault(mode, {})[rnd] = {
        "rate": float(m[4]), "cpu": float(m[5]), "per_cpu": float(m[6]),
        "p50": float(m[7]) * 1000, "p99": float(m[8]) * 1000,
    }

def med(xs):
    return statistics.median(xs)

print(f"Servers: `{flags}`; generator `loadgen` on CPU 0, server (host and worker) on CPU 1.\n")
print("| load | figure | inline (median, min-max) | process (median, min-max) | process / inline per round |")
print("| --- | --- | --- | --- | --- |")
for load, modes in rows.items():
    inl, prc = modes.get("inline", {}), modes.get("process", {})
    rounds = sorted(set(inl) & set(prc))
    key = "p50" if load.startswith("rate") else "per_cpu"
    figs = [(key, "round-trip p50 µs" if key == "p50" else "msgs per server CPU-second")]
    if key == "p50":
        figs.append(("p99", "round-trip p99 µs"))
        figs.append(("cpu", "server CPU"))
    for k, name in figs:
        a = [inl[r][k] for r in rounds]
        b = [prc[r][k] for r in rounds]
        ratio = " / ".join(f"{prc[r][k] / inl[r][k]:.2f}" for r in rounds)
        fmt = (lambda x: f"{x:,.0f}") if k != "cpu" else (lambda x: f"{x:.2f}")
        diff = f" (+{med(b) - med(a):.0f} µs)" if k == "p50" else ""
        print(f"| `{load}` | {name} | {fmt(med(a))} ({fmt(min(a))}-{fmt(max(a))}) | "
              f"{fmt(med(b))} ({fmt(min(b))}-{fmt(max(b))}){diff} | {ratio} |")
