#!/usr/bin/env bash
# The main job: install what is missing, build, and bring up a local cluster on loopback
# (etcd, three keepers with PostgreSQL, two sentinels, a proxy) with its data under
# .cluster/, then show a failover. Subcommands: up (default), status, failover, stop.
# Processes are tracked by PID files and stopped by PID, never by name.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${STOLON_DEMO_DIR:-$ROOT/.cluster}
ETCD_PORT=${STOLON_DEMO_ETCD_PORT:-12379}
ETCD_PEER_PORT=${STOLON_DEMO_ETCD_PEER_PORT:-12380}
CLUSTER=${STOLON_DEMO_CLUSTER:-demo}
ENDPOINT="http://127.0.0.1:$ETCD_PORT"
PROXY_PORT=${STOLON_DEMO_PROXY_PORT:-25430}
read -r -a KEEPER_PORTS <<<"${STOLON_DEMO_KEEPER_PORTS:-25432 25433 25434}"
BIN=${STOLON_DEMO_BIN:-$ROOT/target/release}
COMMON=(--cluster-name "$CLUSTER" --store-endpoints "$ENDPOINT")

step() { printf '\n==> %s\n' "$*"; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_etcd() {
  mkdir -p "$DIR/pids" "$DIR/logs" "$DIR/etcd"
  if pid_alive "$DIR/pids/etcd"; then
    echo "etcd already running (pid $(cat "$DIR/pids/etcd"))"
    return
  fi
  etcd --name demo --data-dir "$DIR/etcd" \
    --listen-client-urls "$ENDPOINT" --advertise-client-urls "$ENDPOINT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "demo=http://127.0.0.1:$ETCD_PEER_PORT" \
    >"$DIR/logs/etcd.log" 2>&1 < /dev/null &
  echo $! >"$DIR/pids/etcd"
  for _ in $(seq 1 100); do
    if ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINT" endpoint health >/dev/null 2>&1; then
      echo "etcd healthy at $ENDPOINT (pid $(cat "$DIR/pids/etcd"))"
      return
    fi
    if ! pid_alive "$DIR/pids/etcd"; then
      echo "etcd exited; last log lines:" >&2
      tail -n 5 "$DIR/logs/etcd.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "etcd did not become healthy in 10s (log: $DIR/logs/etcd.log)" >&2
  exit 1
}

# Starts a daemon in the background with its log and PID file, unless it runs already.
spawn() {
  local name=$1; shift
  if pid_alive "$DIR/pids/$name"; then
    echo "$name already running (pid $(cat "$DIR/pids/$name"))"
    return
  fi
  "$@" >>"$DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/pids/$name"
  # Not the shell's job any more: no "Killed" notice when the demo kills it.
  disown $! 2>/dev/null || true
  echo "$name started (pid $!, log $DIR/logs/$name.log)"
}

secrets() {
  mkdir -p "$DIR/secrets"
  chmod 700 "$DIR/secrets"
  for s in su repl; do
    [ -s "$DIR/secrets/$s.pw" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DIR/secrets/$s.pw")
  done
}

start_keeper() {
  local i=$1 port=${KEEPER_PORTS[$(( $1 - 1 ))]}
  spawn "keeper$i" "$BIN/stolon-keeper" "${COMMON[@]}" --uid "keeper$i" \
    --data-dir "$DIR/keeper$i" --pg-listen-address 127.0.0.1 --pg-port "$port" \
    --pg-su-passwordfile "$DIR/secrets/su.pw" --pg-repl-passwordfile "$DIR/secrets/repl.pw"
}

start_daemons() {
  secrets
  cat >"$DIR/spec.json" <<EOS
{"initMode": "new", "sleepInterval": "2s", "failInterval": "10s",
 "proxyCheckInterval": "2s", "proxyTimeout": "6s",
 "pgParameters": {"max_connections": "100"}}
EOS
  for i in 1 2 3; do start_keeper "$i"; done
  for i in 1 2; do
    spawn "sentinel$i" "$BIN/stolon-sentinel" "${COMMON[@]}" --uid "sentinel$i" \
      --initial-cluster-spec "$DIR/spec.json"
  done
  spawn proxy "$BIN/stolon-proxy" "${COMMON[@]}" --uid proxy1 --listen-address 127.0.0.1 \
    --port "$PROXY_PORT" --metrics-listen-address "127.0.0.1:$((PROXY_PORT + 1))"
}

psql_proxy() {
  PGPASSWORD=$(cat "$DIR/secrets/su.pw") PGCONNECT_TIMEOUT=2 \
    psql -X -q -t -A -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -d postgres "$@"
}

# Waits up to $1 seconds for a write through the proxy; prints the seconds it took.
wait_writable() {
  local start=$(date +%s.%N)
  for _ in $(seq 1 $(( $1 * 10 ))); do
    if psql_proxy -c "CREATE TABLE IF NOT EXISTS demo (at timestamptz); INSERT INTO demo VALUES (now())" >/dev/null 2>&1; then
      awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $start }"
      return 0
    fi
    sleep 0.1
  done
  return 1
}

master_keeper() {
  local port
  port=$(psql_proxy -c "SELECT inet_server_port()" 2>/dev/null) || return 1
  for i in 1 2 3; do
    if [ "${KEEPER_PORTS[$(( i - 1 ))]}" = "$port" ]; then echo "keeper$i"; return 0; fi
  done
  return 1
}

status() {
  if ! pid_alive "$DIR/pids/etcd"; then
    echo "no cluster running (start it with: scripts/cluster.sh up)"
    return 1
  fi
  echo "etcd: $ENDPOINT (pid $(cat "$DIR/pids/etcd"))"
  for f in "$DIR"/pids/*; do
    local n; n=$(basename "$f")
    [ "$n" = etcd ] && continue
    if pid_alive "$f"; then echo "$n: running (pid $(cat "$f"))"; else echo "$n: not running"; fi
  done
  echo "master (through the proxy on 127.0.0.1:$PROXY_PORT): $(master_keeper || echo none)"
  echo "keys under stolon/cluster/$CLUSTER:"
  ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINT" get --prefix --keys-only "stolon/cluster/$CLUSTER" \
    | sed '/^$/d; s/^/  /' || true
}

pgbench_bin() {
  local b=${PG_BIN_PATH:-/usr/lib/postgresql/15/bin}/pgbench
  [ -x "$b" ] && echo "$b" || command -v pgbench
}

pgbench_proxy() {
  PGPASSWORD=$(cat "$DIR/secrets/su.pw") "$(pgbench_bin)" -h 127.0.0.1 -p "$PROXY_PORT" -U postgres "$@" postgres
}

# Kills the master's keeper (and so its PostgreSQL) while pgbench runs through the proxy,
# times the first write through the proxy on the new master, then brings the old keeper
# back as a standby.
demo_failover() {
  local old
  old=$(master_keeper) || { echo "no master to fail over" >&2; return 1; }
  if [ -n "$(pgbench_bin)" ]; then
    pgbench_proxy -i -s 1 -q >"$DIR/logs/pgbench-init.log" 2>&1 || true
    pgbench_proxy -n -c 4 -j 2 -T 20 -P 1 >"$DIR/logs/pgbench.log" 2>&1 &
    local bench=$!
    sleep 3
    echo "pgbench through the proxy before the kill: $(grep -E '^progress' "$DIR/logs/pgbench.log" | tail -n 1)"
  fi
  local rows; rows=$(psql_proxy -c "SELECT count(*) FROM demo")
  # Async replication: wait until both standbys replayed everything, so the demo shows a
  # failover without loss (a write acknowledged just before the kill may be lost in async
  # mode, within maxStandbyLag; synchronous replication loses none).
  for _ in $(seq 1 100); do
    [ "$(psql_proxy -c "SELECT count(*) FROM pg_stat_replication WHERE replay_lsn >= pg_current_wal_lsn()" 2>/dev/null)" = 2 ] && break
    sleep 0.1
  done
  echo "master is $old ($rows rows in table demo); kill -9 $old (pid $(cat "$DIR/pids/$old"))"
  kill -KILL "$(cat "$DIR/pids/$old")"
  rm -f "$DIR/pids/$old"
  local took
  took=$(wait_writable 60) || { echo "no write through the proxy within 60 s" >&2; return 1; }
  echo "writes go through the proxy again after ${took}s; new master: $(master_keeper)"
  echo "rows before the kill: $rows; now: $(psql_proxy -c "SELECT count(*) FROM demo") (one written since)"
  start_keeper "${old#keeper}"
  echo "$old restarted: it rejoins as a standby of the new master"
  if [ -n "${bench:-}" ]; then
    wait "$bench" 2>/dev/null || true
    echo "pgbench's clients cut by the proxy when the master died: $(grep -cE 'client [0-9]+ aborted' "$DIR/logs/pgbench.log") of 4 (log $DIR/logs/pgbench.log)"
    echo "pgbench through the proxy on the new master: $(pgbench_proxy -n -c 4 -j 2 -T 3 2>&1 | grep -E '^tps' | head -n 1)"
  fi
}

stop() {
  # Clients' side first, the store last: keepers stop PostgreSQL cleanly on SIGTERM.
  for f in "$DIR"/pids/proxy "$DIR"/pids/sentinel* "$DIR"/pids/keeper* "$DIR"/pids/etcd; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      echo "stopping $(basename "$f") (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  echo "stopped"
}

ctl() { "$BIN/stolonctl" "${COMMON[@]}" "$@"; }

up() {
  if [ -z "${STOLON_DEMO_SKIP_BUILD:-}" ]; then
    step "installing what is missing"
    bash scripts/deps.sh
    step "building (release)"
    cargo build --release --workspace
  fi
  step "starting etcd"
  start_etcd
  step "starting three keepers, two sentinels and a proxy"
  start_daemons
  step "waiting for the first write through the proxy"
  wait_writable 120 >/dev/null || { echo "the cluster did not come up; logs in $DIR/logs" >&2; exit 1; }
  echo "master: $(master_keeper)"
  step "waiting for the standbys"
  for _ in $(seq 1 600); do
    [ "$(ctl status -f json 2>/dev/null | grep -c '"pg_healthy": true')" = 3 ] && break
    sleep 0.1
  done
  ctl status
  step "failover demo"
  demo_failover
  step "status"
  status || true
  ctl status || true
  cat <<EOT

Connect through the proxy (the superuser password is in $DIR/secrets/su.pw):
  PGPASSWORD=\$(cat $DIR/secrets/su.pw) psql "postgresql://postgres@127.0.0.1:$PROXY_PORT/postgres"
  status:    scripts/cluster.sh status
  failover:  scripts/cluster.sh demo --failover
  admin:     $BIN/stolonctl --cluster-name $CLUSTER --store-endpoints $ENDPOINT status
  stop:      scripts/cluster.sh stop
EOT
}

case "${1:-up}" in
  up) up ;;
  status) status ;;
  failover) demo_failover ;;
  demo) demo_failover ;;
  stop) stop ;;
  *) echo "usage: scripts/cluster.sh [up|status|demo --failover|stop]" >&2; exit 2 ;;
esac
