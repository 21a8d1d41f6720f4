#!/usr/bin/env bash
# Builds the real clients the proxy's client tests drive (proxy/tests/clients.rs), besides
# psql, psycopg2 (Debian's, scripts/deps.sh) and tokio-postgres:
#   pgx     clients/pgx, built with Go (modules from the Go module proxy) into
#           target/clients/pgx-client;
#   pgjdbc  the PostgreSQL JDBC driver from Maven Central into target/clients/postgresql.jar;
#           clients/pgjdbc/Client.java runs as a single source file (Java 11+).
# Each is skipped when already there; a missing toolchain (go, java, mvn) is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/clients
mkdir -p "$out"
for tool in go java mvn; do
  command -v "$tool" >/dev/null 2>&1 || { echo "clients: $tool is missing (the machine's Go, Java and Maven)" >&2; exit 1; }
done
if [ ! -x "$out/pgx-client" ] || [ clients/pgx/main.go -nt "$out/pgx-client" ]; then
  echo "== clients: building the pgx client"
  (cd clients/pgx && go build -o "../../$out/pgx-client" .)
fi
PGJDBC_VERSION=42.7.14
if [ ! -f "$out/postgresql.jar" ]; then
  echo "== clients: fetching pgjdbc $PGJDBC_VERSION"
  mvn -q -B dependency:copy -Dartifact="org.postgresql:postgresql:$PGJDBC_VERSION" \
    -DoutputDirectory="$out/pgjdbc-dl"
  mv "$out/pgjdbc-dl/postgresql-$PGJDBC_VERSION.jar" "$out/postgresql.jar"
  rmdir "$out/pgjdbc-dl"
fi
echo "clients: pgx and pgjdbc ready in $out"
