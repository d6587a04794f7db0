#!/bin/bash
# Stage 2 of the `cargo xtask vmtest` guest: PID 1 on the host's userland
# (read-only 9p root under a tmpfs overlay, see tests/vm/init.sh).
# Loads the modules ktrace hooks into, prints the hooks ktrace attaches
# (KTRACE-VM-HOOKS), runs the guest tests (tests/vm/guest.rs) and reports
# KTRACE-VM-RESULT PASS or FAIL: <why>, then powers the VM off.
# All traffic stays inside network namespaces the tests create.
set -a # export KTRACE_BIN (the tests' ktrace) and the rest
. /run/vmtest.env
set +a
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 RUST_BACKTRACE=1

finish() {
	echo "KTRACE-VM-RESULT $*"
	sync
	echo o >/proc/sysrq-trigger
	sleep 60
}

mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
hostname ktrace-vm
ip link set lo up
echo "ktrace-vm: kernel $(uname -r), userland up after ${SECONDS}s"

# crc32c_generic before ip_vs: libcrc32c needs it and the request_module
# fallback does not find it on this kernel.
modules="crc32c_generic nf_conntrack nf_nat nf_conntrack_netlink ip_vs ip_vs_rr veth dummy
	nf_tables nft_compat nft_chain_nat xt_nat xt_statistic xt_tcpudp xt_conntrack"
for m in $modules; do
	modprobe "$m" || finish "FAIL: modprobe $m"
done

# The hooks ktrace attaches on this kernel, from its status line.
status=$("$KTRACE_BIN" watch --json --duration 0 2>&1 | head -n 1)
hooks=$(printf '%s' "$status" | python3 -c '
import json, sys
try:
    s = json.loads(sys.stdin.read())
except ValueError as e:
    print("unreadable status line: %s" % e)
    sys.exit()
out = []
for h in s["hooks"]:
    if h["attached"]:
        out.append("%s=%s:%s" % (h["name"], h["mechanism"], h.get("target", "")))
    else:
        why = (h.get("reason") or "").splitlines()[0][:160] if h.get("reason") else ""
        out.append("%s=OFF(%s)" % (h["name"], why))
print(" ".join(out))
')
echo "KTRACE-VM-HOOKS $hooks"

cd "$KTRACE_VM_WORKSPACE/tests" || finish "FAIL: no $KTRACE_VM_WORKSPACE/tests"
# Tests that cannot run here record why (ktrace_tests::record_skip); the
# host counts them as skipped from these console lines.
KTRACE_VMTEST=1 KTRACE_SKIP_LOG=/run/ktrace-skips.log \
	timeout -s KILL "$KTRACE_VM_TEST_TIMEOUT" "$KTRACE_VM_TESTBIN" --test-threads=1 --nocapture
rc=$?
if [ -s /run/ktrace-skips.log ]; then
	sed 's/^/KTRACE-VM-SKIP /' /run/ktrace-skips.log
fi
if [ "$rc" = 0 ]; then
	finish PASS
elif [ "$rc" = 137 ]; then
	finish "FAIL: guest tests killed after ${KTRACE_VM_TEST_TIMEOUT}s"
else
	finish "FAIL: guest tests exited with status $rc"
fi
