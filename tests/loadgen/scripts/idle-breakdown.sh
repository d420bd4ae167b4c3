#!/usr/bin/env bash
# Where an idle connection's memory goes: runs wshost (echo plugin, defaults) under heaptrack,
# opens N idle connections with `loadgen idle`, and attributes the heap at its peak (all N open)
# to its owners per connection (idle-breakdown.py). Prints the markdown table.
#   cargo build --release -p wshost -p echo -p loadgen   (heaptrack from the distribution)
#   tests/loadgen/scripts/idle-breakdown.sh [N]
set -eu
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
N=${1:-4000}
WORK=$(mktemp -d)
mkdir "$WORK/plugins"; cp "$ROOT/target/release/libecho.so" "$WORK/plugins/"
heaptrack -o "$WORK/heap" "$ROOT/target/release/wshost" serve --listen 127.0.0.1:0 \
  --admin-listen off --plugins "$WORK/plugins" > "$WORK/log" 2>&1 &
for i in $(seq 200); do grep -q 'listening on' "$WORK/log" && break; sleep 0.1; done
addr=$(grep -o 'ws://[0-9.:]*' "$WORK/log" | head -1)
pid=$(pgrep -n -f "$ROOT/target/release/wshost serve")
"$ROOT/target/release/loadgen" idle --url "$addr/echo" --pid "$pid" --conns "$N" | tail -1
kill -INT "$pid"
for i in $(seq 300); do [ -s "$WORK/heap.zst" ] && ! kill -0 "$pid" 2>/dev/null && break; sleep 0.1; done
sleep 1
heaptrack_print -f "$WORK/heap.zst" --print-peaks 0 --print-allocators 0 --print-temporary 0 \
  --print-leaks 0 -F "$WORK/peak.folded" --flamegraph-cost-type peak > /dev/null 2>&1
python3 "$ROOT/tests/loadgen/scripts/idle-breakdown.py" "$WORK/peak.folded" "$N"
rm -rf "$WORK"
