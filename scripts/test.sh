#!/usr/bin/env bash
# Sets up this node (idempotent) and runs every test: unit, fixture,
# network-namespace integration tests (root), and the stock-kernel VM tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CARGO=$(command -v cargo || echo /usr/bin/cargo)
exec "$CARGO" xtask test
