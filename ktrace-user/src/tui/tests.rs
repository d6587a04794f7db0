//! The dashboard's layout, drawn on ratatui's test backend.

use ratatui::backend::TestBackend;
use ratatui::Terminal;

use super::board::{Board, Update};
use super::*;
use crate::incident::tests::unnated;
use std::sync::Arc;

/// The screen as lines of text.
fn screen(board: &Board, view: &View, w: u16, h: u16) -> Vec<String> {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| draw::draw(f, board, view)).unwrap();
    let buf = t.backend().buffer().clone();
    (0..h)
        .map(|y| (0..w).map(|x| buf[(x, y)].symbol().to_string()).collect())
        .collect()
}

fn board_with_incident() -> Board {
    let mut b = Board::new("node-a".into());
    let hooks = vec![
        HookStatus {
            name: "tcp_send_reset".into(),
            mechanism: "raw_tracepoint".into(),
            attached: true,
            target: String::new(),
            reason: None,
        },
        HookStatus::off("ct_invalid", "kprobes not supported"),
    ];
    b.apply(Update::status(
        &hooks,
        Some("6.18.0"),
        WallClock { offset_ns: 0 },
    ));
    for i in 0..6 {
        b.apply(Update::Finding(
            Box::new(unnated(1_000_000_000 + i * 1_000_000, 40000 + i as u16)),
            None,
        ));
    }
    b.apply(Update::Counts {
        now_ns: 1_500_000_000,
        resets: 6,
        invalid: 8,
    });
    b.apply(Update::Lost(3));
    b
}

/// The columns of the screen's `unnated_reply` row.
fn incident_row(lines: &[String]) -> Vec<&str> {
    let row = lines
        .iter()
        .find(|l| l.contains("unnated_reply"))
        .unwrap_or_else(|| panic!("no incident row:\n{}", lines.join("\n")));
    row.trim_matches('│').split_whitespace().collect()
}

#[test]
fn the_dashboard_names_the_service_backend_and_count() {
    let lines = screen(&board_with_incident(), &View::default(), 120, 30);
    let text = lines.join("\n");
    assert!(
        lines[0].contains("node node-a") && lines[0].contains("kernel 6.18.0"),
        "{text}"
    );
    assert!(
        text.contains("hooks live: tcp_send_reset  (off: 1)"),
        "{text}"
    );
    assert!(text.contains("lost events: 3"), "{text}");
    assert!(text.contains("resets/s: 6 now"), "{text}");
    assert!(text.contains("INVALID/s: 8 now"), "{text}");
    let cols = incident_row(&lines);
    // SEV KIND SERVICE BACKEND RESETS CLIENTS RATE SINCE LAST
    assert_eq!(
        &cols[..6],
        [
            "ERR",
            "unnated_reply",
            "10.96.0.10:2222",
            "10.0.1.2:2222",
            "6",
            "1"
        ],
        "{cols:?}"
    );
    assert!(text.contains("cause:    INVALID (counter +8)"), "{text}");
    assert!(
        text.contains("remedy:   set nf_conntrack_tcp_be_liberal=1"),
        "{text}"
    );
    assert!(
        text.contains("evidence:") && text.contains("{\"basis\":[\"ct_invalid_counter\"]"),
        "{text}"
    );
}

/// With Kubernetes names, the table says the Service and the backend Pod
/// by name and the detail pane says who is who; an incident nothing names
/// keeps its addresses.
#[test]
fn the_dashboard_shows_kubernetes_names_where_known() {
    use crate::names::{SourceState, SourceStatus};
    let names = crate::names::render::tests::example_names();
    let mut b = board_with_incident();
    let text = screen(&b, &View::default(), 120, 30).join("\n");
    assert!(text.contains("names: off"), "{text}");
    let mut rules = SourceStatus::new("kube-proxy-rules", SourceState::Live);
    rules.mode = "iptables".into();
    rules.services = 3;
    b.apply(Update::Names(vec![
        rules,
        SourceStatus::off("kubernetes-api", "no kubeconfig"),
    ]));
    b.apply(Update::finding(
        &unnated(1_100_000_000, 40100),
        Some(&names),
    ));
    let lines = screen(&b, &View::default(), 120, 30);
    let text = lines.join("\n");
    assert!(
        text.contains(
            "names: kube-proxy-rules live (iptables): 3 services   kubernetes-api off -- no kubeconfig"
        ),
        "{text}"
    );
    let cols = incident_row(&lines);
    assert_eq!(
        &cols[..5],
        [
            "ERR",
            "unnated_reply",
            "payments/ledger:grpc",
            "payments/ledger-7f9c",
            "7"
        ],
        "{cols:?}"
    );
    assert!(
        text.contains(
            "names:    Service payments/ledger:grpc, backend pod payments/ledger-7f9c on node-a, client node/node-b"
        ),
        "{text}"
    );
    // Filtered by that Service: the title says it by name.
    let mut view = View::default();
    view.filter.service = Some("10.96.0.10:2222".parse().unwrap());
    let text = screen(&b, &view, 120, 30).join("\n");
    assert!(text.contains("service=payments/ledger:grpc"), "{text}");
    // The next finding of the group without names: addresses again.
    b.apply(Update::finding(&unnated(1_200_000_000, 40200), None));
    let text = screen(&b, &View::default(), 120, 30).join("\n");
    assert!(
        text.contains("10.96.0.10:2222") && !text.contains("payments/"),
        "{text}"
    );
}

/// A name longer than its column keeps its start and its end, the middle
/// marked as cut (never a shorter name that looks whole); the detail pane
/// says it whole.
#[test]
fn long_names_are_elided_in_the_middle_not_cut() {
    use crate::names::{Interner, Peer, PodName, Proto, ServiceName};
    let mut i = Interner::default();
    let svc = ServiceName::parse("kube-system/kube-dns:dns-tcp", &mut i).unwrap();
    let names = FindingNames {
        service: Some((Proto::Tcp, Arc::new(svc))),
        backend: Some(Peer::Pod(Arc::new(PodName {
            namespace: i.get("payments"),
            name: "ledger-7f9c8d6b5-x2k4q".into(),
            node: None,
        }))),
        ..FindingNames::default()
    };
    let mut b = board_with_incident();
    b.apply(Update::finding(
        &unnated(1_100_000_000, 40100),
        Some(&names),
    ));
    let lines = screen(&b, &View::default(), 120, 30);
    let cols = incident_row(&lines);
    assert_eq!(
        &cols[2..5],
        ["kube-syste…ns:dns-tcp", "payments/l…d6b5-x2k4q", "7"],
        "{cols:?}"
    );
    let text = lines.join("\n");
    assert!(
        text.contains(
            "Service kube-system/kube-dns:dns-tcp, backend pod payments/ledger-7f9c8d6b5-x2k4q"
        ),
        "{text}"
    );
}

#[test]
fn filters_narrow_the_table_and_keys_cycle_them() {
    let board = board_with_incident();
    let mut view = View::default();
    let key = |c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE);
    assert_eq!(view.key(key('k'), &board), Action::None);
    assert_eq!(
        view.filter.kind,
        Some(crate::engine::FindingKind::UnnatedReply)
    );
    let text = screen(&board, &view, 120, 30).join("\n");
    assert!(text.contains("incidents (1) kind=unnated_reply"), "{text}");
    view.key(key('k'), &board);
    assert_eq!(view.filter.kind, None, "back to all after the last kind");
    view.key(key('s'), &board);
    assert_eq!(
        view.filter.service,
        Some("10.96.0.10:2222".parse().unwrap())
    );
    assert_eq!(view.key(key('q'), &board), Action::Quit);
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert_eq!(view.key(ctrl_c, &board), Action::Quit);
}

#[test]
fn an_empty_board_says_so() {
    let text = screen(&Board::new("n".into()), &View::default(), 100, 24).join("\n");
    assert!(text.contains("no incident (yet)"), "{text}");
}

#[test]
fn a_timeline_rebuilds_the_board_at_any_time() {
    let mut t = Timeline::default();
    for i in 0..4u64 {
        t.finding(&unnated(1_000_000_000 * (i + 1), 40000 + i as u16), None);
    }
    assert_eq!(t.span(), (1_000_000_000, 4_000_000_000));
    let b = t.board_at("n", 2_500_000_000);
    assert_eq!(b.rows(&Filter::default())[0].connections, 2);
    assert_eq!(
        step(2_500_000_000, -10, 1_000_000_000, 4_000_000_000),
        1_000_000_000
    );
    assert_eq!(
        step(2_500_000_000, 1, 1_000_000_000, 4_000_000_000),
        3_500_000_000
    );
}

#[test]
fn updates_the_dashboard_skipped_are_shown_not_hidden() {
    let mut b = board_with_incident();
    let text = screen(&b, &View::default(), 120, 30).join("\n");
    assert!(!text.contains("dashboard behind"), "{text}");
    b.behind = 42;
    let text = screen(&b, &View::default(), 120, 30).join("\n");
    assert!(
        text.contains("lost events: 3   dashboard behind: 42 updates skipped"),
        "{text}"
    );
}

#[test]
fn a_full_channel_counts_what_the_tap_drops() {
    let (tx, rx) = mpsc::sync_channel(2);
    let mut tap = ChannelTap {
        tx,
        counter: Counter::default(),
        quit: Arc::new(AtomicBool::new(false)),
        dropped: Arc::new(AtomicU64::new(0)),
    };
    for t in 0..5 {
        tap.tick(t);
    }
    assert_eq!(tap.dropped.load(Ordering::Relaxed), 3);
    assert_eq!(rx.try_iter().count(), 2);
}

#[test]
fn the_whole_remedy_shows_in_a_120x40_terminal() {
    let mut b = Board::new("node-a".into());
    let mut f = unnated(1_000_000_000, 40000);
    // The un-NATed reply's remedy as the engine words it (the longest:
    // kube-proxy's nftables mode, request direction).
    f.remedy = "set net.netfilter.nf_conntrack_tcp_be_liberal=1 (and load nf_conntrack from \
        /etc/modules-load.d/ so the sysctl applies at boot); kube-proxy's nftables mode installs \
        no ctstate INVALID drop (run it with --conntrack-tcp-be-liberal to set be_liberal), so \
        drop INVALID on the input hook in a table of your own: nft add table inet invalid-drop; \
        nft add chain inet invalid-drop input '{ type filter hook input priority filter; }'; nft \
        add rule inet invalid-drop input ct state invalid drop; if the table is near full, raise \
        nf_conntrack_max (nf_conntrack_max is 262144)"
        .into();
    f.cause = "Service 10.96.0.10:2222: reply from backend 10.0.1.2:2222 to client \
        10.0.0.2:54904 was not reverse-NATed (conntrack INVALID: the node's conntrack counted 12 \
        INVALID packet(s) as it happened (out of window or table full; the verdict hook cannot \
        attach on this kernel, so the exact reason is unknown)); the client reset it."
        .into();
    b.apply(Update::Finding(Box::new(f), None));
    let last_word = "262144)";
    let text = screen(&b, &View::default(), 120, 40).join("\n");
    assert!(text.contains("remedy:"), "{text}");
    assert!(
        text.contains(last_word),
        "remedy cut ({last_word}):\n{text}"
    );
}

#[test]
fn summarised_resets_count_in_the_resets_per_second() {
    use crate::event::{Event, EventBody, ResetCounts, Source};
    let ev = |body| Event {
        ts_ns: 1,
        netns: 1,
        source: Source::RawTracepoint,
        body,
    };
    let mut c = Counter::default();
    c.event(&ev(EventBody::ResetsSummarised(ResetCounts {
        refused: 1000,
        socket: 2,
    })));
    c.event(&ev(EventBody::TcpSendReset {
        src: "10.0.0.2:80".parse().unwrap(),
        dst: "10.0.0.1:4000".parse().unwrap(),
        reason: None,
        trigger_flags: Some(0x02),
        socket: None,
    }));
    match c.take(5) {
        Update::Counts { resets, .. } => assert_eq!(resets, 1003),
        other => panic!("{other:?}"),
    }
}
