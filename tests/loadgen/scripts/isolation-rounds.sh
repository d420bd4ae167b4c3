#!/usr/bin/env bash
# Interleaved rounds of the echo plugin inline (the default) and process-isolated
# (`--isolation process`), each at otherwise default settings: server (host and its worker) on
# CPU 1, generator on CPU 0. Prints, per round and load, msgs/s, the CPU the server used over the
# measuring window (host + worker processes) and msgs per CPU-second; for `rate` loads the
# open-loop round-trip quantiles.
#   cargo build --release -p wshost -p echo -p loadgen
#   tests/loadgen/scripts/isolation-rounds.sh "echo --conns 100 --size 32 --inflight 8" \
#       "echo --conns 100 --size 16384 --inflight 1" "rate --conns 100 --rate 10000"
set -u
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
LG=$ROOT/target/release/loadgen
PLUGINS=$(mktemp -d); cp "$ROOT/target/release/libecho.so" "$PLUGINS/"
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-4}
declare -A CMD
BASE="$ROOT/target/release/wshost serve --listen 127.0.0.1:0 --admin-listen off --plugins $PLUGINS"
CMD[inline]="$BASE"
CMD[process]="$BASE --isolation process"
# CPU ticks of a process and its children (the worker).
ticks() { local t=0; for p in $1 $(pgrep -P $1); do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat 2>/dev/null || echo 0))); done; echo $t; }
echo "# flags: ${CMD[inline]} | ${CMD[process]} (RUST_LOG unset: the default filter)"
for r in $(seq 1 $ROUNDS); do
 for load in "$@"; do
  for s in inline process; do
    out=$(mktemp); taskset -c 1 ${CMD[$s]} > $out 2>/dev/null & pid=$!
    for i in $(seq 200); do grep -q listening $out && break; sleep 0.05; done
    addr=$(grep -o 'ws://[0-9.:]*' $out | head -1)
    res=$(mktemp)
    taskset -c 0 $LG $load --url $addr/echo --seconds $SECS > $res 2>&1 & lg=$!
    sleep 1.2; t0=$(ticks $pid); w0=$(date +%s.%N)
    wait $lg
    t1=$(ticks $pid); w1=$(date +%s.%N)
    kill $pid; wait $pid 2>/dev/null
    line=$(tail -1 $res)
    rate=$(echo "$line" | grep -oE '^[0-9.]+ msgs/s' | grep -oE '[0-9.]+')
    python3 -c "r=float('${rate:-0}');c=($t1-$t0)/100/($w1-$w0);print(f'round $r | $load | $s | {r:.0f} msgs/s | cpu {c:.2f} | {r/c if c else 0:.0f} msgs per cpu-s | $line')"
    rm -f $out $res
  done
 done
done
