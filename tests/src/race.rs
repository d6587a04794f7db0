//! The conntrack insert race, played from the lab's client namespace: two
//! datagrams of one new UDP flow (one socket, like a resolver's A and AAAA
//! queries) sent at the same instant from two CPUs, so both packets create
//! an unconfirmed conntrack entry on the node and race to confirm it.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
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

/// Sends `pairs` pairs of datagrams to `to` from namespace `ns`, each pair
/// from a fresh socket, its two datagrams from threads pinned to CPUs 0
/// and 1 released together (`at_once`), or one after the other from one
/// thread (the control: no race). Returns how many datagrams were sent.
pub fn udp_pairs(ns: &str, to: SocketAddr, pairs: usize, at_once: bool) -> usize {
    let mut sent = 0;
    // Batches keep the open sockets under the descriptor limit.
    for batch in (0..pairs).collect::<Vec<_>>().chunks(256) {
        let n = batch.len();
        let sockets: Arc<Vec<UdpSocket>> = Arc::new(in_netns(ns, move || {
            (0..n)
                .map(|_| UdpSocket::bind("0.0.0.0:0").expect("UDP socket"))
                .collect()
        }));
        if !at_once {
            for s in sockets.iter() {
                for _ in 0..2 {
                    sent += usize::from(s.send_to(b"query", to).is_ok());
                }
            }
            continue;
        }
        let meet = Arc::new(SpinPair {
            arrived: AtomicUsize::new(0),
        });
        let threads: Vec<_> = (0..2)
            .map(|cpu| {
                let (sockets, meet) = (sockets.clone(), meet.clone());
                std::thread::spawn(move || {
                    pin_to(cpu);
                    let mut ok = 0;
                    for (round, s) in sockets.iter().enumerate() {
                        meet.wait(round);
                        ok += usize::from(s.send_to(b"query", to).is_ok());
                    }
                    ok
                })
            })
            .collect();
        sent += threads
            .into_iter()
            .map(|t| t.join().expect("sender"))
            .sum::<usize>();
    }
    sent
}
