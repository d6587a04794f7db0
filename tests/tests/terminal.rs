//! What a person sees in a real terminal: ktrace under tmux (120x40),
//! the pane captured as text. The plain `watch` view and the `--tui`
//! dashboard during the un-NATed reply incident in the lab's namespaces,
//! and `replay --tui` of the golden recording; the dashboard naming the
//! Service from kube-proxy's rules, live and replayed. Needs tmux (and
//! root for the lab); skipped, saying so, otherwise.
//!
//! Run serially (`--test-threads=1`): kernel hooks are global.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ktrace_tests::kube_proxy::{self, IPTABLES_RESTORE, SERVICE};
use ktrace_tests::{skip, Lab, Scratch, BACKENDS, CLIENT_IP, VIP};

fn tmux_missing() -> bool {
    let missing = Command::new("sh")
        .args(["-c", "command -v tmux"])
        .output()
        .map_or(true, |o| !o.status.success());
    if missing {
        ktrace_tests::record_skip("tmux is not installed (scripts/setup.sh installs it)");
    }
    missing
}

/// A detached tmux session running one command in a 120x40 terminal; the
/// shell then writes the terminal's settings (`stty -a`) and ktrace's exit
/// status, and waits, so the pane can be read after ktrace has gone.
struct Pane {
    name: String,
    stty: PathBuf,
    pid: PathBuf,
}

impl Pane {
    fn start(tag: &str, netns: Option<&str>, args: &[&str], dir: Option<&str>) -> Pane {
        let name = format!("ktrace-{tag}-{}", std::process::id());
        let tmp = std::env::temp_dir();
        let stty = tmp.join(format!("{name}.stty"));
        let pid = tmp.join(format!("{name}.pid"));
        let _ = std::fs::remove_file(&stty);
        let bin = ktrace_tests::ktrace_bin();
        let run = format!(
            "echo $$ > {}; exec {} {}",
            pid.display(),
            bin.display(),
            args.join(" ")
        );
        let inner = match netns {
            Some(ns) => format!("ip netns exec {ns} sh -c '{run}'"),
            None => format!("sh -c '{run}'"),
        };
        let script = format!(
            "{}{inner}; rc=$?; stty -a > {}; echo \"ktrace exited $rc\"; sleep 600",
            dir.map(|d| format!("cd {d} && ")).unwrap_or_default(),
            stty.display()
        );
        let ok = Command::new("tmux")
            .args(["new-session", "-d", "-s", &name, "-x", "120", "-y", "40"])
            .arg(script)
            .status()
            .unwrap()
            .success();
        assert!(ok, "tmux new-session failed");
        Pane { name, stty, pid }
    }

    fn capture(&self, join: bool) -> String {
        // With the scrollback (what scrolled off the 40 rows).
        let mut args = vec!["capture-pane", "-p", "-S", "-200", "-t", &self.name];
        if join {
            args.push("-J");
        }
        let out = Command::new("tmux").args(&args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn text(&self) -> String {
        self.capture(false)
    }

    /// Keeps what the person saw as `NAME.txt` in `KTRACE_SCREEN_DIR` when
    /// that is set (the screens quoted in notes and docs come from here).
    fn keep(&self, name: &str, text: &str) {
        if let Some(dir) = std::env::var_os("KTRACE_SCREEN_DIR") {
            let path = PathBuf::from(dir).join(format!("{name}.txt"));
            std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    /// Waits until the pane satisfies `pred`; the pane's text either way.
    fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> (bool, String) {
        let start = Instant::now();
        loop {
            let t = self.text();
            if pred(&t) {
                return (true, t);
            }
            if start.elapsed() > timeout {
                return (false, t);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &[&str]) {
        Command::new("tmux")
            .args(["send-keys", "-t", &self.name])
            .args(keys)
            .status()
            .unwrap();
    }

    fn interrupt(&self) {
        let pid = std::fs::read_to_string(&self.pid).unwrap();
        let ok = Command::new("kill")
            .args(["-INT", pid.trim()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -INT {pid}");
    }

    /// After ktrace exited: status 0, the main screen back (not the
    /// alternate one), the cursor shown, and the terminal out of raw mode.
    fn assert_restored(&self) {
        let (exited, text) =
            self.wait_for(Duration::from_secs(10), |t| t.contains("ktrace exited"));
        assert!(exited, "ktrace did not stop:\n{text}");
        assert!(text.contains("ktrace exited 0"), "{text}");
        let flags = Command::new("tmux")
            .args([
                "display",
                "-p",
                "-t",
                &self.name,
                "#{alternate_on} #{cursor_flag}",
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&flags.stdout).trim(),
            "0 1",
            "{text}"
        );
        let stty = std::fs::read_to_string(&self.stty).unwrap();
        // `stty -a` lists each mode as a word, `-mode` when it is off.
        let modes: Vec<&str> = stty.split_whitespace().collect();
        for mode in ["icanon", "echo", "isig", "icrnl"] {
            assert!(modes.contains(&mode), "{mode} not restored: {stty}");
        }
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
        let _ = std::fs::remove_file(&self.stty);
        let _ = std::fs::remove_file(&self.pid);
    }
}

/// The dashboard row of `kind`: its columns (the table's borders stripped).
fn row(text: &str, kind: &str) -> Option<Vec<String>> {
    text.lines().find(|l| l.contains(kind)).map(|l| {
        l.trim_matches(|c| c == '│' || c == ' ')
            .split_whitespace()
            .map(str::to_string)
            .collect()
    })
}

/// `ktrace watch` in a 120-column terminal while six connections are reset
/// by un-NATed replies: one line per finding, nothing wrapped, the remedy
/// once, the repeats summed up.
#[test]
fn plain_watch_in_a_terminal_is_compact_and_grouped() {
    if skip() || tmux_missing() {
        return;
    }
    let mut lab = Lab::new("tp", 1);
    lab.start_server();
    let pane = Pane::start("plain", Some(&lab.node), &["watch"], None);
    let (up, text) = pane.wait_for(Duration::from_secs(15), |t| t.contains("ct_counters"));
    assert!(up, "no status block:\n{text}");
    let mut c = lab.client(6);
    let reset = c.unnat_all(Duration::from_millis(1000));
    assert_eq!(reset.len(), 6, "every connection reset");
    let (summed, text) = pane.wait_for(Duration::from_secs(6), |t| {
        t.contains("so far: 6 resets, 1 client")
    });
    assert!(summed, "no group summary of the six resets:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    let findings: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains(" unnated_reply ") && l.contains(CLIENT_IP))
        .collect();
    assert_eq!(findings.len(), 3, "three lines, then the summary:\n{text}");
    for l in &findings {
        let cols: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(cols[3], format!("{VIP}:2222"), "{l}");
        assert_eq!(cols[4], format!("{}:2222", BACKENDS[0]), "{l}");
        assert!(cols[6].starts_with("INVALID"), "{l}");
    }
    assert_eq!(text.matches("fix: ").count(), 1, "the remedy once:\n{text}");
    // Nothing wrapped, the status block included: joining wrapped lines
    // changes nothing.
    let lines = |t: &str| -> Vec<String> { t.lines().map(|l| l.trim_end().to_string()).collect() };
    assert!(text.contains("  nat_mapping "), "{text}");
    assert_eq!(lines(&text), lines(&pane.capture(true)), "a line wrapped");
    pane.keep("watch", &text);
    pane.keys(&["C-c"]);
    pane.assert_restored();
}

/// `ktrace watch --tui` during the same incident: the row names the
/// Service and the backend with the right count; `q` restores the terminal.
#[test]
fn dashboard_in_a_terminal_names_the_incident_and_quits_on_q() {
    if skip() || tmux_missing() {
        return;
    }
    let mut lab = Lab::new("td", 1);
    lab.start_server();
    let pane = Pane::start("tui", Some(&lab.node), &["watch", "--tui"], None);
    let (up, text) = pane.wait_for(Duration::from_secs(15), |t| {
        t.contains("hooks live: tcp_send_reset")
    });
    assert!(up, "no dashboard:\n{text}");
    let mut c = lab.client(4);
    let reset = c.unnat_all(Duration::from_millis(1000));
    assert_eq!(reset.len(), 4);
    let want = reset.len().to_string();
    let (shown, text) = pane.wait_for(Duration::from_secs(5), |t| {
        row(t, "unnated_reply").is_some_and(|r| r.get(4) == Some(&want))
    });
    assert!(shown, "no row with {want} resets:\n{text}");
    let r = row(&text, "unnated_reply").unwrap();
    assert_eq!(r[0], "ERR", "{text}");
    assert_eq!(r[2], format!("{VIP}:2222"), "{text}");
    assert_eq!(r[3], format!("{}:2222", BACKENDS[0]), "{text}");
    assert_eq!(r[5], "1", "one client IP: {text}");
    assert!(
        text.contains("remedy:   set net.netfilter.nf_conntrack_tcp_be_liberal=1"),
        "{text}"
    );
    assert!(text.contains("cause:    INVALID"), "{text}");
    pane.keep("watch-tui", &text);
    pane.keys(&["q"]);
    pane.assert_restored();
}

/// The detail pane's `names:` line, its borders stripped (the header's
/// `names:` line, about the sources, has no border).
fn names_line(text: &str) -> Option<&str> {
    let l = text.lines().find(|l| l.contains("│names:"))?;
    let (_, rest) = l.split_once("│names:")?;
    Some(rest.trim_end_matches(['│', ' ']).trim_start())
}

/// Waits for the incident row with `resets` resets, then checks what the
/// dashboard says of it: the Service by its kube-proxy name in the table,
/// the backend by its address (the rules name no Pod), and the `names:`
/// line of the detail pane (nothing names the client). The screen's text.
fn assert_names_shown(pane: &Pane, resets: usize) -> String {
    let want = resets.to_string();
    let (shown, text) = pane.wait_for(Duration::from_secs(5), |t| {
        row(t, "unnated_reply").is_some_and(|r| r.get(4) == Some(&want))
    });
    assert!(shown, "no row with {want} resets:\n{text}");
    let r = row(&text, "unnated_reply").unwrap();
    assert_eq!(r[2], SERVICE, "the Service by its name:\n{text}");
    assert_eq!(r[3], format!("{}:2222", BACKENDS[0]), "{text}");
    assert_eq!(
        names_line(&text),
        Some(format!("Service {SERVICE}").as_str()),
        "{text}"
    );
    text
}

/// `watch --tui --record` on a node whose Service kube-proxy installed
/// (iptables mode, the names in its rules' comments), during the un-NATed
/// reply incident: the table and the detail pane name the Service. Then
/// `replay --tui` of the recording, outside the node (no rules to read),
/// shows the same names, from the recording.
#[test]
fn dashboard_names_the_service_from_kube_proxy_rules_live_and_replayed() {
    if skip() || tmux_missing() {
        return;
    }
    let mut lab = kube_proxy::lab_with_rules(
        "tk",
        IPTABLES_RESTORE,
        &kube_proxy::iptables_rules(BACKENDS[0]),
    );
    lab.start_server();
    let scratch = Scratch::new("tui-names");
    let rec = scratch.path("names.ktr");
    let args = ["watch", "--tui", "--record", &rec];
    let pane = Pane::start("tuinames", Some(&lab.node), &args, None);
    let (up, text) = pane.wait_for(Duration::from_secs(15), |t| {
        t.contains("hooks live: tcp_send_reset")
    });
    assert!(up, "no dashboard:\n{text}");
    let mut c = lab.client(3);
    assert_eq!(c.unnat_all(Duration::from_millis(1000)).len(), 3);
    let text = assert_names_shown(&pane, 3);
    // The header says where the names come from.
    assert!(
        text.contains("names: kube-proxy-rules live (iptables): 1 services"),
        "{text}"
    );
    pane.keep("watch-tui-names", &text);
    pane.keys(&["q"]);
    pane.assert_restored();

    let pane = Pane::start("tuinamesreplay", None, &["replay", "--tui", &rec], None);
    let (up, text) = pane.wait_for(Duration::from_secs(10), |t| t.contains("incidents (1)"));
    assert!(up, "{text}");
    let text = assert_names_shown(&pane, 3);
    assert!(
        text.contains("names: as the recording stored them"),
        "{text}"
    );
    pane.keys(&["q"]);
    pane.assert_restored();
}

/// SIGINT (as `kill -INT` or a service manager sends it) stops the
/// dashboard and gives the terminal back as it was.
#[test]
fn dashboard_restores_the_terminal_on_sigint() {
    if skip() || tmux_missing() {
        return;
    }
    let lab = Lab::new("ts", 1);
    let pane = Pane::start("sigint", Some(&lab.node), &["watch", "--tui"], None);
    let (up, text) = pane.wait_for(Duration::from_secs(15), |t| t.contains("hooks live:"));
    assert!(up, "no dashboard:\n{text}");
    pane.interrupt();
    pane.assert_restored();
}

fn fixtures() -> String {
    ktrace_tests::workspace()
        .join("ktrace-user/tests/fixtures/replay")
        .display()
        .to_string()
}

/// `replay --tui` of the golden recording: the three incident groups with
/// their counts at the end, none at the start, a step forward; `q` quits.
#[test]
fn replay_dashboard_steps_through_the_recording() {
    if tmux_missing() {
        return;
    }
    let dir = fixtures();
    let pane = Pane::start("replay", None, &["replay", "--tui", "lab.rec"], Some(&dir));
    let (up, text) = pane.wait_for(Duration::from_secs(10), |t| t.contains("incidents (3)"));
    assert!(up, "{text}");
    let service = format!("{VIP}:2222");
    let backend = format!("{}:2222", BACKENDS[0]);
    for (kind, count) in [
        ("unnated_reply", "5"),
        ("backend_switch", "2"),
        ("rst_storm", "12"),
    ] {
        let r = row(&text, kind).unwrap_or_else(|| panic!("no {kind} row:\n{text}"));
        assert_eq!(
            (&r[2], &r[3], r[4].as_str()),
            (&service, &backend, count),
            "{kind}: {text}"
        );
    }
    pane.keep("replay-tui", &text);
    pane.keys(&["Home"]);
    let (empty, text) = pane.wait_for(Duration::from_secs(3), |t| t.contains("incidents (0)"));
    assert!(empty, "nothing at the start:\n{text}");
    pane.keys(&["Right"]);
    let (stepped, text) = pane.wait_for(Duration::from_secs(3), |t| t.contains("(+1.0s of 3.6s)"));
    assert!(stepped, "{text}");
    assert!(
        row(&text, "backend_switch").is_some(),
        "the flush is in the first second:\n{text}"
    );
    pane.keys(&["q"]);
    pane.assert_restored();
}

/// The plain replay in a 120-column terminal: nothing wraps, the remedy
/// once per group (three groups).
#[test]
fn plain_replay_in_a_terminal_fits_120_columns() {
    if tmux_missing() {
        return;
    }
    let dir = fixtures();
    let pane = Pane::start("plainreplay", None, &["replay", "lab.rec"], Some(&dir));
    let (done, text) = pane.wait_for(Duration::from_secs(10), |t| t.contains("ktrace exited"));
    assert!(done, "{text}");
    assert!(text.contains("ktrace exited 0"), "{text}");
    let from_header = |t: &str| -> Vec<String> {
        t.lines()
            .skip_while(|l| !l.starts_with("TIME "))
            .map(|l| l.trim_end().to_string())
            .collect()
    };
    assert!(!from_header(&text).is_empty(), "{text}");
    assert_eq!(
        from_header(&text),
        from_header(&pane.capture(true)),
        "a line wrapped"
    );
    assert_eq!(text.matches("fix: ").count(), 3, "{text}");
    assert!(
        text.contains("so far: 5 resets, 1 client, since 23:54:58"),
        "{text}"
    );
}
