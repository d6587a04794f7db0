//! The live event source: attach, then feed kernel events (ring buffer),
//! NAT mappings (ctnetlink, where no kernel hook gives them) and conntrack
//! counters to a [`Sink`], until Ctrl-C, SIGTERM or the duration.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::{PipelineError, Sink};
use crate::clock::{monotonic_now_ns, WallClock};
use crate::ctnetlink::{Ctnetlink, Received};
use crate::decode::decode;
use crate::event::Event;
use crate::hooks::{self, HookStatus, LoadOptions};
use crate::netns::NetnsNames;
use crate::output::StatusInfo;
use crate::ring::RingReader;

/// Where events come from, for [`run_source`].
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub duration: Option<Duration>,
    pub ring_buffer_bytes: u32,
    pub ctnetlink: bool,
    /// URLs this process serves, for the status line.
    pub exposed: Vec<String>,
}

/// Messages from the ctnetlink thread.
enum CtMsg {
    Events(Vec<Event>),
    /// Events the socket dropped (ENOBUFS).
    Overrun(u64),
    /// The listener stopped on this error: no more NAT mappings.
    Died(String),
}

pub fn check_ring_size(bytes: u32) -> Result<(), PipelineError> {
    if !bytes.is_power_of_two() || bytes < 4096 {
        return Err(PipelineError::Output(std::io::Error::other(
            "--ring-buffer-mb must be a power of two",
        )));
    }
    Ok(())
}

/// Attaches the hooks and feeds `sink` until SIGINT, SIGTERM or the
/// duration; then drains what the kernel still holds and calls `finish`.
pub fn run_source(
    opts: &SourceOptions,
    clock: WallClock,
    sink: &mut dyn Sink,
) -> Result<(), PipelineError> {
    check_ring_size(opts.ring_buffer_bytes)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(PipelineError::Runtime)?;
    rt.block_on(source_loop(opts, clock, sink))
}

/// Ring-buffer records to events, counting the ones that do not decode.
struct Decoder {
    names: crate::decode::Names,
    errors: u64,
    /// `errors` already reported as lost.
    reported: u64,
}

impl Decoder {
    fn feed(&mut self, rec: &[u8], sink: &mut dyn Sink) -> Result<(), PipelineError> {
        match decode(rec, &self.names) {
            Ok(ev) => sink.event(&ev),
            Err(e) => {
                self.errors += 1;
                if self.errors <= 3 {
                    tracing::warn!("undecodable ring-buffer record: {e}");
                }
                Ok(())
            }
        }
    }

    /// Records that did not decode since the last call, as a lost line.
    fn report(&mut self, now: u64, sink: &mut dyn Sink) -> Result<(), PipelineError> {
        if self.errors > self.reported {
            let new = self.errors - self.reported;
            self.reported = self.errors;
            sink.lost(now, new, self.errors, "undecodable ring-buffer record")?;
        }
        Ok(())
    }

    /// Feeds `sink` everything now in the ring buffer.
    fn drain(&mut self, ring: &mut RingReader, sink: &mut dyn Sink) -> Result<(), PipelineError> {
        let mut err = Ok(());
        ring.drain(|rec| {
            if err.is_ok() {
                err = self.feed(rec, sink);
            }
        });
        err
    }
}

async fn source_loop(
    opts: &SourceOptions,
    clock: WallClock,
    sink: &mut dyn Sink,
) -> Result<(), PipelineError> {
    let mut attached = hooks::load_and_attach(&LoadOptions {
        ring_buffer_bytes: opts.ring_buffer_bytes,
    })?;
    let mut ring = RingReader::new(&mut attached.ebpf, attached.logger.take())?;
    // aya's copy of the BTF, freed once the programs loaded, and the code
    // only start-up ran.
    crate::memory::release_startup();
    let my_netns = NetnsNames::current();
    let mut counters = crate::ctstat::CounterWatch::default();
    counters.sample();

    // NAT mappings from ctnetlink where no kernel hook gives them.
    let (ct_tx, mut ct_rx) = mpsc::channel::<CtMsg>(4096);
    let mut status = attached.status.clone();
    if !attached.nat_from_kernel {
        let nat = status.iter_mut().find(|s| s.name == "nat_mapping");
        let kernel_reason = nat
            .as_ref()
            .and_then(|s| s.reason.clone())
            .unwrap_or_default();
        let new = if !opts.ctnetlink {
            HookStatus {
                name: "nat_mapping".into(),
                mechanism: "none".into(),
                attached: false,
                target: String::new(),
                reason: Some(format!("--no-ctnetlink; kprobe: {kernel_reason}")),
            }
        } else {
            match Ctnetlink::subscribe(my_netns.unwrap_or(0)) {
                Ok(ct) => {
                    spawn_ctnetlink(ct, ct_tx.clone());
                    HookStatus {
                        name: "nat_mapping".into(),
                        mechanism: "ctnetlink".into(),
                        attached: true,
                        target: "conntrack NEW/DESTROY events of this network namespace".into(),
                        reason: Some(format!("kprobe unavailable: {kernel_reason}")),
                    }
                }
                Err(e) => HookStatus {
                    name: "nat_mapping".into(),
                    mechanism: "none".into(),
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
    // Conntrack counters of this namespace, sampled every tick and on demand.
    let counters_readable = counters.readable();
    status.push(HookStatus {
        name: "ct_counters".into(),
        mechanism: "procfs".into(),
        attached: counters_readable,
        target: if counters_readable {
            "/proc/net/stat/nf_conntrack of this network namespace, every 200 ms and as soon as a finding waits for it".into()
        } else {
            String::new()
        },
        reason: (!counters_readable)
            .then(|| "nf_conntrack is not loaded (no /proc/net/stat/nf_conntrack)".to_string()),
    });

    let mut dec = Decoder {
        names: attached.names.clone(),
        errors: 0,
        reported: 0,
    };
    sink.start(
        &status,
        &StatusInfo {
            kernel: attached.support.release.as_deref(),
            ring_buffer_bytes: opts.ring_buffer_bytes,
            netns: my_netns,
            memlock: Some(&attached.memlock),
            exposed: Some(&opts.exposed),
            replay: None,
        },
        clock,
    )?;

    let mut sigint = signal(SignalKind::interrupt()).map_err(PipelineError::Runtime)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(PipelineError::Runtime)?;
    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut counter_sample = CounterSample {
        watch: counters,
        netns: my_netns.unwrap_or(0),
        next: tokio::time::Instant::now(),
    };
    let mut ct_open = true;
    let mut ct_overruns = 0u64;

    loop {
        tokio::select! {
            r = ring.readable() => {
                r?;
                dec.drain(&mut ring, sink)?;
                if sink.wants_counters() && counter_sample.next <= tokio::time::Instant::now() {
                    counter_sample.take(monotonic_now_ns(), true, sink)?;
                }
                sink.flush()?;
            }
            msg = ct_rx.recv(), if ct_open => match msg {
                Some(CtMsg::Events(evs)) => {
                    for ev in &evs {
                        sink.event(ev)?;
                    }
                    sink.flush()?;
                }
                Some(CtMsg::Overrun(n)) => {
                    ct_overruns += n;
                    sink.lost(monotonic_now_ns(), n, ct_overruns, "ctnetlink socket overrun (NAT events dropped by the kernel)")?;
                }
                Some(CtMsg::Died(why)) => {
                    let mut hook = HookStatus::off("nat_mapping", format!("ctnetlink listener stopped: {why}"));
                    hook.mechanism = "ctnetlink".into();
                    sink.hook_down(monotonic_now_ns(), &hook)?;
                    ct_open = false;
                }
                None => ct_open = false,
            },
            _ = tick.tick() => {
                // Drains are spaced (ring::MIN_DRAIN_GAP): what the ring
                // holds goes first, so the counter sample below comes after
                // the events it may explain, in time and in order.
                dec.drain(&mut ring, sink)?;
                let now = monotonic_now_ns();
                report_losses(now, &mut ring, &mut dec, sink)?;
                // Conntrack counters of this namespace: evidence of INVALID
                // verdicts and table-full drops where no kprobe can see them.
                counter_sample.take(now, false, sink)?;
                sink.tick(now)?;
                sink.flush()?;
                if sink.done() {
                    break;
                }
            }
            // A finding waits for the counters: sample now (after the ring,
            // which may hold what the sample explains), not at the next tick.
            _ = tokio::time::sleep_until(counter_sample.next), if sink.wants_counters() => {
                dec.drain(&mut ring, sink)?;
                counter_sample.take(monotonic_now_ns(), true, sink)?;
                sink.flush()?;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
        }
    }
    // Flush what the kernel still holds before leaving.
    dec.drain(&mut ring, sink)?;
    while let Ok(CtMsg::Events(evs)) = ct_rx.try_recv() {
        for ev in &evs {
            sink.event(ev)?;
        }
    }
    report_losses(monotonic_now_ns(), &mut ring, &mut dec, sink)?;
    sink.finish(monotonic_now_ns())
}

/// Shortest time between two conntrack counter samples taken on demand:
/// bounds the /proc reads of a storm of un-NATed replies to 1000 a second.
const ON_DEMAND_GAP: Duration = Duration::from_millis(1);

/// The conntrack counters of ktrace's namespace, sampled at every tick and
/// whenever a finding waits to cite them.
struct CounterSample {
    watch: crate::ctstat::CounterWatch,
    netns: u32,
    /// When the next on-demand sample may be taken.
    next: tokio::time::Instant,
}

impl CounterSample {
    /// Feeds `sink` the counters' rise since the last sample (`always`: also
    /// when nothing rose).
    fn take(&mut self, now: u64, always: bool, sink: &mut dyn Sink) -> Result<(), PipelineError> {
        self.next = tokio::time::Instant::now() + ON_DEMAND_GAP;
        let body = if always {
            self.watch.sample_now()
        } else {
            self.watch.sample()
        };
        match body {
            Some(body) => sink.event(&Event {
                ts_ns: now,
                netns: self.netns,
                source: crate::event::Source::Procfs,
                body,
            }),
            None => Ok(()),
        }
    }
}

/// Lost lines for what the kernel could not hand over or read, and for
/// records that did not decode, since the last report.
fn report_losses(
    now: u64,
    ring: &mut RingReader,
    dec: &mut Decoder,
    sink: &mut dyn Sink,
) -> Result<(), PipelineError> {
    for l in ring.new_losses() {
        sink.lost(now, l.count, l.total, &l.what)?;
    }
    dec.report(now, sink)
}

/// Reads ctnetlink on its own thread (the socket blocks) and forwards events.
fn spawn_ctnetlink(mut ct: Ctnetlink, tx: mpsc::Sender<CtMsg>) {
    std::thread::Builder::new()
        .name("ctnetlink".into())
        .spawn(move || loop {
            let msg = match ct.recv() {
                Ok(Received::Events(evs)) if evs.is_empty() => continue,
                Ok(Received::Events(evs)) => CtMsg::Events(evs),
                Ok(Received::Overrun(n)) => CtMsg::Overrun(n),
                Err(e) => {
                    tracing::warn!("ctnetlink: {e}");
                    let _ = tx.blocking_send(CtMsg::Died(e.to_string()));
                    return;
                }
            };
            if tx.blocking_send(msg).is_err() {
                return;
            }
        })
        .expect("spawning a thread");
}
