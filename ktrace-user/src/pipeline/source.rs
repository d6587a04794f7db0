//! The live event source: attach, then feed kernel events (ring buffer),
//! NAT mappings (ctnetlink, where no kernel hook gives them) and conntrack
//! counters to a [`Sink`], until Ctrl-C, SIGTERM or the duration.

use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};

use super::{Loss, PipelineError, Sink};
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
    /// Send every reset one by one (`--every-reset`): none is summarised
    /// in the kernel.
    pub every_reset: bool,
    /// URLs this process serves, for the status line.
    pub exposed: Vec<String>,
    /// kube-proxy's mode detected at start, for the status line.
    pub kube_proxy_mode: Option<crate::engine::KubeProxyMode>,
}

/// Attaches the hooks and feeds `sink` until SIGINT, SIGTERM or the
/// duration; then drains what the kernel still holds and calls `finish`.
pub fn run_source(
    opts: &SourceOptions,
    clock: WallClock,
    sink: &mut dyn Sink,
) -> Result<(), PipelineError> {
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
    /// Events of the drain not yet handed over (reused).
    batch: Vec<Event>,
}

/// Events handed to the sink at a time: enough for the engine to load
/// flows ahead, few enough that a finding is not held back (a few µs).
const BATCH: usize = 256;

impl Decoder {
    fn new(names: crate::decode::Names) -> Decoder {
        Decoder {
            names,
            errors: 0,
            reported: 0,
            batch: Vec::with_capacity(BATCH),
        }
    }

    fn feed(
        &mut self,
        rec: &[u8],
        ct: &mut CtSource,
        sink: &mut dyn Sink,
    ) -> Result<(), PipelineError> {
        match decode(rec, &self.names) {
            Ok(ev) => {
                self.batch.push(ev);
                if self.batch.len() >= BATCH {
                    return self.hand_over(ct, sink);
                }
                Ok(())
            }
            Err(e) => {
                self.errors += 1;
                if self.errors <= 3 {
                    tracing::warn!("undecodable ring-buffer record: {e}");
                }
                Ok(())
            }
        }
    }

    /// The batch, after every NAT mapping ctnetlink holds: those the kernel
    /// made before the batch's events were written come first, as they
    /// happened (a re-mapping before the new backend's reset).
    fn hand_over(&mut self, ct: &mut CtSource, sink: &mut dyn Sink) -> Result<(), PipelineError> {
        let r = ct.drain(sink).and_then(|()| sink.events(&self.batch));
        self.batch.clear();
        r
    }

    /// Records that did not decode since the last call, as a lost line.
    fn report(&mut self, now: u64, sink: &mut dyn Sink) -> Result<(), PipelineError> {
        if self.errors > self.reported {
            let new = self.errors - self.reported;
            self.reported = self.errors;
            sink.lost(
                now,
                &Loss {
                    count: new,
                    total: self.errors,
                    what: "undecodable ring-buffer record".into(),
                },
            )?;
        }
        Ok(())
    }

    /// Feeds `sink` everything now in the ring buffer (and, before each
    /// batch of it, in the ctnetlink socket).
    fn drain(
        &mut self,
        ring: &mut RingReader,
        ct: &mut CtSource,
        sink: &mut dyn Sink,
    ) -> Result<(), PipelineError> {
        let mut err = Ok(());
        ring.drain(|rec| {
            if err.is_ok() {
                err = self.feed(rec, ct, sink);
            }
        });
        if err.is_err() {
            self.batch.clear();
            return err;
        }
        self.hand_over(ct, sink)
    }
}

/// Attaches, says what is live, then runs [`Live`] until it stops.
async fn source_loop(
    opts: &SourceOptions,
    clock: WallClock,
    sink: &mut dyn Sink,
) -> Result<(), PipelineError> {
    let mut attached = hooks::load_and_attach(&LoadOptions {
        ring_buffer_bytes: opts.ring_buffer_bytes,
        every_reset: opts.every_reset,
    })?;
    let ring = RingReader::new(&mut attached.ebpf, attached.logger.take())?;
    let send = attached.status.iter().find(|s| s.name == "tcp_send_reset");
    let summaries = crate::summary::SummaryReader::new(
        &mut attached.ebpf,
        crate::summary::source_of(send.map_or("", |s| &s.mechanism)),
    );
    // aya's copy of the BTF, freed once the programs loaded, and the code
    // only start-up ran.
    crate::memory::release_startup();
    let my_netns = NetnsNames::current();
    let mut counters = crate::ctstat::CounterWatch::default();
    counters.sample();

    // NAT mappings from ctnetlink where no kernel hook gives them.
    let mut status = attached.status.clone();
    let ct = match attached.nat_from_kernel {
        false => nat_from_ctnetlink(&mut status, opts.ctnetlink, my_netns.unwrap_or(0)),
        true => None,
    };
    status.push(counters_status(counters.readable()));
    // Ctrl-C and SIGTERM are handled from before the status line: one that
    // comes right after it stops cleanly instead of killing the process.
    let sigint = signal(SignalKind::interrupt()).map_err(PipelineError::Runtime)?;
    let sigterm = signal(SignalKind::terminate()).map_err(PipelineError::Runtime)?;
    sink.start(
        &status,
        &StatusInfo {
            kernel: attached.support.release.as_deref(),
            ring_buffer_bytes: opts.ring_buffer_bytes,
            netns: my_netns,
            memlock: Some(&attached.memlock),
            exposed: Some(&opts.exposed),
            replay: None,
            kube_proxy_mode: opts.kube_proxy_mode,
        },
        clock,
    )?;
    let mut live = Live {
        ring,
        dec: Decoder::new(attached.names.clone()),
        counters: CounterSample {
            watch: counters,
            netns: my_netns.unwrap_or(0),
            next: tokio::time::Instant::now(),
        },
        summaries,
        ct: CtSource {
            socket: ct,
            overruns: 0,
        },
        sigint,
        sigterm,
    };
    live.run(opts.duration, sink).await?;
    live.finish(sink)
}

/// Replaces the kernel's `nat_mapping` status with ctnetlink's, and
/// returns its subscribed socket, or says why there is none.
fn nat_from_ctnetlink(
    status: &mut Vec<HookStatus>,
    enabled: bool,
    netns: u32,
) -> Option<AsyncFd<Ctnetlink>> {
    let nat = status.iter_mut().find(|s| s.name == "nat_mapping");
    let kernel_reason = nat
        .as_ref()
        .and_then(|s| s.reason.clone())
        .unwrap_or_default();
    let (new, socket) = if !enabled {
        let off = HookStatus::off(
            "nat_mapping",
            format!("--no-ctnetlink; kprobe: {kernel_reason}"),
        );
        (off, None)
    } else {
        let registered = Ctnetlink::subscribe(netns)
            .map_err(|e| e.to_string())
            // SAFETY: the Ctnetlink owns its socket and never replaces or
            // closes it while the AsyncFd holds it (tokio's I/O-safety rule).
            .and_then(|ct| unsafe { AsyncFd::register(ct) }.map_err(|e| e.to_string()));
        match registered {
            Ok(ct) => {
                let on = HookStatus {
                    name: "nat_mapping".into(),
                    mechanism: "ctnetlink".into(),
                    attached: true,
                    target: "conntrack NEW/DESTROY events of this network namespace".into(),
                    reason: Some(format!("kprobe unavailable: {kernel_reason}")),
                };
                (on, Some(ct))
            }
            Err(e) => {
                let off = HookStatus::off("nat_mapping", format!("{e}; kprobe: {kernel_reason}"));
                (off, None)
            }
        }
    };
    match nat {
        Some(s) => *s = new,
        None => status.push(new),
    }
    socket
}

/// The `ct_counters` hook: conntrack counters of this namespace, sampled
/// every tick and on demand.
fn counters_status(readable: bool) -> HookStatus {
    if !readable {
        let mut off = HookStatus::off(
            "ct_counters",
            "nf_conntrack is not loaded (no /proc/net/stat/nf_conntrack)",
        );
        off.mechanism = "procfs".into();
        return off;
    }
    HookStatus {
        name: "ct_counters".into(),
        mechanism: "procfs".into(),
        attached: true,
        target: "/proc/net/stat/nf_conntrack of this network namespace, every 200 ms and as soon as a finding waits for it".into(),
        reason: None,
    }
}

/// The running source: the ring buffer, the ctnetlink socket and the
/// counter sampler, fed to a sink.
struct Live {
    ring: RingReader,
    dec: Decoder,
    /// The kernel's counts of resets it did not send one by one.
    summaries: Option<crate::summary::SummaryReader>,
    counters: CounterSample,
    ct: CtSource,
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
}

impl Live {
    /// Feeds `sink` until SIGINT, SIGTERM, the duration or `sink.done()`.
    async fn run(
        &mut self,
        duration: Option<Duration>,
        sink: &mut dyn Sink,
    ) -> Result<(), PipelineError> {
        let deadline = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                r = self.ring.readable() => {
                    r?;
                    self.dec.drain(&mut self.ring, &mut self.ct, sink)?;
                    if sink.wants_counters() && self.counters.next <= tokio::time::Instant::now() {
                        self.counters.take(monotonic_now_ns(), true, sink)?;
                    }
                    sink.flush()?;
                }
                r = self.ct.readable(), if self.ct.is_open() => {
                    self.ct.drain_after(r, sink)?;
                    sink.flush()?;
                }
                _ = tick.tick() => {
                    if self.tick(sink)? {
                        return Ok(());
                    }
                }
                // A finding waits for the counters: sample now (after the ring,
                // which may hold what the sample explains), not at the next tick.
                _ = tokio::time::sleep_until(self.counters.next), if sink.wants_counters() => {
                    self.dec.drain(&mut self.ring, &mut self.ct, sink)?;
                    self.counters.take(monotonic_now_ns(), true, sink)?;
                    sink.flush()?;
                }
                _ = self.sigint.recv() => return Ok(()),
                _ = self.sigterm.recv() => return Ok(()),
                _ = &mut deadline => return Ok(()),
            }
        }
    }

    /// The 200 ms tick; true when the sink is done.
    fn tick(&mut self, sink: &mut dyn Sink) -> Result<bool, PipelineError> {
        // Drains are spaced (ring::MIN_DRAIN_GAP): what the ring holds goes
        // first, so the counter sample below comes after the events it may
        // explain, in time and in order.
        self.dec.drain(&mut self.ring, &mut self.ct, sink)?;
        let now = monotonic_now_ns();
        self.summarise(now, sink)?;
        self.report_losses(now, sink)?;
        // Conntrack counters of this namespace: evidence of INVALID
        // verdicts and table-full drops where no kprobe can see them.
        self.counters.take(now, false, sink)?;
        sink.tick(now)?;
        sink.flush()?;
        Ok(sink.done())
    }

    /// Flushes what the kernel and the listener still hold, then stops the sink.
    fn finish(&mut self, sink: &mut dyn Sink) -> Result<(), PipelineError> {
        self.dec.drain(&mut self.ring, &mut self.ct, sink)?;
        self.ct.drain(sink)?;
        self.summarise(monotonic_now_ns(), sink)?;
        self.report_losses(monotonic_now_ns(), sink)?;
        sink.finish(monotonic_now_ns())
    }

    /// The resets the kernel counted since the last call, after the ones it
    /// sent (drained just before): a `resets_summarised` event per namespace.
    fn summarise(&mut self, now: u64, sink: &mut dyn Sink) -> Result<(), PipelineError> {
        if let Some(s) = self.summaries.as_mut() {
            for ev in s.take(now) {
                sink.event(&ev)?;
            }
        }
        Ok(())
    }

    /// Lost lines for what the kernel could not hand over or read, and for
    /// records that did not decode, since the last report.
    fn report_losses(&mut self, now: u64, sink: &mut dyn Sink) -> Result<(), PipelineError> {
        for l in self.ring.new_losses() {
            sink.lost(now, &l)?;
        }
        self.dec.report(now, sink)
    }
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

/// NAT mappings from ctnetlink, read on the pipeline's own loop rather
/// than by a thread of its own: drained before every ring batch is handed
/// over, a mapping the kernel made before a reset (say, the re-mapping
/// that sends a segment to the backend that resets it) always reaches the
/// engine before that reset, as it would from the kernel hook. A reader
/// thread lets the two race, and the order of a finding's evidence with them.
struct CtSource {
    /// `None`: not subscribed, or the socket failed (said in a hook-down line).
    socket: Option<AsyncFd<Ctnetlink>>,
    overruns: u64,
}

impl CtSource {
    fn is_open(&self) -> bool {
        self.socket.is_some()
    }

    /// Waits until the socket may hold events (forever when closed).
    async fn readable(&mut self) -> std::io::Result<()> {
        match self.socket.as_mut() {
            Some(s) => s.readable_mut().await.map(|mut g| g.clear_ready()),
            None => std::future::pending().await,
        }
    }

    /// After [`CtSource::readable`]: everything the socket holds.
    fn drain_after(
        &mut self,
        ready: std::io::Result<()>,
        sink: &mut dyn Sink,
    ) -> Result<(), PipelineError> {
        match ready {
            Ok(()) => self.drain(sink),
            Err(e) => self.died(&e, sink),
        }
    }

    /// Feeds `sink` every event the socket holds now (and a lost line for
    /// those the kernel dropped on a full socket).
    fn drain(&mut self, sink: &mut dyn Sink) -> Result<(), PipelineError> {
        while let Some(socket) = self.socket.as_mut() {
            match socket.get_mut().try_recv() {
                Ok(None) => break,
                Ok(Some(Received::Events(evs))) => {
                    for ev in &evs {
                        sink.event(ev)?;
                    }
                }
                Ok(Some(Received::Overrun(n))) => {
                    self.overruns += n;
                    let loss = Loss {
                        count: n,
                        total: self.overruns,
                        what: "ctnetlink socket overrun (NAT events dropped by the kernel)".into(),
                    };
                    sink.lost(monotonic_now_ns(), &loss)?;
                }
                Err(e) => self.died(&e, sink)?,
            }
        }
        Ok(())
    }

    /// The socket failed: no more NAT mappings, said as a hook going down.
    fn died(&mut self, e: &std::io::Error, sink: &mut dyn Sink) -> Result<(), PipelineError> {
        tracing::warn!("ctnetlink: {e}");
        self.socket = None;
        let mut hook = HookStatus::off("nat_mapping", format!("ctnetlink listener stopped: {e}"));
        hook.mechanism = "ctnetlink".into();
        sink.hook_down(monotonic_now_ns(), &hook)
    }
}
