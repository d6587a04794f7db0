//! ktrace: an eBPF observer of the Linux packet path that names the
//! incidents behind Kubernetes Service connection resets.
//!
//! One module per stage of the path:
//! - [`support`]: what the running kernel offers (BTF, kprobes, tracepoints, symbols).
//! - [`layout`] and [`tracefs`]: struct offsets from BTF and tracepoint field
//!   offsets from tracefs, handed to the eBPF programs (ktrace's CO-RE).
//! - [`hooks`]: choosing and attaching the best mechanism for each hook, and the status of each.
//! - [`ring`]: draining the ring buffer and the lost-event counters.
//! - [`summary`]: the resets the kernel counts instead of sending them one by one.
//! - [`decode`]: ring-buffer bytes to [`event::Event`]s, by length-checked copies.
//! - [`ctnetlink`]: NAT mappings from conntrack events where no kernel hook can attach.
//! - [`engine`]: the pure correlation engine shared by `watch` and `replay`.
//! - [`output`]: human and JSON Lines renderings.
//! - [`pipeline`]: the live event source and the [`pipeline::Pipeline`] that
//!   feeds every event to the engine, renderer, recorder and exporter.
//! - [`recording`]: the recording file format, its writer and reader.
//! - [`watch`], [`record`], [`replay`]: the commands, assembled from these.
//! - [`demo`]: a real incident in namespaces of its own, through `watch`'s pipeline.
//! - [`names`]: Kubernetes names of addresses (kube-proxy's rules, the API).
//! - [`metrics_server`]: the HTTP server of `/metrics` (Prometheus) and `/healthz`
//!   for `watch --metrics-addr`.

pub mod background;
pub mod clock;
pub mod ctnetlink;
pub mod ctstat;
pub mod decode;
pub mod demo;
pub mod doctor;
pub mod engine;
pub mod event;
pub mod export;
pub mod hooks;
pub mod incident;
pub mod kube_proxy;
pub mod layout;
pub mod memlock;
pub mod memory;
pub mod metrics_server;
pub mod names;
pub mod netns;
pub mod output;
pub mod pipeline;
pub mod record;
pub mod recording;
pub mod replay;
pub mod ring;
pub mod summary;
pub mod support;
pub mod sysctl;
pub mod tool;
pub mod tracefs;
pub mod tui;
pub mod watch;
pub mod wire;
