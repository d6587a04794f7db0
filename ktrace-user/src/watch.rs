//! `ktrace watch`: attach, then feed kernel events (ring buffer) and NAT
//! mappings (ctnetlink, where no kernel hook gives them) through the
//! correlation engine to the renderer, until Ctrl-C, SIGTERM or the duration.

use std::io::Write;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::clock::{monotonic_now_ns, WallClock};
use crate::ctnetlink::{Ctnetlink, Received};
use crate::decode::{decode, Names};
use crate::engine::{Engine, EngineConfig, Finding};
use crate::event::Event;
use crate::hooks::{self, HookStatus, LoadOptions};
use crate::netns::NetnsNames;
use crate::output::{Renderer, StatusInfo};
use crate::ring::RingReader;

pub struct WatchOptions {
    pub json: bool,
    pub events: bool,
    pub duration: Option<Duration>,
    pub ring_buffer_bytes: u32,
    pub ctnetlink: bool,
    pub engine: EngineConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Hooks(#[from] hooks::HookError),
    #[error(transparent)]
    Ring(#[from] crate::ring::RingError),
    #[error("cannot start the event loop: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot write output: {0}")]
    Output(#[source] std::io::Error),
}

/// Messages from the ctnetlink thread.
enum CtMsg {
    Events(Vec<Event>),
    Overrun,
}

pub fn run(opts: WatchOptions) -> Result<(), WatchError> {
    if !opts.ring_buffer_bytes.is_power_of_two() || opts.ring_buffer_bytes < 4096 {
        return Err(WatchError::Output(std::io::Error::other(
            "--ring-buffer-mb must be a power of two",
        )));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WatchError::Runtime)?;
    rt.block_on(run_async(opts))
}

/// Feeds events to the engine and the renderer.
struct Pipeline<W: Write> {
    engine: Engine,
    out: Renderer<W>,
    names: Names,
    findings: Vec<Finding>,
    decode_errors: u64,
}

impl<W: Write> Pipeline<W> {
    fn handle(&mut self, ev: &Event) -> std::io::Result<()> {
        self.out.event(ev)?;
        self.engine.process(ev, &mut self.findings);
        self.emit_findings()
    }

    fn handle_record(&mut self, rec: &[u8]) -> std::io::Result<()> {
        match decode(rec, &self.names) {
            Ok(ev) => self.handle(&ev),
            Err(e) => {
                self.decode_errors += 1;
                if self.decode_errors <= 3 {
                    tracing::warn!("undecodable ring-buffer record: {e}");
                }
                Ok(())
            }
        }
    }

    fn tick(&mut self, now_ns: u64) -> std::io::Result<()> {
        self.engine.tick(now_ns, &mut self.findings);
        self.emit_findings()
    }

    fn emit_findings(&mut self) -> std::io::Result<()> {
        for f in self.findings.drain(..) {
            self.out.finding(&f)?;
        }
        Ok(())
    }
}

async fn run_async(opts: WatchOptions) -> Result<(), WatchError> {
    let mut attached = hooks::load_and_attach(&LoadOptions {
        ring_buffer_bytes: opts.ring_buffer_bytes,
    })?;
    let mut ring = RingReader::new(&mut attached.ebpf)?;
    let my_netns = NetnsNames::current();

    // NAT mappings from ctnetlink where no kernel hook gives them.
    let (ct_tx, mut ct_rx) = mpsc::channel::<CtMsg>(4096);
    let mut status = attached.status.clone();
    if !attached.nat_from_kernel {
        let nat = status.iter_mut().find(|s| s.name == "nat_mapping");
        let kernel_reason = nat.as_ref().and_then(|s| s.reason.clone()).unwrap_or_default();
        let new = if !opts.ctnetlink {
            HookStatus {
                name: "nat_mapping",
                mechanism: "none",
                attached: false,
                target: String::new(),
                reason: Some(format!("--no-ctnetlink; kprobe: {kernel_reason}")),
            }
        } else {
            match Ctnetlink::subscribe(my_netns.unwrap_or(0)) {
                Ok(ct) => {
                    spawn_ctnetlink(ct, ct_tx.clone());
                    HookStatus {
                        name: "nat_mapping",
                        mechanism: "ctnetlink",
                        attached: true,
                        target: "conntrack NEW/DESTROY events of this network namespace".into(),
                        reason: Some(format!("kprobe unavailable: {kernel_reason}")),
                    }
                }
                Err(e) => HookStatus {
                    name: "nat_mapping",
                    mechanism: "none",
                    attached: false,
                    target: String::new(),
                    reason: Some(format!("{e}; kprobe: {kernel_reason}")),
                },
            }
        };
        match nat {
            Some(s) => *s = new,
            None => status.push(new),
        }
    }
    drop(ct_tx);

    let clock = WallClock::now();
    let stdout = std::io::stdout().lock();
    let mut p = Pipeline {
        engine: Engine::new(opts.engine.clone()),
        out: Renderer::new(
            std::io::BufWriter::with_capacity(1 << 16, stdout),
            opts.json,
            opts.events,
            clock,
            NetnsNames::load(),
        ),
        names: attached.names.clone(),
        findings: Vec::new(),
        decode_errors: 0,
    };
    let out_err = WatchError::Output;
    p.out
        .status(
            &status,
            &StatusInfo {
                kernel: attached.support.release.as_deref(),
                ring_buffer_bytes: opts.ring_buffer_bytes,
                netns: my_netns,
            },
        )
        .and_then(|_| p.out.flush())
        .map_err(out_err)?;

    let mut sigint = signal(SignalKind::interrupt()).map_err(WatchError::Runtime)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(WatchError::Runtime)?;
    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut lost_seen = 0u64;
    let mut ct_open = true;
    let mut ct_overruns = 0u64;

    loop {
        tokio::select! {
            r = ring.readable() => {
                r?;
                let mut err = Ok(());
                ring.drain(|rec| {
                    if err.is_ok() {
                        err = p.handle_record(rec);
                    }
                });
                err.and_then(|_| p.out.flush()).map_err(out_err)?;
            }
            msg = ct_rx.recv(), if ct_open => match msg {
                Some(CtMsg::Events(evs)) => {
                    for ev in &evs {
                        p.handle(ev).map_err(out_err)?;
                    }
                    p.out.flush().map_err(out_err)?;
                }
                Some(CtMsg::Overrun) => {
                    ct_overruns += 1;
                    p.out.lost(1, ct_overruns, "ctnetlink socket overrun (one or more NAT events)").map_err(out_err)?;
                }
                None => ct_open = false,
            },
            _ = tick.tick() => {
                let lost = ring.lost_total();
                if lost > lost_seen {
                    p.out.lost(lost - lost_seen, lost, "ring buffer full").map_err(out_err)?;
                    lost_seen = lost;
                }
                p.out.netns_names_mut().refresh();
                p.tick(monotonic_now_ns()).and_then(|_| p.out.flush()).map_err(out_err)?;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
        }
    }
    // Flush what the kernel still holds before leaving.
    let mut err = Ok(());
    ring.drain(|rec| {
        if err.is_ok() {
            err = p.handle_record(rec);
        }
    });
    err.map_err(out_err)?;
    while let Ok(CtMsg::Events(evs)) = ct_rx.try_recv() {
        for ev in &evs {
            p.handle(ev).map_err(out_err)?;
        }
    }
    let lost = ring.lost_total();
    if lost > lost_seen {
        p.out.lost(lost - lost_seen, lost, "ring buffer full").map_err(out_err)?;
    }
    p.tick(u64::MAX).map_err(out_err)?;
    p.out.flush().map_err(out_err)?;
    Ok(())
}

/// Reads ctnetlink on its own thread (the socket blocks) and forwards events.
fn spawn_ctnetlink(mut ct: Ctnetlink, tx: mpsc::Sender<CtMsg>) {
    std::thread::Builder::new()
        .name("ctnetlink".into())
        .spawn(move || loop {
            let msg = match ct.recv() {
                Ok(Received::Events(evs)) if evs.is_empty() => continue,
                Ok(Received::Events(evs)) => CtMsg::Events(evs),
                Ok(Received::Overrun) => CtMsg::Overrun,
                Err(e) => {
                    tracing::warn!("ctnetlink: {e}");
                    return;
                }
            };
            if tx.blocking_send(msg).is_err() {
                return;
            }
        })
        .expect("spawning a thread");
}
