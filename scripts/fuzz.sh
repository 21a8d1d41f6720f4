#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets: the proxy's startup parser, session-start
# reader (cancel keys), SCRAM/authentication parsers and a session move's readers, the clusterdata,
# spec and info readers, the spec merge patch, the relay's transaction tracking) for a while
# each, and fails on any crash.
#   scripts/fuzz.sh            20 s per target (scripts/test.sh runs this)
#   scripts/fuzz.sh --long     10 min per target (scripts/test.sh --long)
#   scripts/fuzz.sh --secs N   N s per target
# cargo-fuzz needs nightly flags (-Z sanitizer): RUSTC_BOOTSTRAP=1 lets the pinned stable
# toolchain take them. seeds/<target> holds real documents (Go stolon's) to start from. The corpus grows in fuzz/corpus/<target> (kept between runs, not
# committed); a crash leaves its input in fuzz/artifacts/<target> and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=20
while [ $# -gt 0 ]; do
  case "$1" in
    --long) secs=600 ;;
    --secs) secs=$2; shift ;;
    *) echo "usage: scripts/fuzz.sh [--long | --secs N]" >&2; exit 2 ;;
  esac
  shift
done

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== installing cargo-fuzz (from crates.io)"
  cargo install cargo-fuzz --version 0.13.2 --locked
fi

export RUSTC_BOOTSTRAP=1
cd fuzz
logs=$(mktemp -d)
echo "== building the fuzz targets"
if ! cargo fuzz build >"$logs/build.log" 2>&1; then
  tail -40 "$logs/build.log"
  echo "fuzz: the build failed (log $logs/build.log)"
  exit 1
fi
targets=$(cargo fuzz list)
failed=0
for t in $targets; do
  mkdir -p "corpus/$t"
  dict=()
  # The JSON dictionary helps the document readers only (not the wire-protocol parsers).
  case "$t" in startup | session_start | scram | session_state | txstate) ;; *) dict=(-dict=json.dict) ;; esac
  # New inputs go to corpus/<t>; seeds/<t> (committed) starts it from real documents.
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  if cargo fuzz run "$t" "corpus/$t" "${seeds[@]}" -- -max_total_time="$secs" "${dict[@]}" \
      >"$logs/$t.log" 2>&1; then
    runs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$logs/$t.log" | tail -1)
    echo "fuzz $t: ${runs:-finished}, no crash (corpus $(ls "corpus/$t" | wc -l) inputs)"
  else
    echo "fuzz $t: FAILED (log $logs/$t.log; input in fuzz/artifacts/$t)"
    tail -30 "$logs/$t.log"
    failed=1
  fi
done
exit $failed
