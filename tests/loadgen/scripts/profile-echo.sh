#!/usr/bin/env bash
# Profiles wshost (echo plugin, defaults) and the bare tokio-tungstenite reference (4 KiB read
# buffer) under the same closed-loop echo: each server alone on CPU 0, `loadgen echo` on CPU 1,
# `perf record` with DWARF call graphs over the measuring window. Writes folded stacks, flame
# graphs and the table of where the time goes (profile-categories.py) to OUT.
#   cargo build --release -p wshost -p echo -p bare-echo -p loadgen; cargo install inferno
#   tests/loadgen/scripts/profile-echo.sh [OUT] ["--conns 100 --inflight 1 --size 32"]
set -eu
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
OUT=${1:-$ROOT/docs/bench/profile}
LOAD=${2:-"--conns 100 --inflight 1 --size 32"}
SECS=${SECS:-5}
mkdir -p "$OUT"
PLUGINS=$(mktemp -d); cp "$ROOT/target/release/libecho.so" "$PLUGINS/"
declare -A CMD
CMD[wshost]="$ROOT/target/release/wshost serve --listen 127.0.0.1:0 --admin-listen off --plugins $PLUGINS"
CMD[bare]="$ROOT/target/release/bare-echo 127.0.0.1:0 4096"
for s in wshost bare; do
  log=$(mktemp); taskset -c 0 ${CMD[$s]} > "$log" 2>/dev/null & pid=$!
  for i in $(seq 100); do grep -q 'listening on' "$log" && break; sleep 0.05; done
  addr=$(grep -o 'ws://[0-9.:]*' "$log" | head -1)
  # The recording starts after the generator's 1 s warm-up and covers its window.
  (sleep 1; perf record -q -F 2000 --call-graph dwarf,16384 -p $pid -o "$OUT/$s.perf" -- sleep $((SECS - 1)) > /dev/null 2>&1) &
  rec=$!
  echo "$s: $(taskset -c 1 "$ROOT/target/release/loadgen" echo --url "$addr/echo" --seconds $SECS $LOAD 2>&1 | tail -1)"
  wait $rec
  kill $pid; wait $pid 2>/dev/null || true
  perf script -i "$OUT/$s.perf" 2>/dev/null | inferno-collapse-perf > "$OUT/$s.folded"
  inferno-flamegraph --minwidth 0.2 --title "$s: echo $LOAD (CPU 0)" < "$OUT/$s.folded" > "$OUT/$s.svg"
  rm -f "$OUT/$s.perf" "$log"
done
rm -rf "$PLUGINS"
python3 "$ROOT/tests/loadgen/scripts/profile-categories.py" "$OUT/wshost.folded" "$OUT/bare.folded"
