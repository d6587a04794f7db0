//! Keeping resident memory to what is in use. Start-up parses the kernel's
//! BTF twice (ktrace's layouts, then aya's loader): tens of MB, freed once
//! the programs are loaded, but glibc keeps freed heap mapped unless asked
//! to give it back, so a DaemonSet would be sized for a peak it never uses
//! again.

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
