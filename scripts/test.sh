#!/usr/bin/env bash
# Runs every test: unit tests, protocol tests, and integration tests against a real
# PostgreSQL that the test kit starts from the system's binaries. Installs PostgreSQL (and
# Chromium, which the dashboard test drives headless) first if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-chromium
cargo test --workspace --locked "$@"
