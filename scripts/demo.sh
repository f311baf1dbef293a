#!/usr/bin/env bash
# Starts a throwaway PostgreSQL, Weir in front of it, and a realistic load through Weir.
# Extra arguments go to `weir demo` (see `weir demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo run --release --locked -q -p weir -- demo "$@"
