//! IPVS: which real server a new connection was scheduled to, and that
//! server's weight at that moment (weight 0 = quiescent, being drained).

use aya_ebpf::programs::RetProbeContext;
use ktrace_common::{hook, kind, Endpoint, IpvsConnEvent, AF_INET, AF_INET6};

use crate::kernel::{self, layout};
use crate::ring;

#[inline(always)]
fn family(af: u16) -> u8 {
    if af == AF_INET6 as u16 {
        AF_INET6
    } else {
        AF_INET
    }
}

#[inline(always)]
fn endpoint(cp: u64, addr_off: u32, port_off: u32, fam: u8) -> Result<Endpoint, i64> {
    let mut ep = Endpoint::default();
    if addr_off == ktrace_common::NO_OFFSET {
        return Err(-1);
    }
    kernel::read_addr(cp + addr_off as u64, fam, &mut ep)?;
    let port: [u8; 2] = kernel::read(cp, port_off)?;
    ep.port = u16::from_be_bytes(port);
    Ok(ep)
}

/// kretprobe `ip_vs_conn_new(...)`: the returned `cp` is complete. Templates
/// (persistence) come through here too, flagged IP_VS_CONN_F_TEMPLATE.
#[inline(always)]
pub fn try_ip_vs_conn_new_return(ctx: &RetProbeContext) -> Result<(), i64> {
    let cp: u64 = ctx.ret();
    if cp == 0 {
        return Ok(());
    }
    let af: u16 = kernel::read(cp, layout!(ipvs_af))?;
    let daf: u16 = kernel::read(cp, layout!(ipvs_daf)).unwrap_or(af);
    let mut ev = IpvsConnEvent {
        client: endpoint(cp, layout!(ipvs_caddr), layout!(ipvs_cport), family(af))?,
        virtual_service: endpoint(cp, layout!(ipvs_vaddr), layout!(ipvs_vport), family(af))?,
        real_server: endpoint(cp, layout!(ipvs_daddr), layout!(ipvs_dport), family(daf))?,
        conn_flags: kernel::read(cp, layout!(ipvs_flags))?,
        weight: -1,
        ..IpvsConnEvent::default()
    };
    ev.protocol = kernel::read::<u16>(cp, layout!(ipvs_protocol)).unwrap_or(0) as u8;
    let dest: u64 = kernel::read(cp, layout!(ipvs_dest)).unwrap_or(0);
    if dest != 0 {
        ev.dest_flags = kernel::read(dest, layout!(ipvs_dest_flags)).unwrap_or(0);
        ev.weight = kernel::read(dest, layout!(ipvs_dest_weight)).unwrap_or(-1);
    }
    let netns = match kernel::read::<u64>(cp, layout!(ipvs_ipvs)) {
        Ok(ipvs) => match kernel::read::<u64>(ipvs, layout!(netns_ipvs_net)) {
            Ok(net) => kernel::net_inum(net),
            Err(_) => 0,
        },
        Err(_) => 0,
    };
    ev.header = ring::header(kind::IPVS_CONN_NEW, hook::KRETPROBE_IP_VS_CONN_NEW, netns);
    ring::emit(ev);
    Ok(())
}
