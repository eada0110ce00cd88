//! What the C library's allocator holds, and asking it to give free pages
//! back. With `listener::registered`, the only `unsafe` in the crate
//! (`tests/architecture.rs` holds it to these two): both calls are plain C
//! functions that take no pointers, are thread-safe in glibc, and cannot
//! leave Rust's state inconsistent.
#![allow(unsafe_code)]

/// Whether this build's allocator can be trimmed (glibc).
pub const CAN_TRIM: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

/// Gives the allocator's free pages back to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes a byte count and no pointers; glibc
    // takes each arena's lock while it walks it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes handed out by the allocator and not yet freed (0 where it cannot
/// tell).
pub fn in_use_bytes() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallinfo2` takes no arguments and returns a struct by
        // value; glibc takes each arena's lock while it counts.
        let info = unsafe { libc::mallinfo2() };
        info.uordblks.saturating_add(info.hblkhd)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0
    }
}

/// This process's resident memory, from `/proc/self/statm`.
pub fn resident_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(page_size()))
}

/// The kernel's page size, the unit of `statm` (4 KiB on x86-64, up to
/// 64 KiB on some arm64 kernels).
fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| usize::try_from(size).ok())
        .unwrap_or(4096)
}
