#!/usr/bin/env bash
# Sets up this node (idempotent), builds ktrace, and runs `ktrace watch`.
# Arguments go to `ktrace watch` (e.g. --json --events --duration 60);
# `watch.sh demo [--json]` runs `ktrace demo` instead (a first run's tour).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CARGO=$(command -v cargo || echo /usr/bin/cargo)
"$CARGO" build --release -p ktrace
if [ "${1:-}" = demo ]; then
    shift
    exec ./target/release/ktrace demo "$@"
fi
exec ./target/release/ktrace watch "$@"
