//! Ring-buffer records to [`Event`]s. Every record is length-checked for its
//! kind before a byte is read, then read field by field with `bytes::Buf`
//! (native endianness: the kernel wrote it on this machine). No pointer casts.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Buf;
use ktrace_common::{
    hook, invalid_reason, kind, reset_flags, CtInvalidEvent, EventHeader, IpvsConnEvent, NatEvent,
    ResetEvent, AF_INET, AF_INET6, CT_MESSAGE_LEN,
};

use crate::event::{CtInvalid, Event, EventBody, IpvsConnNew, NatEntry, Source};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {got} bytes is shorter than the {need}-byte {what}")]
    TooShort {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("unknown event kind {0}")]
    UnknownKind(u16),
    #[error("unknown address family {0}")]
    BadFamily(u8),
}

/// Names of kernel enum values that events carry as numbers.
#[derive(Debug, Clone, Default)]
pub struct Names {
    /// `enum sk_rst_reason`, e.g. 1 -> "NO_SOCKET" (shared by the events
    /// that carry it: no allocation per event).
    pub reset_reasons: HashMap<u32, std::sync::Arc<str>>,
}

const IP_VS_CONN_F_TEMPLATE: u32 = 0x1000;

fn need(buf: &[u8], n: usize, what: &'static str) -> Result<(), DecodeError> {
    if buf.len() < n {
        Err(DecodeError::TooShort {
            what,
            need: n,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn header(b: &mut &[u8]) -> EventHeader {
    let kind = b.get_u16_ne();
    let hook = b.get_u8();
    let _pad = b.get_u8();
    let netns = b.get_u32_ne();
    let ts_ns = b.get_u64_ne();
    EventHeader {
        kind,
        hook,
        _pad0: 0,
        netns,
        ts_ns,
    }
}

/// Reads a 20-byte `Endpoint`; `None` when its family is 0 (absent).
fn endpoint(b: &mut &[u8]) -> Result<Option<SocketAddr>, DecodeError> {
    let mut addr = [0u8; 16];
    b.copy_to_slice(&mut addr);
    let port = b.get_u16_ne();
    let family = b.get_u8();
    let _pad = b.get_u8();
    let ip = match family {
        0 => return Ok(None),
        AF_INET => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(addr)),
        f => return Err(DecodeError::BadFamily(f)),
    };
    Ok(Some(SocketAddr::new(ip, port)))
}

fn required(ep: Option<SocketAddr>) -> Result<SocketAddr, DecodeError> {
    ep.ok_or(DecodeError::BadFamily(0))
}

fn source(hook_id: u8) -> Source {
    match hook_id {
        hook::TP_TCP_SEND_RESET | hook::TP_TCP_RECEIVE_RESET => Source::Tracepoint,
        hook::KPROBE_TCP_V4_SEND_RESET | hook::KPROBE_TCP_V6_SEND_RESET => Source::Kprobe,
        hook::CTNETLINK => Source::Ctnetlink,
        hook::RAW_TP_TCP_SEND_RESET | hook::RAW_TP_TCP_RECEIVE_RESET => Source::RawTracepoint,
        hook::FENTRY_TCP_V4_SEND_RESET | hook::FENTRY_TCP_V6_SEND_RESET => Source::Fentry,
        _ => Source::Kretprobe,
    }
}

/// The log helpers get printf templates ("SEQ is over upper bound %u (over
/// the window of the receiver)"), cut at 60 bytes: keep the words before
/// the first conversion.
fn clean_message(m: &str) -> String {
    let head = m.split('%').next().unwrap_or(m);
    let head = head.split(" (").next().unwrap_or(head);
    head.trim().trim_end_matches([':', ',']).trim().to_string()
}

/// Decodes one ring-buffer record.
pub fn decode(record: &[u8], names: &Names) -> Result<Event, DecodeError> {
    need(record, size_of::<EventHeader>(), "event header")?;
    let mut b = record;
    let h = header(&mut b);
    let body = match h.kind {
        kind::TCP_SEND_RESET | kind::TCP_RECEIVE_RESET => {
            need(record, size_of::<ResetEvent>(), "reset event")?;
            reset(h.kind, &mut b, names)?
        }
        kind::CT_INVALID | kind::CT_TABLE_FULL => {
            need(record, size_of::<CtInvalidEvent>(), "conntrack event")?;
            conntrack(h.kind, &mut b)?
        }
        kind::IPVS_CONN_NEW => {
            need(record, size_of::<IpvsConnEvent>(), "IPVS event")?;
            let client = required(endpoint(&mut b)?)?;
            let service = required(endpoint(&mut b)?)?;
            let real_server = required(endpoint(&mut b)?)?;
            let conn_flags = b.get_u32_ne();
            let dest_flags = b.get_u32_ne();
            let weight = b.get_i32_ne();
            let protocol = b.get_u8();
            EventBody::IpvsConnNew(Box::new(IpvsConnNew {
                client,
                service,
                real_server,
                protocol,
                template: conn_flags & IP_VS_CONN_F_TEMPLATE != 0,
                conn_flags,
                dest_flags,
                weight: (weight >= 0).then_some(weight),
            }))
        }
        kind::NAT_MAPPING | kind::CT_CONFIRM_DROP => {
            need(record, size_of::<NatEvent>(), "NAT event")?;
            let nat = NatEntry {
                client: required(endpoint(&mut b)?)?,
                service: required(endpoint(&mut b)?)?,
                backend: required(endpoint(&mut b)?)?,
                snat: endpoint(&mut b)?,
                protocol: b.get_u8(),
            };
            if h.kind == kind::NAT_MAPPING {
                EventBody::NatMapping(Box::new(nat))
            } else {
                EventBody::CtConfirmDrop(Box::new(nat))
            }
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    Ok(Event {
        ts_ns: h.ts_ns,
        netns: h.netns,
        source: source(h.hook),
        body,
    })
}

/// A reset sent or received ([`ResetEvent`]).
fn reset(k: u16, b: &mut &[u8], names: &Names) -> Result<EventBody, DecodeError> {
    let src = required(endpoint(b)?)?;
    let dst = required(endpoint(b)?)?;
    let reason = b.get_u32_ne();
    let state = b.get_u8();
    let flags = b.get_u8();
    let trigger_flags = b.get_u8();
    b.advance(1);
    let sock_cookie = b.get_u64_ne();
    Ok(if k == kind::TCP_SEND_RESET {
        EventBody::TcpSendReset {
            src,
            dst,
            reason: (flags & reset_flags::HAS_REASON != 0).then(|| {
                names
                    .reset_reasons
                    .get(&reason)
                    .cloned()
                    .unwrap_or_else(|| format!("REASON_{reason}").into())
            }),
            trigger_flags: (flags & reset_flags::HAS_TRIGGER != 0).then_some(trigger_flags),
            socket: (flags & reset_flags::HAS_SOCKET != 0).then_some(state),
        }
    } else {
        EventBody::TcpReceiveReset {
            src,
            dst,
            sock_cookie,
        }
    })
}

/// A conntrack INVALID verdict or failed entry creation ([`CtInvalidEvent`]).
fn conntrack(k: u16, b: &mut &[u8]) -> Result<EventBody, DecodeError> {
    let src = required(endpoint(b)?)?;
    let dst = required(endpoint(b)?)?;
    let orig_src = endpoint(b)?;
    let orig_dst = endpoint(b)?;
    let reply_src = endpoint(b)?;
    let reason = b.get_u8();
    let ctinfo = b.get_u8();
    let _protocol = b.get_u8();
    b.advance(1);
    let verdict = b.get_i32_ne();
    let mut msg = [0u8; CT_MESSAGE_LEN];
    b.copy_to_slice(&mut msg);
    Ok(if k == kind::CT_TABLE_FULL {
        EventBody::CtTableFull {
            src,
            dst,
            errno: -verdict,
        }
    } else {
        let end = msg.iter().position(|&c| c == 0).unwrap_or(msg.len());
        let message = (reason == invalid_reason::MESSAGE && end > 0)
            .then(|| clean_message(&String::from_utf8_lossy(&msg[..end])).into());
        EventBody::CtInvalid(Box::new(CtInvalid {
            src,
            dst,
            orig_src,
            orig_dst,
            reply_src,
            reply_dir: ctinfo >= 3,
            message,
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ktrace_common::Endpoint;

    /// Serialises a `#[repr(C)]` record exactly as the kernel writes it.
    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: test-only view of a plain-old-data struct with explicit padding.
        unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()).to_vec() }
    }

    fn v4(a: [u8; 4], port: u16) -> Endpoint {
        let mut e = Endpoint {
            port,
            family: AF_INET,
            ..Default::default()
        };
        e.addr[..4].copy_from_slice(&a);
        e
    }

    fn reset(kind_: u16, flags: u8, reason: u32) -> ResetEvent {
        ResetEvent {
            header: EventHeader {
                kind: kind_,
                hook: hook::TP_TCP_SEND_RESET,
                _pad0: 0,
                netns: 4026532000,
                ts_ns: 123,
            },
            src: v4([10, 0, 0, 2], 40000),
            dst: v4([10, 0, 1, 2], 2222),
            reason,
            state: 0,
            flags,
            trigger_flags: 0,
            _pad: 0,
            sock_cookie: 0,
        }
    }

    fn names() -> Names {
        Names {
            reset_reasons: [(1, "NO_SOCKET".into())].into_iter().collect(),
        }
    }

    #[test]
    fn decodes_a_no_socket_reset() {
        let rec = bytes_of(&reset(kind::TCP_SEND_RESET, reset_flags::HAS_REASON, 1));
        let ev = decode(&rec, &names()).unwrap();
        assert_eq!(ev.ts_ns, 123);
        assert_eq!(ev.netns, 4026532000);
        assert_eq!(ev.source, Source::Tracepoint);
        assert_eq!(
            ev.body,
            EventBody::TcpSendReset {
                src: "10.0.0.2:40000".parse().unwrap(),
                dst: "10.0.1.2:2222".parse().unwrap(),
                reason: Some("NO_SOCKET".into()),
                socket: None,
                trigger_flags: None,
            }
        );
    }

    #[test]
    fn unknown_reason_values_keep_their_number() {
        let rec = bytes_of(&reset(kind::TCP_SEND_RESET, reset_flags::HAS_REASON, 77));
        match decode(&rec, &names()).unwrap().body {
            EventBody::TcpSendReset { reason, .. } => {
                assert_eq!(reason.as_deref(), Some("REASON_77"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decodes_ipv6_and_ct_invalid_with_message() {
        let mut ev = CtInvalidEvent::default();
        ev.header.kind = kind::CT_INVALID;
        ev.header.hook = hook::KRETPROBE_NF_CONNTRACK_TCP_PACKET;
        ev.src = v4([10, 0, 1, 2], 2222);
        ev.dst = v4([10, 0, 0, 2], 40000);
        ev.orig_src = v4([10, 0, 0, 2], 40000);
        ev.orig_dst = v4([10, 96, 0, 10], 2222);
        ev.reply_src = Endpoint {
            addr: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            port: 2222,
            family: AF_INET6,
            _pad: 0,
        };
        ev.reason = invalid_reason::MESSAGE;
        ev.ctinfo = 3;
        ev.verdict = -1;
        ev.message[..27].copy_from_slice(b"SEQ is over the upper bound");
        match decode(&bytes_of(&ev), &names()).unwrap().body {
            EventBody::CtInvalid(c) => {
                assert_eq!(c.orig_dst, Some("10.96.0.10:2222".parse().unwrap()));
                assert_eq!(c.reply_src, Some("[fd00::2]:2222".parse().unwrap()));
                assert!(c.reply_dir);
                assert_eq!(c.message.as_deref(), Some("SEQ is over the upper bound"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn conntrack_templates_are_cleaned() {
        assert_eq!(
            clean_message("SEQ is over upper bound %u (over the window of the receiver"),
            "SEQ is over upper bound"
        );
        assert_eq!(
            clean_message("invalid tcp flag combination"),
            "invalid tcp flag combination"
        );
        assert_eq!(
            clean_message("ACK is under the lower bound (possible overly delayed ACK)"),
            "ACK is under the lower bound"
        );
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        let good = bytes_of(&reset(kind::TCP_SEND_RESET, 0, 0));
        // Every truncation of a valid record is refused.
        for n in 0..good.len() {
            assert!(decode(&good[..n], &names()).is_err(), "len {n}");
        }
        let mut bad_kind = good.clone();
        bad_kind[0] = 0xee;
        assert_eq!(
            decode(&bad_kind, &names()),
            Err(DecodeError::UnknownKind(0xee))
        );
        let mut bad_family = good.clone();
        bad_family[16 + 18] = 99;
        assert_eq!(
            decode(&bad_family, &names()),
            Err(DecodeError::BadFamily(99))
        );
        // Random bytes of every length never panic.
        let mut x: u32 = 0x12345678;
        for len in 0..300 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = decode(&buf, &names());
        }
    }

    #[test]
    fn ipvs_template_and_weight() {
        let ev = IpvsConnEvent {
            header: EventHeader {
                kind: kind::IPVS_CONN_NEW,
                hook: hook::KRETPROBE_IP_VS_CONN_NEW,
                ..Default::default()
            },
            client: v4([10, 0, 0, 2], 0),
            virtual_service: v4([10, 96, 0, 20], 80),
            real_server: v4([10, 0, 1, 3], 8080),
            conn_flags: 0x1000,
            dest_flags: 1,
            weight: 0,
            protocol: 6,
            _pad: [0; 7],
        };
        match decode(&bytes_of(&ev), &names()).unwrap().body {
            EventBody::IpvsConnNew(c) => {
                assert!(c.template);
                assert_eq!(c.weight, Some(0));
            }
            other => panic!("{other:?}"),
        }
    }
}
