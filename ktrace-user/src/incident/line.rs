//! The compact forms: one line per finding or group that fits the
//! terminal (120 columns by default), a short cause from the typed
//! evidence, and the explanation (the full sentence and the remedy),
//! wrapped to the same width.

use std::net::SocketAddr;

use ratatui::crossterm::style::Stylize;

use super::Group;
use crate::clock::WallClock;
use crate::engine::finding::{TableFull, UnnatedPath, UnnatedReply};
use crate::engine::Phase;
use crate::engine::{Evidence, Finding, Severity};
use crate::names::FindingNames;

/// The width the lines fit when stdout is not a terminal (or its width is unknown).
pub const DEFAULT_WIDTH: usize = 120;

/// Column widths (a longer value pushes the columns after it; the cause,
/// last, is cut to make the line fit).
const KIND_W: usize = 14;
const ADDR_W: usize = 18;
const CLIENT_W: usize = 19;

/// How the human lines look.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    /// ANSI colours (stdout is a terminal and `NO_COLOR` is unset).
    pub color: bool,
    /// Lines are cut to this many columns.
    pub width: usize,
}

impl Default for Style {
    fn default() -> Self {
        Style {
            color: false,
            width: DEFAULT_WIDTH,
        }
    }
}

impl Style {
    /// Colour when `is_terminal` and the environment has no `NO_COLOR`
    /// (<https://no-color.org>: set to anything but empty).
    pub fn for_stdout(is_terminal: bool, no_color: Option<std::ffi::OsString>) -> Style {
        Style {
            color: is_terminal && no_color.is_none_or(|v| v.is_empty()),
            width: DEFAULT_WIDTH,
        }
    }
}

/// `CRIT`, `ERR `, `WARN`: four columns.
pub fn severity_tag(s: Severity) -> &'static str {
    match s {
        Severity::Critical => "CRIT",
        Severity::Error => "ERR ",
        Severity::Warning => "WARN",
    }
}

fn paint_severity(s: Severity, style: &Style) -> String {
    let tag = severity_tag(s);
    if !style.color {
        return tag.to_string();
    }
    match s {
        Severity::Critical => tag.red().bold().to_string(),
        Severity::Error => tag.red().to_string(),
        Severity::Warning => tag.yellow().to_string(),
    }
}

/// `HH:MM:SS.mmm` of a monotonic time.
pub fn clock_time(clock: &WallClock, ts_ns: u64) -> String {
    let t = clock.rfc3339(ts_ns);
    t.get(11..23).unwrap_or(&t).to_string()
}

fn addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "-".to_string(), |s| s.to_string())
}

/// The short cause of a finding, from its typed evidence: e.g.
/// `INVALID: SEQ over upper bound`, `INVALID (counter +8)`.
pub fn short_cause(f: &Finding) -> String {
    match &f.evidence {
        Evidence::UnnatedReply(e) => unnated_cause(e),
        Evidence::BackendSwitch(e) => format!("was {}, idle {:.1}s", e.old_backend, e.idle_s),
        Evidence::RstStorm(e) => match e.phase {
            Phase::Start => format!("start: {} resets/{}s", e.count, e.window_s),
            Phase::Update => format!("{} resets/{}s, {} total", e.count, e.window_s, e.total),
            Phase::End => format!("end: {} resets in all", e.total),
        },
        Evidence::QuiescentBackend(e) => format!(
            "weight 0{}",
            if e.persistence_template {
                " (persistence template)"
            } else {
                ""
            }
        ),
        Evidence::ConntrackTableFull(e) => table_full_cause(e),
        Evidence::ConntrackInsertRace(e) => format!("race {}: {} packet(s)", e.outcome, e.count),
    }
}

fn unnated_cause(e: &UnnatedReply) -> String {
    if let Some(v) = &e.verdict {
        return match &v.ct_reason {
            // "SEQ is over upper bound" -> "SEQ over upper bound".
            Some(r) => format!("INVALID: {}", r.replace(" is ", " ")),
            None => format!("INVALID (x{})", v.ct_invalid_count),
        };
    }
    match (e.ct_invalid_counter_rise, e.path) {
        (Some(n), _) if n > 0 => format!("INVALID (counter +{n})"),
        (_, UnnatedPath::EntryLost) => "no conntrack entry".to_string(),
        (_, UnnatedPath::ReplyToSnatAddress) => "reply to SNAT address".to_string(),
        (_, UnnatedPath::RequestToLocalService) => "request not DNATed".to_string(),
        (_, UnnatedPath::ReplyToClient) => "not reverse-NATed (client RST)".to_string(),
    }
}

fn table_full_cause(e: &TableFull) -> String {
    match e.nf_conntrack_max {
        Some(m) => format!("table full: {} drops (max {m})", e.count),
        None => format!("table full: {} drops", e.count),
    }
}

/// The column header printed above the first finding.
pub fn header(style: &Style) -> String {
    let h = format!(
        "{:<12} {:<4} {:<KIND_W$} {:<ADDR_W$} {:<ADDR_W$} {:<CLIENT_W$} CAUSE",
        "TIME", "SEV", "KIND", "SERVICE", "BACKEND", "CLIENT"
    );
    let h = fit(&h, style.width);
    if style.color {
        h.dim().to_string()
    } else {
        h
    }
}

/// One finding on one line: time, severity, kind, service, backend,
/// client, short cause.
pub fn finding_line(f: &Finding, clock: &WallClock, style: &Style) -> String {
    let time = clock_time(clock, f.ts_ns);
    let rest = format!(
        "{:<KIND_W$} {:<ADDR_W$} {:<ADDR_W$} {:<CLIENT_W$} {}",
        f.kind().as_str(),
        addr(f.service),
        addr(f.backend),
        addr(f.client),
        short_cause(f)
    );
    assemble(&time, f.severity, &rest, style)
}

/// A group's summary in the columns of the finding lines: connections
/// reset and clients affected so far, since when (`state` "so far"), or
/// from when to when (any other `state`, e.g. "ended").
pub fn group_line(g: &Group, clock: &WallClock, style: &Style, now_ns: u64, state: &str) -> String {
    let time = clock_time(clock, now_ns);
    let hms = |ns| {
        clock_time(clock, ns)
            .get(..8)
            .unwrap_or_default()
            .to_string()
    };
    let when = if state == "so far" {
        format!("since {}", hms(g.first_ns))
    } else {
        format!("{}..{}", hms(g.first_ns), hms(g.last_ns))
    };
    let rest = format!(
        "{:<KIND_W$} {:<ADDR_W$} {:<ADDR_W$} {state}: {} reset{}, {}, {when}",
        g.key.kind.as_str(),
        addr(g.key.target),
        backends(&g.backends),
        g.connections,
        if g.connections == 1 { "" } else { "s" },
        clients(g),
    );
    assemble(&time, g.severity, &rest, style)
}

/// `1 client`, `12 clients`, `4096+ clients` (distinct IPs).
pub fn clients(g: &Group) -> String {
    let n = g.clients();
    format!(
        "{n}{} client{}",
        if g.clients_capped { "+" } else { "" },
        if n == 1 && !g.clients_capped { "" } else { "s" }
    )
}

/// The most recent backend, `+N` when there were others: `A`, `A+2`.
pub fn backends(b: &[SocketAddr]) -> String {
    match b {
        [] => "-".to_string(),
        [one] => one.to_string(),
        [.., last] => format!("{last}+{}", b.len() - 1),
    }
}

fn assemble(time: &str, sev: Severity, rest: &str, style: &Style) -> String {
    // Time (12), a space, severity (4), a space: 18 columns before `rest`.
    let rest = fit(rest, style.width.saturating_sub(18));
    format!("{time} {} {}", paint_severity(sev, style), rest.trim_end())
}

/// `s` cut to `width` columns, ending in `…` when cut.
pub fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The explanation printed under a group's first line: what happened
/// (the finding's sentence) and what to do, wrapped and indented.
pub fn explanation(f: &Finding, names: Option<&FindingNames>, style: &Style) -> Vec<String> {
    let sentence = crate::names::render::sentence(f, names);
    let what = sentence
        .strip_suffix(&format!(" Fix: {}", f.remedy))
        .unwrap_or(&sentence);
    let mut lines = wrapped("why: ", what, style.width);
    lines.extend(wrapped("fix: ", &f.remedy, style.width));
    if style.color {
        lines = lines.into_iter().map(|l| l.dim().to_string()).collect();
    }
    lines
}

/// The Kubernetes names of a finding printed without its explanation
/// (the explanation's sentence carries them otherwise), indented like it.
pub fn names(n: &FindingNames, style: &Style) -> Option<String> {
    let text = crate::names::render::summary(n)?;
    let l = wrapped("names: ", &text, style.width).join("\n");
    Some(if style.color { l.dim().to_string() } else { l })
}

/// `text` wrapped to `width` columns, the first line starting with
/// `label` and all indented under the severity column.
fn wrapped(label: &str, text: &str, width: usize) -> Vec<String> {
    let first = format!("{:13}{label}", "");
    let indent = first.len();
    hanging(&first, text, indent, width)
}

/// `head` followed by `text` wrapped to `width` columns, the lines after
/// the first indented by `indent` spaces (under where `text` starts when
/// `indent` is `head`'s length).
pub fn hanging(head: &str, text: &str, indent: usize, width: usize) -> Vec<String> {
    let rest = " ".repeat(indent);
    let opts = textwrap::Options::new(width.max(40))
        .initial_indent(head)
        .subsequent_indent(&rest)
        .break_words(true);
    textwrap::wrap(text, opts)
        .into_iter()
        .map(|l| l.into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::finding::{CtVerdict, Time, UnnatedBasis};

    fn finding(verdict: Option<CtVerdict>, rise: Option<u64>) -> Finding {
        Finding {
            ts_ns: 5_000_000_000,
            severity: Severity::Error,
            service: Some("10.96.0.10:2222".parse().unwrap()),
            backend: Some("10.0.1.2:2222".parse().unwrap()),
            client: Some("10.0.0.2:51706".parse().unwrap()),
            cause: "conntrack INVALID: the node's conntrack counted 10 INVALID packet(s) as it happened (out of window or table full; the verdict hook cannot attach on this kernel, so the exact reason is unknown)".into(),
            remedy: "set net.netfilter.nf_conntrack_tcp_be_liberal=1 (or drop ctstate INVALID in the FORWARD chain) so out-of-window replies are not left un-NATed; check for asymmetric routing".into(),
            evidence: Evidence::UnnatedReply(UnnatedReply {
                basis: vec![UnnatedBasis::CtInvalidCounter],
                rst_reason: None,
                verdict,
                first: Time::Mono(5_000_000_000),
                count: 1,
                ct_invalid_counter_rise: rise,
                path: UnnatedPath::ReplyToClient,
                snat: None,
            }),
        }
    }

    #[test]
    fn the_short_cause_comes_from_the_evidence() {
        assert_eq!(short_cause(&finding(None, Some(8))), "INVALID (counter +8)");
        let v = CtVerdict {
            ct_verdict: "INVALID",
            ct_invalid_count: 1,
            ct_reason: Some("SEQ is over upper bound".into()),
        };
        assert_eq!(
            short_cause(&finding(Some(v), None)),
            "INVALID: SEQ over upper bound"
        );
        assert_eq!(
            short_cause(&finding(None, None)),
            "not reverse-NATed (client RST)"
        );
    }

    #[test]
    fn a_finding_line_fits_and_names_everything() {
        let clock = WallClock { offset_ns: 0 };
        let style = Style::default();
        let l = finding_line(&finding(None, Some(8)), &clock, &style);
        assert!(l.chars().count() <= 120, "{l}");
        assert_eq!(
            l,
            "00:00:05.000 ERR  unnated_reply  10.96.0.10:2222    10.0.1.2:2222      10.0.0.2:51706      INVALID (counter +8)"
        );
        for w in [60, 80, 100] {
            let l = finding_line(
                &finding(None, Some(8)),
                &clock,
                &Style { width: w, ..style },
            );
            assert!(l.chars().count() <= w, "{w}: {l}");
        }
    }

    #[test]
    fn explanations_wrap_within_the_width() {
        let f = finding(None, Some(8));
        let lines = explanation(&f, None, &Style::default());
        assert!(lines[0]
            .trim_start()
            .starts_with("why: Service 10.96.0.10:2222"));
        assert!(lines
            .iter()
            .any(|l| l.trim_start().starts_with("fix: set net.netfilter")));
        assert!(lines.iter().all(|l| l.chars().count() <= 120), "{lines:#?}");
        assert!(!lines.iter().any(|l| l.contains("Fix:")), "{lines:#?}");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(Style::for_stdout(true, None).color);
        assert!(!Style::for_stdout(false, None).color);
        assert!(!Style::for_stdout(true, Some("1".into())).color);
        assert!(Style::for_stdout(true, Some("".into())).color);
    }
}
