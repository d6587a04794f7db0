//! Renderings of a [`Report`]: a human table, and JSON Lines (one
//! `{"type":"check", ...}` object per check, fields in a fixed order).

use std::io::{self, Write};

use serde::Serialize;

use super::{Check, Report, Status};

/// Text width the human view wraps at.
const WIDTH: usize = 100;

/// A check as a JSON line: `"type":"check"` first, then the check's own
/// fields in their order.
#[derive(Serialize)]
struct JsonCheck<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    check: &'a Check,
}

/// One JSON object per check, one per line.
pub fn json_lines(report: &Report, out: &mut impl Write) -> io::Result<()> {
    for check in &report.checks {
        let line = JsonCheck {
            kind: "check",
            check,
        };
        serde_json::to_writer(&mut *out, &line).map_err(io::Error::other)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

fn label(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Warn => "WARN",
        Status::Fail => "FAIL",
        Status::Unknown => "unknown",
    }
}

/// The human table: one line per check, then for each check that is not
/// ok what was expected, why it matters and what to do.
pub fn human(report: &Report, out: &mut impl Write) -> io::Result<()> {
    let mut head = format!("ktrace doctor: root {}", report.root.display());
    if !report.live {
        head.push_str(" (offline dump)");
    }
    if let Some(k) = &report.kernel {
        head.push_str(&format!(", kernel {k}"));
    }
    if let Some(ns) = &report.netns {
        head.push_str(&format!(", network namespace {ns}"));
        match report.initial_netns {
            Some(true) => head.push_str(" (the host's)"),
            Some(false) => head.push_str(" (not the host's)"),
            None => {}
        }
    }
    writeln!(out, "{}", clean(&head))?;
    writeln!(out)?;
    let name_w = report
        .checks
        .iter()
        .map(|c| c.check.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let status_w = 7;
    let value_col = status_w + 2 + name_w + 2;
    writeln!(out, "{:<status_w$}  {:<name_w$}  VALUE", "STATUS", "CHECK")?;
    for c in &report.checks {
        let prefix = format!(
            "{:<status_w$}  {:<name_w$}  ",
            label(c.status),
            clean(&c.check)
        );
        let value = wrap(&clean(&c.value), WIDTH.saturating_sub(value_col).max(30));
        for (i, l) in value.iter().enumerate() {
            if i == 0 {
                writeln!(out, "{prefix}{l}")?;
            } else {
                writeln!(out, "{:value_col$}{l}", "")?;
            }
        }
        if c.status != Status::Ok {
            detail(out, "expected", &c.expected)?;
            detail(out, "why", &c.why)?;
            detail(out, "fix", &c.fix)?;
        }
    }
    writeln!(out)?;
    writeln!(out, "{}", summary(report))?;
    out.flush()
}

/// `14 ok, 3 warn, 1 fail, 2 unknown`.
pub fn summary(report: &Report) -> String {
    format!(
        "{} ok, {} warn, {} fail, {} unknown",
        report.count(Status::Ok),
        report.count(Status::Warn),
        report.count(Status::Fail),
        report.count(Status::Unknown)
    )
}

fn detail(out: &mut impl Write, what: &str, text: &str) -> io::Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    let indent = 9;
    let tag = format!("{what}: ");
    let lines = wrap(&clean(text), WIDTH - indent - tag.len());
    for (i, l) in lines.iter().enumerate() {
        if i == 0 {
            writeln!(out, "{:indent$}{tag}{l}", "")?;
        } else {
            writeln!(out, "{:w$}{l}", "", w = indent + tag.len())?;
        }
    }
    Ok(())
}

/// The text with control characters (from files of a dump) made visible.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// Greedy word wrap (textwrap's first fit); words longer than `width` get
/// a line of their own. Widths count characters: textwrap's own words count
/// display width, which would wrap lines with `…` or `�` differently.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let words: Vec<Word> = text.split_whitespace().map(Word).collect();
    textwrap::wrap_algorithms::wrap_first_fit(&words, &[width as f64])
        .into_iter()
        .map(|line| line.iter().map(|w| w.0).collect::<Vec<_>>().join(" "))
        .collect()
}

/// A word of [`wrap`], as wide as its characters, one space after it.
#[derive(Debug)]
struct Word<'a>(&'a str);

impl textwrap::core::Fragment for Word<'_> {
    fn width(&self) -> f64 {
        self.0.chars().count() as f64
    }
    fn whitespace_width(&self) -> f64 {
        1.0
    }
    fn penalty_width(&self) -> f64 {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Check;
    use std::path::PathBuf;

    fn report() -> Report {
        Report {
            root: PathBuf::from("/x"),
            live: false,
            kernel: Some("6.1.0".into()),
            netns: None,
            initial_netns: None,
            checks: vec![
                Check::new("a", Status::Ok, "1"),
                Check::new("long_check", Status::Fail, "0")
                    .expected("1")
                    .why("word ".repeat(50))
                    .fix("do it")
                    .evidence(serde_json::json!({"n": 1})),
            ],
        }
    }

    #[test]
    fn json_lines_have_the_contract_fields() {
        let mut out = Vec::new();
        json_lines(&report(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        for l in &lines {
            assert_eq!(l["type"], "check");
            for f in ["check", "status", "value", "expected", "why", "fix"] {
                assert!(l[f].is_string(), "{f} in {l}");
            }
        }
        assert_eq!(lines[1]["status"], "fail");
        assert_eq!(lines[1]["evidence"]["n"], 1);
        assert!(lines[0].get("evidence").is_none());
        assert!(text.starts_with("{\"type\":\"check\",\"check\":\"a\""));
    }

    #[test]
    fn human_table_wraps_and_summarises() {
        let mut out = Vec::new();
        human(&report(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("FAIL"));
        assert!(text.contains("fix: do it"));
        assert!(text.lines().all(|l| l.chars().count() <= WIDTH), "{text}");
        assert!(text.trim_end().ends_with("1 ok, 0 warn, 1 fail, 0 unknown"));
        assert_eq!(wrap("", 10), vec![String::new()]);
        assert_eq!(
            wrap("averyveryverylongword x", 5),
            vec!["averyveryverylongword", "x"]
        );
    }
}
