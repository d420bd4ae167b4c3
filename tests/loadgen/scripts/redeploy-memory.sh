#!/usr/bin/env bash
# Re-deploys the echo plugin N times into a running host (a new build renamed into place, then
# SIGHUP; each waits for the new generation's load line) and samples the host's resident memory,
# its mapped plugin libraries and its worker processes every STEP re-deploys.
#   cargo build --release -p wshost -p echo
#   tests/loadgen/scripts/redeploy-memory.sh process 1000     # or: inline 200
set -u
MODE=${1:-process}; N=${2:-1000}; STEP=${STEP:-100}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
DIR=$(mktemp -d); mkdir -p $DIR/plugins; cp "$ROOT/target/release/libecho.so" $DIR/plugins/
LOG=$DIR/log
RUST_LOG=info $ROOT/target/release/wshost serve --listen 127.0.0.1:0 --admin-listen off \
  --no-watch --plugins $DIR/plugins --isolation $MODE > $DIR/out 2> $LOG & pid=$!
for i in $(seq 200); do grep -q listening $DIR/out && break; sleep 0.05; done
rss() { awk '/VmRSS/ {print $2}' /proc/$pid/status; }
echo "# wshost serve --no-watch --isolation $MODE; $N re-deploys of libecho.so (cp + rename + SIGHUP)"
echo "redeploys | host RSS KiB | mapped libraries | worker processes"
sample() {
  libs=$(awk '/libecho/ {print $6}' /proc/$pid/maps | sort -u | wc -l)
  echo "$1 | $(rss) | $libs | $(pgrep -P $pid | wc -l)"
}
sample 0
for g in $(seq 2 $((N + 1))); do
  cp "$ROOT/target/release/libecho.so" $DIR/plugins/.libecho.so.tmp
  mv $DIR/plugins/.libecho.so.tmp $DIR/plugins/libecho.so
  kill -HUP $pid
  until grep -q "plugin=echo .*generation=$g " $LOG; do sleep 0.005; done
  if [ $(( (g - 1) % STEP )) -eq 0 ]; then sleep 0.3; sample $((g - 1)); fi
done
kill $pid; wait $pid 2>/dev/null; rm -rf $DIR
