#!/usr/bin/env bash
# Shows that the end-to-end suite catches a broken system. Each run breaks one safety
# mechanism on purpose (STOLON_E2E_BREAK, honoured only by binaries built with the cargo
# feature control/fault-injection, as `cargo test` and this script build them) and runs the scenario that must then FAIL:
#   no-self-fencing   the keeper never fences a master that lost the store (and arms no
#                     watchdog): an isolated old master keeps taking writes
#   no-proxy-fencing  a proxy cut from the store keeps routing
#   lowest-wal        the sentinel elects the standby with the LOWEST WAL position
# The script fails if any broken system passes its scenario. Run by `scripts/test.sh
# --long`; takes about 3 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins --features control/fault-injection --quiet
cargo test -p e2e --no-run --quiet 2>/dev/null
logs=$(mktemp -d)
missed=0
run() {
  local brk=$1 file=$2 test=$3
  echo "== STOLON_E2E_BREAK=$brk  $file::$test  (must fail)"
  if STOLON_E2E_BREAK=$brk cargo test -q -p e2e --test "$file" -- --exact "$test" \
      >"$logs/$brk.log" 2>&1; then
    echo "   NOT CAUGHT: the scenario passed with $brk"
    missed=1
  else
    echo "   caught: $(grep -m1 -A1 'panicked at' "$logs/$brk.log" | tail -1)"
  fi
}
run no-self-fencing partitions isolated_master_fences_itself_before_a_new_master_and_rejoins
run no-proxy-fencing partitions a_proxy_cut_from_etcd_fences_and_the_sentinel_waits_for_it
run lowest-wal failover kill9_master_keeper_and_postgres_async
echo "logs: $logs"
exit $missed
