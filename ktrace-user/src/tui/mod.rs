//! The live dashboard of `watch --tui` and `replay --tui` (ratatui over
//! crossterm).
//!
//! - [`board`]: the data shown (header, incident groups, per-second
//!   series), fed by [`board::Update`]s.
//! - [`draw`]: the layout.
//!
//! Live, the pipeline runs as for `watch` and a [`ChannelTap`] copies its
//! status, findings and per-tick counts into a bounded channel without ever
//! waiting (a full channel drops and counts). The dashboard runs on its own
//! thread: it drains the channel, redraws at most [`FRAME`] apart and reads
//! keys. `q`, Esc or Ctrl-C stop the source at its next tick; the terminal
//! is restored on quit, on error and on panic (ratatui's hook), and when
//! the source stops by SIGINT, SIGTERM or `--duration`.

pub mod board;
pub mod draw;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEvent, KeyModifiers};

use crate::clock::WallClock;
use crate::event::Event;
use crate::hooks::HookStatus;
use crate::names::{FindingNames, SourceStatus};
use crate::pipeline::Tap;
use board::{Board, Counter, Filter, Update};

/// Shortest time between two redraws.
pub const FRAME: Duration = Duration::from_millis(200);
/// Updates the channel holds before the tap drops them.
const CHANNEL: usize = 8192;

/// What the person chose: selection, filter, pause, replay position.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub selected: usize,
    pub filter: Filter,
    pub paused: bool,
    /// Replay: where the cursor is, as the header says it.
    pub replay: Option<String>,
}

/// What a key asks for.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    None,
    Quit,
    /// Replay: move the cursor by this many seconds (`i64::MIN`/`MAX`: start/end).
    Step(i64),
    Play,
}

impl View {
    /// Handles a key against what `board` shows.
    fn key(&mut self, k: KeyEvent, board: &Board) -> Action {
        let rows = board.rows(&self.filter);
        match k.code {
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                return Action::Quit
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = (self.selected + 1).min(rows.len().saturating_sub(1))
            }
            KeyCode::Up => self.selected = self.selected.saturating_sub(1),
            KeyCode::Char('k') => {
                let kinds = distinct(board.rows(&Filter::default()).iter().map(|g| g.key.kind));
                self.filter.kind = cycle(&kinds, self.filter.kind);
                self.selected = 0;
            }
            KeyCode::Char('s') => {
                let services = distinct(
                    board
                        .rows(&Filter::default())
                        .iter()
                        .filter_map(|g| g.key.target),
                );
                self.filter.service = cycle(&services, self.filter.service);
                self.selected = 0;
            }
            KeyCode::Char('c') => self.filter = Filter::default(),
            KeyCode::Char('p') => self.paused = !self.paused,
            KeyCode::Char(' ') => return Action::Play,
            KeyCode::Left => return Action::Step(-1),
            KeyCode::Right => return Action::Step(1),
            KeyCode::PageUp => return Action::Step(-10),
            KeyCode::PageDown => return Action::Step(10),
            KeyCode::Home => return Action::Step(i64::MIN),
            KeyCode::End => return Action::Step(i64::MAX),
            _ => {}
        }
        Action::None
    }
}

fn distinct<T: PartialEq>(it: impl Iterator<Item = T>) -> Vec<T> {
    let mut v = Vec::new();
    for x in it {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

/// The next filter value: none, then each of `values`, then none again.
fn cycle<T: PartialEq + Copy>(values: &[T], cur: Option<T>) -> Option<T> {
    match cur.and_then(|c| values.iter().position(|v| *v == c)) {
        None if cur.is_none() => values.first().copied(),
        Some(i) if i + 1 < values.len() => Some(values[i + 1]),
        _ => None,
    }
}

/// The pipeline's side of the live dashboard: copies into the channel,
/// never waits.
pub struct ChannelTap {
    tx: SyncSender<Update>,
    counter: Counter,
    quit: Arc<AtomicBool>,
    /// Updates dropped because the dashboard was behind.
    pub dropped: Arc<AtomicU64>,
}

impl ChannelTap {
    fn send(&mut self, u: Update) {
        if self.tx.try_send(u).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Tap for ChannelTap {
    fn status(&mut self, hooks: &[HookStatus], kernel: Option<&str>, clock: WallClock) {
        let u = Update::status(hooks, kernel, clock);
        if let Update::Status { invalid_hook, .. } = u {
            self.counter.invalid_hook = invalid_hook;
        }
        self.send(u);
    }
    fn event(&mut self, ev: &Event) {
        self.counter.event(ev);
    }
    fn finding(&mut self, f: &crate::engine::Finding, names: Option<&FindingNames>) {
        self.send(Update::finding(f, names));
    }
    fn names(&mut self, sources: &[SourceStatus]) {
        self.send(Update::Names(sources.to_vec()));
    }
    fn lost(&mut self, _now_ns: u64, count: u64) {
        self.send(Update::Lost(count));
    }
    fn tick(&mut self, now_ns: u64) {
        let u = self.counter.take(now_ns);
        self.send(u);
    }
    fn done(&self) -> bool {
        self.quit.load(Ordering::Relaxed)
    }
}

/// The live dashboard: the tap to give the pipeline, and the thread that
/// draws until `q` or the end of the source.
pub struct Live {
    pub thread: std::thread::JoinHandle<std::io::Result<()>>,
}

/// Starts the dashboard thread (it takes the terminal at once) and
/// returns the tap that feeds it.
pub fn start_live() -> (ChannelTap, Live) {
    let (tx, rx) = mpsc::sync_channel(CHANNEL);
    let quit = Arc::new(AtomicBool::new(false));
    let tap = ChannelTap {
        tx,
        counter: Counter::default(),
        quit: quit.clone(),
        dropped: Arc::new(AtomicU64::new(0)),
    };
    // SIGINT/SIGTERM before the pipeline handles them (while it attaches)
    // would kill the process with the terminal still raw and on the
    // alternate screen: they end the dashboard instead, which restores it.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let _ = signal_hook::flag::register(sig, quit.clone());
    }
    let dropped = tap.dropped.clone();
    let thread = std::thread::Builder::new()
        .name("dashboard".into())
        .spawn(move || {
            let r = run_live(rx, &quit, &dropped);
            // However it ended, the source stops too.
            quit.store(true, Ordering::Relaxed);
            r
        })
        .expect("spawning a thread");
    (tap, Live { thread })
}

/// Restores the terminal when dropped (quit, error or early return).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

fn run_live(rx: Receiver<Update>, quit: &AtomicBool, dropped: &AtomicU64) -> std::io::Result<()> {
    let mut terminal = ratatui::try_init()?;
    let _restore = Restore;
    let mut board = Board::new(board::node_name());
    let mut frozen: Option<Board> = None;
    let mut view = View::default();
    let mut next_draw = Instant::now();
    loop {
        if quit.load(Ordering::Relaxed) {
            return Ok(());
        }
        loop {
            match rx.try_recv() {
                Ok(u) => board.apply(u),
                Err(TryRecvError::Empty) => break,
                // The source stopped (signal, duration, error).
                Err(TryRecvError::Disconnected) => return Ok(()),
            }
        }
        board.behind = dropped.load(Ordering::Relaxed);
        let now = Instant::now();
        if now >= next_draw {
            let shown = frozen.as_ref().unwrap_or(&board);
            terminal.draw(|f| draw::draw(f, shown, &view))?;
            next_draw = now + FRAME;
        }
        if event::poll(Duration::from_millis(50))? {
            if let TermEvent::Key(k) = event::read()? {
                let shown = frozen.as_ref().unwrap_or(&board);
                if view.key(k, shown) == Action::Quit {
                    quit.store(true, Ordering::Relaxed);
                    return Ok(());
                }
                frozen = view
                    .paused
                    .then(|| frozen.take().unwrap_or_else(|| board.clone()));
                next_draw = Instant::now();
            }
        }
    }
}

/// A recording's updates in time order, for `replay --tui`.
#[derive(Debug, Default)]
pub struct Timeline {
    pub updates: Vec<(u64, Update)>,
    counter: Counter,
}

impl Tap for Timeline {
    fn status(&mut self, hooks: &[HookStatus], kernel: Option<&str>, clock: WallClock) {
        let u = Update::status(hooks, kernel, clock);
        if let Update::Status { invalid_hook, .. } = u {
            self.counter.invalid_hook = invalid_hook;
        }
        self.updates.push((0, u));
    }
    fn event(&mut self, ev: &Event) {
        self.counter.event(ev);
    }
    fn finding(&mut self, f: &crate::engine::Finding, names: Option<&FindingNames>) {
        self.updates.push((f.ts_ns, Update::finding(f, names)));
    }
    fn names(&mut self, sources: &[SourceStatus]) {
        self.updates.push((0, Update::Names(sources.to_vec())));
    }
    fn lost(&mut self, now_ns: u64, count: u64) {
        self.updates.push((now_ns, Update::Lost(count)));
    }
    fn tick(&mut self, now_ns: u64) {
        let u = self.counter.take(now_ns);
        self.updates.push((now_ns, u));
    }
}

/// Replay feeds a timeline it shares with its caller.
impl Tap for std::rc::Rc<std::cell::RefCell<Timeline>> {
    fn status(&mut self, hooks: &[HookStatus], kernel: Option<&str>, clock: WallClock) {
        self.borrow_mut().status(hooks, kernel, clock);
    }
    fn event(&mut self, ev: &Event) {
        self.borrow_mut().event(ev);
    }
    fn finding(&mut self, f: &crate::engine::Finding, names: Option<&FindingNames>) {
        self.borrow_mut().finding(f, names);
    }
    fn names(&mut self, sources: &[SourceStatus]) {
        self.borrow_mut().names(sources);
    }
    fn lost(&mut self, now_ns: u64, count: u64) {
        self.borrow_mut().lost(now_ns, count);
    }
    fn tick(&mut self, now_ns: u64) {
        self.borrow_mut().tick(now_ns);
    }
}

impl Timeline {
    /// The board as it was at `at_ns`: every update up to then.
    pub fn board_at(&self, node: &str, at_ns: u64) -> Board {
        let mut b = Board::new(node.to_string());
        for (ts, u) in &self.updates {
            if *ts <= at_ns {
                b.apply(u.clone());
            }
        }
        b.now_ns = at_ns;
        b
    }

    /// The first and last times of the recording.
    pub fn span(&self) -> (u64, u64) {
        let ts = self.updates.iter().map(|(t, _)| *t).filter(|t| *t > 0);
        let first = ts.clone().min().unwrap_or(0);
        (first, ts.max().unwrap_or(first))
    }
}

/// `replay --tui`: the recording's timeline through the dashboard, the
/// cursor at its end; keys step through time.
pub fn run_replay(timeline: &Timeline, node: &str) -> std::io::Result<()> {
    let mut terminal = ratatui::try_init()?;
    let _restore = Restore;
    let (first, last) = timeline.span();
    let mut at = last;
    let mut view = View::default();
    let mut playing = false;
    let mut dirty = true;
    let mut last_step = Instant::now();
    let mut board = timeline.board_at(node, at);
    loop {
        if playing && last_step.elapsed() >= Duration::from_secs(1) {
            last_step = Instant::now();
            at = (at + 1_000_000_000).min(last);
            playing = at < last;
            dirty = true;
        }
        if dirty {
            // Rebuilt only when the cursor moved or a key changed the view:
            // a long recording has millions of updates.
            board = timeline.board_at(node, at);
            view.replay = Some(format!(
                "at {} (+{:.1}s of {:.1}s){}",
                crate::incident::line::clock_time(&board.clock, at),
                (at - first) as f64 / 1e9,
                (last - first) as f64 / 1e9,
                if playing { " playing" } else { "" }
            ));
            terminal.draw(|f| draw::draw(f, &board, &view))?;
            dirty = false;
        }
        if event::poll(Duration::from_millis(100))? {
            if let TermEvent::Key(k) = event::read()? {
                match view.key(k, &board) {
                    Action::Quit => return Ok(()),
                    Action::Step(s) => {
                        at = step(at, s, first, last);
                        playing = false;
                    }
                    Action::Play => {
                        playing = !playing;
                        if at >= last {
                            at = first;
                        }
                        last_step = Instant::now();
                    }
                    Action::None => {}
                }
                dirty = true;
            }
        }
    }
}

/// The cursor moved by `secs` seconds within `first..=last`.
fn step(at: u64, secs: i64, first: u64, last: u64) -> u64 {
    match secs {
        i64::MIN => first,
        i64::MAX => last,
        s if s < 0 => at
            .saturating_sub(s.unsigned_abs() * 1_000_000_000)
            .max(first),
        s => (at + s as u64 * 1_000_000_000).min(last),
    }
}

#[cfg(test)]
mod tests;
