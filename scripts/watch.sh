#!/usr/bin/env bash
# Sets up this node (idempotent), builds ktrace, and runs `ktrace watch`.
# Arguments go to `ktrace watch` (e.g. --json --events --duration 60).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CARGO=$(command -v cargo || echo /usr/bin/cargo)
"$CARGO" build --release -p ktrace
exec ./target/release/ktrace watch "$@"
