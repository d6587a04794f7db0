//! Bad flags are usage errors: exit status 2 and one line on stderr, before
//! anything is attached or opened (so these run without root).

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ktrace"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (&["watch", "--ring-buffer-mb", "3"], "power of two"),
        (&["watch", "--ring-buffer-mb", "4096"], "power of two"),
        (
            &["watch", "--ring-buffer-mb", "lots"],
            "not a number of MiB",
        ),
        (&["watch", "--storm-window", "0"], "between 0.001 and 86400"),
        (&["watch", "--storm-window", "-1"], "--storm-window"),
        (&["watch", "--storm-window", "soon"], "not a duration"),
        (&["watch", "--storm-threshold", "0"], "--storm-threshold"),
        (&["watch", "--duration", "-1"], "--duration"),
        (&["watch", "--duration", "nan"], "--duration"),
        (&["watch", "--keep", "3"], "need --record PATH"),
        (&["watch", "--no-such-flag"], "--no-such-flag"),
        (&["watch", "--every-reset=yes"], "--every-reset"),
        (&["replay", "x.rec", "--every-reset"], "--every-reset"),
        (&["record", "--json"], "--output"),
        (
            &["record", "-o", "/tmp/x", "--rotate-size", "1K"],
            "between 4K and 1P",
        ),
        (
            &["record", "-o", "/tmp/x", "--rotate-size", "2E"],
            "between 4K and 1P",
        ),
        (
            &["record", "-o", "/tmp/x", "--rotate-size", "10X"],
            "not a size",
        ),
        (
            &["record", "-o", "/tmp/x", "--rotate-time", "0"],
            "between 1 and",
        ),
        (&["record", "-o", "/tmp/x", "--keep", "0"], "--keep"),
        (
            &["replay", "x.rec", "--storm-window", "0"],
            "--storm-window",
        ),
        (&["replay", "x.rec", "--since", "yesterday"], "--since"),
        (
            &[
                "replay",
                "x.rec",
                "--since",
                "2026-01-02T00:00:00Z",
                "--until",
                "2026-01-01T00:00:00Z",
            ],
            "--since is after --until",
        ),
        (&["doctor", "--sample", "1e9"], "between 0 and 86400"),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, needle) in cases {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("ktrace: ") && stderr.contains(needle),
            "{args:?}: {stderr:?} should mention {needle:?}"
        );
    }
}

#[test]
fn help_and_version_still_print() {
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("ktrace "), "{stdout}");
    let (code, stdout, _) = run(&["watch", "--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("--ring-buffer-mb"), "{stdout}");
}
