#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ one after another, each for SECONDS (default 600),
# at low CPU priority. By hand, not in CI: needs a nightly toolchain.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      # targets: startup frontend config (default all)
#
# Prints each target's executions and whether it crashed; exits 1 if any did. Crashing
# inputs are left in fuzz/artifacts/TARGET/, logs in fuzz/target/fuzz-TARGET.log. The corpus
# grows in fuzz/corpus/TARGET/ and starts from the seeds in fuzz/seeds/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-600}
[[ $# -gt 0 ]] && shift
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(startup frontend config)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

failed=0
for t in "${targets[@]}"; do
  log=target/fuzz-$t.log
  mkdir -p target "corpus/$t"
  echo "fuzz: $t for ${seconds}s (log: fuzz/$log)"
  if nice -n 19 cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$seconds" \
       </dev/null >"$log" 2>&1; then
    status="no crash"
  elif grep -q 'Test unit written to' "$log"; then
    status=CRASHED failed=1
  else
    status="FAILED (did not run)" failed=1
  fi
  runs=$(grep -E '^Done [0-9]+ runs' "$log" | tail -1 || true)
  echo "fuzz: $t: $status; ${runs:-$(grep -oE '^#[0-9]+' "$log" | tail -1 || true) runs}"
  [[ $failed == 0 ]] || grep -iE 'panicked|error|test unit written' "$log" | head -5 || true
done
exit "$failed"
