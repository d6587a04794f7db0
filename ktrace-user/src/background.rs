//! The side features' threads: the metrics server, the OTLP export and
//! the Kubernetes API source each run on a thread of their own with a
//! single-threaded event loop, so their network I/O never delays the
//! pipeline (which drains the ring buffer on the main thread).

use std::future::Future;

/// Starts a thread named `name` that builds its own event loop and runs
/// the future `task` makes to completion. If the event loop cannot be
/// built, `failed` gets why, on that thread. Errs when the thread cannot
/// be started.
pub(crate) fn spawn<Fut>(
    name: &str,
    task: impl FnOnce() -> Fut + Send + 'static,
    failed: impl FnOnce(String) + Send + 'static,
) -> std::io::Result<()>
where
    Fut: Future<Output = ()>,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(task()),
                Err(e) => failed(format!("cannot start its event loop: {e}")),
            }
        })
        .map(drop)
}
