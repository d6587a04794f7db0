//! `cargo xtask dist` and `cargo xtask image`: what runs on a node.
//!
//! - `dist`: one statically linked x86_64 `ktrace` (glibc's static
//!   libraries, `+crt-static`; no musl target exists on these machines)
//!   with the eBPF object inside, stripped, at `target/dist/ktrace`. It
//!   needs no toolchain and no shared library on the node; the stock-kernel
//!   VM runs this binary (`vmtest`).
//! - `image`: that binary alone in an OCI image built `FROM scratch` with
//!   buildah (no registry, no daemon), written as an OCI archive at
//!   `target/dist/ktrace-image.tar` and tagged `localhost/ktrace:VERSION`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{cargo, json_str, run_status, run_stdout, workspace};

const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The image's name in local container storage and inside the archive.
pub const IMAGE: &str = concat!("localhost/ktrace:", env!("CARGO_PKG_VERSION"));

fn dist_dir() -> PathBuf {
    workspace().join("target/dist")
}

/// Builds `target/dist/ktrace` (static, stripped) and returns its path.
pub fn dist() -> Result<PathBuf> {
    let t = Instant::now();
    eprintln!("xtask: building a static {TARGET} ktrace (target/{TARGET}/release)");
    // An explicit --target keeps these flags off build scripts and proc
    // macros, which cannot be static; the host build is left as it is.
    let out = run_stdout(
        cargo()
            .args([
                "build",
                "--release",
                "-p",
                "ktrace",
                "--target",
                TARGET,
                "--message-format=json-render-diagnostics",
            ])
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static -C strip=symbols",
            ),
        "cargo build --release -p ktrace --target x86_64-unknown-linux-gnu (static)",
    )?;
    let exe = out
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("ktrace-user"))
        .find_map(|l| json_str(l, "executable"))
        .map(PathBuf::from)
        .context("cargo did not report the static ktrace executable")?;
    let object = out
        .lines()
        .filter(|l| l.contains("\"reason\":\"build-script-executed\"") && l.contains("ktrace-user"))
        .find_map(|l| json_str(l, "out_dir"))
        .map(|d| Path::new(d).join("ktrace.bpf.o"))
        .context("cargo did not report ktrace's build script output directory")?;
    if std::fs::metadata(&object).map(|m| m.len()).unwrap_or(0) == 0 {
        bail!("the eBPF object is empty: the eBPF toolchain is missing; run scripts/setup.sh");
    }
    check_static(&exe)?;
    std::fs::create_dir_all(dist_dir())?;
    let dest = dist_dir().join("ktrace");
    let tmp = dest.with_extension("tmp");
    std::fs::copy(&exe, &tmp).with_context(|| format!("copying {}", exe.display()))?;
    std::fs::rename(&tmp, &dest)?;
    eprintln!(
        "xtask: {} ({} bytes, static, eBPF object inside) in {:.1}s",
        dest.display(),
        std::fs::metadata(&dest)?.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(dest)
}

/// Fails unless `exe` is an ELF with no program interpreter (nothing for
/// a dynamic loader to resolve on the node).
fn check_static(exe: &Path) -> Result<()> {
    let b = std::fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
    };
    if b.get(..5) != Some(b"\x7fELF\x02") {
        bail!("{} is not a 64-bit ELF", exe.display());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{}: truncated ELF header", exe.display());
    };
    for i in 0..usize::from(phnum) {
        let ph = phoff as usize + i * usize::from(phentsize);
        const PT_INTERP: u32 = 3;
        if u32_at(ph) == Some(PT_INTERP) {
            bail!(
                "{} is dynamically linked (it has a program interpreter)",
                exe.display()
            );
        }
    }
    Ok(())
}

fn buildah(args: &[&str], what: &str) -> Result<String> {
    Ok(run_stdout(Command::new("buildah").args(args), what)?
        .trim()
        .to_string())
}

/// Builds the image from `bin` and writes the OCI archive; returns its path.
pub fn image(bin: &Path) -> Result<PathBuf> {
    let t = Instant::now();
    if Command::new("buildah").arg("--version").output().is_err() {
        bail!("buildah is not installed: run scripts/setup.sh");
    }
    let bin = bin.to_str().context("the binary's path is not UTF-8")?;
    let c = buildah(&["from", "scratch"], "buildah from scratch")?;
    let built = (|| -> Result<()> {
        buildah(
            &["copy", "--chmod", "0755", &c, bin, "/ktrace"],
            "buildah copy",
        )?;
        // Root inside (the DaemonSet grants the capabilities), no shell:
        // the entrypoint is ktrace itself.
        buildah(
            &[
                "config",
                "--entrypoint",
                r#"["/ktrace"]"#,
                "--cmd",
                r#"["watch","--json"]"#,
                "--user",
                "0:0",
                "--env",
                "KTRACE_LOG=warn",
                "--label",
                "org.opencontainers.image.title=ktrace",
                "--label",
                concat!(
                    "org.opencontainers.image.version=",
                    env!("CARGO_PKG_VERSION")
                ),
                "--label",
                "org.opencontainers.image.description=eBPF observer of the Linux packet path",
                &c,
            ],
            "buildah config",
        )?;
        buildah(&["commit", "--quiet", "--rm", &c, IMAGE], "buildah commit")?;
        Ok(())
    })();
    if built.is_err() {
        let _ = Command::new("buildah").args(["rm", &c]).output();
    }
    built?;
    let archive = dist_dir().join("ktrace-image.tar");
    let _ = std::fs::remove_file(&archive);
    let dest = format!("oci-archive:{}:{IMAGE}", archive.display());
    run_status(
        Command::new("buildah").args(["push", "--quiet", IMAGE, &dest]),
        "buildah push (oci-archive)",
    )?;
    eprintln!(
        "xtask: image {IMAGE}: {} ({} bytes) in {:.1}s",
        archive.display(),
        std::fs::metadata(&archive)?.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(archive)
}
