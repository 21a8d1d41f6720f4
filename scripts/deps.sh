#!/usr/bin/env bash
# Installs what the project needs from Debian when it is missing: etcd, protoc (etcd-client
# builds with it), PostgreSQL 15 server binaries, and the peers the benchmarks compare
# against (HAProxy, PgBouncer). As root it installs; otherwise it prints the one command
# to run and fails.
set -euo pipefail

PG_BIN=${PG_BIN_PATH:-/usr/lib/postgresql/15/bin}
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v pgbouncer >/dev/null 2>&1 || missing+=(pgbouncer)
[ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client-15)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)

if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: everything needed is installed"
  exit 0
fi

cmd="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "deps: missing packages: ${missing[*]}" >&2
  echo "deps: run this as root, then try again:" >&2
  echo "  sudo apt-get update && sudo $cmd" >&2
  exit 1
fi
echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
$cmd -qq
# Debian starts these services on install where systemd runs; the project starts its own.
for svc in etcd haproxy pgbouncer postgresql; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done
echo "deps: done"
