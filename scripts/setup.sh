#!/usr/bin/env bash
# Installs everything ktrace needs to build and test on a Debian 12 / Ubuntu node.
# Idempotent: each step is skipped when its result is already present.
set -euo pipefail

need_apt=()
want=(rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev
      iproute2 iptables nftables conntrack python3 hping3 tcpdump kmod tmux
      qemu-system-x86 busybox-static cpio ipvsadm zstd xz-utils
      buildah podman runc prometheus)
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# bpf-linker links the eBPF object; it must be built against LLVM 22 (rustc-web's LLVM).
if ! command -v bpf-linker >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/bpf-linker" ]; then
  echo "setup: building bpf-linker (about a minute)" >&2
  PATH=/usr/lib/llvm-22/bin:/usr/bin:/bin:$HOME/.cargo/bin \
    /usr/bin/cargo install --locked bpf-linker@0.13.0 --no-default-features --features llvm-22
fi

# Tracepoints need tracefs.
if [ ! -d /sys/kernel/tracing/events ]; then
  mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi
