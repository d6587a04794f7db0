//! The four ways a program attaches (kprobe, fentry, raw tracepoint,
//! tracepoint), each loading the program first, with errors as the one-line
//! reasons a [`super::HookStatus`] carries.

use aya::programs::{BtfTracePoint, FEntry, KProbe, RawTracePoint, TracePoint};
use aya::Ebpf;

use crate::support::KernelSupport;

const NO_KPROBES: &str =
    "kprobes not supported by this kernel (no /sys/bus/event_source/devices/kprobe)";

/// Why a kprobe on `sym` cannot be used, if it cannot.
pub(super) fn kprobe_blocker(support: &KernelSupport, sym: &str) -> Option<String> {
    if !support.kprobes {
        Some(NO_KPROBES.to_string())
    } else if !support.has_symbol(sym) {
        Some(format!(
            "{sym} is not in /proc/kallsyms (inlined, or its module is not loaded)"
        ))
    } else {
        None
    }
}

/// The program `prog` of the object, as its concrete type.
fn program<'a, T>(ebpf: &'a mut Ebpf, prog: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(prog)
        .ok_or_else(|| format!("program {prog} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{e}"))
}

fn refused(prog: &str, e: impl std::fmt::Display) -> String {
    format!("verifier refused {prog}: {e}")
}

pub(super) fn kprobe(ebpf: &mut Ebpf, prog: &str, func: &str) -> Result<(), String> {
    let p: &mut KProbe = program(ebpf, prog)?;
    p.load().map_err(|e| refused(prog, e))?;
    p.attach(func, 0)
        .map_err(|e| format!("attach to {func} failed: {e}"))?;
    Ok(())
}

/// A raw tracepoint whose program reads its arguments typed by BTF
/// (`tp_btf`, 5.5+).
pub(super) fn btf_tracepoint(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    prog: &str,
    name: &str,
) -> Result<(), String> {
    let p: &mut BtfTracePoint = program(ebpf, prog)?;
    p.load(name, btf).map_err(|e| refused(prog, e))?;
    p.attach()
        .map_err(|e| format!("attach to BTF raw tracepoint {name} failed: {e}"))?;
    Ok(())
}

/// fentry needs the kernel's BTF for the function's prototype.
pub(super) fn fentry(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    prog: &str,
    func: &str,
) -> Result<(), String> {
    let p: &mut FEntry = program(ebpf, prog)?;
    p.load(func, btf).map_err(|e| refused(prog, e))?;
    p.attach()
        .map_err(|e| format!("fentry on {func} failed: {e}"))?;
    Ok(())
}

pub(super) fn raw_tracepoint(ebpf: &mut Ebpf, prog: &str, name: &str) -> Result<(), String> {
    let p: &mut RawTracePoint = program(ebpf, prog)?;
    p.load().map_err(|e| refused(prog, e))?;
    p.attach(name)
        .map_err(|e| format!("attach to raw tracepoint {name} failed: {e}"))?;
    Ok(())
}

pub(super) fn tracepoint(ebpf: &mut Ebpf, prog: &str, cat: &str, name: &str) -> Result<(), String> {
    let p: &mut TracePoint = program(ebpf, prog)?;
    p.load().map_err(|e| refused(prog, e))?;
    p.attach(cat, name)
        .map_err(|e| format!("attach to {cat}:{name} failed: {e}"))?;
    Ok(())
}
