//! Builds the eBPF object (ktrace-ebpf) with Debian's rustc and bpf-linker,
//! and hands it to the crate as `$OUT_DIR/ktrace.bpf.o`.
//!
//! Without that toolchain the object is left empty: the userspace crate
//! still builds, tests and lints, and `ktrace watch` says what to install.
//! `KTRACE_EBPF_OBJECT=path` uses a prebuilt object instead.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("ktrace.bpf.o");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let ebpf = root.join("ktrace-ebpf");
    println!("cargo:rerun-if-env-changed=KTRACE_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", ebpf.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        ebpf.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("ktrace-common/src").display()
    );

    if let Ok(prebuilt) = std::env::var("KTRACE_EBPF_OBJECT") {
        std::fs::copy(&prebuilt, &out).expect("copying KTRACE_EBPF_OBJECT");
        return;
    }
    match build_ebpf(&ebpf) {
        Ok(obj) => {
            std::fs::copy(&obj, &out).expect("copying the eBPF object");
        }
        Err(why) => {
            println!("cargo:warning=eBPF object not built ({why}); `ktrace watch` will refuse to run. Run scripts/setup.sh.");
            std::fs::write(&out, b"").unwrap();
        }
    }
}

fn build_ebpf(dir: &Path) -> Result<PathBuf, String> {
    let cargo = Path::new("/usr/bin/cargo");
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let linker_found = Path::new(&format!("{home}/.cargo/bin/bpf-linker")).exists()
        || Path::new("/usr/local/bin/bpf-linker").exists()
        || Path::new("/usr/bin/bpf-linker").exists();
    if !cargo.exists() || !Path::new("/usr/lib/rustlib/bpfel-unknown-none").exists() {
        return Err("Debian's rustc-web with libstd-rust-web-dev-bpf is not installed".into());
    }
    if !linker_found {
        return Err("bpf-linker is not installed".into());
    }
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dir)
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        .env("PATH", format!("/usr/bin:/bin:{home}/.cargo/bin"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", dir.join("target"));
    // The outer cargo's settings are for the host build, not this one.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME"
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTDOC"
        {
            cmd.env_remove(&k);
        }
    }
    cmd.env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", dir.join("target"));
    let status = cmd
        .status()
        .map_err(|e| format!("running /usr/bin/cargo: {e}"))?;
    if !status.success() {
        // The toolchain is there but the kernel code does not build: that is
        // a bug to fix, not a missing install; fail loudly.
        panic!("building ktrace-ebpf failed ({status}); see the errors above");
    }
    Ok(dir.join("target/bpfel-unknown-none/release/ktrace"))
}
