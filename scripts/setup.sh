#!/usr/bin/env bash
# Installs what Weir's tests, demo and benchmarks need on a fresh Debian/Ubuntu machine:
# PostgreSQL's server and client binaries (initdb, postgres, psql, pgbench); with
# --with-pgbouncer, PgBouncer for the benchmark comparison; with --with-chromium, a headless
# browser for the dashboard test. Installs only what is missing; safe to run again.
set -euo pipefail

want_pgbouncer=0
want_chromium=0
for arg in "$@"; do
  case "$arg" in
    --with-pgbouncer) want_pgbouncer=1 ;;
    --with-chromium) want_chromium=1 ;;
    *) echo "setup: unknown option $arg (expected --with-pgbouncer, --with-chromium)" >&2; exit 2 ;;
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
echo "setup: PostgreSQL binaries in $(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | tail -n1)"
