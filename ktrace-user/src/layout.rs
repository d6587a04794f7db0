//! Struct offsets and function signatures from the running kernel's BTF,
//! handed to the eBPF programs as the `LAYOUT` global. This is ktrace's
//! CO-RE: the kernel side never hard-codes where a field lives.

use std::path::Path;

use btf_rs::{Btf, Type};
use ktrace_common::{KernelLayout, NO_OFFSET};

/// The kernel's BTF: vmlinux, and module BTF where ktrace needs it.
pub struct KernelBtf {
    pub vmlinux: Btf,
    pub ip_vs: Option<Btf>,
}

impl KernelBtf {
    /// Loads `/sys/kernel/btf/vmlinux` (and `ip_vs` when that module is loaded).
    pub fn load(root: &Path) -> Result<KernelBtf, btf_rs::Error> {
        let dir = root.join("sys/kernel/btf");
        let vmlinux = Btf::from_file(dir.join("vmlinux"))?;
        let ip_vs = Btf::from_split_file(dir.join("ip_vs"), &vmlinux).ok();
        Ok(KernelBtf { vmlinux, ip_vs })
    }
}

/// Strips typedefs and qualifiers down to the underlying type.
fn resolve(btf: &Btf, mut t: Type) -> Option<Type> {
    for _ in 0..16 {
        t = match t {
            Type::Typedef(ref x) => btf.resolve_chained_type(x).ok()?,
            Type::Volatile(ref x) => btf.resolve_chained_type(x).ok()?,
            Type::Const(ref x) => btf.resolve_chained_type(x).ok()?,
            Type::Restrict(ref x) => btf.resolve_chained_type(x).ok()?,
            Type::TypeTag(ref x) => btf.resolve_chained_type(x).ok()?,
            other => return Some(other),
        };
    }
    None
}

fn find_struct(btf: &Btf, name: &str) -> Option<btf_rs::Struct> {
    btf.resolve_types_by_name(name)
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
}

/// Byte offset of `field` in the struct or union `s`, descending into
/// anonymous members, with the member's resolved type.
fn find_member(btf: &Btf, s: &btf_rs::Struct, field: &str) -> Option<(u32, Type)> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let ty = btf
            .resolve_chained_type(m)
            .ok()
            .and_then(|t| resolve(btf, t));
        if name == field {
            return Some((m.bit_offset() / 8, ty?));
        }
        if name.is_empty() {
            if let Some(Type::Struct(inner) | Type::Union(inner)) = ty {
                if let Some((off, t)) = find_member(btf, &inner, field) {
                    return Some((m.bit_offset() / 8 + off, t));
                }
            }
        }
    }
    None
}

/// Offset of a dotted path (`"__sk_common.skc_net"`) inside `struct name`;
/// array members are entered at element 0.
pub fn offset_of(btf: &Btf, name: &str, path: &str) -> Option<u32> {
    let mut s = find_struct(btf, name)?;
    let mut total = 0;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let (off, mut ty) = find_member(btf, &s, part)?;
        total += off;
        if i + 1 == parts.len() {
            return Some(total);
        }
        if let Type::Array(a) = &ty {
            ty = resolve(btf, btf.resolve_chained_type(a).ok()?)?;
        }
        s = match ty {
            Type::Struct(x) | Type::Union(x) => x,
            _ => return None,
        };
    }
    Some(total)
}

/// Size of the element type of the array member `path` of `struct name`.
pub fn array_elem_size(btf: &Btf, name: &str, field: &str) -> Option<u32> {
    let s = find_struct(btf, name)?;
    let (_, ty) = find_member(btf, &s, field)?;
    let Type::Array(a) = ty else { return None };
    match resolve(btf, btf.resolve_chained_type(&a).ok()?)? {
        Type::Struct(x) | Type::Union(x) => Some(x.size() as u32),
        _ => None,
    }
}

/// Number of declared parameters of a kernel function (variadic `...` not counted).
pub fn param_count(btf: &Btf, func: &str) -> Option<usize> {
    for t in btf.resolve_types_by_name(func).ok()? {
        if let Type::Func(f) = t {
            if let Ok(Type::FuncProto(p)) = btf.resolve_chained_type(&f) {
                return Some(p.parameters.iter().filter(|p| !p.is_variadic()).count());
            }
        }
    }
    None
}

/// Names of an enum's values (e.g. `sk_rst_reason`), by value.
pub fn enum_names(btf: &Btf, name: &str) -> Vec<(u32, String)> {
    let Ok(types) = btf.resolve_types_by_name(name) else {
        return Vec::new();
    };
    for t in types {
        if let Type::Enum(e) = t {
            return e
                .members
                .iter()
                .filter_map(|m| Some((m.val(), btf.resolve_name(m).ok()?)))
                .collect();
        }
    }
    Vec::new()
}

fn or_none(v: Option<u32>) -> u32 {
    v.unwrap_or(NO_OFFSET)
}

/// Fills a [`KernelLayout`] from BTF; fields the kernel lacks stay [`NO_OFFSET`].
pub fn kernel_layout(kbtf: &KernelBtf) -> KernelLayout {
    let b = &kbtf.vmlinux;
    let mut l = KernelLayout::UNKNOWN;
    l.skb_head = or_none(offset_of(b, "sk_buff", "head"));
    l.skb_network_header = or_none(offset_of(b, "sk_buff", "network_header"));
    l.skb_dev = or_none(offset_of(b, "sk_buff", "dev"));
    l.skb_nfct = or_none(offset_of(b, "sk_buff", "_nfct"));
    // TCP_SKB_CB(skb)->tcp_flags: the control block is `cb` at its start.
    l.skb_tcp_flags = or_none(
        offset_of(b, "sk_buff", "cb")
            .and_then(|cb| Some(cb + offset_of(b, "tcp_skb_cb", "tcp_flags")?)),
    );
    l.dev_nd_net = or_none(offset_of(b, "net_device", "nd_net.net"));
    l.net_ns_inum = or_none(offset_of(b, "net", "ns.inum"));
    l.sk_net = or_none(offset_of(b, "sock_common", "skc_net"));
    l.sk_state = or_none(offset_of(b, "sock_common", "skc_state"));
    l.sk_family = or_none(offset_of(b, "sock_common", "skc_family"));
    l.sk_addrpair = or_none(offset_of(b, "sock_common", "skc_addrpair"));
    l.sk_portpair = or_none(offset_of(b, "sock_common", "skc_portpair"));
    l.sk_v6_daddr = or_none(offset_of(b, "sock_common", "skc_v6_daddr"));
    l.sk_v6_rcv_saddr = or_none(offset_of(b, "sock_common", "skc_v6_rcv_saddr"));
    l.sk_cookie = or_none(offset_of(b, "sock_common", "skc_cookie"));
    let tuple_in_hash = offset_of(b, "nf_conntrack_tuple_hash", "tuple");
    l.ct_tuplehash =
        or_none(offset_of(b, "nf_conn", "tuplehash").and_then(|o| Some(o + tuple_in_hash?)));
    l.ct_tuplehash_size = or_none(array_elem_size(b, "nf_conn", "tuplehash"));
    l.ct_status = or_none(offset_of(b, "nf_conn", "status"));
    l.ct_net = or_none(offset_of(b, "nf_conn", "ct_net"));
    l.tuple_src_u3 = or_none(offset_of(b, "nf_conntrack_tuple", "src.u3"));
    l.tuple_src_port = or_none(offset_of(b, "nf_conntrack_tuple", "src.u"));
    l.tuple_src_l3num = or_none(offset_of(b, "nf_conntrack_tuple", "src.l3num"));
    l.tuple_dst_u3 = or_none(offset_of(b, "nf_conntrack_tuple", "dst.u3"));
    l.tuple_dst_port = or_none(offset_of(b, "nf_conntrack_tuple", "dst.u"));
    l.tuple_dst_protonum = or_none(offset_of(b, "nf_conntrack_tuple", "dst.protonum"));
    if let Some(v) = &kbtf.ip_vs {
        l.ipvs_caddr = or_none(offset_of(v, "ip_vs_conn", "caddr"));
        l.ipvs_vaddr = or_none(offset_of(v, "ip_vs_conn", "vaddr"));
        l.ipvs_daddr = or_none(offset_of(v, "ip_vs_conn", "daddr"));
        l.ipvs_cport = or_none(offset_of(v, "ip_vs_conn", "cport"));
        l.ipvs_vport = or_none(offset_of(v, "ip_vs_conn", "vport"));
        l.ipvs_dport = or_none(offset_of(v, "ip_vs_conn", "dport"));
        l.ipvs_af = or_none(offset_of(v, "ip_vs_conn", "af"));
        l.ipvs_daf = or_none(offset_of(v, "ip_vs_conn", "daf"));
        l.ipvs_protocol = or_none(offset_of(v, "ip_vs_conn", "protocol"));
        l.ipvs_flags = or_none(offset_of(v, "ip_vs_conn", "flags"));
        l.ipvs_dest = or_none(offset_of(v, "ip_vs_conn", "dest"));
        l.ipvs_ipvs = or_none(offset_of(v, "ip_vs_conn", "ipvs"));
        l.netns_ipvs_net = or_none(offset_of(v, "netns_ipvs", "net"));
        l.ipvs_dest_flags = or_none(offset_of(v, "ip_vs_dest", "flags"));
        l.ipvs_dest_weight = or_none(offset_of(v, "ip_vs_dest", "weight"));
    }
    // nf_ct_l4proto_log_invalid(skb, ct, [state,] fmt, ...): 5.14 added `state`.
    if let Some(n) = param_count(b, "nf_ct_l4proto_log_invalid") {
        l.log_invalid_fmt_arg = (n as u32).saturating_sub(1);
    }
    if let Some(n) = param_count(b, "nf_l4proto_log_invalid") {
        l.l4_log_invalid_fmt_arg = (n as u32).saturating_sub(1);
    }
    // tcp_v4_send_reset(sk, skb[, reason]): 6.10 added the reason.
    l.send_reset_has_reason = u32::from(param_count(b, "tcp_v4_send_reset") == Some(3));
    l
}

/// Fields the base hooks (resets, netns) cannot do without.
pub fn missing_base_fields(l: &KernelLayout) -> Vec<&'static str> {
    let mut v = Vec::new();
    for (name, off) in [
        ("sk_buff.head", l.skb_head),
        ("sk_buff.network_header", l.skb_network_header),
        ("sk_buff.dev", l.skb_dev),
        ("net_device.nd_net.net", l.dev_nd_net),
        ("net.ns.inum", l.net_ns_inum),
        ("sock_common.skc_net", l.sk_net),
    ] {
        if off == NO_OFFSET {
            v.push(name);
        }
    }
    v
}

/// Fields the conntrack hooks need.
pub fn missing_conntrack_fields(l: &KernelLayout) -> Vec<&'static str> {
    let mut v = Vec::new();
    for (name, off) in [
        ("nf_conn.tuplehash", l.ct_tuplehash),
        ("nf_conn.status", l.ct_status),
        ("nf_conn.ct_net", l.ct_net),
        ("sk_buff._nfct", l.skb_nfct),
        ("nf_conntrack_tuple.src.u3", l.tuple_src_u3),
        ("nf_conntrack_tuple.dst.u3", l.tuple_dst_u3),
    ] {
        if off == NO_OFFSET {
            v.push(name);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against this machine's BTF when it has one (skips, saying so, otherwise).
    #[test]
    fn offsets_from_running_kernel() {
        let root = Path::new("/");
        let Ok(kbtf) = KernelBtf::load(root) else {
            ktrace_tests::record_skip("no /sys/kernel/btf/vmlinux on this kernel");
            return;
        };
        let l = kernel_layout(&kbtf);
        assert!(
            missing_base_fields(&l).is_empty(),
            "{:?}",
            missing_base_fields(&l)
        );
        // struct nf_conntrack_tuple has been laid out the same since 2.6.
        assert_eq!(l.tuple_src_u3, 0);
        assert_eq!(l.tuple_src_port, 16);
        assert_eq!(l.tuple_src_l3num, 18);
        assert_eq!(l.tuple_dst_u3, 20);
        assert_eq!(l.tuple_dst_port, 36);
        assert_eq!(l.tuple_dst_protonum, 38);
        // The tuple follows an hlist_nulls_node (two pointers) in the hash entry.
        assert_eq!(l.ct_tuplehash_size, 56);
        assert!(l.skb_head < 512 && l.skb_network_header < 512);
        // cb[48] follows next, prev, dev, sk and tstamp; tcp_flags follows
        // seq, end_seq and a 4-byte union in tcp_skb_cb.
        assert_eq!(l.skb_tcp_flags, 40 + 12);
        let reasons = enum_names(&kbtf.vmlinux, "sk_rst_reason");
        if !reasons.is_empty() {
            assert!(reasons
                .iter()
                .any(|(v, n)| *v == 1 && n == "SK_RST_REASON_NO_SOCKET"));
        }
    }
}
