//! Keeping resident memory to what is in use. Start-up parses the kernel's
//! BTF twice (ktrace's layouts, then aya's loader): tens of MB, freed once
//! the programs are loaded, but glibc keeps freed heap mapped unless asked
//! to give it back, so a DaemonSet would be sized for a peak it never uses
//! again. Once start-up is over, the pages of ktrace's own code that only
//! start-up ran (argument parsing, BTF and ELF parsing, the loader) are
//! given back too: see [`release_startup`].

/// At start: allocations above 256 KiB get their own mapping (returned to
/// the kernel when freed), and freed heap above 256 KiB at the top is
/// trimmed. Fixed values also stop glibc from raising both thresholds
/// after the first large free, which is what kept the BTF's pages. Two
/// arenas at most: ktrace's few threads do not contend on malloc.
pub fn configure() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns the heap freed so far to the kernel (after a large, short-lived
/// structure such as parsed BTF is dropped).
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Start-up is over (programs attached, BTF freed): the freed heap, and
/// the pages of ktrace's own code and constants that only start-up used.
/// Those are clean pages of the executable: the kernel reclaims them
/// (`MADV_PAGEOUT`, Linux 5.4+; earlier kernels refuse and keep them), and
/// the few that run again are read back on their next use. Measured on
/// `record` and `watch`: about 2 MB of the 5.5 MB of the binary that
/// start-up makes resident (scripts/measure-memory.sh).
pub fn release_startup() {
    release_freed();
    page_out_own_code();
}

/// `MADV_PAGEOUT` on every read-only mapping of the executable (never a
/// writable one: those hold relocated data).
fn page_out_own_code() {
    let (Ok(exe), Ok(maps)) = (
        std::fs::read_link("/proc/self/exe"),
        std::fs::read_to_string("/proc/self/maps"),
    ) else {
        return;
    };
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let f: Vec<&str> = line.splitn(6, ' ').collect();
        let [range, perms, _, _, _, path] = f[..] else {
            continue;
        };
        if path.trim_start() != exe.as_os_str() || perms.as_bytes().get(1) != Some(&b'-') {
            continue;
        }
        let Some((start, end)) = range.split_once('-').and_then(|(a, b)| {
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        }) else {
            continue;
        };
        // SAFETY: a whole mapping of this process, read-only and backed by
        // the executable: paging it out loses nothing (it is read back).
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT);
        }
    }
}

/// Asks for transparent huge pages under `[ptr, ptr + len)`: for a large
/// table read at random (the engine's flows), one TLB entry covers 2 MiB
/// instead of 4 KiB, and a TLB miss costs a page walk, two-level in a VM.
/// Call before the memory is first written. A hint: the kernel ignores it
/// where THP is off, and small ranges are not worth it.
pub fn advise_huge_pages(ptr: *const u8, len: usize) {
    const HUGE_PAGE: usize = 2 << 20;
    if len < 2 * HUGE_PAGE {
        return;
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    // madvise takes whole pages: those inside the range only.
    let start = (ptr as usize).next_multiple_of(page);
    let end = (ptr as usize + len) & !(page - 1);
    if end > start {
        // SAFETY: the pages lie inside an allocation the caller owns;
        // MADV_HUGEPAGE changes how they are backed, never their contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn paging_out_start_up_code_keeps_the_process_running() {
        super::release_startup();
        // Code paged out above runs again (read back on use).
        let v: Vec<u64> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_500);
        assert!(format!("{v:?}").len() > 1000);
    }
}
