#!/usr/bin/env bash
# Kernel cost of ktrace under a reset storm, side by side with tcpdump, in one run.
#
# A SYN flood (hping3) between two network namespaces this script creates, to
# a closed port, makes the kernel answer every SYN with an RST. Each round
# measures, for SECS seconds per mode, the RSTs the kernel sent per second
# (TcpOutRsts of the target namespace) with:
#   absent          nothing attached (the round's own baseline)
#   tcpdump         tcpdump -w on the target's interface
#   ktrace-watch    ktrace watch --json
#   ktrace-record   ktrace record (a running reader)
#   ktrace-stalled  ktrace record stopped with SIGSTOP for the whole flood
#                   (a reader that does not read: the kernel must not pay more)
#   ktrace-events   ktrace watch --json --events (every event printed)
#   ktrace-every    ktrace record --every-reset: no reset summarised in the
#                   kernel (every one through the ring buffer), for comparison
#   ktrace-tui      ktrace watch --tui, the dashboard in a 120x40 tmux
#                   terminal: whether it kept up (its resets/s against the
#                   kernel's, updates it skipped) and the screen it showed
# and prints per mode the cost against the round's baseline, bytes written
# per second, the observer's CPU time during the flood (user+system, in % of
# one CPU), its resident memory at the end of the flood and its
# peak (VmRSS/VmHWM), and for ktrace: the events it lost, the resets the kernel
# counted instead of sending them one by one (resets_summarised: refusals
# beyond each CPU's sample), whether the target's reset events plus the
# summarised ones plus the lost ones equal the kernel's TcpOutRsts, and the
# nanoseconds per run of its programs (kernel.bpf_stats_enabled,
# from the programs' fdinfo). The modes run in a rotated order each round; the
# summary at the end gives each mode's median cost and its spread over rounds.
#
# Usage: scripts/bench-storm.sh [SECS]   (root; traffic stays in the namespaces)
#        ROUNDS=N (default 3)   MODES="ktrace-record ktrace-stalled" (a subset)
#        HOOK_ONLY=1: the reset hook's ns/run and the exactness of the
#        counts only (ktrace-record unless MODES says otherwise, no
#        baseline rounds, so no cost): a quick check of a kernel-side change
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
ROUNDS=${ROUNDS:-3}
HOOK_ONLY=${HOOK_ONLY:-0}
if [ "$HOOK_ONLY" = 1 ]; then
  MODES=${MODES:-ktrace-record}
else
  MODES=${MODES:-tcpdump ktrace-watch ktrace-record ktrace-stalled ktrace-events ktrace-every ktrace-tui}
fi
KTRACE=${KTRACE_BIN:-./target/release/ktrace}
[ -x "$KTRACE" ] || { echo "build first: cargo build --release -p ktrace" >&2; exit 1; }
command -v hping3 >/dev/null || { echo "hping3 missing: scripts/setup.sh installs it" >&2; exit 1; }
if [[ " $MODES " == *" ktrace-tui "* ]] && ! command -v tmux >/dev/null; then
  echo "tmux missing (scripts/setup.sh installs it): ktrace-tui left out" >&2
  MODES=${MODES//ktrace-tui/}
fi
KTRACE=$(realpath "$KTRACE")

# Per-run names: two benches at once must not share (or delete) namespaces.
A=ktr-bench-$$-a B=ktr-bench-$$-b
OUT=$(mktemp -d)
TMUX_SOCK=ktr-bench-$$
cleanup() {
  tmux -L "$TMUX_SOCK" kill-server 2>/dev/null || true
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
# The target's namespace inode: ktrace sees every namespace, and other
# traffic on this machine must not count as the storm's.
B_INUM=$(ip netns exec $B stat -L -c %i /proc/self/ns/net)

rsts() { ip netns exec $B nstat -az TcpOutRsts | awk '/TcpOutRsts/ {print $2}'; }
sum_lost() {
  python3 -c "import json,sys; print(sum(json.loads(l).get('count',0) for l in open(sys.argv[1]) if '\"type\":\"lost\"' in l and 'ring buffer' in l))" "$1"
}
# Resets of the target namespace in a JSON Lines stream: "EVENTS SUMMARISED"
# (tcp_send_reset events, and the counts of resets_summarised events).
count_resets() {
  python3 -c '
import json, sys
ns = int(sys.argv[1]); events = summarised = 0
for line in sys.stdin:
    if "\"type\":\"event\"" not in line or "\"netns\":%d," % ns not in line:
        continue
    v = json.loads(line)
    if v["event"] == "tcp_send_reset":
        events += 1
    elif v["event"] == "resets_summarised":
        summarised += v["count"]
print(events, summarised)' "$B_INUM"
}
# CPU time of process $1 so far (user + system), in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Waits up to 20 s for ktrace's first status line in $1, which it writes
# once its hooks are attached: on a loaded machine that can take longer
# than the fixed pause, and resets sent before would count as missed.
wait_attached() { for _ in $(seq 200); do grep -q '"type":"status"' "$1" 2>/dev/null && return 0; sleep 0.1; done; }
# Waits up to 10 s for process $1 (not a child of this shell) to end.
wait_gone() { for _ in $(seq 100); do [ -e "/proc/$1" ] || return 0; sleep 0.1; done; }

# run MODE: floods for SECS seconds while MODE's observer runs; prints one row
# and appends "MODE RATE" to $OUT/rates.
run() {
  local mode=$1
  local obs_pid="" file="$OUT/$1.out"
  : > "$file"
  case $mode in
    absent) ;;
    tcpdump) ip netns exec $B tcpdump -q -i veth-b -w "$file" 2>/dev/null & obs_pid=$! ;;
    ktrace-watch) "$KTRACE" watch --json > "$file" 2>"$OUT/err" & obs_pid=$! ;;
    ktrace-events) "$KTRACE" watch --json --events > "$file" 2>"$OUT/err" & obs_pid=$! ;;
    ktrace-record|ktrace-stalled)
      "$KTRACE" record --json --output "$OUT/rec.krec" > "$OUT/$mode.json" 2>"$OUT/err" & obs_pid=$! ;;
    ktrace-every)
      "$KTRACE" record --json --every-reset --output "$OUT/rec.krec" > "$OUT/$mode.json" 2>"$OUT/err" & obs_pid=$! ;;
    ktrace-tui)
      tmux -L "$TMUX_SOCK" new-session -d -x 120 -y 40 "exec $KTRACE watch --tui 2>$OUT/err"
      obs_pid=$(tmux -L "$TMUX_SOCK" display -p '#{pane_pid}') ;;
  esac
  sleep 1.5
  case $mode in
    ktrace-watch|ktrace-events) wait_attached "$file" ;;
    ktrace-record|ktrace-stalled|ktrace-every) wait_attached "$OUT/$mode.json" ;;
  esac
  [ "$mode" = ktrace-stalled ] && kill -STOP "$obs_pid"
  local before; before=$(rsts)
  local ticks0=0; [ -n "$obs_pid" ] && ticks0=$(cpu_ticks "$obs_pid")
  ip netns exec $A timeout "$SECS" hping3 -q -S -p 9 --flood 10.200.0.2 >/dev/null 2>&1 || true
  sleep 0.5
  local after; after=$(rsts)
  local cpu="-"
  [ -n "$obs_pid" ] && cpu=$(python3 -c "print(f'{($(cpu_ticks "$obs_pid") - $ticks0) / $(getconf CLK_TCK) / $SECS * 100:.0f}%')")
  # The dashboard as it was at the end of the flood (its sparkline's
  # window holds the flood's seconds).
  [ "$mode" = ktrace-tui ] && tmux -L "$TMUX_SOCK" capture-pane -p > "$OUT/tui.screen"
  local per_run=""
  if [ -n "$obs_pid" ] && [[ $mode == ktrace-* ]]; then
    # Nanoseconds per program run, from the fdinfo of ktrace's BPF programs.
    per_run=$(for f in /proc/$obs_pid/fdinfo/*; do
      awk '/^run_time_ns/ {t=$2} /^run_cnt/ {c=$2} END {if (c > 1000) printf "%d ", t / c}' "$f" 2>/dev/null
    done)
  fi
  # Resident memory of the observer at the end of the flood, and its peak.
  local mem="-"
  [ -n "$obs_pid" ] && mem=$(awk '/^VmRSS/ {r=$2} /^VmHWM/ {h=$2} END {printf "%.1f/%.1fMB", r/1024, h/1024}' "/proc/$obs_pid/status" 2>/dev/null)
  if [ "$mode" = ktrace-stalled ]; then
    kill -CONT "$obs_pid"
    sleep 1 # let it drain what the ring holds and report the loss
  fi
  if [ "$mode" = ktrace-tui ]; then
    kill -INT "$obs_pid" 2>/dev/null || true; wait_gone "$obs_pid"
    tmux -L "$TMUX_SOCK" kill-server 2>/dev/null || true
  elif [ -n "$obs_pid" ]; then
    kill -INT "$obs_pid" 2>/dev/null || true; wait "$obs_pid" 2>/dev/null || true
  fi
  local bytes; bytes=$(stat -c %s "$file")
  local sent=$(( after - before ))
  local lost="-" seen="-" match="-" events="-" summarised="-"
  case $mode in
    ktrace-record|ktrace-stalled|ktrace-every)
      bytes=$(cat "$OUT"/rec.krec* | wc -c)
      lost=$(sum_lost "$OUT/$mode.json")
      read -r events summarised < <("$KTRACE" replay --json --events "$OUT"/rec.krec 2>/dev/null | count_resets)
      rm -f "$OUT"/rec.krec* ;;
    ktrace-events) lost=$(sum_lost "$file"); read -r events summarised < <(count_resets < "$file") ;;
    ktrace-watch) lost=$(sum_lost "$file") ;;
    ktrace-tui)
      # Kept up: no event lost, no update skipped, and the highest
      # resets/s it drew is at least 90 % of the kernel's mean rate.
      lost=$(grep -o 'lost events: [0-9]*' "$OUT/tui.screen" | awk '{print $3}' || true)
      local skipped max
      skipped=$(grep -o 'dashboard behind: [0-9]*' "$OUT/tui.screen" | awk '{print $3}' || true)
      max=$(grep -o 'resets/s: [0-9]* now, max [0-9]*' "$OUT/tui.screen" | awk '{print $NF}' || true)
      if [ -n "$max" ] && [ "${lost:-1}" = 0 ] && [ -z "$skipped" ] && [ "$max" -ge $(( sent * 9 / 10 / SECS )) ]; then
        match="kept-up(max ${max}/s)"
      else
        match="BEHIND(max ${max:-?}/s, skipped ${skipped:-0})"
      fi
      cp "$OUT/tui.screen" "$OUT/tui.last" ;;
  esac
  if [ "$events" != "-" ]; then
    # Every reset the kernel sent is an event, summarised, or counted as
    # lost (the lost count is machine-wide: other traffic can only add to it).
    seen=$(( events + summarised ))
    if [ $(( seen + lost )) -ge "$sent" ] && [ "$seen" -le "$sent" ]; then match="yes"; else match="NO"; fi
    [ "$lost" = 0 ] && [ "$seen" = "$sent" ] && match="exact"
  fi
  local rate=$(( sent / SECS ))
  # The busiest program's ns/run (the reset hook's, in this storm).
  local hook_ns; hook_ns=$(echo "${per_run:--}" | tr ' ' '\n' | sort -n | tail -1)
  echo "$mode $rate ${hook_ns:--}" >> "$OUT/rates"
  printf "%-15s %8d RST/s  cost %-6s %9.1f KB/s  cpu=%-5s rss/peak=%-13s lost=%-8s events=%-7s summarised=%-8s events+summarised+lost=kernel(%d):%-5s ns/run=%s\n" \
    "$mode" "$rate" "$(cost "$rate")" "$(echo "$bytes / $SECS / 1024" | bc -l)" "$cpu" "${mem:--}" "$lost" "$events" "$summarised" "$sent" "$match" "${per_run:--}"
}

BASE=0
# Cost: how much lower the RST rate is than this round's baseline (negative: noise).
cost() { if [ "$BASE" -gt 0 ]; then python3 -c "print(f'{(1-$1/$BASE)*100:.1f}%')"; else echo "-"; fi; }

sysctl -qw kernel.bpf_stats_enabled=1
echo "reset storm: hping3 SYN flood to a closed port, ${SECS}s per mode, $ROUNDS rounds, $(nproc) CPUs, kernel $(uname -r)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine makes the rates noisy)"
read -ra modes <<< "$MODES"
for round in $(seq 1 "$ROUNDS"); do
  echo "--- round $round"
  echo "round $round" >> "$OUT/rates"
  BASE=0
  if [ "$HOOK_ONLY" != 1 ]; then
    row=$(run absent); echo "$row"; BASE=$(echo "$row" | awk '{print $2}')
  fi
  n=${#modes[@]}
  for i in $(seq 0 $((n - 1))); do run "${modes[$(( (i + round - 1) % n ))]}"; done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ -s "$OUT/tui.last" ]; then
  echo "the dashboard (watch --tui, 120x40) at the end of the last round's flood:"
  cat "$OUT/tui.last"
fi

# Per mode: the cost against each round's baseline, median and spread; and
# the stalled reader against the running one (same round).
python3 - "$OUT/rates" <<'EOF'
import statistics, sys
rounds, cur, hook_ns = [], None, {}
for line in open(sys.argv[1]):
    k, v, *ns = line.split()
    if k == "round":
        cur = {}; rounds.append(cur)
    else:
        cur[k] = int(v)
        if ns and ns[0] != "-":
            hook_ns.setdefault(k, []).append(int(ns[0]))
modes = [m for m in rounds[0] if m != "absent"]
print("summary (cost vs the same round's baseline; median [min .. max] over %d rounds)" % len(rounds))
for m in modes:
    c = [100 * (1 - r[m] / r["absent"]) for r in rounds if r.get("absent") and m in r]
    ns = hook_ns.get(m)
    hook = f"   reset hook {statistics.median(ns):.0f} ns/run [{min(ns)} .. {max(ns)}]" if ns else ""
    cost = f"{statistics.median(c):6.1f}%  [{min(c):.1f} .. {max(c):.1f}]" if c else "  (no baseline)"
    print(f"  {m:15} {cost}{hook}")
if "absent" in rounds[0] and "ktrace-record" in modes and "ktrace-stalled" in modes:
    print("absent / running (record) / stalled (record, SIGSTOP) RST/s per round:")
    for i, r in enumerate(rounds, 1):
        d = 100 * (r["ktrace-stalled"] / r["ktrace-record"] - 1)
        print(f"  round {i}: {r['absent']:8d} / {r['ktrace-record']:8d} / {r['ktrace-stalled']:8d}   stalled vs running {d:+.1f}%")
EOF
