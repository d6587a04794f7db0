#!/bin/busybox sh
# Stage 1 of the `cargo xtask vmtest` guest: /init of the initramfs that
# xtask/src/vm.rs builds (busybox only). Mounts the host's root, shared
# read-only over 9p, under a tmpfs overlay, binds the kernel package's
# modules at /lib/modules/<release>, and switches to tests/vm/guest.sh on
# that root. Any failure here is reported as the run's result.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
. /vmtest.env

fail() {
	echo "KTRACE-VM-RESULT FAIL: stage 1: $*"
	poweroff -f
	sleep 60
}

for m in $KTRACE_VM_INSMOD; do
	insmod "/modules/$m" || fail "insmod $m"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /lower ||
	fail "mounting the host root over 9p"
mount -t tmpfs -o mode=0755 rw /rw || fail "tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot ||
	fail "overlay on the host root"
# A fresh /run: the host's netns names and locks must not leak in. /tmp
# stays the overlay's (writes land in the guest's tmpfs): the workspace, and
# so the module cache and test binaries, may live under the host's /tmp.
mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "tmpfs /run"
mkdir -p "/newroot/lib/modules/$KTRACE_VM_RELEASE"
mount --bind "/newroot$KTRACE_VM_MODULES" "/newroot/lib/modules/$KTRACE_VM_RELEASE" ||
	fail "binding $KTRACE_VM_MODULES"
cp /vmtest.env /newroot/run/vmtest.env
for d in proc sys dev; do
	mount --move "/$d" "/newroot/$d" || fail "moving /$d"
done
exec switch_root /newroot /bin/bash "$KTRACE_VM_STAGE2"
fail "switch_root"
