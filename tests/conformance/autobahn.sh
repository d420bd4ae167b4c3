#!/usr/bin/env bash
# The project's Autobahn|Testsuite runner: installs the fuzzing client (wstest) if it is missing,
# runs the given cases against a WebSocket echo server on loopback, and prints a summary.
#
#   tests/conformance/autobahn.sh ws://127.0.0.1:PORT/echo '1.*,2.*,...'
#
# wstest is Python 2.7 only (autobahntestsuite 25.10.1: Autobahn 0.10.9, Twisted 19.10). The
# interpreter is, in order: $AUTOBAHN_PY27, a working python2.7 on PATH or in pyenv, or Debian
# bullseye's python2.7 packages unpacked (not installed) under the cache dir. Everything goes to
# $AUTOBAHN_HOME (default ~/.cache/wshost-autobahn); only the package registries are used.
#
# The cases are dealt round-robin to $AUTOBAHN_JOBS fuzzing clients run side by side (default:
# the machine's CPUs, at most 4): wstest is one Python process that keeps one core busy while
# the server idles, and the permessage-deflate cases (12.*, 13.*) take most of the time.
#
# Last line: `autobahn: N passed, M failed, K skipped` (skipped: UNIMPLEMENTED cases).
# Exit: 0 no FAILED case, 1 some FAILED case, 2 usage, 3 install or run error.
set -euo pipefail

say() { echo "[autobahn] $*" >&2; }
fail() { local code=$1; shift; say "error: $*"; exit "$code"; }

[[ $# -ge 1 ]] || fail 2 "usage: $0 ws://127.0.0.1:PORT/PATH [CASES]"
URL=$1
CASES=${2:-*}
[[ $URL =~ ^ws://(127\.[0-9.]+|localhost|\[::1\]):([0-9]+)(/.*)?$ ]] ||
  fail 2 "only loopback servers are tested here; got $URL"
PORT=${BASH_REMATCH[2]}

CACHE=${AUTOBAHN_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/wshost-autobahn}
VENV=$CACHE/venv
mkdir -p "$CACHE"

# The versions wstest is known to work with (its own package declares no dependencies).
PINS="autobahntestsuite==25.10.1 autobahn[accelerate,twisted]==0.10.9 txaio==2.1.0
Twisted==19.10.0 zope.interface==4.6.0 incremental==16.10.1 Automat==20.2.0 attrs==21.4.0
constantly==15.1.0 hyperlink==21.0.0 idna==2.10 PyHamcrest==1.10.1 pyOpenSSL==19.1.0
cryptography==3.3.2 cffi==1.15.1 pycparser==2.21 enum34==1.1.10 ipaddress==1.0.23
service_identity==18.1.0 pyasn1==0.5.1 pyasn1-modules==0.3.0 Jinja2==2.11.3 MarkupSafe==1.1.1
Werkzeug==1.0.1 klein==17.10.0 typing==3.10.0.0 unittest2==1.1.0 argparse==1.4.0
linecache2==1.0.0 traceback2==1.4.0 six==1.16.0 wsaccel==0.6.6 ujson==2.0.3 setuptools==44.0.0"
BUILD_PINS="Cython==3.0.12 setuptools==44.0.0 wheel==0.36.2"
VIRTUALENV=16.7.12
STAMP=$(printf '%s %s %s' "$PINS" "$BUILD_PINS" "$VIRTUALENV" | sha256sum | cut -c1-16)

works27() { "$1" -c 'import sys; assert sys.version_info[:2] == (2, 7)' >/dev/null 2>&1; }

# Python 2.7 from Debian 11's packages, unpacked under the cache with a private apt state.
debian27() {
  local apt=$CACHE/apt root=$CACHE/py27
  if [[ ! -x $root/usr/bin/python2.7 ]]; then
    mkdir -p "$apt/lists/partial" "$apt/parts" "$apt/debs"
    local mirror
    mirror=$(grep -hoE '^(URIs:|deb)[[:space:]]+[^[:space:]]+' /etc/apt/sources.list.d/*.sources \
      /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | grep -m1 '/debian/\?$') ||
      fail 3 "no Debian mirror in this machine's apt sources"
    echo "deb $mirror bullseye main" >"$apt/sources.list"
    local opts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o "Dir::Etc::sourceparts=$apt/parts"
      -o "Dir::State::Lists=$apt/lists" -o "APT::Sandbox::User=root")
    say "fetching python2.7 from Debian bullseye"
    apt-get "${opts[@]}" -qq update >&2 || fail 3 "apt-get update (bullseye) failed"
    (cd "$apt/debs" && apt-get "${opts[@]}" -qq download python2.7 python2.7-minimal \
      libpython2.7-minimal libpython2.7-stdlib libpython2.7 libpython2.7-dev python2.7-dev \
      libssl1.1 libffi7 >&2) || fail 3 "apt-get download failed"
    rm -rf "$root" && mkdir -p "$root"
    for deb in "$apt"/debs/*.deb; do dpkg -x "$deb" "$root"; done
  fi
  echo "$root/usr/bin/python2.7"
}

python27() {
  local c
  for c in ${AUTOBAHN_PY27:-} "$(command -v python2.7 || true)" \
    "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python2.7; do
    [[ -n $c && -x $c ]] && works27 "$c" && { echo "$c"; return; }
  done
  debian27
}

use27() {
  if [[ $1 == "$CACHE"/py27/* ]]; then
    export LD_LIBRARY_PATH="$CACHE/py27/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export CFLAGS="-I$CACHE/py27/usr/include ${CFLAGS:-}"
  fi
}

export PYTHONWARNINGS=ignore
if [[ -f $VENV/stamp && $(cat "$VENV/stamp") == "$STAMP" ]] && use27 "$(cat "$VENV/base")" &&
  "$VENV/bin/wstest" -a >/dev/null 2>&1; then
  :
else
  started=$SECONDS
  py=$(python27)
  use27 "$py"
  works27 "$py" || fail 3 "no working Python 2.7 ($py)"
  say "installing wstest with $py"
  mkdir -p "$CACHE/dl"
  wheel=$CACHE/dl/virtualenv-$VIRTUALENV-py2.py3-none-any.whl
  [[ -f $wheel ]] || python3 -m pip download -q --no-deps --only-binary=:all: -d "$CACHE/dl" \
    "virtualenv==$VIRTUALENV" >&2 || fail 3 "cannot download virtualenv $VIRTUALENV"
  rm -rf "$VENV"
  PYTHONPATH=$wheel "$py" -m virtualenv --no-download -q "$VENV" >&2 || fail 3 "virtualenv failed"
  tr ' ' '\n' <<<"$BUILD_PINS" >"$CACHE/dl/build-pins.txt"
  tr ' ' '\n' <<<"$PINS" | grep -v '^$' >"$CACHE/dl/pins.txt"
  PIP_CONSTRAINT=$CACHE/dl/build-pins.txt "$VENV/bin/pip" install -q --disable-pip-version-check \
    --no-python-version-warning -r "$CACHE/dl/pins.txt" >&2 || fail 3 "pip install failed"
  "$VENV/bin/wstest" -a >/dev/null 2>&1 || fail 3 "wstest does not start"
  echo "$py" >"$VENV/base"
  echo "$STAMP" >"$VENV/stamp"
  say "installed in $((SECONDS - started)) s"
fi

timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT" 2>/dev/null ||
  fail 3 "nothing listens on port $PORT"

RUN=$(mktemp -d "${TMPDIR:-/tmp}/autobahn.XXXXXX")
trap 'rm -rf "$RUN"' EXIT
REPORTS=${AUTOBAHN_OUTDIR:-$RUN/reports}
mkdir -p "$REPORTS"
JOBS=${AUTOBAHN_JOBS:-$(nproc 2>/dev/null || echo 1)}
[[ $JOBS =~ ^[0-9]+$ ]] || fail 2 "AUTOBAHN_JOBS must be a number; got $JOBS"
((JOBS < 1)) && JOBS=1
((JOBS > 4)) && JOBS=4
# The case patterns resolved as wstest resolves them, dealt round-robin into one spec per client
# (neighbouring cases cost alike, so every client gets its share of the slow ones).
"$VENV/bin/python" - "$RUN" "$REPORTS" "$URL" "$CASES" "$JOBS" <<'PY' || fail 3 "no case matches $CASES"
import json, os, sys
from autobahntestsuite.case import Cases, CaseCategories, CaseSubCategories
from autobahntestsuite.caseset import CaseSet
run, out, url, cases, jobs = sys.argv[1:]
jobs = int(jobs)
patterns = [c.strip() for c in cases.split(",") if c.strip()]
ids = CaseSet("fuzzing", "case", Cases, CaseCategories, CaseSubCategories).parseSpecCases(
    {"cases": patterns})
if not ids:
    sys.exit(1)
jobs = min(jobs, len(ids))
for k in range(jobs):
    outdir = out if jobs == 1 else os.path.join(out, "client-%d" % k)
    json.dump({"outdir": outdir, "servers": [{"agent": "wshost", "url": url}],
               "cases": ids[k::jobs], "exclude-cases": [], "exclude-agent-cases": {}},
              open(os.path.join(run, "spec-%d.json" % k), "w"))
PY
specs=("$RUN"/spec-*.json)
say "running cases $CASES against $URL with ${#specs[@]} client(s)"
pids=()
for spec in "${specs[@]}"; do
  (cd "$RUN" && exec timeout "${AUTOBAHN_TIMEOUT:-1800}" "$VENV/bin/wstest" -m fuzzingclient \
    -s "$spec") >"${spec%.json}.log" 2>&1 &
  pids+=($!)
done
timed_out=0
for pid in "${pids[@]}"; do
  set +e
  wait "$pid"
  code=$?
  set -e
  [[ $code -eq 124 ]] && timed_out=1
done
((timed_out)) && fail 3 "wstest timed out"
indexes=()
for spec in "${specs[@]}"; do
  index=$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["outdir"])' \
    "$spec")/index.json
  [[ -f $index ]] || { tail -20 "${spec%.json}.log" >&2; fail 3 "wstest wrote no report ($spec)"; }
  indexes+=("$index")
done

# A case passes with behaviour OK, NON-STRICT or INFORMATIONAL and a clean close; UNIMPLEMENTED
# (a feature the server does not offer) is skipped; anything else fails.
"$VENV/bin/python" - "${indexes[@]}" <<'PY'
import json, sys
index = {}
for path in sys.argv[1:]:
    for agent, cases in json.load(open(path)).items():
        index.setdefault(agent, {}).update(cases)
passed = failed = skipped = strict = nonstrict = 0
for cases in index.values():
    for case, r in sorted(cases.items()):
        behaviour, close = r.get("behavior"), r.get("behaviorClose")
        if behaviour == "UNIMPLEMENTED":
            skipped += 1
        elif behaviour in ("OK", "NON-STRICT", "INFORMATIONAL", "NO_CLOSE") and close not in ("FAILED", "UNCLEAN"):
            passed += 1
            strict += behaviour != "OK" or close in ("WRONG CODE", "FAILED BY CLIENT")
            if behaviour == "NON-STRICT" or close == "NON-STRICT":
                nonstrict += 1
                sys.stderr.write("NON-STRICT case %s: behavior=%s close=%s\n" % (case, behaviour, close))
        else:
            failed += 1
            sys.stderr.write("FAILED case %s: behavior=%s close=%s\n" % (case, behaviour, close))
if passed + failed + skipped == 0:
    sys.stderr.write("no case ran\n")
    sys.exit(3)
print("autobahn breakdown: %d OK, %d NON-STRICT or INFORMATIONAL, %d FAILED, %d UNIMPLEMENTED"
      % (passed - strict, strict, failed, skipped))
print("autobahn strictness: %d NON-STRICT" % nonstrict)
print("autobahn: %d passed, %d failed, %d skipped" % (passed, failed, skipped))
sys.exit(1 if failed else 0)
PY
