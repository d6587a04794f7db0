//! The dashboard's layout: header, sparklines, incidents table, detail
//! pane, key help. Pure drawing from a [`Board`] and a [`View`].

use std::net::SocketAddr;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table, Wrap};
use ratatui::Frame;

use super::board::Board;
use super::View;
use crate::engine::Severity;
use crate::incident::line::{backends, clock_time, severity_tag, short_cause};
use crate::incident::Group;
use crate::names::FindingNames;

fn severity_style(s: Severity) -> Style {
    match s {
        Severity::Critical => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Severity::Error => Style::new().fg(Color::Red),
        Severity::Warning => Style::new().fg(Color::Yellow),
    }
}

pub fn draw(frame: &mut Frame, board: &Board, view: &View) {
    let [header, sparks, table, detail, help] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(5),
        Constraint::Min(5),
        // Room for the longest cause and remedy (four lines each at 120
        // columns) with the evidence after them.
        Constraint::Length(12),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    draw_header(frame, header, board, view);
    draw_sparklines(frame, sparks, board);
    let rows = board.rows(&view.filter);
    let selected = view.selected.min(rows.len().saturating_sub(1));
    draw_table(frame, table, board, &rows, selected, view);
    draw_detail(frame, detail, board, rows.get(selected).copied());
    let keys = if view.replay.is_some() {
        " ←/→ 1 s  PgUp/PgDn 10 s  Home/End  space play  ↑/↓ select  k kind  s service  c clear  q quit"
    } else {
        " ↑/↓ select  k filter kind  s filter service  c clear  p pause  q quit"
    };
    frame.render_widget(
        Paragraph::new(keys).style(Style::new().add_modifier(Modifier::DIM)),
        help,
    );
}

fn draw_header(frame: &mut Frame, area: Rect, board: &Board, view: &View) {
    let live: Vec<&str> = board
        .hooks
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| n.as_str())
        .collect();
    let off = board.hooks.len() - live.len();
    let mut title = format!(" ktrace  node {}  kernel {} ", board.node, board.kernel);
    if let Some(r) = &view.replay {
        title.push_str(&format!(" replay {r} "));
    }
    if view.paused {
        title.push_str(" PAUSED ");
    }
    let lost = if board.lost > 0 {
        Span::styled(
            format!("lost events: {}", board.lost),
            Style::new().fg(Color::Red),
        )
    } else {
        Span::raw("lost events: 0")
    };
    let behind = if board.behind > 0 {
        Span::styled(
            format!("   dashboard behind: {} updates skipped", board.behind),
            Style::new().fg(Color::Red),
        )
    } else {
        Span::raw("")
    };
    let names = match (&board.name_sources, &view.replay) {
        (Some(s), _) if !s.is_empty() => {
            s.iter().map(|s| s.short()).collect::<Vec<_>>().join("   ")
        }
        (_, Some(_)) => "as the recording stored them".into(),
        _ => "off".into(),
    };
    let text = vec![
        Line::from(format!("hooks live: {}  (off: {off})", live.join(" "))),
        Line::from(format!("names: {names}")),
        Line::from(vec![
            lost,
            behind,
            Span::raw(format!(
                "   incidents: {}   at {}",
                board.groups.len(),
                clock_time(&board.clock, board.now_ns)
            )),
        ]),
    ];
    frame.render_widget(
        Paragraph::new(text).block(Block::new().borders(Borders::TOP).title(title)),
        area,
    );
}

fn draw_sparklines(frame: &mut Frame, area: Rect, board: &Board) {
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(area);
    for (area, name, series, color) in [
        (left, "resets/s", &board.resets, Color::Red),
        (right, "INVALID/s", &board.invalid, Color::Yellow),
    ] {
        // The newest seconds that fit the width.
        let width = usize::from(area.width.saturating_sub(2));
        let data: Vec<u64> = series.iter().rev().take(width).rev().copied().collect();
        let now = series.back().copied().unwrap_or(0);
        let max = series.iter().copied().max().unwrap_or(0);
        let title = format!(" {name}: {now} now, max {max} ");
        frame.render_widget(
            Sparkline::default()
                .block(Block::bordered().title(title))
                .data(&data)
                .style(Style::new().fg(color)),
            area,
        );
    }
}

fn draw_table(
    frame: &mut Frame,
    area: Rect,
    board: &Board,
    rows: &[&Group],
    selected: usize,
    view: &View,
) {
    let header = Row::new([
        "SEV",
        "KIND",
        "SERVICE",
        "BACKEND",
        "RESETS",
        "CLIENTS",
        "RATE/s",
        "SINCE",
        "LAST SEEN",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let body: Vec<Row> = rows
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let mut style = if g.active(board.now_ns) {
                Style::new()
            } else {
                Style::new().add_modifier(Modifier::DIM)
            };
            if i == selected {
                style = style.add_modifier(Modifier::REVERSED);
            }
            Row::new([
                Cell::new(severity_tag(g.severity).trim()).style(severity_style(g.severity)),
                Cell::new(g.key.kind.as_str()),
                Cell::new(service_cell(g, board.names.get(&g.key))),
                Cell::new(backend_cell(g, board.names.get(&g.key))),
                Cell::new(g.connections.to_string()),
                Cell::new(format!(
                    "{}{}",
                    g.clients(),
                    if g.clients_capped { "+" } else { "" }
                )),
                Cell::new(format!("{:.1}", g.rate(board.now_ns))),
                Cell::new(clock_time(&board.clock, g.first_ns)),
                Cell::new(clock_time(&board.clock, g.last_ns)),
            ])
            .style(style)
        })
        .collect();
    let mut title = format!(" incidents ({}) ", rows.len());
    if let Some(k) = view.filter.kind {
        title.push_str(&format!("kind={} ", k.as_str()));
    }
    if let Some(s) = view.filter.service {
        // By name when a group of that Service has one, as its rows say.
        let names = board
            .names
            .iter()
            .find(|(k, _)| k.target == Some(s))
            .map(|(_, n)| n);
        title.push_str(&format!("service={} ", service_label(Some(s), names)));
    }
    // 118 columns with their gaps: a 120-column terminal shows every
    // column whole (RESETS and RATE/s are as wide as their headers).
    let widths = [
        Constraint::Length(4),
        Constraint::Length(21),
        Constraint::Length(NAME_W as u16),
        Constraint::Length(NAME_W as u16),
        Constraint::Length(6),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(12),
        Constraint::Length(12),
    ];
    let empty = rows.is_empty();
    let table = Table::new(body, widths)
        .header(header)
        .block(Block::bordered().title(title));
    frame.render_widget(table, area);
    if empty {
        let inner = Rect {
            y: area.y + 2,
            height: 1,
            x: area.x + 2,
            width: area.width.saturating_sub(4),
        };
        frame.render_widget(Paragraph::new("no incident (yet)"), inner);
    }
}

/// The width of the SERVICE and BACKEND columns.
const NAME_W: usize = 21;

/// `s` in `width` characters: when longer, its middle is replaced by `…`,
/// so that a long name keeps both its namespace and the end that tells
/// it apart (a port's name, a Pod's replica suffix, a `+N`) instead of
/// being cut into what looks like another name.
fn fit(s: String, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        return s;
    }
    let head = (width - 1) / 2;
    let tail = width - 1 - head;
    let start: String = s.chars().take(head).collect();
    let end: String = s.chars().skip(n - tail).collect();
    format!("{start}…{end}")
}

/// The SERVICE cell: the Service port's Kubernetes name when known
/// (`namespace/name:port`), else its address.
fn service_cell(g: &Group, n: Option<&FindingNames>) -> String {
    fit(service_label(g.key.target, n), NAME_W)
}

/// A Service as the dashboard says it: its port's name when `n` has it,
/// else its address (`-` when there is none).
fn service_label(target: Option<SocketAddr>, n: Option<&FindingNames>) -> String {
    match n.and_then(|n| n.service.as_ref()) {
        Some((_, s)) => s.to_string(),
        None => target.map_or("-".into(), |t| t.to_string()),
    }
}

/// The BACKEND cell: the latest backend's Pod (or node) when known, else
/// its address; `+N` the other backends of the group.
fn backend_cell(g: &Group, n: Option<&FindingNames>) -> String {
    let named = n
        .and_then(|n| n.backend.as_ref())
        .filter(|_| g.backends.last() == g.latest.backend.as_ref());
    let s = match (named, g.backends.len()) {
        (Some(p), 0 | 1) => p.to_string(),
        (Some(p), k) => format!("{p}+{}", k - 1),
        (None, _) => backends(&g.backends),
    };
    fit(s, NAME_W)
}

fn draw_detail(frame: &mut Frame, area: Rect, board: &Board, g: Option<&Group>) {
    let block = Block::bordered().title(" selected incident ");
    let Some(g) = g else {
        frame.render_widget(Paragraph::new("").block(block), area);
        return;
    };
    let f = &g.latest;
    let evidence =
        serde_json::to_string(&f.evidence.at_wall_clock(&board.clock)).unwrap_or_default();
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let names = board
        .names
        .get(&g.key)
        .and_then(crate::names::render::summary);
    let mut text = Vec::new();
    if let Some(n) = names {
        text.push(Line::from(vec![
            Span::styled("names:    ", bold),
            Span::raw(n),
        ]));
    }
    text.extend([
        Line::from(vec![
            Span::styled("cause:    ", bold),
            Span::raw(format!("{} — {}", short_cause(f), f.cause)),
        ]),
        // The remedy before the evidence: it is what the person acts on,
        // and the evidence is what a small terminal may cut.
        Line::from(vec![
            Span::styled("remedy:   ", bold),
            Span::raw(f.remedy.clone()),
        ]),
        Line::from(vec![Span::styled("evidence: ", bold), Span::raw(evidence)]),
    ]);
    frame.render_widget(
        Paragraph::new(text).block(block).wrap(Wrap { trim: false }),
        area,
    );
}
