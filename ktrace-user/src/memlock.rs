//! RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps to it (5.11 moved
//! the accounting to the memory cgroup), and its usual 64 KiB or 8 MiB
//! default refuses the ring buffer with EPERM, which reads as "not root".

use crate::support::kernel_version;

/// Raises the limit where the running kernel still charges it, and says
/// what was done, for the status line. `release` is `uname -r`.
pub fn prepare(release: Option<&str>) -> String {
    if release
        .and_then(kernel_version)
        .is_some_and(|v| v >= (5, 11))
    {
        return "not charged (kernel accounts BPF memory to the cgroup)".into();
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a plain syscall on a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        "raised to unlimited (this kernel charges BPF maps to RLIMIT_MEMLOCK)".into()
    } else {
        let e = std::io::Error::last_os_error();
        format!("could not be raised ({e}); BPF maps count against RLIMIT_MEMLOCK on this kernel")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_kernels_are_left_alone() {
        assert!(prepare(Some("6.1.0-56-amd64")).starts_with("not charged"));
    }
}
