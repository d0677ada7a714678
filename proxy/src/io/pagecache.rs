//! Is a file range in the page cache? One `cachestat(2)` call (Linux 6.5+).
//!
//! The zero-copy send path (`sendfile`) reads the cache file in the worker
//! thread that sends; it may only do that when no disk read can block it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// `cachestat` has number 451 on every architecture with the unified
/// syscall table; the libc crate does not name it for x86_64 yet.
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Set once the kernel said it has no `cachestat`.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(4096)
        .max(1)
}

/// Whether every page of `offset..offset + len` of `file` is cached.
/// `false` when unknown (old kernel, error): callers then take a path that
/// cannot block on disk.
#[must_use]
pub fn is_resident(file: &File, offset: u64, len: u64) -> bool {
    if len == 0 || UNSUPPORTED.load(Ordering::Relaxed) {
        return false;
    }
    let page = page_size();
    let first = offset / page;
    let Some(end) = offset.checked_add(len) else {
        return false;
    };
    let pages = end.div_ceil(page) - first;
    let range = CachestatRange {
        off: first * page,
        len: pages * page,
    };
    let mut stat = Cachestat::default();
    // SAFETY: both pointers are to live, properly laid-out structs for the
    // duration of the call; the kernel only reads `range` and writes `stat`.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &raw const range,
            &raw mut stat,
            0u32,
        )
    };
    if rc != 0 {
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            UNSUPPORTED.store(true, Ordering::Relaxed);
        }
        return false;
    }
    stat.nr_cache >= pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn written_pages_are_resident_and_evicted_ones_are_not() {
        let path = std::env::temp_dir().join(format!("herd-pc-{}", std::process::id()));
        let mut f = File::create(&path).expect("create");
        f.write_all(&vec![7u8; 1 << 20]).expect("write");
        f.sync_all().expect("sync");
        let f = File::open(&path).expect("open");
        // Just written: in the page cache.
        assert!(is_resident(&f, 0, 1 << 20));
        assert!(is_resident(&f, 4095, 2));
        // A hole past the end holds no cached pages.
        assert!(!is_resident(&f, 1 << 20, 4096));
        // Dropped from the cache: not resident any more.
        nix::fcntl::posix_fadvise(
            &f,
            0,
            1 << 20,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .expect("fadvise");
        assert!(!is_resident(&f, 0, 1 << 20));
        assert!(!is_resident(&f, 0, 0));
        drop(f);
        let _ = std::fs::remove_file(&path);
    }
}
