//! `cargo xtask vmtest`: the kernel-dependent tests on stock distribution
//! kernels, booted under QEMU.
//!
//! For each package of [`KERNEL_PACKAGES`]:
//! 1. `apt-get download` the package into the cache (once), `dpkg-deb -x`
//!    it and run `depmod` on the extracted tree (once);
//! 2. build a small initramfs: static busybox, the modules that mount the
//!    host's root over 9p (read-only) under a tmpfs overlay, and
//!    `tests/vm/init.sh` as `/init`;
//! 3. boot it under QEMU (TCG unless `KTRACE_VM_ACCEL=kvm`); the guest
//!    switches to the host's userland (python3, iproute2, iptables, ipvsadm,
//!    conntrack, the ktrace and test binaries built here, all at the same
//!    paths), runs `tests/vm/guest.sh`, which loads the modules, prints the
//!    hooks ktrace attached and runs the `vm` test binary (tests/vm/guest.rs);
//! 4. watches the console: a kernel panic (lockups and hung tasks panic too,
//!    see [`KERNEL_CMDLINE`]), silence or overrunning the time limit kill
//!    the guest and fail the run with the reason.
//!
//! Prints one line per kernel: PASS/FAIL, wall time, hooks attached.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{cargo, json_str, run_status, run_stdout, workspace, Built};

/// Kernel packages to test, fetched with `apt-get download` (exact names,
/// never a wildcard). Adding a kernel is adding a line.
pub const KERNEL_PACKAGES: &[&str] = &[
    // Debian 12's stock kernel: kprobes, BTF (vmlinux and modules), conntrack and IPVS as modules.
    "linux-image-6.1.0-56-amd64",
    // Debian 12's backported 6.12: the >= 6.10 `tcp_send_reset` tracepoint
    // (with `reason`, firing for no-socket resets) together with kprobes and IPVS.
    "linux-image-6.12.117+deb12-amd64",
];

/// Host packages the VM test needs: QEMU, the initramfs tools, and the
/// userland the guest borrows from this machine.
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "xz-utils",
    "ipvsadm",
    "iproute2",
    "iptables",
    "conntrack",
    "python3",
];

/// Modules the initramfs loads (with their dependencies) to mount the host root.
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// `panic=-1` with `-no-reboot` makes QEMU exit on a panic; oopses, soft
/// lockups and hung tasks are made panics so that they end the run at once.
const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1 oops=panic softlockup_panic=1 \
     hung_task_panic=1 hung_task_timeout_secs=120 mitigations=off";

/// Console lines that announce the guest's reports (see tests/vm/guest.sh).
const MARK_HOOKS: &str = "KTRACE-VM-HOOKS ";
const MARK_RESULT: &str = "KTRACE-VM-RESULT ";

fn env_secs(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number of seconds")),
        Err(_) => Ok(default),
    }
}

fn cache_dir() -> PathBuf {
    std::env::var_os("KTRACE_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".cache/vm"))
}

/// The console logs the last run left, one per kernel package.
pub fn console_logs() -> Vec<(&'static str, PathBuf)> {
    KERNEL_PACKAGES
        .iter()
        .map(|k| (*k, cache_dir().join(k).join("console.log")))
        .filter(|(_, p)| p.exists())
        .collect()
}

pub fn vmtest(built: &Built, only: &[String]) -> Result<()> {
    let started = Instant::now();
    for k in only {
        if !KERNEL_PACKAGES.contains(&k.as_str()) {
            bail!(
                "--kernel {k}: not in KERNEL_PACKAGES ({}); add it there",
                KERNEL_PACKAGES.join(", ")
            );
        }
    }
    let kernels: Vec<&str> = KERNEL_PACKAGES
        .iter()
        .copied()
        .filter(|k| only.is_empty() || only.iter().any(|o| o == k))
        .collect();
    let timeout = env_secs("KTRACE_VM_TIMEOUT", 600)?;
    let silence = env_secs("KTRACE_VM_SILENCE", 240)?;
    let kvm = match std::env::var("KTRACE_VM_ACCEL").as_deref() {
        Ok("kvm") => true,
        Ok("tcg") | Err(_) => false,
        Ok(other) => bail!("KTRACE_VM_ACCEL={other:?}: use tcg or kvm"),
    };
    if euid() != 0 {
        bail!(
            "vmtest must run as root (apt-get, and the guest shares this machine's root read-only)"
        );
    }
    ensure_host_packages()?;
    let testbin = build_guest_tests()?;
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    // The guest runs copies: a concurrent `cargo build` in this workspace
    // must not swap the binaries under a running guest.
    let bin = cache.join("bin");
    std::fs::create_dir_all(&bin)?;
    let ktrace = bin.join("ktrace");
    let testbin = {
        let copy = bin.join("vm-tests");
        copy_exe(&testbin, &copy)?;
        copy_exe(&built.ktrace, &ktrace)?;
        copy
    };
    let built = &Built { ktrace };

    let mut lines = Vec::new();
    let mut failed = 0;
    for pkg in &kernels {
        let t = Instant::now();
        let outcome = prepare_kernel(&cache, pkg).and_then(|k| {
            let initramfs = build_initramfs(&k, built, &testbin, timeout)?;
            boot(&k, &initramfs, timeout, silence, kvm)
        });
        let secs = t.elapsed().as_secs_f64();
        let line = match outcome {
            Ok(o) if o.passed => format!(
                "vmtest {pkg} ({}): PASS in {secs:.0}s; hooks: {}",
                o.release,
                o.hooks.as_deref().unwrap_or("?")
            ),
            Ok(o) => {
                failed += 1;
                format!(
                    "vmtest {pkg} ({}): FAIL in {secs:.0}s: {}; hooks: {}; console log: {}",
                    o.release,
                    o.reason,
                    o.hooks.as_deref().unwrap_or("not reported"),
                    o.log.display()
                )
            }
            Err(e) => {
                failed += 1;
                format!("vmtest {pkg}: FAIL in {secs:.0}s: {e:#}")
            }
        };
        println!("{line}");
        lines.push(line);
    }
    eprintln!(
        "xtask: vmtest summary ({:.0}s in all):",
        started.elapsed().as_secs_f64()
    );
    for l in &lines {
        eprintln!("  {l}");
    }
    if failed > 0 {
        bail!("vmtest: {failed} of {} kernel(s) failed", kernels.len());
    }
    Ok(())
}

/// Copies an executable (replacing `to` by rename, so a running copy is not touched).
fn copy_exe(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

fn euid() -> u32 {
    // Without libc: the owner of /proc/self is the effective uid.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_get(args: &[&str], dir: Option<&Path>) -> Result<()> {
    let mut c = Command::new("apt-get");
    c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    if let Some(d) = dir {
        c.current_dir(d);
    }
    run_status(&mut c, &format!("apt-get {}", args.join(" ")))
}

/// Runs an apt-get command; if it fails (stale package lists), runs
/// `apt-get update` once and tries again.
fn apt_get_retry(args: &[&str], dir: Option<&Path>) -> Result<()> {
    if apt_get(args, dir).is_ok() {
        return Ok(());
    }
    eprintln!("xtask: retrying after apt-get update");
    apt_get(&["update", "-qq"], None)?;
    apt_get(args, dir)
}

fn ensure_host_packages() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(&missing);
    apt_get_retry(&args, None)
}

/// Builds the guest test binary (tests/vm/guest.rs) and returns its path.
fn build_guest_tests() -> Result<PathBuf> {
    let out = run_stdout(
        cargo().args([
            "test",
            "-p",
            "ktrace-tests",
            "--test",
            "vm",
            "--release",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ]),
        "building the guest tests (cargo test -p ktrace-tests --test vm --no-run)",
    )?;
    out.lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"name\":\"vm\""))
        .find_map(|l| json_str(l, "executable"))
        .map(PathBuf::from)
        .context("cargo did not report the executable of the vm test")
}

/// An extracted kernel package.
struct Kernel {
    release: String,
    /// The package's files (`boot/`, `lib/modules/<release>/`).
    root: PathBuf,
    vmlinuz: PathBuf,
    dir: PathBuf,
}

/// Downloads, extracts and indexes `pkg` once; later runs reuse the cache.
fn prepare_kernel(cache: &Path, pkg: &str) -> Result<Kernel> {
    let dir = cache.join(pkg);
    let root = dir.join("root");
    let stamp = dir.join(".prepared");
    std::fs::create_dir_all(&dir)?;
    if !stamp.exists() {
        let deb = match find_deb(&dir, pkg)? {
            Some(d) => d,
            None => {
                eprintln!("xtask: apt-get download {pkg}");
                apt_get_retry(&["download", "-q", pkg], Some(&dir))?;
                find_deb(&dir, pkg)?.with_context(|| {
                    format!("apt-get download {pkg} left no .deb in {}", dir.display())
                })?
            }
        };
        eprintln!("xtask: extracting {}", deb.display());
        let tmp = dir.join("root.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_dir_all(&root);
        run_status(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp),
            "dpkg-deb -x",
        )?;
        std::fs::rename(&tmp, &root)?;
        let release = release_of(&root)?;
        // The .deb ships no modules.dep: index the modules for modprobe.
        run_status(
            Command::new("depmod").arg("-b").arg(&root).arg(&release),
            "depmod",
        )?;
        std::fs::write(&stamp, deb.file_name().unwrap().as_encoded_bytes())?;
    }
    let release = release_of(&root)?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!(
            "{} missing: delete {} and run again",
            vmlinuz.display(),
            dir.display()
        );
    }
    Ok(Kernel {
        release,
        root,
        vmlinuz,
        dir,
    })
}

fn find_deb(dir: &Path, pkg: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{pkg}_");
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(dir.join(name)));
        }
    }
    Ok(None)
}

fn release_of(root: &Path) -> Result<String> {
    let mods = root.join("lib/modules");
    let mut found = Vec::new();
    for e in std::fs::read_dir(&mods).with_context(|| format!("reading {}", mods.display()))? {
        found.push(e?.file_name().to_string_lossy().into_owned());
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kernel release in {}, found {found:?}",
            mods.display()
        ),
    }
}

/// Quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Copies one kernel module, decompressing an `.xz` or `.zst` one.
fn copy_module(from: &Path, to: &Path) -> Result<()> {
    let tool = match from.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        _ => {
            std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
            return Ok(());
        }
    };
    let out = std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    run_status(
        Command::new(tool).args(["-dc"]).arg(from).stdout(out),
        &format!("{tool} -dc {}", from.display()),
    )
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Builds `<kernel dir>/initramfs.cpio`: busybox, the 9p/overlay modules,
/// `/init` (tests/vm/init.sh) and `/vmtest.env` (what the guest runs).
fn build_initramfs(k: &Kernel, built: &Built, testbin: &Path, timeout: u64) -> Result<PathBuf> {
    let stage = k.dir.join("initramfs.d");
    let _ = std::fs::remove_dir_all(&stage);
    for d in [
        "bin", "modules", "proc", "sys", "dev", "lower", "rw", "newroot",
    ] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    std::fs::copy("/bin/busybox", stage.join("bin/busybox"))
        .context("copying /bin/busybox (busybox-static)")?;

    // The modules in load order, from modprobe's view of the extracted tree.
    let deps = run_stdout(
        Command::new("modprobe")
            .args(["-a", "--show-depends", "-d"])
            .arg(&k.root)
            .args(["-S", &k.release])
            .args(INITRAMFS_MODULES),
        "modprobe --show-depends",
    )?;
    let mut order: Vec<String> = Vec::new();
    for line in deps.lines() {
        let mut w = line.split_whitespace();
        if w.next() != Some("insmod") {
            continue; // "builtin NAME": nothing to load
        }
        let Some(path) = w.next() else { continue };
        let name = Path::new(path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        // busybox's insmod takes plain .ko files: newer packages (6.12)
        // compress their modules.
        let name = name
            .strip_suffix(".xz")
            .or_else(|| name.strip_suffix(".zst"))
            .map_or(name.clone(), str::to_string);
        if !order.contains(&name) {
            copy_module(Path::new(path), &stage.join("modules").join(&name))?;
            order.push(name);
        }
    }

    let ws = workspace();
    let init = ws.join("tests/vm/init.sh");
    std::fs::copy(&init, stage.join("init"))
        .with_context(|| format!("copying {}", init.display()))?;
    let modules = k.root.join("lib/modules").join(&k.release);
    let vars = [
        ("KTRACE_VM_RELEASE", k.release.clone()),
        ("KTRACE_VM_INSMOD", order.join(" ")),
        ("KTRACE_VM_MODULES", path_str(&modules)?.to_string()),
        (
            "KTRACE_VM_STAGE2",
            path_str(&ws.join("tests/vm/guest.sh"))?.to_string(),
        ),
        ("KTRACE_VM_WORKSPACE", path_str(&ws)?.to_string()),
        ("KTRACE_VM_TESTBIN", path_str(testbin)?.to_string()),
        // The guest kills its own tests before the host kills the guest.
        (
            "KTRACE_VM_TEST_TIMEOUT",
            timeout.saturating_sub(90).max(60).to_string(),
        ),
        ("KTRACE_BIN", path_str(&built.ktrace)?.to_string()),
    ];
    let env: String = vars
        .iter()
        .map(|(k, v)| format!("{k}={}\n", sh_quote(v)))
        .collect();
    std::fs::write(stage.join("vmtest.env"), env)?;

    let out = k.dir.join("initramfs.cpio");
    let file = std::fs::File::create(&out)?;
    run_status(
        Command::new("sh")
            .args(["-c", "find . | LC_ALL=C sort | cpio -o -H newc --quiet"])
            .current_dir(&stage)
            .stdout(file),
        "cpio",
    )?;
    Ok(out)
}

struct Outcome {
    release: String,
    passed: bool,
    reason: String,
    hooks: Option<String>,
    log: PathBuf,
}

enum Line {
    Out(String),
    Err(String),
}

fn reader<R: Read + Send + 'static>(r: R, tx: mpsc::Sender<Line>, err: bool) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let s = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .replace('\r', "");
                    if tx
                        .send(if err { Line::Err(s) } else { Line::Out(s) })
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The QEMU command line: the host's root read-only, the console on stdio.
fn qemu(k: &Kernel, initramfs: &Path, kvm: bool) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    if kvm {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]);
    }
    cmd.args(["-m", "1024", "-smp", "2", "-kernel"])
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", KERNEL_CMDLINE])
        .args([
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        // The host's root, read-only; the guest puts a tmpfs overlay on it.
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Passed, or why not, from the guest's panic line, its result line and
/// how the run ended.
fn verdict(
    panic: Option<String>,
    result: Option<String>,
    failure: Option<String>,
) -> (bool, String) {
    let mut reason = String::new();
    let passed = match (&panic, &result, &failure) {
        (Some(p), _, _) => {
            reason = format!("guest kernel panic: {p}");
            false
        }
        (None, _, Some(f)) if result.as_deref() != Some("PASS") => {
            reason = f.clone();
            false
        }
        (None, Some(r), _) if r == "PASS" => true,
        (None, Some(r), _) => {
            reason = r
                .strip_prefix("FAIL")
                .unwrap_or(r)
                .trim()
                .trim_start_matches(':')
                .trim()
                .to_string();
            false
        }
        (None, None, _) => {
            reason = "the guest powered off without reporting a result".into();
            false
        }
    };
    (passed, reason)
}

/// Boots the kernel and follows its console until the guest powers off,
/// panics, goes silent for `silence` seconds or runs past `timeout`.
fn boot(k: &Kernel, initramfs: &Path, timeout: u64, silence: u64, kvm: bool) -> Result<Outcome> {
    let log_path = k.dir.join("console.log");
    let mut log = std::fs::File::create(&log_path)?;
    let mut cmd = qemu(k, initramfs, kvm);
    eprintln!(
        "xtask: booting {} under QEMU ({}), limits {timeout}s in all / {silence}s silent; console: {}",
        k.release,
        if kvm { "KVM" } else { "TCG" },
        log_path.display()
    );
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    reader(child.stdout.take().unwrap(), tx.clone(), false);
    reader(child.stderr.take().unwrap(), tx, true);

    let start = Instant::now();
    let deadline = start + Duration::from_secs(timeout);
    let mut last_output = Instant::now();
    let mut hooks = None;
    let mut result: Option<String> = None;
    let mut panic: Option<String> = None;
    let mut kill_at: Option<Instant> = None;
    let failure = loop {
        let now = Instant::now();
        if let Some(t) = kill_at {
            if now >= t {
                kill(&mut child);
                break None;
            }
        }
        if now >= deadline {
            kill(&mut child);
            break Some(format!(
                "guest still running after {timeout}s (KTRACE_VM_TIMEOUT): killed"
            ));
        }
        let silent_until = last_output + Duration::from_secs(silence);
        if now >= silent_until {
            kill(&mut child);
            break Some(format!(
                "guest hung: no console output for {silence}s (KTRACE_VM_SILENCE): killed"
            ));
        }
        let wait = deadline.min(silent_until).min(kill_at.unwrap_or(deadline)) - now;
        match rx.recv_timeout(wait) {
            Ok(Line::Out(l)) => {
                last_output = Instant::now();
                let _ = writeln!(log, "{l}");
                println!("  | {l}");
                if let Some(rest) = l.find(MARK_HOOKS).map(|i| &l[i + MARK_HOOKS.len()..]) {
                    hooks = Some(rest.trim().to_string());
                } else if let Some(rest) = l.find(MARK_RESULT).map(|i| &l[i + MARK_RESULT.len()..])
                {
                    result = Some(rest.trim().to_string());
                } else if l.contains("Kernel panic") && panic.is_none() {
                    panic = Some(l.trim().to_string());
                    // Let the backtrace reach the log, then stop the guest.
                    kill_at = Some(Instant::now() + Duration::from_secs(5));
                }
            }
            Ok(Line::Err(l)) => {
                let _ = writeln!(log, "qemu: {l}");
                // -cpu max under TCG warns about every feature it lacks.
                if !l.contains("TCG doesn't support requested feature") {
                    eprintln!("  | qemu: {l}");
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let status = child.wait()?;
                break if status.success() {
                    None
                } else {
                    Some(format!("qemu exited with {status}"))
                };
            }
        }
    };
    let (passed, reason) = verdict(panic, result, failure);
    Ok(Outcome {
        release: k.release.clone(),
        passed,
        reason,
        hooks,
        log: log_path,
    })
}
