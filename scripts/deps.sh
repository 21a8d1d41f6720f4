#!/usr/bin/env bash
# Installs every Debian package the build, the tests and the demo use, when it is missing, and
# assumes nothing else (a machine that has never seen the project has none of them):
#   build:  protoc and the google/protobuf/*.proto files (etcd-client's build script needs
#           both: protobuf-compiler AND libprotobuf-dev), OpenSSL's headers (libssl-dev: the
#           etcd client's TLS), a C compiler and pkg-config;
#   run:    etcd 3 (server and etcdctl), PostgreSQL 15 server and client (psql, pgbench),
#           iproute2 (ip netns for the partition tests), openssl (test TLS certificates),
#           util-linux (runuser, setsid), procps, strace (the keeper's durability test),
#           python3-pip where python3 has no pip (PostgreSQL 16 and 18 come from PyPI),
#           python3-psycopg2 (a real client of the proxy's tests: scripts/clients.sh);
#   peers:  HAProxy and PgBouncer, which the benchmarks and tests compare against.
# Each package is checked by the file the project uses, not by name only. As root it
# installs; otherwise it prints the one command to run and fails.
set -euo pipefail

PG_BIN=${PG_BIN_PATH:-/usr/lib/postgresql/15/bin}
missing=()
need() { # need PACKAGE FILE-OR-COMMAND...: PACKAGE is missing when any of them is
  local pkg=$1; shift
  for f in "$@"; do
    if [[ $f == /* ]]; then [ -e "$f" ] || { missing+=("$pkg"); return; }
    else command -v "$f" >/dev/null 2>&1 || { missing+=("$pkg"); return; }
    fi
  done
}
need etcd-server etcd
need etcd-client etcdctl
need protobuf-compiler protoc
need libprotobuf-dev /usr/include/google/protobuf/descriptor.proto
need libssl-dev /usr/include/openssl/ssl.h
need gcc cc
need pkg-config pkg-config
need haproxy haproxy
need pgbouncer pgbouncer
need postgresql-15 "$PG_BIN/postgres" "$PG_BIN/initdb" "$PG_BIN/pg_rewind" "$PG_BIN/pg_basebackup"
need postgresql-client-15 psql pgbench
need iproute2 ip tc
need openssl openssl
need util-linux runuser setsid
need procps ps
need strace strace
# psycopg2 (libpq) is one of the real clients the proxy's client tests drive.
need python3-psycopg2 /usr/lib/python3/dist-packages/psycopg2/__init__.py
# pip installs PostgreSQL 16 and 18 from PyPI (scripts/pg-versions.sh).
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)

if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: everything needed is installed"
  exit 0
fi

# Recommends are left out to keep the install small; everything the project uses is named
# above (libprotobuf-dev is only a recommendation of protobuf-compiler, hence its own line).
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
# Check again: a package that installed but did not bring the file we use is an error here,
# not a confusing build failure later.
missing=()
need protobuf-compiler protoc
need libprotobuf-dev /usr/include/google/protobuf/descriptor.proto
need libssl-dev /usr/include/openssl/ssl.h
need etcd-server etcd
need postgresql-15 "$PG_BIN/postgres"
if [ ${#missing[@]} -ne 0 ]; then
  echo "deps: still missing after the install: ${missing[*]}" >&2
  exit 1
fi
echo "deps: done"
