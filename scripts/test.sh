#!/usr/bin/env bash
# Runs every test: unit tests, protocol tests, and integration tests against a real
# PostgreSQL that the test kit starts from the system's binaries. Installs PostgreSQL (and
# Chromium, which the dashboard test drives headless, and the drivers of the driver tests)
# first if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-chromium --with-drivers
cargo test --workspace --locked "$@"
# The idle client's task size is a release-build property (issue 8's memory target).
cargo test --release --locked -p weir-proxy --lib -- session::size_tests::an_idle_clients_task_stays_small
