//! Reading kernel memory at offsets userspace found in BTF.
//!
//! Rust has no CO-RE relocations, so userspace resolves every struct offset
//! from the running kernel's BTF and hands them over in the `LAYOUT` global
//! (a read-only constant the verifier sees). These helpers turn
//! `(pointer, offset)` into values and packet headers into [`Endpoint`]s.

use aya_ebpf::bindings::pt_regs;
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use aya_ebpf::programs::ProbeContext;
use ktrace_common::{Endpoint, KernelLayout, AF_INET, AF_INET6, NO_OFFSET};

/// Filled in by userspace at load time (`EbpfLoader::set_global`).
#[no_mangle]
pub static LAYOUT: KernelLayout = KernelLayout::UNKNOWN;

/// Reads one field of [`LAYOUT`]. Volatile so the compiler does not fold the
/// compile-time default into the code.
macro_rules! layout {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&$crate::kernel::LAYOUT.$field) }
    };
}
pub(crate) use layout;

/// Reads a `T` at `base + off`, failing on a null base or an unknown offset.
#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Result<T, i64> {
    if base == 0 || off == NO_OFFSET {
        return Err(-1);
    }
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T).map_err(|e| e as i64) }
}

/// Argument `n` of a kprobe when `n` is known only at load time (a
/// [`LAYOUT`] field). `ProbeContext::arg(n)` with such an `n` compiles to a
/// load from `ctx + offset(n)`, which the verifier refuses ("dereference of
/// modified ctx ptr": the context is readable only at offsets fixed in the
/// instruction; seen on 6.1). A copy of the saved registers on the stack
/// has no such limit, and the verifier knows `n` from the frozen `LAYOUT`.
#[inline(always)]
pub fn arg_at(ctx: &ProbeContext, n: u32) -> Option<u64> {
    // SAFETY: `ctx.regs` points at the probed function's saved registers.
    let mut regs: pt_regs = unsafe { bpf_probe_read_kernel(ctx.regs as *const pt_regs) }.ok()?;
    ProbeContext::new((&mut regs as *mut pt_regs).cast()).arg(n as usize)
}

/// Network namespace inode of a `struct net *`.
#[inline(always)]
pub fn net_inum(net: u64) -> u32 {
    read::<u32>(net, layout!(net_ns_inum)).unwrap_or(0)
}

/// Network namespace of a socket (`sk->__sk_common.skc_net`).
#[inline(always)]
pub fn sock_netns(sk: u64) -> u32 {
    match read::<u64>(sk, layout!(sk_net)) {
        Ok(net) => net_inum(net),
        Err(_) => 0,
    }
}

/// Network namespace of a packet, through the device it arrived on or leaves by.
#[inline(always)]
pub fn skb_netns(skb: u64) -> u32 {
    let Ok(dev) = read::<u64>(skb, layout!(skb_dev)) else {
        return 0;
    };
    match read::<u64>(dev, layout!(dev_nd_net)) {
        Ok(net) => net_inum(net),
        Err(_) => 0,
    }
}

/// Addresses, protocol and TCP flags of the packet in `skb`, read from
/// `skb->head + skb->network_header` (the transport header offset is not
/// trustworthy in every hook).
pub struct PacketInfo {
    pub src: Endpoint,
    pub dst: Endpoint,
    pub protocol: u8,
    pub tcp_flags: u8,
}

pub const TCP_FLAG_RST: u8 = 0x04;

#[inline(always)]
pub fn skb_packet(skb: u64) -> Result<PacketInfo, i64> {
    let head: u64 = read(skb, layout!(skb_head))?;
    let nh: u16 = read(skb, layout!(skb_network_header))?;
    let ip = head + nh as u64;
    let first: u8 = read(ip, 0)?;
    let mut info = PacketInfo {
        src: Endpoint::default(),
        dst: Endpoint::default(),
        protocol: 0,
        tcp_flags: 0,
    };
    let l4;
    match first >> 4 {
        4 => {
            info.protocol = read(ip, 9)?;
            info.src.family = AF_INET;
            info.dst.family = AF_INET;
            let s: [u8; 4] = read(ip, 12)?;
            let d: [u8; 4] = read(ip, 16)?;
            info.src.addr[..4].copy_from_slice(&s);
            info.dst.addr[..4].copy_from_slice(&d);
            l4 = ip + ((first & 0x0f) as u64) * 4;
        }
        6 => {
            // Extension headers are not walked: TCP follows the fixed header
            // in the traffic ktrace cares about.
            info.protocol = read(ip, 6)?;
            info.src.family = AF_INET6;
            info.dst.family = AF_INET6;
            info.src.addr = read(ip, 8)?;
            info.dst.addr = read(ip, 24)?;
            l4 = ip + 40;
        }
        _ => return Err(-2),
    }
    // TCP, UDP and SCTP all start with the two ports.
    if info.protocol == 6 || info.protocol == 17 || info.protocol == 132 {
        let ports: [u8; 4] = read(l4, 0)?;
        info.src.port = u16::from_be_bytes([ports[0], ports[1]]);
        info.dst.port = u16::from_be_bytes([ports[2], ports[3]]);
    }
    if info.protocol == 6 {
        info.tcp_flags = read(l4, 13)?;
    }
    Ok(info)
}

/// Reads `len` bytes of an address (4 or 16) at `ptr` into an [`Endpoint`].
#[inline(always)]
pub fn read_addr(ptr: u64, family: u8, out: &mut Endpoint) -> Result<(), i64> {
    out.family = family;
    if family == AF_INET6 {
        out.addr = read(ptr, 0)?;
    } else {
        let a: [u8; 4] = read(ptr, 0)?;
        out.addr[..4].copy_from_slice(&a);
    }
    Ok(())
}

/// Copies a NUL-terminated kernel string prefix into `out` (best effort).
#[inline(always)]
pub fn read_str(ptr: u64, out: &mut [u8]) {
    if ptr == 0 {
        return;
    }
    unsafe {
        let _ = aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(ptr as *const u8, out);
    }
}

/// Copies raw bytes (best effort).
#[inline(always)]
pub fn read_bytes(ptr: u64, out: &mut [u8]) -> Result<(), i64> {
    if ptr == 0 {
        return Err(-1);
    }
    unsafe { bpf_probe_read_kernel_buf(ptr as *const u8, out).map_err(|e| e as i64) }
}
