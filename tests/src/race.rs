//! The conntrack insert race, played from the lab's client namespace: two
//! packets of one new flow sent at the same instant from two CPUs, so both
//! create an unconfirmed conntrack entry on the node and race to confirm
//! it. UDP (one socket, like a resolver's A and AAAA queries): kernels
//! from 5.6 on resolve the clash, even when DNAT sent the two packets to
//! different backends. TCP (the same SYN twice): the kernel never resolves
//! a TCP clash, so the loser is dropped (`insert_failed`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Runs `f` on a thread that entered network namespace `ns` (`ip netns` name).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("opening namespace {ns}: {e}"));
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with an open namespace fd.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one CPU set, applied to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Two threads meet here once per round, spinning (a sleeping barrier
/// wakes its waiters tens of microseconds apart: too late to race).
struct SpinPair {
    arrived: AtomicUsize,
}

impl SpinPair {
    fn wait(&self, round: usize) {
        self.arrived.fetch_add(1, Ordering::AcqRel);
        while self.arrived.load(Ordering::Acquire) < 2 * (round + 1) {
            std::hint::spin_loop();
        }
    }
}

/// Calls `send(cpu, round)` for every round in `0..rounds` from two
/// threads pinned to CPUs 0 and 1, released together each round. Returns
/// how many calls succeeded.
fn on_two_cpus_at_once<F>(rounds: usize, send: Arc<F>) -> usize
where
    F: Fn(usize, usize) -> bool + Send + Sync + 'static,
{
    let meet = Arc::new(SpinPair {
        arrived: AtomicUsize::new(0),
    });
    let threads: Vec<_> = (0..2)
        .map(|cpu| {
            let (send, meet) = (send.clone(), meet.clone());
            std::thread::spawn(move || {
                pin_to(cpu);
                (0..rounds)
                    .filter(|&round| {
                        meet.wait(round);
                        send(cpu, round)
                    })
                    .count()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().expect("sender")).sum()
}

/// Sends `pairs` pairs of datagrams to `to` from namespace `ns`, each pair
/// from a fresh socket, its two datagrams sent on two CPUs at once
/// (`at_once`), or one after the other from one thread (the control: no
/// race). Returns how many datagrams were sent.
pub fn udp_pairs(ns: &str, to: SocketAddr, pairs: usize, at_once: bool) -> usize {
    let mut sent = 0;
    // Batches keep the open sockets under the descriptor limit.
    for batch in (0..pairs).collect::<Vec<_>>().chunks(256) {
        let n = batch.len();
        let sockets: Vec<UdpSocket> = in_netns(ns, move || {
            (0..n)
                .map(|_| UdpSocket::bind("0.0.0.0:0").expect("UDP socket"))
                .collect()
        });
        if !at_once {
            for s in &sockets {
                for _ in 0..2 {
                    sent += usize::from(s.send_to(b"query", to).is_ok());
                }
            }
            continue;
        }
        let send = move |_cpu, round: usize| sockets[round].send_to(b"query", to).is_ok();
        sent += on_two_cpus_at_once(n, Arc::new(send));
    }
    sent
}

/// Sends `pairs` TCP SYNs from `from`'s address to `to`, each twice at once
/// on two CPUs (the same segment: one new flow), from the ports
/// `from.port()..from.port() + pairs` (unused by any socket: the client's
/// kernel resets the backend's SYN/ACK). Returns how many SYNs were sent.
/// A raw socket per CPU: a raw socket sends under its lock, which would
/// take turns where the race needs both at once.
pub fn tcp_syn_pairs(ns: &str, from: SocketAddrV4, to: SocketAddrV4, pairs: u16) -> usize {
    let ip = *from.ip();
    let raw = in_netns(ns, move || [RawTcp::bound(ip), RawTcp::bound(ip)]);
    let send = move |cpu: usize, round: usize| {
        let src = SocketAddrV4::new(ip, from.port() + round as u16);
        raw[cpu].send(&syn(src, to), *to.ip())
    };
    on_two_cpus_at_once(usize::from(pairs), Arc::new(send))
}

/// A raw IPv4 TCP socket: the kernel adds the IP header, we write the TCP one.
struct RawTcp(OwnedFd);

impl RawTcp {
    fn bound(ip: Ipv4Addr) -> RawTcp {
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let raw = RawTcp(unsafe { OwnedFd::from_raw_fd(fd) });
        let sa = sockaddr(ip);
        // SAFETY: bind with a valid sockaddr_in and its size.
        let r = unsafe {
            libc::bind(
                fd,
                std::ptr::from_ref(&sa).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(r, 0, "bind {ip}: {}", std::io::Error::last_os_error());
        raw
    }

    fn send(&self, segment: &[u8], to: Ipv4Addr) -> bool {
        let sa = sockaddr(to);
        // SAFETY: sendto with a valid buffer, sockaddr_in and their sizes.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                std::ptr::from_ref(&sa).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        n == segment.len() as isize
    }
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP header with SYN set, checksummed for `from` -> `to`.
fn syn(from: SocketAddrV4, to: SocketAddrV4) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&from.port().to_be_bytes());
    h[2..4].copy_from_slice(&to.port().to_be_bytes());
    h[4..8].copy_from_slice(&0x1000_0000u32.to_be_bytes());
    h[12] = 5 << 4; // data offset: 5 words, no options
    h[13] = 0x02; // SYN
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&from.ip().octets());
    pseudo.extend_from_slice(&to.ip().octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8, 0, 20]);
    pseudo.extend_from_slice(&h);
    h[16..18].copy_from_slice(&checksum(&pseudo).to_be_bytes());
    h
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What a race scenario did: pairs sent, and how the node's counters rose.
#[derive(Debug, Clone, Copy)]
pub struct Raced {
    pub pairs: usize,
    pub insert_failed: u64,
    pub clash_resolve: u64,
}

/// The TCP insert race on `lab`'s Service (VIP:PORT, DNATed at random
/// over its backends): rounds of `pairs` duplicated SYNs from the client
/// until the node's `insert_failed` rises, at most `max_rounds`. Nothing
/// listens behind the Service for these ports' sake: the backend refuses.
pub fn tcp_race_until_dropped(lab: &crate::Lab, pairs: u16, max_rounds: u16) -> Raced {
    let (failed0, clash0) = (lab.ct_stat("insert_failed"), lab.ct_stat("clashres"));
    let client: Ipv4Addr = crate::CLIENT_IP.parse().unwrap();
    let vip = SocketAddrV4::new(crate::VIP.parse().unwrap(), crate::PORT);
    let mut sent = 0;
    for round in 0..max_rounds {
        if lab.ct_stat("insert_failed") > failed0 {
            break;
        }
        // Ports below the ephemeral range, new for every pair: no entry exists.
        let from = SocketAddrV4::new(client, 10_000 + round * pairs);
        assert_eq!(
            tcp_syn_pairs(&lab.client, from, vip, pairs),
            2 * usize::from(pairs)
        );
        sent += usize::from(pairs);
    }
    Raced {
        pairs: sent,
        insert_failed: lab.ct_stat("insert_failed") - failed0,
        clash_resolve: lab.ct_stat("clashres") - clash0,
    }
}

/// One `dropped` finding per packet the node dropped, each from the
/// `__nf_conntrack_confirm` hook and naming the client, `service` and one
/// of `backends`; as many `ct_confirm_drop` events. Returns the findings.
pub fn assert_one_finding_per_drop<'a>(
    lines: &'a [serde_json::Value],
    dropped: u64,
    service: &str,
    backends: &std::collections::BTreeSet<String>,
) -> Vec<&'a serde_json::Value> {
    let found: Vec<&serde_json::Value> =
        crate::select(lines, "finding", Some("conntrack_insert_race"))
            .into_iter()
            .filter(|f| f["evidence"]["outcome"] == "dropped")
            .collect();
    assert_eq!(
        found.len() as u64,
        dropped,
        "one finding per dropped packet: {found:?}"
    );
    for f in &found {
        assert_eq!(f["evidence"]["basis"], "confirm_drop", "{f}");
        assert_eq!(f["service"], service, "{f}");
        let client = f["client"].as_str().unwrap();
        assert!(client.starts_with(&format!("{}:", crate::CLIENT_IP)), "{f}");
        assert!(backends.contains(f["backend"].as_str().unwrap()), "{f}");
    }
    let events = crate::select(lines, "event", Some("ct_confirm_drop"));
    assert_eq!(events.len() as u64, dropped, "{events:?}");
    found
}
