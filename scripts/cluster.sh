#!/usr/bin/env bash
# The main job: install what is missing, build, and bring up a local cluster on loopback
# with its data under .cluster/. Subcommands: up (default), status, stop.
# Processes are tracked by PID files and stopped by PID, never by name.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${STOLON_DEMO_DIR:-$ROOT/.cluster}
ETCD_PORT=${STOLON_DEMO_ETCD_PORT:-12379}
ETCD_PEER_PORT=${STOLON_DEMO_ETCD_PEER_PORT:-12380}
CLUSTER=${STOLON_DEMO_CLUSTER:-demo}
ENDPOINT="http://127.0.0.1:$ETCD_PORT"

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

status() {
  if ! pid_alive "$DIR/pids/etcd"; then
    echo "no cluster running (start it with: scripts/cluster.sh up)"
    return 1
  fi
  echo "etcd: $ENDPOINT (pid $(cat "$DIR/pids/etcd"))"
  echo "keys under stolon/cluster/$CLUSTER:"
  ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINT" get --prefix --keys-only "stolon/cluster/$CLUSTER" \
    | sed '/^$/d; s/^/  /' || true
}

stop() {
  for f in "$DIR"/pids/*; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      echo "stopping $(basename "$f") (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  echo "stopped"
}

up() {
  step "installing what is missing"
  bash scripts/deps.sh
  step "building (release)"
  cargo build --release --workspace
  step "starting etcd"
  start_etcd
  step "status"
  status || true
  cat <<EOT

The store is up. The keeper, sentinel and proxy daemons are not built yet (see the open
issues); this command will start three keepers, two sentinels and a proxy once they are.
  status:  scripts/cluster.sh status
  stop:    scripts/cluster.sh stop
EOT
}

case "${1:-up}" in
  up) up ;;
  status) status ;;
  stop) stop ;;
  *) echo "usage: scripts/cluster.sh [up|status|stop]" >&2; exit 2 ;;
esac
