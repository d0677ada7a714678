//! What to record: a block device (matched by device number) or an image
//! file (matched by superblock device and inode).

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use herd_ebpf_common::kernel_dev;

use super::RecordError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// `block:block_rq_issue` where `dev` matches.
    Device { dev: u32 },
    /// `filemap:mm_filemap_add_to_page_cache` where both match.
    File { sdev: u32, ino: u64 },
}

/// An opened recording target.
pub struct Target {
    pub path: PathBuf,
    pub kind: TargetKind,
    pub size: u64,
    pub file: File,
}

/// `BLKGETSIZE64` from <linux/fs.h>.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl Target {
    /// Opens `path` as a device (`device == true`) or a file.
    ///
    /// # Errors
    /// `Target` if it cannot be opened or sized; `NotBlockOrFile` if it is
    /// the wrong kind.
    pub fn open(path: &Path, device: bool) -> Result<Self, RecordError> {
        let err = |source| RecordError::Target {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let md = file.metadata().map_err(err)?;
        let (kind, size) = if device {
            if !md.file_type().is_block_device() {
                return Err(RecordError::NotBlockOrFile(path.to_owned()));
            }
            let rdev = md.rdev();
            let mut size = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
            let rc = unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    BLKGETSIZE64,
                    &raw mut size,
                )
            };
            if rc != 0 {
                return Err(err(std::io::Error::last_os_error()));
            }
            let dev = kernel_dev(libc::major(rdev), libc::minor(rdev));
            (TargetKind::Device { dev }, size)
        } else {
            if !md.is_file() {
                return Err(RecordError::NotBlockOrFile(path.to_owned()));
            }
            let sdev = kernel_dev(libc::major(md.dev()), libc::minor(md.dev()));
            (
                TargetKind::File {
                    sdev,
                    ino: md.ino(),
                },
                md.len(),
            )
        };
        Ok(Self {
            path: path.to_owned(),
            kind,
            size,
            file,
        })
    }

    /// Drops the image's pages from the page cache, so that reads the
    /// recording should see are not served from memory unseen (the
    /// page-cache tracepoint only fires when a page is added; buffered reads
    /// of a device never reach the block layer when cached).
    ///
    /// # Errors
    /// The `posix_fadvise` error.
    pub fn evict_page_cache(&self) -> std::io::Result<()> {
        // Dirty pages are not dropped: write them back first.
        self.file.sync_data()?;
        nix::fcntl::posix_fadvise(
            &self.file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .map_err(std::io::Error::from)
    }
}
