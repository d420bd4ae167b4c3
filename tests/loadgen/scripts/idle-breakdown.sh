#!/usr/bin/env bash
# Where an idle connection's memory goes: runs wshost (echo plugin, defaults) under heaptrack,
# opens N idle connections with `loadgen idle`, and attributes the heap to its owners per
# connection (idle-breakdown.py). Prints the markdown table.
#   peak:   the heap at its peak (all N open, each just after its one message: none parked yet)
#   parked: the heap once every connection has parked (wshost killed then, the heap it held read
#           as heaptrack's "leaked")
#   cargo build --release -p wshost -p echo -p loadgen   (heaptrack from the distribution)
#   (wshost is built again here without jemalloc, into target/heaptrack: heaptrack sees only the
#   system allocator's calls)
#   tests/loadgen/scripts/idle-breakdown.sh [N] [peak|parked]
set -eu
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
N=${1:-4000}
MODE=${2:-peak}
WORK=$(mktemp -d)
cargo build --release -q -p wshost --no-default-features --target-dir "$ROOT/target/heaptrack"
WSHOST=$ROOT/target/heaptrack/release/wshost
mkdir "$WORK/plugins"; cp "$ROOT/target/release/libecho.so" "$WORK/plugins/"
heaptrack -o "$WORK/heap" "$WSHOST" serve --listen 127.0.0.1:0 \
  --admin-listen off --plugins "$WORK/plugins" > "$WORK/log" 2>&1 &
for i in $(seq 200); do grep -q 'listening on' "$WORK/log" && break; sleep 0.1; done
addr=$(grep -o 'ws://[0-9.:]*' "$WORK/log" | head -1)
pid=$(pgrep -n -f "$WSHOST serve")
if [ "$MODE" = parked ]; then
  "$ROOT/target/release/loadgen" idle --url "$addr/echo" --pid "$pid" --conns "$N" --hold \
    > "$WORK/idle" 2>&1 &
  held=$!
  for i in $(seq 1200); do grep -q holding "$WORK/idle" && break; sleep 0.1; done
  grep '^| server' "$WORK/idle" | tail -1
  # (loadgen read the RSS after its settle: every connection has parked by then.)
  kill -KILL "$pid"
  COST=leaked; WHEN="once every connection has parked"
else
  "$ROOT/target/release/loadgen" idle --url "$addr/echo" --pid "$pid" --conns "$N" | tail -1
  kill -INT "$pid"
  COST=peak; WHEN="at the peak"
fi
for i in $(seq 300); do [ -s "$WORK/heap.zst" ] && ! kill -0 "$pid" 2>/dev/null && break; sleep 0.1; done
sleep 1
[ "$MODE" = parked ] && kill "$held" 2>/dev/null
heaptrack_print -f "$WORK/heap.zst" --print-peaks 0 --print-allocators 0 --print-temporary 0 \
  --print-leaks 0 -F "$WORK/heap.folded" --flamegraph-cost-type "$COST" > /dev/null 2>&1
python3 "$ROOT/tests/loadgen/scripts/idle-breakdown.py" "$WORK/heap.folded" "$N" "$WHEN"
rm -rf "$WORK"
