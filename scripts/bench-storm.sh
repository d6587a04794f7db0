#!/usr/bin/env bash
# Kernel cost of ktrace under a reset storm, side by side with tcpdump, in one run.
#
# A SYN flood (hping3) between two network namespaces this script creates, to
# a closed port, makes the kernel answer every SYN with an RST. For each mode
# (nothing attached, tcpdump -w, ktrace watch, ktrace watch --events) it
# measures for SECS seconds: RSTs the kernel sent per second (TcpOutRsts of
# the target namespace), the cost against the baseline, bytes written per
# second, and for ktrace the events it lost and the nanoseconds per run of
# each of its programs (kernel.bpf_stats_enabled, from the programs' fdinfo).
#
# Usage: scripts/bench-storm.sh [SECS]   (root; traffic stays in the namespaces)
#        ROUNDS=N repeats the modes N times (default 2), a baseline between rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
KTRACE=${KTRACE_BIN:-./target/release/ktrace}
[ -x "$KTRACE" ] || { echo "build first: cargo build --release -p ktrace" >&2; exit 1; }
command -v hping3 >/dev/null || { echo "hping3 missing: scripts/setup.sh installs it" >&2; exit 1; }

A=ktr-bench-a B=ktr-bench-b
OUT=$(mktemp -d)
cleanup() {
  for ns in $A $B; do
    for p in $(ip netns pids $ns 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del $ns 2>/dev/null || true
  done
  sysctl -qw kernel.bpf_stats_enabled=0 || true
  rm -rf "$OUT"
}
trap cleanup EXIT
cleanup 2>/dev/null || true
OUT=$(mktemp -d)
ip netns add $A; ip netns add $B
ip link add veth-a netns $A type veth peer name veth-b netns $B
ip -n $A addr add 10.200.0.1/24 dev veth-a; ip -n $A link set veth-a up; ip -n $A link set lo up
ip -n $B addr add 10.200.0.2/24 dev veth-b; ip -n $B link set veth-b up; ip -n $B link set lo up
# Let the target answer every SYN (no rate limit on RSTs).
ip netns exec $B sysctl -qw net.ipv4.tcp_syncookies=0 || true

rsts() { ip netns exec $B nstat -az TcpOutRsts | awk '/TcpOutRsts/ {print $2}'; }

# run MODE: floods for SECS seconds while MODE's observer runs; prints one row.
run() {
  local mode=$1
  local obs_pid="" file="$OUT/$1.out"
  : > "$file"
  case $mode in
    baseline) ;;
    tcpdump) ip netns exec $B tcpdump -q -i veth-b -w "$file" 2>/dev/null & obs_pid=$! ;;
    ktrace-watch) "$KTRACE" watch --json > "$file" 2>"$OUT/err" & obs_pid=$! ;;
    ktrace-events) "$KTRACE" watch --json --events > "$file" 2>"$OUT/err" & obs_pid=$! ;;
    ktrace-record) "$KTRACE" record --json --output "$OUT/rec.krec" > "$OUT/$mode.json" 2>"$OUT/err" & obs_pid=$! ;;
  esac
  sleep 1.5
  local before; before=$(rsts)
  ip netns exec $A timeout "$SECS" hping3 -q -S -p 9 --flood 10.200.0.2 >/dev/null 2>&1 || true
  sleep 0.5
  local after; after=$(rsts)
  local per_run=""
  if [ -n "$obs_pid" ] && [[ $mode == ktrace-* ]]; then
    # Nanoseconds per program run, from the fdinfo of ktrace's BPF programs.
    per_run=$(for f in /proc/$obs_pid/fdinfo/*; do
      awk '/^run_time_ns/ {t=$2} /^run_cnt/ {c=$2} END {if (c > 0) printf "%d ", t / c}' "$f" 2>/dev/null
    done)
  fi
  [ -n "$obs_pid" ] && { kill -INT "$obs_pid" 2>/dev/null || true; wait "$obs_pid" 2>/dev/null || true; }
  local bytes; bytes=$(stat -c %s "$file")
  [ "$mode" = ktrace-record ] && bytes=$(cat "$OUT"/rec.krec* | wc -c)
  local rate=$(( (after - before) / SECS ))
  local lost="-" events="-"
  if [ "$mode" = ktrace-record ]; then
    lost=$(python3 -c "import json,sys; print(sum(json.loads(l).get('count',0) for l in open(sys.argv[1]) if '\"lost\"' in l))" "$OUT/$mode.json")
    events=$(python3 -c "import json,sys; print(sum(json.loads(l).get('events',0) for l in open(sys.argv[1]) if '\"recording\"' in l))" "$OUT/$mode.json")
    rm -f "$OUT"/rec.krec*
  elif [[ $mode == ktrace-* ]]; then
    lost=$(python3 -c "import json,sys; print(sum(json.loads(l).get('count',0) for l in open(sys.argv[1]) if '\"lost\"' in l))" "$file")
    events=$(grep -c '"type":"event"' "$file" || true)
  fi
  printf "%-14s %10d RST/s  cost %-7s %10.1f KB/s  lost=%-8s events=%-9s ns/run=%s\n" \
    "$mode" "$rate" "$(cost "$rate")" "$(echo "$bytes / $SECS / 1024" | bc -l)" "$lost" "$events" "${per_run:--}"
}

BASE=0
# Cost: how much lower the RST rate is than the baseline (negative: noise, faster).
cost() { if [ "$BASE" -gt 0 ]; then python3 -c "print(f'{(1-$1/$BASE)*100:.1f}%')"; else echo "-"; fi; }

sysctl -qw kernel.bpf_stats_enabled=1
echo "reset storm: hping3 SYN flood to a closed port, ${SECS}s per mode, $(nproc) CPUs, kernel $(uname -r)"
row=$(run baseline); echo "$row"; BASE=$(echo "$row" | awk '{print $2}')
for round in $(seq 1 "${ROUNDS:-2}"); do
  [ "$round" -gt 1 ] && { row=$(run baseline); echo "$row"; }
  run tcpdump
  run ktrace-watch
  run ktrace-record
  run ktrace-events
done
row=$(run baseline); echo "$row (again)"
