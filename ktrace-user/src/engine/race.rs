//! The conntrack insert race: two packets of one new flow (a resolver's A
//! and AAAA queries from one socket) each create an unconfirmed entry on
//! two CPUs; the second to confirm either gets its clash resolved (5.x
//! kernels, counted by `clash_resolve`) or is dropped (`insert_failed`,
//! and `__nf_conntrack_confirm` returns NF_DROP): the client then waits
//! for its resolver's timeout, typically 5 s.
//!
//! A hooked drop is a finding per packet, naming the flow; the counters
//! give one finding per episode (repeats merged like table-full).

use std::net::SocketAddr;

use super::finding::{self, Evidence, Finding, Severity, Time};
use super::{Engine, Repeat};

const REMEDY_DROPPED: &str = "in the client Pod's resolv.conf add `options single-request-reopen` (glibc: the A and AAAA queries then use separate sockets) or `use-vc` (DNS over TCP), or run NodeLocal DNSCache (queries to its node-local address are not DNATed); kernels from 5.6 on resolve most UDP clashes instead of dropping";
const REMEDY_RESOLVED: &str = "nothing to do on this kernel; on kernels that cannot resolve the clash the same race drops the packet (insert_failed) and lookups wait 5 s: there, `options single-request-reopen` in resolv.conf or NodeLocal DNSCache";

#[derive(Clone, Copy)]
pub(super) enum Outcome {
    Dropped = 0,
    Resolved = 1,
}

impl Engine {
    /// `__nf_conntrack_confirm` dropped this packet of `client` -> `service`.
    pub(super) fn on_confirm_drop(
        &mut self,
        ts: u64,
        client: SocketAddr,
        service: SocketAddr,
        backend: SocketAddr,
        out: &mut Vec<Finding>,
    ) {
        let evidence = Evidence::ConntrackInsertRace(finding::InsertRace {
            outcome: "dropped",
            basis: "confirm_drop",
            count: 1,
            first: Time::Mono(ts),
            last: Time::Mono(ts),
        });
        out.push(Finding {
            ts_ns: ts,
            severity: Severity::Error,
            service: Some(service),
            backend: (backend != service).then_some(backend),
            client: Some(client),
            cause: "the packet lost the race to confirm its new conntrack entry against another packet of the same flow sent at the same time from another CPU (a resolver's A and AAAA queries from one socket), and the kernel dropped it: the client waits for its timeout (5 s for DNS) before retrying".into(),
            remedy: REMEDY_DROPPED.into(),
            evidence,
        });
    }

    /// The counters rose by `n` races of `outcome` (where drops cannot be
    /// hooked, or for clashes the kernel resolved).
    pub(super) fn on_race_counter(
        &mut self,
        ts: u64,
        outcome: Outcome,
        n: u64,
        out: &mut Vec<Finding>,
    ) {
        let r = self.races[outcome as usize].get_or_insert(Repeat::new(ts));
        if ts.saturating_sub(r.last) > self.cfg.repeat_ns {
            *r = Repeat::new(ts);
        }
        if !r.note(ts, n, self.cfg.repeat_ns) {
            return;
        }
        let r = *r;
        let (name, basis, counter, severity, remedy) = match outcome {
            Outcome::Dropped => (
                "dropped",
                "insert_failed_counter",
                "insert_failed",
                Severity::Error,
                REMEDY_DROPPED,
            ),
            Outcome::Resolved => (
                "resolved",
                "clash_resolve_counter",
                "clash_resolve",
                Severity::Warning,
                REMEDY_RESOLVED,
            ),
        };
        let what = match outcome {
            Outcome::Dropped => "lost the race to confirm their new conntrack entry and were dropped (clients wait for their timeout, 5 s for DNS)",
            Outcome::Resolved => "raced to confirm a new conntrack entry against another packet of the same flow, and the kernel resolved the clash: nothing was dropped",
        };
        out.push(Finding {
            ts_ns: ts,
            severity,
            service: None,
            backend: None,
            client: None,
            cause: format!(
                "{} packet(s) {what}; two packets of one new flow sent at once from two CPUs, as a resolver's A and AAAA queries from one socket are (the conntrack counter {counter} rose; which flow cannot be seen without the __nf_conntrack_confirm kprobe)",
                r.count
            ),
            remedy: remedy.into(),
            evidence: Evidence::ConntrackInsertRace(finding::InsertRace {
                outcome: name,
                basis,
                count: r.count,
                first: Time::Mono(r.first),
                last: Time::Mono(r.last),
            }),
        });
    }
}
