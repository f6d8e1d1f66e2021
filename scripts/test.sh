#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and the integration tests against PostgreSQL
# (127.0.0.1:5432, trust auth), SQLite, an SQS-protocol server (moto, from PyPI, installed into
# .venv and started here on a free loopback port), headless Chromium and PgBouncer (Debian's,
# installed here when missing). Starts the local PostgreSQL cluster if it is down.
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}"

if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "PostgreSQL is not answering on 127.0.0.1:5432; trying to start it" >&2
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

# Debian's chromium: the dashboard's browser test drives it headless over the DevTools protocol.
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser test" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y chromium >/dev/null || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y chromium >/dev/null; }
fi

# Debian's PgBouncer: the pooler tests put a real one in front of the test database.
if ! [ -x /usr/sbin/pgbouncer ] && ! command -v pgbouncer >/dev/null 2>&1; then
  echo "installing Debian's pgbouncer for the connection-pooler tests" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y pgbouncer >/dev/null || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y pgbouncer >/dev/null; }
fi

# moto[server]: a real SQS-protocol server on loopback.
VENV="${BULKFLOW_VENV:-.venv}"
if [ ! -x "$VENV/bin/moto_server" ]; then
  echo "installing moto[server] into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]>=5,<6"
fi
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" >"${TMPDIR:-/tmp}/bulkflow-moto-$PORT.log" 2>&1 &
MOTO_PID=$!
trap 'kill "$MOTO_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/', timeout=1)" 2>/dev/null && break
  sleep 0.2
done
export BULKFLOW_TEST_SQS_ENDPOINT="http://127.0.0.1:$PORT"
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
export AWS_ENDPOINT_URL_SQS="$BULKFLOW_TEST_SQS_ENDPOINT"

cargo test --features failpoints "$@"

# Fault tests that take the whole PostgreSQL cluster down (a restart mid-run) run alone, after
# the rest, so they cannot break tests sharing the cluster.
if [ "$#" -eq 0 ]; then
  cargo test --features failpoints --test e2e -- --ignored --test-threads=1
fi
