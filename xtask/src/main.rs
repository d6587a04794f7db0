//! `cargo xtask`: ktrace's build and test entry points.
//!
//! - `cargo xtask build`: the eBPF object and the `ktrace` binary, release.
//! - `cargo xtask dist`: a static x86_64 `ktrace` with the eBPF object
//!   inside, at `target/dist/ktrace` (see `dist.rs`).
//! - `cargo xtask image`: `dist`, then an OCI image of it (buildah, from
//!   scratch) at `target/dist/ktrace-image.tar`.
//! - `cargo xtask test [--no-vm]`: `build`, `image`, then `cargo test --workspace --release --
//!   --test-threads=1` on this machine's kernel, then `vmtest` with the static binary.
//! - `cargo xtask vmtest [--kernel PACKAGE]...`: boots stock distribution
//!   kernels under QEMU and runs the kernel-dependent tests inside them
//!   (see `vm.rs` and docs/vmtest.md).

mod dist;
mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  build                        build the eBPF object and target/release/ktrace
  dist                         a static x86_64 ktrace with the eBPF object inside: target/dist/ktrace
  image                        dist, then an OCI image of it from scratch (buildah): target/dist/ktrace-image.tar
  test [--no-vm]               build, image, cargo test --workspace --release -- --test-threads=1, then vmtest
  vmtest [--kernel PACKAGE]... boot stock kernels under QEMU and run the kernel tests inside
                               (default: every package in xtask/src/vm.rs KERNEL_PACKAGES)

environment (vmtest):
  KTRACE_VM_CACHE      cache directory (default: <workspace>/.cache/vm)
  KTRACE_VM_TIMEOUT    seconds a guest may run in all (default 600)
  KTRACE_VM_SILENCE    seconds a guest may print nothing before it counts as hung (default 240)
  KTRACE_VM_ACCEL      tcg (default) or kvm";

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    match cmd.as_str() {
        "build" => {
            no_args(rest)?;
            build().map(|_| ())
        }
        "dist" => {
            no_args(rest)?;
            dist::dist().map(|_| ())
        }
        "image" => {
            no_args(rest)?;
            dist::dist().and_then(|bin| dist::image(&bin)).map(|_| ())
        }
        "test" => {
            let mut vm = true;
            for a in rest {
                match a.as_str() {
                    "--no-vm" => vm = false,
                    _ => usage_error(&format!("unknown argument {a:?} to test")),
                }
            }
            test(vm)
        }
        "vmtest" => {
            let kernels = parse_kernels(rest);
            vmtest(&kernels)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => usage_error(&format!("unknown command {other:?}")),
    }
}

fn usage_error(msg: &str) -> ! {
    eprintln!("xtask: {msg}\n\n{USAGE}");
    std::process::exit(2);
}

fn no_args(rest: &[String]) -> Result<()> {
    if let Some(a) = rest.first() {
        usage_error(&format!("unexpected argument {a:?}"));
    }
    Ok(())
}

fn parse_kernels(rest: &[String]) -> Vec<String> {
    let mut kernels = Vec::new();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kernel" => match it.next() {
                Some(k) => kernels.push(k.clone()),
                None => usage_error("--kernel needs a package name"),
            },
            _ => usage_error(&format!("unknown argument {a:?} to vmtest")),
        }
    }
    kernels
}

/// The workspace root (this crate lives in `<root>/xtask`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// The cargo that runs us (the toolchain of `cargo xtask`), else `cargo` on PATH.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace());
    c
}

/// Runs `cmd`, inheriting stdio; fails with `what` when it does not succeed.
pub fn run_status(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Test counts summed over cargo's `test result:` lines, with the tests that
/// found at run time that they cannot run here (see [`Counts::add_skips`]).
#[derive(Default, Clone)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// `name: reason` of each test that skipped at run time.
    pub skipped: Vec<String>,
    /// Names of the `#[ignore]`d tests: manual benchmarks, run by name.
    pub ignored_names: Vec<String>,
}

/// Console lines of a guest that name a test it skipped (tests/vm/guest.sh).
pub const MARK_SKIP: &str = "KTRACE-VM-SKIP ";

impl Counts {
    /// Adds the skips a test binary recorded (`name\treason` lines, written by
    /// `ktrace_tests::record_skip`): libtest counted them as passed, so they
    /// move from passed to skipped.
    pub fn add_skips(&mut self, text: &str) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (name, why) = line.split_once('\t').unwrap_or((line, "no reason given"));
            self.skipped.push(format!("{name}: {why}"));
            self.passed = self.passed.saturating_sub(1);
        }
    }

    /// The closing line CI reads, after one line per test that did not run.
    /// `#[ignore]`d tests are manual benchmarks, not tests that could not
    /// run: they are named on their own line, not counted as skipped.
    pub fn print_closing(&self) {
        for s in &self.skipped {
            println!("skipped: {s}");
        }
        if self.ignored > 0 {
            println!(
                "not run: {} #[ignore]d manual benchmark(s), run by name: {}",
                self.ignored,
                self.ignored_names.join(", ")
            );
        }
        println!(
            "tests: {} passed, {} failed, {} skipped",
            self.passed,
            self.failed,
            self.skipped.len()
        );
    }

    /// Adds a `test result: ok. 5 passed; 0 failed; 1 ignored; ...` line,
    /// or notes the name of a `test NAME ... ignored` one.
    pub fn add_line(&mut self, line: &str) {
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.split_once(" ... ignored"))
            .map(|(name, _)| name)
        {
            self.ignored_names.push(name.to_string());
            return;
        }
        let Some(rest) = line
            .trim_start_matches(|c: char| !c.is_ascii_alphabetic())
            .strip_prefix("test result: ")
        else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut w = part.split_whitespace();
            if let (Some(n), Some(what)) = (w.next(), w.next()) {
                if let Ok(n) = n.parse::<u64>() {
                    match what {
                        "passed" => self.passed += n,
                        "failed" => self.failed += n,
                        "ignored" => self.ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Runs `cmd`, echoing its stdout, and counts the tests it reports.
pub fn run_counting(cmd: &mut Command, what: &str, counts: &mut Counts) -> Result<()> {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    let out = child.stdout.take().expect("piped stdout");
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        counts.add_line(&line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` with stdout captured (stderr inherited) and returns stdout.
pub fn run_stdout(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The string value of `"key":"..."` in one line of cargo's JSON messages.
/// (Cargo escapes only quotes, backslashes and control characters, which
/// the paths read here do not contain.)
pub fn json_str<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let start = line.find(&pat)? + pat.len();
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

pub struct Built {
    /// target/release/ktrace
    pub ktrace: PathBuf,
}

/// `cargo xtask build`: the eBPF object (built by ktrace-user/build.rs with
/// Debian's rustc and bpf-linker) and the release `ktrace` binary. Fails when
/// the object came out empty (build.rs leaves it empty, with a warning, when
/// the eBPF toolchain is missing).
pub fn build() -> Result<Built> {
    let t = Instant::now();
    eprintln!("xtask: building the eBPF object and target/release/ktrace");
    let out = run_stdout(
        cargo().args([
            "build",
            "--release",
            "-p",
            "ktrace",
            "--message-format=json-render-diagnostics",
        ]),
        "cargo build --release -p ktrace",
    )?;
    let mut object = None;
    let mut exe = None;
    for line in out.lines() {
        let ours = line.contains("/ktrace-user#") || line.contains("ktrace-user)");
        if !ours {
            continue;
        }
        if line.contains("\"reason\":\"build-script-executed\"") {
            object = json_str(line, "out_dir").map(|d| Path::new(d).join("ktrace.bpf.o"));
        }
        if line.contains("\"reason\":\"compiler-artifact\"") {
            if let Some(e) = json_str(line, "executable") {
                exe = Some(PathBuf::from(e));
            }
        }
    }
    let object = object.context("cargo did not report ktrace's build script output directory")?;
    let size = std::fs::metadata(&object).map(|m| m.len()).unwrap_or(0);
    if size == 0 {
        bail!(
            "the eBPF object {} is empty: the eBPF toolchain is missing (see the cargo warning above); run scripts/setup.sh",
            object.display()
        );
    }
    let ktrace = exe.unwrap_or_else(|| workspace().join("target/release/ktrace"));
    if !ktrace.exists() {
        bail!("{} was not built", ktrace.display());
    }
    eprintln!(
        "xtask: built {} (eBPF object {} bytes) in {:.1}s",
        ktrace.display(),
        size,
        t.elapsed().as_secs_f64()
    );
    Ok(Built { ktrace })
}

/// `cargo xtask test`: build; the workspace tests on this machine's kernel
/// (serially: kernel hooks are global); then `vmtest` unless `--no-vm`.
fn test(vm: bool) -> Result<()> {
    let built = build()?;
    // What ships: the tests load the image into podman (tests/tests/image.rs)
    // and the VM runs the static binary.
    let static_bin = dist::dist()?;
    let image = dist::image(&static_bin)?;
    let t = Instant::now();
    eprintln!(
        "xtask: cargo test --workspace --release -- --test-threads=1 (KTRACE_BIN={}, KTRACE_IMAGE={})",
        built.ktrace.display(),
        image.display()
    );
    let mut counts = Counts::default();
    // Tests that cannot run here say so in this file (ktrace_tests::record_skip).
    let skip_log = workspace().join("target/test-skips.log");
    let _ = std::fs::remove_file(&skip_log);
    let host = run_counting(
        cargo()
            // --release reuses the dependencies `build` just compiled
            // instead of building them all again in the debug profile.
            .args(["test", "--workspace", "--release", "--", "--test-threads=1"])
            .env("KTRACE_BIN", &built.ktrace)
            .env("KTRACE_IMAGE", &image)
            .env("KTRACE_SKIP_LOG", &skip_log),
        "cargo test --workspace",
        &mut counts,
    );
    counts.add_skips(&std::fs::read_to_string(&skip_log).unwrap_or_default());
    if let Err(e) = host {
        counts.failed = counts.failed.max(1);
        counts.print_closing();
        return Err(e);
    }
    eprintln!(
        "xtask: host tests passed in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    if vm {
        let r = vm::vmtest(&Built { ktrace: static_bin }, &[]);
        // The guests' own test results, from their console logs.
        for (kernel, log) in vm::console_logs() {
            if let Ok(text) = std::fs::read_to_string(log) {
                text.lines().for_each(|l| counts.add_line(l));
                let skips: Vec<String> = text
                    .lines()
                    .filter_map(|l| {
                        l.split_once(MARK_SKIP)
                            .map(|(_, s)| format!("{kernel}/{s}"))
                    })
                    .collect();
                counts.add_skips(&skips.join("\n"));
            }
        }
        if let Err(e) = r {
            counts.failed = counts.failed.max(1);
            counts.print_closing();
            return Err(e);
        }
    } else {
        eprintln!("xtask: --no-vm: vmtest skipped");
    }
    // One closing line for whoever reads the log's end (CI among them).
    counts.print_closing();
    Ok(())
}

/// The VM runs the static binary of `dist`: the one a node gets.
fn vmtest(kernels: &[String]) -> Result<()> {
    build()?;
    let ktrace = dist::dist()?;
    vm::vmtest(&Built { ktrace }, kernels)
}
