#!/usr/bin/env bash
# Installs what Weir's tests, demo and benchmarks need on a fresh Debian/Ubuntu machine:
# PostgreSQL's server and client binaries (initdb, postgres, psql, pgbench); with
# --with-pgbouncer, PgBouncer for the benchmark comparison; with --with-chromium, a headless
# browser for the dashboard test; with --with-drivers, the drivers the driver tests run
# (crates/weir/tests/it/drivers.rs): asyncpg and psycopg from PyPI, node-postgres from npm and
# a sqlx client built from crates.io, under target/drivers, pgjdbc, Java and Node.js from the
# system's packages. Installs only
# what is missing; safe to run again.
set -euo pipefail

want_pgbouncer=0
want_chromium=0
want_drivers=0
for arg in "$@"; do
  case "$arg" in
    --with-pgbouncer) want_pgbouncer=1 ;;
    --with-chromium) want_chromium=1 ;;
    --with-drivers) want_drivers=1 ;;
    *) echo "setup: unknown option $arg (expected --with-pgbouncer, --with-chromium, --with-drivers)" >&2; exit 2 ;;
  esac
done

have_pg_server() {
  local bindir
  bindir=$(pg_config --bindir 2>/dev/null || true)
  [ -n "$bindir" ] && [ -x "$bindir/initdb" ] && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

packages=()
have_pg_server || packages+=(postgresql)
command -v psql >/dev/null 2>&1 || packages+=(postgresql-client)
if [ "$want_pgbouncer" = 1 ] && ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  packages+=(pgbouncer)
fi
if [ "$want_chromium" = 1 ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  packages+=(chromium)
fi
if [ "$want_drivers" = 1 ]; then
  command -v java >/dev/null 2>&1 || packages+=(default-jre-headless)
  [ -f /usr/share/java/postgresql.jar ] || packages+=(libpostgresql-jdbc-java)
  command -v node >/dev/null 2>&1 || packages+=(nodejs)
  command -v npm >/dev/null 2>&1 || packages+=(npm)
  python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
fi

if [ "${#packages[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing ${packages[*]}"
  # The tests start their own throwaway servers: no system cluster is needed.
  $sudo mkdir -p /etc/postgresql-common
  if [ ! -f /etc/postgresql-common/createcluster.conf ]; then
    echo "create_main_cluster = false" | $sudo tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! $sudo apt-get install -y -q "${packages[@]}" >/tmp/weir-apt.log 2>&1; then
    $sudo apt-get update -q >>/tmp/weir-apt.log 2>&1
    $sudo apt-get install -y -q "${packages[@]}" >>/tmp/weir-apt.log 2>&1 || {
      cat /tmp/weir-apt.log
      echo "setup: could not install ${packages[*]}" >&2
      exit 1
    }
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust from https://rustup.rs" >&2
  exit 1
fi
if [ "$want_drivers" = 1 ]; then
  # Pinned, so a new release cannot turn the suite red overnight. Installed into the
  # project's target directory, not the system's Python or Node.
  drivers="$(cd "$(dirname "$0")/.." && pwd)/target/drivers"
  if ! PYTHONPATH="$drivers/python" python3 -c "import asyncpg, psycopg, sys
sys.exit(asyncpg.__version__ != '0.32.0' or psycopg.__version__ != '3.3.9')" >/dev/null 2>&1; then
    echo "setup: installing asyncpg and psycopg into $drivers/python"
    pip=(python3 -m pip install -q --disable-pip-version-check --upgrade --target "$drivers/python"
      "asyncpg==0.32.0" "psycopg[binary]==3.3.9")
    "${pip[@]}" >/tmp/weir-pip.log 2>&1 || "${pip[@]}" --break-system-packages >>/tmp/weir-pip.log 2>&1 || {
      cat /tmp/weir-pip.log
      echo "setup: could not install asyncpg and psycopg" >&2
      exit 1
    }
  fi
  if ! grep -qs '"version": "8.23.1"' "$drivers/node/node_modules/pg/package.json"; then
    echo "setup: installing node-postgres into $drivers/node"
    mkdir -p "$drivers/node"
    npm install --silent --no-audit --no-fund --prefix "$drivers/node" pg@8.23.1 >/tmp/weir-npm.log 2>&1 || {
      cat /tmp/weir-npm.log
      echo "setup: could not install node-postgres" >&2
      exit 1
    }
  fi
  # Its own workspace and lock file; cargo rebuilds it only when its source changes.
  root="$(cd "$(dirname "$0")/.." && pwd)"
  cargo build -q --locked --manifest-path "$root/crates/weir/tests/drivers/sqlx_client/Cargo.toml" \
    --target-dir "$drivers/sqlx" || {
    echo "setup: could not build the sqlx client (crates/weir/tests/drivers/sqlx_client)" >&2
    exit 1
  }
fi

echo "setup: PostgreSQL binaries in $(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | tail -n1)"
