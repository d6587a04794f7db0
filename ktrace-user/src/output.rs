//! What `watch` and `replay` print: JSON Lines for machines (one object per
//! line, per `CONTRACT.md`) or an aligned, readable stream for a person.

use std::io::{self, Write};

use std::net::SocketAddr;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::clock::WallClock;
use crate::engine::Finding;
use crate::event::{Event, EventBody, Source};
use crate::hooks::HookStatus;
use crate::incident::line::{hanging, DEFAULT_WIDTH};
use crate::incident::plain::{Admitted, PlainOptions, PlainView};
use crate::names::{render as names_out, NameResolver, SourceStatus};
use crate::netns::NetnsNames;

/// Where a `names:` status line continues: under the source's state
/// (`  names: ` and the 18-column source name).
const NAMES_INDENT: usize = 28;

/// Context printed with the status line.
pub struct StatusInfo<'a> {
    pub kernel: Option<&'a str>,
    pub ring_buffer_bytes: u32,
    pub netns: Option<u32>,
    /// What was done about RLIMIT_MEMLOCK (see `crate::memlock`).
    pub memlock: Option<&'a str>,
    /// Live: the URLs this process serves (none: nothing is exposed).
    /// `None` in replay, which serves nothing and says nothing of it.
    pub exposed: Option<&'a [String]>,
    /// Replaying a recording: which one (the status line's `"replay"`).
    pub replay: Option<&'a ReplaySource>,
    /// kube-proxy's mode as detected at start (or recorded): the form a
    /// remedy's INVALID drop takes. `None` where no engine reasons (demo).
    pub kube_proxy_mode: Option<crate::engine::KubeProxyMode>,
}

/// The recording a replay reads, as its status line names it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplaySource {
    pub files: Vec<String>,
    pub recording_id: String,
    pub host: String,
    pub recorded_by: String,
    pub command: String,
    pub format_version: String,
    pub boot_id: Option<String>,
    /// When the recording started (RFC 3339).
    pub started: String,
    pub segments: Vec<u64>,
}

pub struct Renderer<W: Write> {
    out: W,
    json: bool,
    events: bool,
    clock: WallClock,
    netns: NetnsNames,
    /// Kubernetes names of addresses (none known: addresses as they are).
    names: NameResolver,
    /// The human view's findings, grouped into incidents.
    plain: PlainView,
}

impl<W: Write> Renderer<W> {
    pub fn new(out: W, json: bool, events: bool, clock: WallClock, netns: NetnsNames) -> Self {
        Renderer {
            out,
            json,
            events,
            clock,
            netns,
            names: NameResolver::default(),
            plain: PlainView::default(),
        }
    }

    pub fn names(&self) -> &NameResolver {
        &self.names
    }

    pub fn names_mut(&mut self) -> &mut NameResolver {
        &mut self.names
    }

    /// The human view's colours, width and `--explain`.
    pub fn with_plain(mut self, opts: PlainOptions) -> Self {
        self.plain = PlainView::new(opts);
        self
    }

    pub fn netns_names_mut(&mut self) -> &mut NetnsNames {
        &mut self.netns
    }

    /// One JSON line.
    fn line(&mut self, v: &impl Serialize) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, v)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// A line for a person (human mode only; JSON has no place for it).
    pub fn note(&mut self, line: &str) -> io::Result<()> {
        if self.json {
            return Ok(());
        }
        writeln!(self.out, "{line}")
    }

    /// The status line, stamped `ts_ns` (when the hooks were attached, or
    /// when the replayed recording started).
    pub fn status(
        &mut self,
        ts_ns: u64,
        hooks: &[HookStatus],
        info: &StatusInfo,
    ) -> io::Result<()> {
        if self.json {
            let v = self.status_json(ts_ns, hooks, info);
            return self.line(&v);
        }
        self.status_human(hooks, info)
    }

    /// The `status` JSON line.
    fn status_json(&self, ts_ns: u64, hooks: &[HookStatus], info: &StatusInfo) -> Value {
        let hooks: Vec<Value> = hooks
            .iter()
            .map(|h| {
                let mut m = Map::new();
                m.insert("name".into(), json!(h.name));
                m.insert("mechanism".into(), json!(h.mechanism));
                m.insert("attached".into(), json!(h.attached));
                if !h.target.is_empty() {
                    m.insert("target".into(), json!(h.target));
                }
                if let Some(r) = &h.reason {
                    m.insert("reason".into(), json!(r));
                }
                Value::Object(m)
            })
            .collect();
        let mut v = json!({
            "type": "status",
            "ts": self.clock.rfc3339(ts_ns),
            "version": env!("CARGO_PKG_VERSION"),
            "hooks": hooks,
            "ring_buffer_bytes": info.ring_buffer_bytes,
        });
        if let Some(k) = info.kernel {
            v["kernel"] = json!(k);
        }
        if let Some(n) = info.netns {
            v["netns"] = json!(n);
        }
        if let Some(m) = info.memlock {
            v["memlock"] = json!(m);
        }
        if let Some(x) = info.exposed {
            v["exposed"] = json!(x);
        }
        if let Some(r) = info.replay {
            v["replay"] = json!(r);
        }
        if let Some(m) = info.kube_proxy_mode {
            v["kube_proxy_mode"] = json!(m);
        }
        if let Some(n) = self.names.names() {
            n.take_status_change();
            v["names"] = json!(n.status_now());
        }
        v
    }

    /// The status block of the human view: versions, then one line a hook.
    fn status_human(&mut self, hooks: &[HookStatus], info: &StatusInfo) -> io::Result<()> {
        writeln!(
            self.out,
            "ktrace {} on kernel {}: hooks",
            env!("CARGO_PKG_VERSION"),
            info.kernel.unwrap_or("?")
        )?;
        if let Some(m) = info.memlock {
            writeln!(self.out, "  memlock: {m}")?;
        }
        if let Some(x) = info.exposed {
            writeln!(self.out, "  exposed: {}", exposure(x))?;
        }
        if let Some(m) = info.kube_proxy_mode {
            use crate::engine::KubeProxyMode as M;
            let said = match m {
                M::None => "none found (remedies give both iptables and nft rules)".into(),
                M::Unknown => "mode unknown (remedies give both iptables and nft rules)".into(),
                m => format!("{} mode (remedies give its form of rule)", m.as_str()),
            };
            writeln!(self.out, "  kube-proxy: {said}")?;
        }
        if let Some(n) = self.names.names() {
            n.take_status_change();
            for s in n.status_now() {
                for l in hanging("  names: ", &s.human(), NAMES_INDENT, DEFAULT_WIDTH) {
                    writeln!(self.out, "{l}")?;
                }
            }
        }
        for h in hooks {
            let head = format!(
                "  {:<18} {:<10} {:<4} ",
                h.name,
                h.mechanism,
                if h.attached { "live" } else { "off" },
            );
            let detail = match (&h.reason, h.target.is_empty()) {
                (None, _) => h.target.clone(),
                (Some(r), true) => r.clone(),
                (Some(r), false) => format!("{}  -- {r}", h.target),
            };
            // Long details continue under the detail column, so the block
            // fits the same width as the finding lines.
            for l in hanging(&head, &detail, head.len(), DEFAULT_WIDTH) {
                writeln!(self.out, "{}", l.trim_end())?;
            }
        }
        Ok(())
    }

    fn netns_label(&self, inum: u32) -> String {
        match self.netns.name(inum) {
            Some(n) => format!("{n}({inum})"),
            None => inum.to_string(),
        }
    }

    /// Prints a decoded event when `--events` asked for them.
    /// Whether events are printed (`--events`), not only findings.
    pub fn prints_events(&self) -> bool {
        self.events
    }

    pub fn event(&mut self, ev: &Event) -> io::Result<()> {
        if !self.events {
            return Ok(());
        }
        if self.json {
            let (src, dst) = ev.body.endpoints().unzip();
            let line = EventLine {
                kind: "event",
                event: ev.body.name(),
                ts: self.clock.rfc3339(ev.ts_ns),
                netns: ev.netns,
                netns_name: self.netns.name(ev.netns),
                source: ev.source,
                src,
                dst,
                body: &ev.body,
            };
            if self.names.is_off() {
                serde_json::to_writer(&mut self.out, &line)?;
            } else {
                let mut v = serde_json::to_value(&line)?;
                names_out::add_event_fields(&mut v, &self.names);
                serde_json::to_writer(&mut self.out, &v)?;
            }
            return self.out.write_all(b"\n");
        }
        let t = self.clock.rfc3339(ev.ts_ns);
        let time = t.get(11..26).unwrap_or(&t);
        let (src, dst) = match (&ev.body, ev.body.endpoints()) {
            (_, Some((s, d))) => (s.to_string(), d.to_string()),
            (EventBody::ResetsSummarised(_), None) => ("resets".to_string(), "counted".to_string()),
            (_, None) => ("conntrack".to_string(), "counters".to_string()),
        };
        let ns = self.netns_label(ev.netns);
        let named: Vec<(&str, std::net::SocketAddr)> = ev
            .body
            .endpoints()
            .map_or(Vec::new(), |(s, d)| vec![("src", s), ("dst", d)]);
        let names = names_out::event_suffix(&named, &self.names);
        writeln!(
            self.out,
            "{time} {:<17} {src:>21} -> {dst:<21} {}  netns={ns}{names}",
            ev.body.name(),
            event_detail(&ev.body)
        )
    }

    /// Events the kernel could not hand over, as soon as they are known
    /// (`ts_ns`: when they were found lost).
    pub fn lost(&mut self, ts_ns: u64, count: u64, total: u64, what: &str) -> io::Result<()> {
        if self.json {
            let v = json!({
                "type": "lost",
                "ts": self.clock.rfc3339(ts_ns),
                "count": count,
                "total": total,
                "source": what,
            });
            return self.line(&v);
        }
        writeln!(
            self.out,
            "LOST {count} events ({what}; {total} since start)"
        )
    }

    /// The engine's counters, printed once when watch or replay stops:
    /// `{"type":"stats", ...}` or one human line.
    pub fn engine_stats(&mut self, s: &crate::engine::EngineStats) -> io::Result<()> {
        if self.json {
            let v = json!({
                "type": "stats",
                "events": s.events,
                "findings": s.findings,
                "flows_tracked": s.flows_tracked,
                "flows_evicted_by_age": s.flows_evicted_by_age,
                "flows_evicted_by_count": s.flows_evicted_by_count,
                "pending_dropped": s.pending_dropped,
            });
            return self.line(&v);
        }
        writeln!(
            self.out,
            "stopped: {} events, {} findings; {} flows tracked ({} evicted by age, {} by count)",
            s.events, s.findings, s.flows_tracked, s.flows_evicted_by_age, s.flows_evicted_by_count
        )
    }

    /// A name source changed state (`{"type":"names", ...}` or human lines).
    pub fn names_status(&mut self, ts_ns: u64, sources: &[SourceStatus]) -> io::Result<()> {
        if self.json {
            let v = json!({
                "type": "names",
                "ts": self.clock.rfc3339(ts_ns),
                "sources": sources,
            });
            return self.line(&v);
        }
        for s in sources {
            for l in hanging("names: ", &s.human(), NAMES_INDENT - 2, DEFAULT_WIDTH) {
                writeln!(self.out, "{l}")?;
            }
        }
        Ok(())
    }

    pub fn finding(&mut self, f: &Finding) -> io::Result<()> {
        let names = self.names.finding(f);
        self.finding_named(f, names.as_ref())
    }

    /// A finding with the names of its addresses (looked up once by the
    /// caller): its JSON object, or in the human view a compact line (with
    /// the remedy the first time its incident group shows; see
    /// `crate::incident::plain`).
    pub fn finding_named(
        &mut self,
        f: &Finding,
        names: Option<&crate::names::FindingNames>,
    ) -> io::Result<()> {
        let a = self.admit(f);
        self.finding_admitted(f, a, names)
    }

    /// Counts `f` where the view counts findings and says whether it is
    /// printed (every finding in JSON; in the human view, those not folded
    /// into their group's summary): its names are needed only then.
    pub fn admit(&mut self, f: &Finding) -> Admitted {
        if self.json {
            return Admitted {
                print: true,
                new: false,
            };
        }
        self.plain.admit(f)
    }

    /// Prints a finding [`admit`](Self::admit) admitted.
    pub fn finding_admitted(
        &mut self,
        f: &Finding,
        a: Admitted,
        names: Option<&crate::names::FindingNames>,
    ) -> io::Result<()> {
        if self.json {
            let names = names.map(names_out::NameFields::from);
            return self.line(&f.json(&self.clock, names));
        }
        self.plain.print(f, a, names, &self.clock, &mut self.out)
    }

    /// Time passes (`now_ns`): the human view's group summaries.
    pub fn tick(&mut self, now_ns: u64) -> io::Result<()> {
        if self.json {
            return Ok(());
        }
        self.plain.tick(now_ns, &self.clock, &mut self.out)
    }

    /// The end: the human view's last summary of each incident group.
    pub fn close_groups(&mut self, now_ns: u64) -> io::Result<()> {
        if self.json {
            return Ok(());
        }
        self.plain.finish(now_ns, &self.clock, &mut self.out)
    }
}

/// One `{"type":"event", ...}` line: the header, then the body's own
/// fields (their names and order are in `crate::event`).
#[derive(Serialize)]
struct EventLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    event: &'static str,
    ts: String,
    netns: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    netns_name: Option<&'a str>,
    source: Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    src: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dst: Option<SocketAddr>,
    #[serde(flatten)]
    body: &'a EventBody,
}

/// What the human line says after an event's two ends.
fn event_detail(body: &EventBody) -> String {
    match body {
        EventBody::TcpSendReset { reason, socket, .. } => format!(
            "reason={}{}",
            reason.as_deref().unwrap_or("-"),
            if socket.is_some() { "" } else { " no-socket" }
        ),
        EventBody::TcpReceiveReset { .. } => String::new(),
        EventBody::CtInvalid(c) => format!(
            "{}{}",
            c.message.as_deref().unwrap_or("INVALID"),
            c.orig_dst
                .map(|s| format!(" service={s}"))
                .unwrap_or_default()
        ),
        EventBody::CtTableFull { errno, .. } => format!("errno={errno}"),
        EventBody::IpvsConnNew(c) => format!(
            "real={} weight={}{}",
            c.real_server,
            c.weight.map_or("-".into(), |w| w.to_string()),
            if c.template { " template" } else { "" }
        ),
        EventBody::NatMapping(nat) | EventBody::NatDestroy(nat) | EventBody::CtConfirmDrop(nat) => {
            format!("backend={}", nat.backend)
        }
        EventBody::ResetsSummarised(c) => format!(
            "count={} refused={} socket={}",
            c.total(),
            c.refused,
            c.socket
        ),
        EventBody::CtCounters(c) => format!(
            "invalid+{} drop+{} early_drop+{} insert_failed+{}{} entries={}/{}",
            c.invalid,
            c.drop,
            c.early_drop,
            c.insert_failed,
            if c.clash_resolve > 0 {
                format!(" clash_resolve+{}", c.clash_resolve)
            } else {
                String::new()
            },
            c.count.map_or("?".into(), |n| n.to_string()),
            c.max.map_or("?".into(), |m| m.to_string())
        ),
    }
}

/// The human view of what is served: the URLs and who can reach them.
fn exposure(urls: &[String]) -> String {
    if urls.is_empty() {
        return "nothing (no HTTP endpoint; --metrics-addr serves /metrics and /healthz)".into();
    }
    let local = urls.iter().all(|u| {
        u.starts_with("http://127.")
            || u.starts_with("http://[::1]")
            || u.starts_with("http://localhost")
    });
    format!(
        "{} ({})",
        urls.join(", "),
        if local {
            "loopback: this host only"
        } else {
            "reachable from the network"
        }
    )
}
