#!/usr/bin/env bash
# The test command: installs what is missing, checks formatting and lints, and runs every
# test (unit, integration against real etcd and PostgreSQL, and end-to-end scenarios).
# `--long` adds the repetitions and the full scenario matrix (not run in CI).
set -euo pipefail
cd "$(dirname "$0")/.."

long=0
for a in "$@"; do
  case "$a" in
    --long) long=1 ;;
    *) echo "usage: scripts/test.sh [--long]" >&2; exit 2 ;;
  esac
done

bash scripts/deps.sh
# pgx and pgjdbc, real clients of the proxy's tests (proxy/tests/clients.rs).
bash scripts/clients.sh
# A clean clone's build has no use for incremental state (it saves ~2 GB of disk there).
if [ "${CI:-}" = "true" ]; then
  export CARGO_INCREMENTAL=0
fi
# The debug build and the fuzz build need ~6 GB; say so plainly rather than fail mid-link.
free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
echo "== disk: $(( free_kb / 1024 / 1024 )) GiB free where the build goes"
if [ "$free_kb" -lt $(( 6 * 1024 * 1024 )) ]; then
  echo "warning: less than 6 GiB free; the build may fail with 'No space left on device'" >&2
fi
start=$(date +%s)
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== unused dependencies (cargo machete)"
if ! command -v cargo-machete >/dev/null 2>&1; then
  cargo install cargo-machete --version 0.9.2 --locked
fi
cargo machete
echo "== cargo test"
if [ "$long" -eq 1 ]; then
  STOLON_TEST_LONG=1 cargo test --workspace -- --include-ignored
  echo "== the partition and failover suites again with spec failsafeMode on"
  STOLON_E2E_FAILSAFE=1 cargo test -p e2e --test partitions --test failover
  echo "== the suite catches a broken system"
  bash scripts/e2e-broken.sh
  echo "== fuzzing (10 min per target)"
  bash scripts/fuzz.sh --long
else
  cargo test --workspace
  echo "== fuzzing (20 s per target)"
  bash scripts/fuzz.sh
fi
# PostgreSQL 16 and 18 beside Debian's 15: the core scenarios (init, kill -9 failover async
# and sync, pg_rewind, switchover, standby cluster, PITR, sessions moved) on each; with --long, every e2e
# scenario. E2E_PG_MAJOR makes each scenario check that every keeper ran that version.
bash scripts/pg-versions.sh
core=(init_with_three_keepers_and_two_sentinels_one_master_rest_standbys
  init_pitr_with_and_without_a_recovery_target_time
  kill9_master_keeper_and_postgres_async kill9_master_keeper_and_postgres_sync
  old_master_rejoins_with_pg_rewind planned_switchover_under_load_loses_nothing
  standby_cluster_async
  a_switchover_moves_idle_sessions_with_their_settings_statements_and_cancel_key
  pgbench_prepared_runs_through_a_switchover_without_an_error
  a_kill_9_failover_moves_idle_sessions_whose_state_the_proxy_proved)
for v in 16 18; do
  echo "== PostgreSQL $v"
  export PG_BIN_PATH E2E_PG_MAJOR=$v
  PG_BIN_PATH=$(bash scripts/pg-versions.sh --print "$v")
  if [ "$long" -eq 1 ]; then
    STOLON_TEST_LONG=1 cargo test -p e2e
  else
    cargo test -p e2e --test initialisation --test failover --test standby_cluster --test moves -- \
      --exact "${core[@]}"
  fi
  unset PG_BIN_PATH E2E_PG_MAJOR
done
echo "== all tests passed in $(( $(date +%s) - start ))s"
