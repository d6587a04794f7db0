//! The human stream of `watch`, `replay` and `demo`: what a person reads
//! scrolling by in a terminal or a piped log.
//!
//! - The first finding of a group (kind x Service) prints its compact line,
//!   then the explanation and the remedy, once.
//! - The next [`LINES_PER_GROUP`]` - 1` findings of the group print their line
//!   only. Later ones are counted, not printed: a summary line per group
//!   ("so far: N connections, C clients, backends, first..last") says how
//!   the group grows, at most every [`SUMMARY_EVERY_NS`], and a last one
//!   when the group goes quiet ([`super::GROUP_IDLE_NS`]) or ktrace stops.
//! - Reset-storm findings are already rate-limited by the engine (start,
//!   at most one update a window, end): each is printed.
//! - `--explain` prints every finding, each with its explanation.

use std::io::{self, Write};

use super::line::{self, Style};
use super::{Group, GroupKey, Groups};
use crate::clock::WallClock;
use crate::engine::{Finding, FindingKind};
use crate::names::FindingNames;

/// Findings of a group printed one per line before they are summarised.
pub const LINES_PER_GROUP: u64 = 3;
/// Shortest time between two summary lines of one group.
pub const SUMMARY_EVERY_NS: u64 = 2_000_000_000;

/// Options of the human view.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainOptions {
    pub style: Style,
    /// Every finding printed with its explanation (`--explain`).
    pub explain: bool,
}

impl PlainOptions {
    /// For stdout as it is: colour on a terminal unless `NO_COLOR` is set,
    /// lines cut to the terminal's width when it is narrower than 120.
    pub fn for_stdout(explain: bool) -> PlainOptions {
        use std::io::IsTerminal;
        let tty = io::stdout().is_terminal();
        let mut style = Style::for_stdout(tty, std::env::var_os("NO_COLOR"));
        if tty {
            if let Ok((cols, _)) = ratatui::crossterm::terminal::size() {
                style.width = style.width.min(usize::from(cols).max(40));
            }
        }
        PlainOptions { style, explain }
    }
}

/// What [`PlainView::admit`] decided of a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Its lines are printed (otherwise it is counted in its group's summary).
    pub print: bool,
    /// It starts its group (its explanation and remedy follow its line).
    pub new: bool,
}

/// Per group: what the stream printed of it.
#[derive(Debug, Default, Clone, Copy)]
struct Shown {
    /// Findings counted but not printed since the last summary.
    unsummarised: u64,
    /// When the last line about the group was printed (monotonic ns).
    last_line_ns: u64,
    /// The group's findings when its last summary was printed.
    summarised: u64,
}

/// The grouping state of the human stream.
#[derive(Debug, Default)]
pub struct PlainView {
    pub opts: PlainOptions,
    groups: Groups,
    shown: std::collections::HashMap<GroupKey, Shown>,
    header_done: bool,
}

impl PlainView {
    pub fn new(opts: PlainOptions) -> PlainView {
        PlainView {
            opts,
            ..Default::default()
        }
    }

    pub fn finding(
        &mut self,
        f: &Finding,
        names: Option<&FindingNames>,
        clock: &WallClock,
        out: &mut dyn Write,
    ) -> io::Result<()> {
        let a = self.admit(f);
        self.print(f, a, names, clock, out)
    }

    /// Counts `f` in its group and says whether it is printed (and
    /// whether it starts its group): a caller that looks names up for the
    /// line does so only when it is printed.
    pub fn admit(&mut self, f: &Finding) -> Admitted {
        let key = GroupKey::of(f);
        let new = self.groups.add(f);
        let group_findings = self.groups.get(&key).map_or(1, |g| g.findings);
        let shown = self.shown.entry(key).or_default();
        let print = self.opts.explain
            || group_findings <= LINES_PER_GROUP
            || key.kind == FindingKind::RstStorm;
        if print {
            shown.last_line_ns = shown.last_line_ns.max(f.ts_ns);
        } else {
            shown.unsummarised += 1;
        }
        Admitted { print, new }
    }

    /// The lines of a finding [`admit`](Self::admit) admitted.
    pub fn print(
        &mut self,
        f: &Finding,
        a: Admitted,
        names: Option<&FindingNames>,
        clock: &WallClock,
        out: &mut dyn Write,
    ) -> io::Result<()> {
        if !a.print {
            return Ok(());
        }
        let style = self.opts.style;
        if !self.header_done {
            self.header_done = true;
            writeln!(out, "{}", line::header(&style))?;
        }
        writeln!(out, "{}", line::finding_line(f, clock, &style))?;
        if a.new || self.opts.explain {
            for l in line::explanation(f, names, &style) {
                writeln!(out, "{l}")?;
            }
        } else if let Some(l) = names.and_then(|n| line::names(n, &style)) {
            writeln!(out, "{l}")?;
        }
        Ok(())
    }

    /// Time passes: summary lines of the groups that grew unprinted, and
    /// the last summary of the groups that went quiet.
    pub fn tick(&mut self, now_ns: u64, clock: &WallClock, out: &mut dyn Write) -> io::Result<()> {
        let style = self.opts.style;
        for g in self.groups.sorted(now_ns) {
            let Some(s) = self.shown.get_mut(&g.key) else {
                continue;
            };
            if s.unsummarised > 0 && now_ns >= s.last_line_ns + SUMMARY_EVERY_NS {
                writeln!(
                    out,
                    "{}",
                    line::group_line(g, clock, &style, now_ns, "so far")
                )?;
                s.unsummarised = 0;
                s.last_line_ns = now_ns;
                s.summarised = g.findings;
            }
        }
        for g in self.groups.expire(now_ns) {
            self.closed(&g, now_ns, "ended", clock, out)?;
        }
        Ok(())
    }

    /// ktrace stops: the last summary of every group that had more than
    /// one finding.
    pub fn finish(
        &mut self,
        now_ns: u64,
        clock: &WallClock,
        out: &mut dyn Write,
    ) -> io::Result<()> {
        let groups: Vec<Group> = self.groups.sorted(now_ns).into_iter().cloned().collect();
        for g in &groups {
            self.closed(g, now_ns, "total", clock, out)?;
        }
        self.groups = Groups::default();
        Ok(())
    }

    /// The last summary of a group (`state`: "ended" when it went quiet,
    /// "total" when ktrace stops).
    fn closed(
        &mut self,
        g: &Group,
        now_ns: u64,
        state: &str,
        clock: &WallClock,
        out: &mut dyn Write,
    ) -> io::Result<()> {
        let s = self.shown.remove(&g.key).unwrap_or_default();
        if g.findings > 1 && g.findings > s.summarised && g.key.kind != FindingKind::RstStorm {
            let at = if now_ns == u64::MAX {
                g.last_ns
            } else {
                now_ns
            };
            writeln!(
                out,
                "{}",
                line::group_line(g, clock, &self.opts.style, at, state)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view_output(findings: &[Finding], explain: bool, end_ns: u64) -> String {
        let mut v = PlainView::new(PlainOptions {
            style: Style::default(),
            explain,
        });
        let clock = WallClock { offset_ns: 0 };
        let mut out = Vec::new();
        for f in findings {
            v.finding(f, None, &clock, &mut out).unwrap();
            v.tick(f.ts_ns, &clock, &mut out).unwrap();
        }
        v.finish(end_ns, &clock, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn storm_of_unnated(n: u16) -> Vec<Finding> {
        (0..n)
            .map(|i| {
                crate::incident::tests::unnated(1_000_000_000 + u64::from(i) * 1_000_000, 40000 + i)
            })
            .collect()
    }

    #[test]
    fn a_group_prints_its_remedy_once_and_summarises_its_repeats() {
        let text = view_output(&storm_of_unnated(6), false, 2_000_000_000);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("TIME "), "{text}");
        assert_eq!(text.matches("fix: ").count(), 1, "{text}");
        assert_eq!(
            text.matches(" unnated_reply ").count(),
            4,
            "3 lines and a summary: {text}"
        );
        let last = lines.last().unwrap();
        assert!(
            last.contains("10.0.1.2:2222      total: 6 resets, 1 client, 00:00:01..00:00:01"),
            "{last}"
        );
        assert!(lines.iter().all(|l| l.chars().count() <= 120), "{text}");
    }

    #[test]
    fn explain_prints_every_finding_with_its_remedy() {
        let text = view_output(&storm_of_unnated(4), true, 2_000_000_000);
        assert_eq!(text.matches("fix: ").count(), 4, "{text}");
        assert!(
            text.lines().last().unwrap().contains("total: 4 resets"),
            "{text}"
        );
    }

    #[test]
    fn a_growing_group_gets_a_summary_while_it_lasts() {
        let mut v = PlainView::default();
        let clock = WallClock { offset_ns: 0 };
        let mut out = Vec::new();
        for f in storm_of_unnated(5) {
            v.finding(&f, None, &clock, &mut out).unwrap();
        }
        v.tick(1_500_000_000, &clock, &mut out).unwrap();
        assert!(!String::from_utf8_lossy(&out).contains("so far"));
        v.tick(3_100_000_000, &clock, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("so far: 5 resets, 1 client, since 00:00:01"),
            "{text}"
        );
    }
}
