//! What `watch` and `replay` print: JSON Lines for machines (one object per
//! line, per `CONTRACT.md`) or an aligned, readable stream for a person.

use std::io::{self, Write};

use serde_json::{json, Map, Value};

use crate::clock::WallClock;
use crate::engine::Finding;
use crate::event::{Event, EventBody};
use crate::hooks::HookStatus;
use crate::incident::plain::{PlainOptions, PlainView};
use crate::netns::NetnsNames;

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
            plain: PlainView::default(),
        }
    }

    /// The human view's colours, width and `--explain`.
    pub fn with_plain(mut self, opts: PlainOptions) -> Self {
        self.plain = PlainView::new(opts);
        self
    }

    pub fn netns_names_mut(&mut self) -> &mut NetnsNames {
        &mut self.netns
    }

    fn line(&mut self, v: &Value) -> io::Result<()> {
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
            return self.line(&v);
        }
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
        for h in hooks {
            writeln!(
                self.out,
                "  {:<18} {:<10} {:<4} {}{}",
                h.name,
                h.mechanism,
                if h.attached { "live" } else { "off" },
                h.target,
                h.reason
                    .as_ref()
                    .map(|r| format!("{}{r}", if h.target.is_empty() { "" } else { "  -- " }))
                    .unwrap_or_default()
            )?;
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
    pub fn event(&mut self, ev: &Event) -> io::Result<()> {
        if !self.events {
            return Ok(());
        }
        if self.json {
            let v = event_json(ev, &self.clock, &self.netns);
            return self.line(&v);
        }
        let t = self.clock.rfc3339(ev.ts_ns);
        let time = t.get(11..26).unwrap_or(&t).to_string();
        let (src, dst, detail) = match &ev.body {
            EventBody::TcpSendReset {
                src,
                dst,
                reason,
                has_socket,
                ..
            } => (
                src.to_string(),
                dst.to_string(),
                format!(
                    "reason={}{}",
                    reason.as_deref().unwrap_or("-"),
                    if *has_socket { "" } else { " no-socket" }
                ),
            ),
            EventBody::TcpReceiveReset { src, dst, .. } => {
                (src.to_string(), dst.to_string(), String::new())
            }
            EventBody::CtInvalid {
                src,
                dst,
                orig_dst,
                message,
                ..
            } => (
                src.to_string(),
                dst.to_string(),
                format!(
                    "{}{}",
                    message.as_deref().unwrap_or("INVALID"),
                    orig_dst
                        .map(|s| format!(" service={s}"))
                        .unwrap_or_default()
                ),
            ),
            EventBody::CtTableFull { src, dst, errno } => {
                (src.to_string(), dst.to_string(), format!("errno={errno}"))
            }
            EventBody::IpvsConnNew {
                client,
                service,
                real_server,
                template,
                weight,
                ..
            } => (
                client.to_string(),
                service.to_string(),
                format!(
                    "real={real_server} weight={}{}",
                    weight.map_or("-".into(), |w| w.to_string()),
                    if *template { " template" } else { "" }
                ),
            ),
            EventBody::NatMapping {
                client,
                service,
                backend,
                ..
            }
            | EventBody::NatDestroy {
                client,
                service,
                backend,
                ..
            } => (
                client.to_string(),
                service.to_string(),
                format!("backend={backend}"),
            ),
            EventBody::CtCounters {
                invalid,
                drop,
                early_drop,
                insert_failed,
                count,
                max,
            } => (
                "conntrack".to_string(),
                "counters".to_string(),
                format!(
                    "invalid+{invalid} drop+{drop} early_drop+{early_drop} insert_failed+{insert_failed} entries={}/{}",
                    count.map_or("?".into(), |c| c.to_string()),
                    max.map_or("?".into(), |m| m.to_string())
                ),
            ),
        };
        let ns = self.netns_label(ev.netns);
        writeln!(
            self.out,
            "{time} {:<17} {src:>21} -> {dst:<21} {detail}  netns={ns}",
            ev.body.name()
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

    /// A finding: its JSON object, or in the human view a compact line
    /// (with the remedy the first time its incident group shows; see
    /// `crate::incident::plain`).
    pub fn finding(&mut self, f: &Finding) -> io::Result<()> {
        if self.json {
            let v = f.to_json(&self.clock);
            return self.line(&v);
        }
        self.plain.finding(f, &self.clock, &mut self.out)
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

/// The JSON object of one event (`"type":"event"`).
pub fn event_json(ev: &Event, clock: &WallClock, netns: &NetnsNames) -> Value {
    let mut m = Map::new();
    m.insert("type".into(), json!("event"));
    m.insert("event".into(), json!(ev.body.name()));
    m.insert("ts".into(), json!(clock.rfc3339(ev.ts_ns)));
    m.insert("netns".into(), json!(ev.netns));
    if let Some(n) = netns.name(ev.netns) {
        m.insert("netns_name".into(), json!(n));
    }
    m.insert("source".into(), json!(ev.source.as_str()));
    let mut put = |k: &str, v: Value| {
        m.insert(k.into(), v);
    };
    match &ev.body {
        EventBody::TcpSendReset {
            src,
            dst,
            reason,
            has_socket,
            state,
            trigger_flags,
        } => {
            put("src", json!(src.to_string()));
            put("dst", json!(dst.to_string()));
            if let Some(r) = reason {
                put("reason", json!(r));
            }
            if let Some(f) = trigger_flags {
                put("answers", json!(tcp_flags(*f)));
            }
            put("socket", json!(has_socket));
            if *has_socket && *state != 0 {
                put("state", json!(tcp_state(*state)));
            }
        }
        EventBody::TcpReceiveReset {
            src,
            dst,
            sock_cookie,
        } => {
            put("src", json!(src.to_string()));
            put("dst", json!(dst.to_string()));
            if *sock_cookie != 0 {
                put("sock_cookie", json!(sock_cookie));
            }
        }
        EventBody::CtInvalid {
            src,
            dst,
            orig_src,
            orig_dst,
            reply_src,
            reply_dir,
            message,
        } => {
            put("src", json!(src.to_string()));
            put("dst", json!(dst.to_string()));
            if let Some(s) = orig_src {
                put("client", json!(s.to_string()));
            }
            if let Some(s) = orig_dst {
                put("service", json!(s.to_string()));
            }
            if let Some(s) = reply_src {
                put("backend", json!(s.to_string()));
            }
            put(
                "direction",
                json!(if *reply_dir { "reply" } else { "original" }),
            );
            if let Some(msg) = message {
                put("reason", json!(msg));
            }
        }
        EventBody::CtTableFull { src, dst, errno } => {
            put("src", json!(src.to_string()));
            put("dst", json!(dst.to_string()));
            put("errno", json!(errno));
        }
        EventBody::IpvsConnNew {
            client,
            service,
            real_server,
            protocol,
            template,
            conn_flags,
            dest_flags,
            weight,
        } => {
            put("src", json!(client.to_string()));
            put("dst", json!(service.to_string()));
            put("client", json!(client.to_string()));
            put("service", json!(service.to_string()));
            put("backend", json!(real_server.to_string()));
            put("protocol", json!(protocol));
            put("template", json!(template));
            put("conn_flags", json!(conn_flags));
            put("dest_flags", json!(dest_flags));
            if let Some(w) = weight {
                put("weight", json!(w));
            }
        }
        EventBody::NatMapping {
            client,
            service,
            backend,
            protocol,
        }
        | EventBody::NatDestroy {
            client,
            service,
            backend,
            protocol,
        } => {
            put("src", json!(client.to_string()));
            put("dst", json!(service.to_string()));
            put("client", json!(client.to_string()));
            put("service", json!(service.to_string()));
            put("backend", json!(backend.to_string()));
            put("protocol", json!(protocol));
        }
        EventBody::CtCounters {
            invalid,
            drop,
            early_drop,
            insert_failed,
            count,
            max,
        } => {
            put("invalid", json!(invalid));
            put("drop", json!(drop));
            put("early_drop", json!(early_drop));
            put("insert_failed", json!(insert_failed));
            if let Some(c) = count {
                put("entries", json!(c));
            }
            if let Some(m) = max {
                put("max", json!(m));
            }
        }
    }
    Value::Object(m)
}

/// `"SYN"`, `"ACK|PSH"`, ... for the flags of a TCP segment.
pub fn tcp_flags(f: u8) -> String {
    const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    let v: Vec<&str> = (0..8)
        .filter(|i| f & (1 << i) != 0)
        .map(|i| NAMES[i])
        .collect();
    v.join("|")
}

fn tcp_state(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
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
