#!/usr/bin/env bash
# Memory of `ktrace watch` as the DaemonSet runs it (--json, --metrics-addr,
# 8 MiB ring buffer), idle and during the reset storm of scripts/bench-storm.sh:
# the process's resident memory (VmRSS now, VmHWM the peak) and the kernel
# memory of its BPF maps (memlock in the fdinfo of its map fds; with cgroup
# v2 memory accounting, kernel 5.11+, it counts against the pod's limit too).
#
# Usage: scripts/measure-memory.sh [IDLE_SECS] [STORM_SECS]   (root)
# The endpoint listens on 127.0.0.1:19464 while it runs.
# KTRACE_CMD=record measures `ktrace record --json` instead (to a scratch
# file; the last column is then the bytes recorded).
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${1:-20}
STORM=${2:-10}
KTRACE=${KTRACE_BIN:-./target/release/ktrace}
[ -x "$KTRACE" ] || { echo "build first: cargo build --release -p ktrace" >&2; exit 1; }

CMD=${KTRACE_CMD:-watch}
out=$(mktemp)
rec=$(mktemp -d)
case "$CMD" in
  watch) "$KTRACE" watch --json --metrics-addr 127.0.0.1:19464 >"$out" 2>&1 & ;;
  record) "$KTRACE" record --json --output "$rec/rec.krec" >"$out" 2>&1 & ;;
  *) echo "KTRACE_CMD is watch or record" >&2; exit 2 ;;
esac
pid=$!
trap 'kill -INT $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$out" "$rec"' EXIT

kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$pid/status"; }
maps_kib() {
  local sum=0 m
  for f in /proc/$pid/fdinfo/*; do
    m=$(awk '/^map_type/ {t=1} /^memlock/ {if (t) print $2}' "$f" 2>/dev/null || true)
    [ -n "$m" ] && sum=$((sum + m))
  done
  echo $((sum / 1024))
}
# Kernel events ktrace decoded so far (from its own /metrics): proof the storm reached it.
events() {
  if [ "$CMD" = record ]; then du -cb "$rec" | awk 'END {print $1 " bytes"}'; return; fi
  python3 -c 'import urllib.request as u; print(int(sum(float(l.rsplit(" ", 1)[1]) for l in u.urlopen("http://127.0.0.1:19464/metrics").read().decode().splitlines() if l.startswith("ktrace_kernel_events_total{"))))'
}
report() { printf "%-6s VmRSS %6s KiB  VmHWM %6s KiB  BPF maps %6s KiB  events %s\n" "$1" "$(kib VmRSS)" "$(kib VmHWM)" "$(maps_kib)" "$(events)"; }

sleep "$IDLE"
report idle
ROUNDS=1 bash scripts/bench-storm.sh "$STORM" >&2
report storm
