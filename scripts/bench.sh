#!/usr/bin/env bash
# One command for the performance comparison: installs PostgreSQL and PgBouncer if missing,
# then measures direct PostgreSQL, PgBouncer and Weir in one run and appends the dated
# tables to docs/BENCHMARKS.md. Extra arguments go to scripts/bench_compare.py
# (--seconds, --repeat, --clients, --modes, --idle, --pool-size, --workers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-pgbouncer
python3 scripts/bench_compare.py --doc docs/BENCHMARKS.md "$@"
