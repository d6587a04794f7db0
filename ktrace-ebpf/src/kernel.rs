//! Reading kernel memory at offsets userspace found in BTF.
//!
//! Rust has no CO-RE relocations, so userspace resolves every struct offset
//! from the running kernel's BTF and hands them over in the `LAYOUT` global
//! (a read-only constant the verifier sees). These helpers turn
//! `(pointer, offset)` into values and packet headers into [`Endpoint`]s.

use aya_ebpf::bindings::pt_regs;
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use aya_ebpf::{macros::map, maps::PerCpuArray};
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

/// A `T` at `base + off`: a plain load when `base` is a BTF-typed argument
/// (`TYPED`: fentry, tp_btf; the verifier turns it into a load guarded by
/// an exception-table entry, no helper call), else a probe read.
#[inline(always)]
pub fn field<const TYPED: bool, T: Copy>(base: u64, off: u32) -> Result<T, i64> {
    if !TYPED {
        return read(base, off);
    }
    if off == NO_OFFSET {
        return Err(-1);
    }
    // SAFETY: a typed load at a BTF offset; a bad pointer reads as zero.
    Ok(unsafe { core::ptr::read_volatile((base as *const u8).wrapping_add(off as usize) as *const T) })
}

/// `TCP_LISTEN`: a listener's reset is the "no socket" case.
pub const TCP_LISTEN: u8 = 10;

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

/// Network namespace of a `struct net_device *`: `dev->nd_net.net->ns.inum`,
/// read afresh each time. Nothing is cached by device pointer: a device
/// moves between namespaces keeping its address (`ip link set ... netns`,
/// how CNI plugins place a pod's veth), and a deleted pod's device and
/// namespace are freed and their memory reused for the next pod's, so a
/// pointer-keyed cache would name the wrong namespace, and the kernel
/// gives no cheaper way to tell that the pointer's namespace is the same.
#[inline(always)]
pub fn dev_netns(dev: u64) -> u32 {
    match read::<u64>(dev, layout!(dev_nd_net)) {
        Ok(net) => net_inum(net),
        Err(_) => 0,
    }
}

/// Network namespace of the device of a BTF-typed `skb` argument (fentry,
/// tp_btf): `skb->dev->nd_net.net->ns.inum`. The verifier types each
/// pointer loaded on the way (`struct net_device`, `struct net`), and the
/// three reads are plain loads guarded by exception-table entries, a few
/// nanoseconds in all, cheaper than a cache's lookup and never stale; a
/// NULL or freed pointer reads as zero. An untyped `skb` has its device
/// read with its other fields ([`PacketInfo::dev`], [`skb_flags_dev`]):
/// [`dev_netns`] of that.
#[inline(always)]
pub fn skb_netns(skb: u64) -> u32 {
    let Ok(dev) = field::<true, u64>(skb, layout!(skb_dev)) else {
        return 0;
    };
    let Ok(net) = field::<true, u64>(dev, layout!(dev_nd_net)) else {
        return 0;
    };
    field::<true, u32>(net, layout!(net_ns_inum)).unwrap_or(0)
}

/// Addresses, protocol and TCP flags of the packet in `skb`, read from
/// `skb->head + skb->network_header` (the transport header offset is not
/// trustworthy in every hook).
pub struct PacketInfo {
    pub src: Endpoint,
    pub dst: Endpoint,
    pub protocol: u8,
    pub tcp_flags: u8,
    /// `skb->dev` (0 when unknown or `TYPED`), for [`dev_netns`].
    pub dev: u64,
}

pub const TCP_FLAG_RST: u8 = 0x04;

/// Per-CPU scratch for the span of `struct sk_buff` read by [`skb_span`].
#[map]
static SKB_SCRATCH: PerCpuArray<SkbSpan> = PerCpuArray::with_max_entries(1, 0);
const SKB_SPAN: usize = 256;

/// A span of `struct sk_buff` from `dev` on, with 8 bytes of slack so that
/// a field read at any masked offset stays inside.
type SkbSpan = [u8; SKB_SPAN + 8];

/// The first `len` bytes of `skb` from `skb->dev` on (at `dev_off`), by one
/// probe read: each kernel read is a helper call, some 30 ns of a storm's
/// reset whatever its length, so callers that need several fields near
/// `dev` read them in one go. `len` is at most [`SKB_SPAN`].
#[inline(always)]
fn skb_span(skb: u64, dev_off: u32, len: u32) -> Result<&'static SkbSpan, i64> {
    let slot = SKB_SCRATCH.get_ptr_mut(0).ok_or(-3i64)?;
    // SAFETY: a per-CPU slot, used by one program run at a time.
    let buf = unsafe { &mut *slot };
    let len = len as usize;
    if skb == 0 || len > SKB_SPAN {
        return Err(-1);
    }
    unsafe {
        bpf_probe_read_kernel_buf((skb + dev_off as u64) as *const u8, &mut buf[..len])
            .map_err(|e| e as i64)?;
    }
    Ok(buf)
}

/// A `T` (8 bytes at most) at `at` bytes into a [`skb_span`]. Offsets are
/// load-time constants; the mask bounds them for the verifier.
#[inline(always)]
fn span_read<T>(span: &SkbSpan, at: u32) -> T {
    const { assert!(core::mem::size_of::<T>() <= 8) };
    // SAFETY: the index is below SKB_SPAN and the buffer has 8 bytes more.
    unsafe {
        core::ptr::read_unaligned(
            span.as_ptr().wrapping_add((at as usize) & (SKB_SPAN - 1)) as *const T
        )
    }
}

/// `skb->head`, `skb->network_header` and `skb->dev`. Every kernel seen
/// has `dev` first and the other two within 256 bytes of it (16 and about
/// 200 on 6.x), so one [`skb_span`] covers the three.
#[inline(always)]
fn skb_fields(skb: u64) -> Result<(u64, u16, u64), i64> {
    let (head_off, nh_off, dev_off) =
        (layout!(skb_head), layout!(skb_network_header), layout!(skb_dev));
    let known = head_off != NO_OFFSET && nh_off != NO_OFFSET && dev_off != NO_OFFSET;
    if known && dev_off < nh_off && nh_off < head_off && head_off + 8 - dev_off <= SKB_SPAN as u32
    {
        let span = skb_span(skb, dev_off, head_off + 8 - dev_off)?;
        let dev = span_read::<u64>(span, 0);
        let nh = span_read::<u16>(span, nh_off - dev_off);
        let head = span_read::<u64>(span, head_off - dev_off);
        return Ok((head, nh, dev));
    }
    Ok((read(skb, head_off)?, read(skb, nh_off)?, read(skb, dev_off).unwrap_or(0)))
}

/// `TCP_SKB_CB(skb)->tcp_flags` (at `flags_off`) and `skb->dev` of an
/// untyped `skb`, by one [`skb_span`] from `dev` to the flags (about 40
/// bytes on 6.x).
#[inline(always)]
pub fn skb_flags_dev(skb: u64, flags_off: u32) -> Result<(u8, u64), i64> {
    let dev_off = layout!(skb_dev);
    if dev_off != NO_OFFSET && dev_off < flags_off && flags_off - dev_off < SKB_SPAN as u32 {
        let span = skb_span(skb, dev_off, flags_off + 1 - dev_off)?;
        return Ok((span_read::<u8>(span, flags_off - dev_off), span_read::<u64>(span, 0)));
    }
    Ok((read(skb, flags_off)?, read(skb, dev_off).unwrap_or(0)))
}

/// Per-CPU scratch for packet headers: kept off the 512-byte BPF stack,
/// which the conntrack programs' events already use most of.
#[map]
static HDR_SCRATCH: PerCpuArray<[u8; 64]> = PerCpuArray::with_max_entries(1, 0);

/// `skb->head` and `skb->network_header` as plain loads, for programs
/// whose `skb` argument the verifier types from BTF (fentry, tp_btf): it
/// turns each into a load guarded by an exception-table entry, with no
/// helper call (the probe read of [`skb_fields`] is about 40 ns of a reset
/// storm's budget). The device is not read: these programs take the
/// namespace from [`skb_netns`]. Never call it with an untyped `skb`
/// (kprobe, raw tracepoint): the verifier refuses the program.
#[inline(always)]
fn skb_fields_typed(skb: u64) -> Result<(u64, u16, u64), i64> {
    let (head_off, nh_off) = (layout!(skb_head), layout!(skb_network_header));
    if head_off == NO_OFFSET || nh_off == NO_OFFSET {
        return Err(-1);
    }
    let p = skb as *const u8;
    // SAFETY: typed loads at BTF offsets of `struct sk_buff`; a bad
    // pointer reads as zero (the load's exception handler), never faults.
    let (head, nh) = unsafe {
        (
            core::ptr::read_volatile(p.wrapping_add(head_off as usize) as *const u64),
            core::ptr::read_volatile(p.wrapping_add(nh_off as usize) as *const u16),
        )
    };
    Ok((head, nh, 0))
}

/// Per-CPU slot through which a BTF-typed value becomes a plain number.
#[map]
static UNTYPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `v` as a plain number the verifier knows nothing about. The verifier
/// assumes some BTF-typed arguments are never NULL (tp_btf arguments on
/// 6.2 – 6.12) and would wire a NULL test on them to "not NULL", although
/// `tcp_send_reset` passes a NULL socket or packet; a value stored to and
/// loaded back from a map is a number, and tests on it stay.
#[inline(always)]
pub fn untyped(v: u64) -> u64 {
    match UNTYPED.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, used by one program run at a time;
        // volatile so the compiler keeps the round trip.
        Some(slot) => unsafe {
            core::ptr::write_volatile(slot, v);
            core::ptr::read_volatile(slot)
        },
        None => 0,
    }
}

/// The packet in `skb`; `TYPED` when `skb` is a BTF-typed argument (see
/// [`skb_fields_typed`]) and already tested non-NULL through [`untyped`].
#[inline(always)]
pub fn skb_packet<const TYPED: bool>(skb: u64) -> Result<PacketInfo, i64> {
    let (head, nh, dev) = if TYPED {
        skb_fields_typed(skb)?
    } else {
        skb_fields(skb)?
    };
    let ip = head + nh as u64;
    let mut info = PacketInfo {
        src: Endpoint::default(),
        dst: Endpoint::default(),
        protocol: 0,
        tcp_flags: 0,
        dev,
    };
    // One read covers the fixed IPv6 header (40 bytes) plus the first 14
    // bytes of TCP, or an option-less IPv4 header and TCP: fewer helper
    // calls per packet is what a storm pays for.
    let slot = HDR_SCRATCH.get_ptr_mut(0).ok_or(-3i64)?;
    // SAFETY: a per-CPU slot, used by one program run at a time.
    let hdr: &mut [u8; 64] = unsafe { &mut *slot };
    if ip == 0 {
        return Err(-1);
    }
    unsafe { bpf_probe_read_kernel_buf(ip as *const u8, &mut hdr[..56]).map_err(|e| e as i64)? };
    let (l4, l4_in_hdr) = match hdr[0] >> 4 {
        4 => {
            info.protocol = hdr[9];
            info.src.family = AF_INET;
            info.dst.family = AF_INET;
            info.src.addr[..4].copy_from_slice(&hdr[12..16]);
            info.dst.addr[..4].copy_from_slice(&hdr[16..20]);
            let ihl = ((hdr[0] & 0x0f) as u64) * 4;
            (ip + ihl, ihl == 20)
        }
        6 => {
            // Extension headers are not walked: TCP follows the fixed header
            // in the traffic ktrace cares about.
            info.protocol = hdr[6];
            info.src.family = AF_INET6;
            info.dst.family = AF_INET6;
            info.src.addr.copy_from_slice(&hdr[8..24]);
            info.dst.addr.copy_from_slice(&hdr[24..40]);
            (ip + 40, true)
        }
        _ => return Err(-2),
    };
    if info.protocol != 6 && info.protocol != 17 && info.protocol != 132 {
        return Ok(info);
    }
    // TCP, UDP and SCTP all start with the two ports; TCP flags at 13.
    let t: [u8; 14] = if l4_in_hdr && info.src.family == AF_INET {
        let mut t = [0u8; 14];
        t.copy_from_slice(&hdr[20..34]);
        t
    } else if l4_in_hdr {
        let mut t = [0u8; 14];
        t.copy_from_slice(&hdr[40..54]);
        t
    } else {
        read(l4, 0)?
    };
    info.src.port = u16::from_be_bytes([t[0], t[1]]);
    info.dst.port = u16::from_be_bytes([t[2], t[3]]);
    if info.protocol == 6 {
        info.tcp_flags = t[13];
    }
    Ok(info)
}

/// A socket's own endpoints (local, remote), for resets without a packet.
#[inline(always)]
pub fn sock_endpoints(sk: u64, local: &mut Endpoint, remote: &mut Endpoint) -> Result<(), i64> {
    let family: u16 = read(sk, layout!(sk_family))?;
    // skc_portpair: dport (network order) then num (host order).
    let ports: [u8; 4] = read(sk, layout!(sk_portpair))?;
    remote.port = u16::from_be_bytes([ports[0], ports[1]]);
    local.port = u16::from_ne_bytes([ports[2], ports[3]]);
    if family == AF_INET6 as u16 {
        local.family = AF_INET6;
        remote.family = AF_INET6;
        remote.addr = read(sk, layout!(sk_v6_daddr))?;
        local.addr = read(sk, layout!(sk_v6_rcv_saddr))?;
    } else {
        local.family = AF_INET;
        remote.family = AF_INET;
        // skc_addrpair: daddr then rcv_saddr.
        let pair: [u8; 8] = read(sk, layout!(sk_addrpair))?;
        remote.addr[..4].copy_from_slice(&pair[..4]);
        local.addr[..4].copy_from_slice(&pair[4..]);
    }
    Ok(())
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
