#!/usr/bin/env bash
# Interleaved rounds of `loadgen echo` against this build's wshost (echo plugin), another wshost
# build (OLD_WSHOST, OLD_PLUGINS: e.g. the build before a change) and the bare tokio-tungstenite
# server; server on CPU 1, generator on CPU 0; every server at its defaults. Prints msgs/s, the
# server's CPU (over warm-up and window) and msgs per CPU-second, per round.
#   cargo build --release -p wshost -p echo -p bare-echo -p loadgen
#   OLD_WSHOST=/path/wshost OLD_PLUGINS=/path/plugins tests/loadgen/scripts/echo-rounds.sh "--conns 100 --size 32 --inflight 8"
set -u
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
LG=$ROOT/target/release/loadgen
NEW_PLUGINS=$(mktemp -d); cp "$ROOT/target/release/libecho.so" "$NEW_PLUGINS/"
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-4}
declare -A CMD
CMD[new]="$ROOT/target/release/wshost serve --listen 127.0.0.1:0 --admin-listen off --plugins $NEW_PLUGINS"
CMD[old]="${OLD_WSHOST:-$ROOT/target/release/wshost} serve --listen 127.0.0.1:0 --admin-listen off --plugins ${OLD_PLUGINS:-$NEW_PLUGINS}"
CMD[bare]="$ROOT/target/release/bare-echo"
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
for r in $(seq 1 $ROUNDS); do
 for load in "$@"; do
  for s in new old bare; do
    out=$(mktemp); taskset -c 1 ${CMD[$s]} > $out 2>/dev/null & pid=$!
    for i in $(seq 100); do grep -q listening $out && break; sleep 0.05; done
    addr=$(grep -o 'ws://[0-9.:]*' $out | head -1); path=/echo; [ $s = bare ] && path=/
    t0=$(ticks $pid)
    res=$(taskset -c 0 $LG echo --url $addr$path --seconds $SECS $load 2>&1 | tail -1)
    t1=$(ticks $pid)
    kill $pid; wait $pid 2>/dev/null
    rate=$(echo "$res" | grep -oE '[0-9.]+ msgs/s' | grep -oE '[0-9.]+')
    cpu=$(python3 -c "print(($t1-$t0)/100/($SECS+1))")
    python3 -c "r=float('${rate:-0}');c=float('$cpu');print(f'round $r | $load | $s | {r:.0f} msgs/s | cpu {c:.2f} | {r/c if c else 0:.0f} msgs per cpu-s | $res')"
  done
 done
done
