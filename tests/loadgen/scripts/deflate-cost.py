#!/usr/bin/env python3
"""Bytes on the wire and server CPU per message of a typical JSON message, with
permessage-deflate on and off (the same wshost build at its defaults, the echo plugin).

    cargo build --release -p wshost -p echo
    python3 tests/loadgen/scripts/deflate-cost.py [MESSAGES] [ROUNDS]

Needs the `websockets` package (pip install websockets). The server runs on CPU 1, this client
on CPU 0. Wire bytes are the loopback interface's bytes over the run (both directions, with
TCP/IP headers: what one echo costs the network; run it on an otherwise quiet loopback), CPU
the server's user+system ticks over the run. Prints one line per round and mode, then the medians.
"""
import asyncio, json, os, re, statistics, subprocess, sys, tempfile, shutil

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
MSG = json.dumps({"type": "update", "room": "lobby", "seq": 12345, "items": [
    {"id": i, "name": f"user-{i}", "status": "online", "tags": ["member", "verified"]}
    for i in range(8)]})

def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().split()
    with open("/proc/net/dev") as f:
        lo = next(l for l in f if l.strip().startswith("lo:"))
    wire = int(lo.split(":", 1)[1].split()[0])
    return int(fields[13]) + int(fields[14]), wire

async def run(url, compression):
    import websockets
    async with websockets.connect(url, compression=compression, max_size=None) as ws:
        assert (ws.response.headers.get("sec-websocket-extensions") is not None) == (compression is not None)
        for i in range(0, N, 100):
            for _ in range(100):
                await ws.send(MSG)
            for _ in range(100):
                await ws.recv()

def main():
    plugins = tempfile.mkdtemp()
    shutil.copy(os.path.join(ROOT, "target/release/libecho.so"), plugins)
    # The default message rate (10,000/s, burst as many) would close this client: it is lifted.
    flags = ["serve", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--max-message-rate", "0", "--plugins", plugins]
    print(f"# {len(MSG)}-byte JSON message, {N} echoed per run; wshost {' '.join(flags[:-1])} DIR (RUST_LOG=off)")
    results = {"on": [], "off": []}
    os.sched_setaffinity(0, {0})
    for r in range(ROUNDS):
        for mode in ("on", "off"):
            p = subprocess.Popen(["taskset", "-c", "1", os.path.join(ROOT, "target/release/wshost")] + flags,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "off"})
            line = p.stdout.readline().decode()
            while "listening on" not in line:
                line = p.stdout.readline().decode()
            url = re.search(r"ws://\S+", line).group(0) + "/echo"
            t0, w0 = stat(p.pid)
            asyncio.run(run(url, "deflate" if mode == "on" else None))
            t1, w1 = stat(p.pid)
            p.terminate(); p.wait()
            bytes_per = (w1 - w0) / N
            cpu_us = (t1 - t0) / os.sysconf("SC_CLK_TCK") / N * 1e6
            results[mode].append((bytes_per, cpu_us))
            print(f"round {r + 1} | compression {mode} | {bytes_per:.0f} bytes on the wire per echo | {cpu_us:.1f} us server CPU per message")
    for mode in ("on", "off"):
        b = statistics.median(x[0] for x in results[mode]); c = statistics.median(x[1] for x in results[mode])
        print(f"median | compression {mode} | {b:.0f} bytes per echo | {c:.1f} us CPU per message")
    shutil.rmtree(plugins)

main()
