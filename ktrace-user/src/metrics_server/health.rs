//! What `/healthz` answers: ktrace is alive when its kernel hooks are
//! attached and the pipeline drained the ring buffer recently (it does
//! every 200 ms; a pipeline stuck on its output or a dead event loop stops
//! doing so, and the liveness probe restarts the pod).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::hooks::HookStatus;

/// A drain older than this makes ktrace unhealthy.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// Shared by the pipeline (which updates it) and the metrics server (which reads it).
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    /// Kernel hooks (ring-buffer sources) attached; `u64::MAX` before the status.
    hooks: AtomicU64,
    /// Milliseconds since `epoch` of the last drain, plus one (0: never).
    drained_ms: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            epoch: Instant::now(),
            hooks: AtomicU64::new(u64::MAX),
            drained_ms: AtomicU64::new(0),
        }
    }
}

impl Health {
    /// The hooks' status, once attached. ctnetlink and procfs sources do not
    /// count: only hooks that feed the ring buffer.
    pub fn attached(&self, hooks: &[HookStatus]) {
        let n = hooks
            .iter()
            .filter(|h| h.attached && !matches!(&*h.mechanism, "ctnetlink" | "procfs"))
            .count();
        self.hooks.store(n as u64, Ordering::Relaxed);
    }

    /// The pipeline drained the ring buffer just now.
    pub fn drained(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.drained_ms.store(ms, Ordering::Relaxed);
    }

    /// `Ok(why it is healthy)` or `Err(why not)`, one line each.
    pub fn check(&self) -> Result<String, String> {
        let hooks = self.hooks.load(Ordering::Relaxed);
        if hooks == u64::MAX {
            return Err("starting: kernel hooks not attached yet".into());
        }
        if hooks == 0 {
            return Err("no kernel hook is attached (see the status line)".into());
        }
        let drained = self.drained_ms.load(Ordering::Relaxed);
        if drained == 0 {
            return Err(format!(
                "{hooks} hooks attached; ring buffer not drained yet"
            ));
        }
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let age = Duration::from_millis(now.saturating_sub(drained));
        if age > STALE_AFTER {
            return Err(format!(
                "{hooks} hooks attached, but the ring buffer was last drained {:.1} s ago",
                age.as_secs_f64()
            ));
        }
        Ok(format!(
            "{hooks} hooks attached; ring buffer drained {:.1} s ago",
            age.as_secs_f64()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(name: &'static str, mechanism: &'static str, attached: bool) -> HookStatus {
        HookStatus {
            name: name.into(),
            mechanism: mechanism.into(),
            attached,
            target: String::new(),
            reason: None,
        }
    }

    #[test]
    fn healthy_only_with_hooks_and_a_recent_drain() {
        let h = Health::default();
        assert!(h.check().unwrap_err().starts_with("starting"));
        h.attached(&[
            hook("nat_mapping", "ctnetlink", true),
            hook("ct_counters", "procfs", true),
        ]);
        assert!(h.check().unwrap_err().contains("no kernel hook"));
        h.attached(&[hook("tcp_send_reset", "tracepoint", true)]);
        assert!(h.check().unwrap_err().contains("not drained yet"));
        h.drained();
        assert!(h.check().unwrap().starts_with("1 hooks attached"));
        // A drain long ago.
        let h2 = Health {
            epoch: Instant::now() - STALE_AFTER - Duration::from_secs(1),
            hooks: AtomicU64::new(1),
            drained_ms: AtomicU64::new(1),
        };
        assert!(h2.check().unwrap_err().contains("last drained"));
    }
}
