#!/usr/bin/env bash
# Builds a PgBouncer with prepared-statement support in transaction mode (1.21 or later) for
# the comparison, since Debian 12 packages 1.18, which has none. It takes the source package
# of Debian's next release (13, "trixie": 1.24.1) from Debian's mirror, builds it against
# this system's libraries and installs it under /opt/pgbouncer-<version>. Nothing of it is
# kept in this repository. Then:
#   WEIR_BENCH_PGBOUNCER=/opt/pgbouncer-1.24/bin/pgbouncer bash scripts/bench.sh
# Not used by the tests or CI.
set -euo pipefail
work=$(mktemp -d /tmp/pgbouncer-src.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo 'deb-src http://deb.debian.org/debian trixie main' > "$work/sources.list"
apt=(-o "Dir::Etc::sourcelist=$work/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$work/lists"
     -o "Dir::Cache=$work/cache")
apt-get "${apt[@]}" update -q
(cd "$work" && apt-get "${apt[@]}" source --download-only pgbouncer)
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q libevent-dev libc-ares-dev libssl-dev pkg-config make gcc
tar -C "$work" -xzf "$work"/pgbouncer_*.orig.tar.gz
src=$(echo "$work"/pgbouncer-*/)
version=$(basename "$src" | sed 's/^pgbouncer-//; s/\.[0-9]*$//')
prefix=/opt/pgbouncer-$version
(cd "$src" && ./configure -q --prefix="$prefix" --with-cares --without-pam --without-systemd \
    && make -s -j"$(nproc)" && make -s install)
"$prefix/bin/pgbouncer" --version
echo "installed: $prefix/bin/pgbouncer"
