#!/usr/bin/env bash
# Longer kill -9 torture run (release build): KILLS (default 200), DEVICES (default 5000), SEED.
# Prints the seed, the kills survived and the simulator's report (rev_duplicate_numbers must be 0).
set -euo pipefail
cd "$(dirname "$0")/.."
export TORTURE_KILLS="${KILLS:-200}" TORTURE_DEVICES="${DEVICES:-5000}"
if [ -n "${SEED:-}" ]; then export TORTURE_SEED="$SEED"; fi
exec ./scripts/test.sh --release --test e2e torture -- --nocapture
