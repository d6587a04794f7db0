//! Running the node's own tools (`iptables-save`, `nft`): found on PATH or
//! in the sbin directories a non-login shell may leave out, stdout as
//! text, stuck ones killed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a tool may run (one stuck on the xtables lock, say).
const TOOL_TIMEOUT: Duration = Duration::from_secs(15);

/// Where `tool` is installed, if it is.
pub fn find_in_path(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(Into::into))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Runs a tool and returns its stdout, or why it could not (with the first
/// line of what it said on stderr). A tool stuck (on the xtables lock,
/// say) is killed after [`TOOL_TIMEOUT`].
pub fn run_tool(tool: &str, args: &[&str]) -> Result<String, String> {
    let path = find_in_path(tool).ok_or_else(|| format!("{tool} is not installed"))?;
    let shown = format!("{tool} {}", args.join(" ")).trim().to_string();
    let mut child = Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    // Drained on threads so a large ruleset cannot block the child.
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() > TOOL_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                let secs = TOOL_TIMEOUT.as_secs();
                return Err(format!("{shown} did not finish in {secs}s"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if !status.success() {
        let msg = String::from_utf8_lossy(&err);
        let line = msg.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let line = line.trim();
        return Err(format!("{shown} failed ({status}): {line}"));
    }
    String::from_utf8(out).map_err(|_| format!("{shown} printed non-UTF-8 output"))
}

/// Reads a child's pipe to its end on a thread of its own.
fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut bytes);
        }
        bytes
    })
}
