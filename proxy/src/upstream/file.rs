//! A local file or block device as upstream, read through the io_uring
//! engine. This is what the root proxy serves from.
//!
//! Reads use O_DIRECT when the file system allows it: the chunk cache above
//! already keeps what was read, so the page cache would only hold a second
//! copy. Requests are widened to 4 KiB alignment for O_DIRECT and trimmed
//! back; chunk-aligned requests (all of the cache's) need no copy.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Extents, ExtentsFuture, ReadFuture, Upstream, UpstreamError, UpstreamResult};
use crate::io::buf::ALIGN;
use crate::io::{Engine, IoBuf};

pub struct FileUpstream {
    path: PathBuf,
    buffered: Arc<File>,
    direct: Option<Arc<File>>,
    size: u64,
    engine: Engine,
}

impl FileUpstream {
    /// Opens `path` read-only; `use_direct` asks for O_DIRECT where possible.
    ///
    /// # Errors
    /// `Open` when the file cannot be opened or sized.
    pub fn open(path: &Path, engine: Engine, use_direct: bool) -> UpstreamResult<Self> {
        let open_err = |source| UpstreamError::Open {
            path: path.display().to_string(),
            source,
        };
        let mut buffered = File::open(path).map_err(open_err)?;
        // Seeking to the end sizes regular files and block devices alike.
        let size = buffered.seek(SeekFrom::End(0)).map_err(open_err)?;
        let direct = if use_direct {
            File::options()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .map_err(|e| tracing::info!(path = %path.display(), error = %e, "O_DIRECT unavailable, reading through the page cache"))
                .ok()
                .map(Arc::new)
        } else {
            None
        };
        Ok(Self {
            path: path.to_owned(),
            buffered: Arc::new(buffered),
            direct,
            size,
            engine,
        })
    }

    /// Whether reads bypass the page cache.
    #[must_use]
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    async fn read(&self, offset: u64, len: usize) -> UpstreamResult<IoBuf> {
        let end = offset.saturating_add(len as u64);
        if end > self.size {
            return Err(UpstreamError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        let read_err = |source| UpstreamError::Read {
            offset,
            len,
            source,
        };
        let align = ALIGN as u64;
        let (file, start, span) = match &self.direct {
            Some(d) => {
                let start = offset / align * align;
                let stop = end.next_multiple_of(align);
                (
                    d,
                    start,
                    usize::try_from(stop - start).unwrap_or(usize::MAX),
                )
            }
            None => (&self.buffered, offset, len),
        };
        let buf = self
            .engine
            .read_at(file, start, IoBuf::scratch(span))
            .await
            .map_err(read_err)?;
        let skip = usize::try_from(offset - start).unwrap_or(0);
        if buf.len() < skip + len {
            return Err(read_err(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if skip == 0 {
            let mut buf = buf;
            buf.truncate(len);
            Ok(buf)
        } else {
            Ok(IoBuf::from_slice(&buf[skip..skip + len]))
        }
    }
}

impl Upstream for FileUpstream {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        Box::pin(self.read(offset, len))
    }

    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    fn source_kind(&self) -> &'static str {
        "image"
    }

    fn extents(&self) -> ExtentsFuture<'_> {
        let (file, size, path) = (Arc::clone(&self.buffered), self.size, self.path.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || data_extents(&file, size))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|source| UpstreamError::Open {
                    path: path.display().to_string(),
                    source,
                })
        })
    }
}

/// The file's data extents by `SEEK_DATA`/`SEEK_HOLE`; `None` where the
/// file system cannot say. A block device answers "all data".
fn data_extents(file: &File, size: u64) -> std::io::Result<Extents> {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let at = i64::try_from(pos).map_err(std::io::Error::other)?;
        let data = match lseek(file, at, Whence::SeekData) {
            Ok(d) => d.unsigned_abs(),
            // No data after `pos`: the rest is a hole.
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) if pos == 0 => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let from = i64::try_from(data).map_err(std::io::Error::other)?;
        let hole = lseek(file, from, Whence::SeekHole)
            .map_err(std::io::Error::from)?
            .unsigned_abs()
            .min(size);
        if hole <= data {
            break;
        }
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_match_file_direct_and_buffered() {
        // /var/tmp is disk-backed here, so O_DIRECT is exercised; tmpfs
        // falls back to buffered reads and must give the same bytes.
        let dir = std::env::var("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir());
        let path = dir.join(format!("herd-file-up-{}", std::process::id()));
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        File::create(&path)
            .and_then(|mut f| f.write_all(&data))
            .expect("write sample");
        let engine = Engine::start(32, false).expect("engine");
        // O_DIRECT is refused by tmpfs only, of the file systems here.
        let tmpfs = nix::sys::statfs::statfs(&dir)
            .is_ok_and(|f| f.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        for direct in [true, false] {
            let up = FileUpstream::open(&path, engine.clone(), direct).expect("open");
            assert_eq!(up.is_direct(), direct && !tmpfs, "O_DIRECT where asked");
            assert_eq!(up.size(), 100_000);
            for (off, len) in [
                (0u64, 4096usize),
                (4096, 8192),
                (1, 10),
                (99_000, 1000),
                (5000, 70_000),
            ] {
                let got = up.read_at(off, len).await.expect("read");
                let off = usize::try_from(off).expect("small");
                assert_eq!(
                    &got[..],
                    &data[off..off + len],
                    "off {off} len {len} direct {direct}"
                );
            }
            assert!(matches!(
                up.read_at(99_999, 2).await,
                Err(UpstreamError::OutOfRange { .. })
            ));
        }
        let _ = std::fs::remove_file(&path);
        assert!(matches!(
            FileUpstream::open(Path::new("/nonexistent/herd"), engine, true),
            Err(UpstreamError::Open { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sparse_files_report_their_data_extents() {
        use std::os::unix::fs::FileExt;
        let dir = std::env::var("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir());
        let path = dir.join(format!("herd-file-sparse-{}", std::process::id()));
        let f = File::create(&path).expect("create");
        f.set_len(8 << 20).expect("size");
        f.write_all_at(&[1u8; 8192], 1 << 20).expect("write");
        f.write_all_at(&[2u8; 4096], (8 << 20) - 4096)
            .expect("write");
        f.sync_all().expect("sync");
        let engine = Engine::start(8, false).expect("engine");
        let up = FileUpstream::open(&path, engine, false).expect("open");
        let got = up.extents().await.expect("extents");
        let _ = std::fs::remove_file(&path);
        // File systems may round extents out to their block; these writes
        // are block-aligned, so every one names exactly what was written.
        assert_eq!(got, Some(vec![(1 << 20, 8192), ((8 << 20) - 4096, 4096)]));
    }
}
