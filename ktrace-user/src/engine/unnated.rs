//! No-socket resets of NATed connections: which way the un-NATed packet
//! went (or which re-mapping) explains each, one finding per connection.
//!
//! The topologies, by the reset that gives each away:
//! - reply to the client: the client resets the backend's own address;
//! - reply to the node's masquerade (SNAT) address: the node's own stack
//!   resets the backend from that address, which an SNAT mapping ties to
//!   the real client;
//! - request to a Service address the node holds locally (IPVS binds every
//!   VIP to `kube-ipvs0`): the node resets the client from the VIP;
//! - reply after the entry was flushed or expired: as the first, on a flow
//!   whose entry conntrack destroyed (the flush's incident, not INVALID).

use std::borrow::Cow;
use std::net::SocketAddr;

use super::finding::{self, CtVerdict, Evidence, Finding, Severity, Time};
use super::flows::{flow_flags, Ep, Flow, FlowId, TCP};
use super::{
    Engine, UnnatedBasis, UnnatedPath, HOLD_NS, NO_INVALID_COUNTED, REPORT_AGAIN_MS, STORM_SWITCH,
    STORM_UNNATED,
};

/// Who a broken connection's finding names, and how its packet went.
#[derive(Debug, Clone, Copy)]
pub(super) struct Culprit {
    pub client: Ep,
    pub backend: Ep,
    pub path: UnnatedPath,
    pub snat: Option<SocketAddr>,
}

impl Engine {
    pub(super) fn on_no_socket_reset(
        &mut self,
        ts: u64,
        netns: u32,
        src: SocketAddr,
        dst: SocketAddr,
        reason: Option<&str>,
        out: &mut Vec<Finding>,
    ) {
        let (src_ep, dst_ep) = (Ep::new(src), Ep::new(dst));
        // Masquerade: the node resets the backend from the SNAT address.
        if let Some(&client) = self.snat.get(&src_ep) {
            if let Some(id) = self.flows.find(client, TCP, netns) {
                let flow = self.flows.get(id);
                if flow.backend == dst_ep || flow.previous_backend == dst_ep {
                    let c = Culprit {
                        client,
                        backend: dst_ep,
                        path: UnnatedPath::ReplyToSnatAddress,
                        snat: Some(src),
                    };
                    return self.on_unnated(ts, id, flow, c, reason, out);
                }
            }
        }
        // The client (src) resets the backend's own address.
        if let Some(id) = self.flows.find(src_ep, TCP, netns) {
            let flow = self.flows.get(id);
            if flow.service != dst_ep && (flow.backend == dst_ep || flow.previous_backend == dst_ep)
            {
                let c = Culprit {
                    client: src_ep,
                    backend: dst_ep,
                    path: UnnatedPath::ReplyToClient,
                    snat: None,
                };
                return self.on_unnated(ts, id, flow, c, reason, out);
            }
        }
        // The client is reset: by a backend (through the node's SNAT
        // address when masqueraded), or by the node from the Service address.
        let client = self.snat.get(&dst_ep).copied().unwrap_or(dst_ep);
        let Some(id) = self.flows.find(client, TCP, netns) else {
            return self.defer(ts, netns, src, client.get());
        };
        let flow = self.flows.get(id);
        if flow.service == src_ep {
            let c = Culprit {
                client,
                backend: flow.backend,
                path: UnnatedPath::RequestToLocalService,
                snat: None,
            };
            return self.on_unnated(ts, id, flow, c, reason, out);
        }
        self.on_backend_reset(ts, netns, id, flow, src_ep, client, reason, out);
    }

    /// A backend (src) reset the client of flow `id`.
    #[allow(clippy::too_many_arguments)]
    fn on_backend_reset(
        &mut self,
        ts: u64,
        netns: u32,
        id: FlowId,
        flow: Flow,
        src: Ep,
        client: Ep,
        reason: Option<&str>,
        out: &mut Vec<Finding>,
    ) {
        let now_ms = self.flows.ms(ts);
        if flow.backend == src {
            let recent =
                now_ms.abs_diff(flow.mapped_ms) as u64 * 1_000_000 <= self.cfg.correlation_ns;
            if !flow.previous_backend.is_none() && recent {
                self.flows.set_flags(id, flow_flags::REPORTED);
                if !flow.has(flow_flags::REPORTED) {
                    out.push(self.switch_finding(ts, client.get(), &flow, reason));
                }
                self.count_storm(flow.service, src, client, STORM_SWITCH, ts, out);
            } else if flow.has(flow_flags::UNNATED) {
                // The backend, having accepted the reset of its end, resets
                // the client's next segment: same incident.
                self.count_storm(flow.service, src, client, STORM_UNNATED, ts, out);
            }
            return;
        }
        if flow.previous_backend.is_none() {
            // The mapping may not have caught up yet (ctnetlink lags).
            self.defer(ts, netns, src.get(), client.get());
        }
    }

    /// An un-NATed packet broke flow `id`: one finding per connection.
    fn on_unnated(
        &mut self,
        ts: u64,
        id: FlowId,
        flow: Flow,
        mut c: Culprit,
        reason: Option<&str>,
        out: &mut Vec<Finding>,
    ) {
        let now_ms = self.flows.ms(ts);
        // A flow already reported that was quiet for a while is a new
        // connection on a reused client port: conntrack may revive its
        // entry without a NEW event (SYN on a CLOSE entry).
        let quiet = now_ms.saturating_sub(flow.last_seen_ms) >= REPORT_AGAIN_MS;
        self.flows
            .touch(id, now_ms, flow_flags::UNNATED | flow_flags::REPORTED);
        if c.backend == flow.previous_backend && c.backend != flow.backend {
            // The old backend, after the flow was re-mapped (flush, expiry):
            // the backend switch's connection, never a second finding.
            if !flow.has(flow_flags::REPORTED) {
                out.push(self.switch_finding(ts, c.client.get(), &flow, reason));
            }
            self.count_storm(flow.service, c.backend, c.client, STORM_SWITCH, ts, out);
            return;
        }
        if !flow.has(flow_flags::REPORTED) || quiet {
            if flow.has(flow_flags::DESTROYED) && c.path != UnnatedPath::RequestToLocalService {
                c.path = UnnatedPath::EntryLost;
            }
            let mut f = self.unnated_finding(ts, &c, flow.service.get(), reason);
            let cite_counters = c.path != UnnatedPath::EntryLost
                && self.cfg.ct_counters
                && !self.cfg.ct_invalid_hook;
            if cite_counters && !self.invalid_samples.covers(ts) {
                // Cite the next conntrack counter sample (which the live
                // source takes as soon as it sees this wants one:
                // `wants_counter_sample`).
                self.held.push((ts + HOLD_NS, f));
            } else {
                if cite_counters {
                    // A sample read after the reset reached the engine first.
                    self.settle_held(&mut f);
                }
                out.push(f);
            }
        }
        self.count_storm(flow.service, c.backend, c.client, STORM_UNNATED, ts, out);
    }

    pub(super) fn unnated_finding(
        &self,
        ts: u64,
        c: &Culprit,
        service: SocketAddr,
        reason: Option<&str>,
    ) -> Finding {
        let seen = self
            .invalid
            .get(&c.client)
            .filter(|s| ts.abs_diff(s.ts) <= self.cfg.correlation_ns);
        let mut basis = vec![first_basis(c.path)];
        // Worded once (static) but where conntrack's own message is cited.
        let verdict: Cow<'static, str> = match seen {
            Some(s) => {
                basis.push(UnnatedBasis::CtInvalid);
                match &s.message {
                    Some(m) => format!("conntrack INVALID: {m}").into(),
                    None => "conntrack INVALID".into(),
                }
            }
            None if self.cfg.ct_invalid_hook => match c.path {
                UnnatedPath::RequestToLocalService => {
                    "conntrack reported no INVALID verdict for it: the request bypassed NAT"
                }
                _ => "conntrack reported no INVALID verdict for it: the reply bypassed NAT",
            }
            .into(),
            None => inferred(c.path).into(),
        };
        if c.path == UnnatedPath::EntryLost {
            basis.push(UnnatedBasis::CtEntryDestroyed);
        }
        let evidence = Evidence::UnnatedReply(finding::UnnatedReply {
            basis,
            rst_reason: reason.map(str::to_string),
            verdict: seen.map(|s| CtVerdict {
                ct_verdict: "INVALID",
                ct_invalid_count: s.count,
                ct_reason: s.message.clone(),
            }),
            first: Time::Mono(ts),
            count: 1,
            ct_invalid_counter_rise: None,
            path: c.path,
            snat: c.snat,
        });
        Finding {
            ts_ns: ts,
            severity: Severity::Error,
            service: Some(service),
            backend: Some(c.backend.get()),
            client: Some(c.client.get()),
            cause: cause(&verdict, c.path, c.snat, service),
            remedy: self.remedies.unnated(c.path, service.is_ipv6()).to_string(),
            evidence,
        }
    }

    /// A held finding cites the INVALID packets the counter samples around
    /// it counted (none, also when no sample came in time).
    pub(super) fn settle_held(&self, f: &mut Finding) {
        let Evidence::UnnatedReply(e) = &mut f.evidence else {
            return;
        };
        let service = f.service.unwrap_or(([0, 0, 0, 0], 0).into());
        let lost = f.client.and_then(|c| {
            let id = self.flows.find(Ep::new(c), TCP, 0)?;
            Some(self.flows.get(id).has(flow_flags::DESTROYED))
        });
        let invalid = self.invalid_samples.around(f.ts_ns);
        if invalid > 0 {
            let verdict = format!(
                "conntrack INVALID: the node's conntrack counted {invalid} INVALID packet(s) as it happened (out of window or table full; the verdict hook cannot attach on this kernel, so the exact reason is unknown)"
            );
            e.ct_invalid_counter_rise = Some(invalid);
            e.basis.push(UnnatedBasis::CtInvalidCounter);
            f.cause = cause(&verdict, e.path, e.snat, service);
        } else if lost == Some(true) && e.path != UnnatedPath::RequestToLocalService {
            // Its entry was destroyed meanwhile (the DESTROY event lagged):
            // a flush or expiry, not an INVALID verdict.
            e.path = UnnatedPath::EntryLost;
            e.basis.push(UnnatedBasis::CtEntryDestroyed);
            f.cause = cause("", e.path, e.snat, service);
            f.remedy = self.remedies.unnated(e.path, service.is_ipv6()).to_string();
        } else {
            f.cause = format!("{NO_INVALID_COUNTED}{}", tail(e.path, e.snat, service));
        }
    }
}

fn first_basis(path: UnnatedPath) -> UnnatedBasis {
    match path {
        UnnatedPath::ReplyToClient | UnnatedPath::EntryLost => {
            UnnatedBasis::ClientRstToBackendAddress
        }
        UnnatedPath::ReplyToSnatAddress => UnnatedBasis::NodeRstToBackendFromSnatAddress,
        UnnatedPath::RequestToLocalService => UnnatedBasis::NodeRstFromServiceAddress,
    }
}

/// The verdict without a hook to see it, by what it is inferred from.
fn inferred(path: UnnatedPath) -> &'static str {
    match path {
        UnnatedPath::ReplyToClient | UnnatedPath::EntryLost => concat!(
            "conntrack INVALID likely (out of window or table full): its verdict cannot be observed on this kernel; inferred from ",
            "the client's no-socket RST to the backend's own address"
        ),
        UnnatedPath::ReplyToSnatAddress => concat!(
            "conntrack INVALID likely (out of window or table full): its verdict cannot be observed on this kernel; inferred from ",
            "the node's no-socket RST to the backend from its masquerade address"
        ),
        UnnatedPath::RequestToLocalService => concat!(
            "conntrack INVALID likely (out of window or table full): its verdict cannot be observed on this kernel; inferred from ",
            "the node's no-socket RST to the client from the Service address"
        ),
    }
}

/// The verdict, then how the packet went where it did.
fn cause(
    verdict: &str,
    path: UnnatedPath,
    snat: Option<SocketAddr>,
    service: SocketAddr,
) -> String {
    if path == UnnatedPath::EntryLost {
        return "the conntrack entry was lost mid-connection (flushed, or expired while idle): the backend's segment found no entry and left without reverse NAT, so the client reset it".into();
    }
    match path {
        UnnatedPath::ReplyToClient => verdict.to_string(),
        _ => format!("{verdict}{}", tail(path, snat, service)),
    }
}

fn tail(path: UnnatedPath, snat: Option<SocketAddr>, service: SocketAddr) -> String {
    match path {
        UnnatedPath::ReplyToClient | UnnatedPath::EntryLost => String::new(),
        UnnatedPath::ReplyToSnatAddress => format!(
            "; neither de-SNATed nor de-DNATed, the reply was addressed to the node's masquerade address {}, so the node's own stack took it, had no socket there and reset the backend; the client learns it on its next send, reset by the backend through the Service address",
            snat.map_or("?".into(), |s| s.to_string())
        ),
        UnnatedPath::RequestToLocalService => format!(
            "; the client's segment was not DNATed and reached {service}, which this node holds on a local interface (IPVS binds every Service address to kube-ipvs0): the node's stack, with no socket there, answered with a reset from the Service address whose sequence number was in the client's window, so the client took it for a legitimate reset by the backend (which still holds the connection open)"
        ),
    }
}
