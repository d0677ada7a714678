//! The stamp that lets a root reuse its persisted manifest: what the image
//! file looked like when the manifest was made. Any write to the file, or a
//! new file renamed over it, changes its ctime or inode, so a stale
//! manifest is never reused for a regular file. Block devices, LUNs and
//! NBD sources have no such stamp (their ctime does not follow writes).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ManifestError;
use crate::upstream::UpstreamUrl;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Nanoseconds since the epoch (TOML integers are 64-bit).
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// The identity of the manifest made from this state of the file.
    pub identity: String,
}

fn ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// `herd-cache.manifest` → `herd-cache.manifest.source`.
#[must_use]
pub fn path_for(manifest: &Path) -> PathBuf {
    let mut s = manifest.as_os_str().to_owned();
    s.push(".source");
    PathBuf::from(s)
}

impl Stamp {
    /// The stamp of a regular image file of `size` bytes; `None` for any
    /// other source.
    #[must_use]
    pub fn of(source: &UpstreamUrl, size: u64) -> Option<Self> {
        let UpstreamUrl::File(path) = source else {
            return None;
        };
        Self::of_file(path).filter(|s| s.size == size)
    }

    /// The stamp of the regular file at `path` as it is now, whatever its
    /// size (a root's SIGHUP compares two); `None` for anything else.
    #[must_use]
    pub fn of_file(path: &Path) -> Option<Self> {
        let md = std::fs::metadata(path).ok()?;
        if !md.is_file() {
            return None;
        }
        Some(Self {
            path: path.to_owned(),
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime_ns: ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: ns(md.ctime(), md.ctime_nsec()),
            identity: String::new(),
        })
    }

    /// Whether both stamps describe the same, unchanged file.
    #[must_use]
    pub fn same_image(&self, other: &Self) -> bool {
        (
            &self.path,
            self.dev,
            self.ino,
            self.size,
            self.mtime_ns,
            self.ctime_ns,
        ) == (
            &other.path,
            other.dev,
            other.ino,
            other.size,
            other.mtime_ns,
            other.ctime_ns,
        )
    }

    /// Reads a stamp; `None` if missing or unreadable (the manifest is
    /// then built again).
    #[must_use]
    pub fn load(path: &Path) -> Option<Self> {
        toml::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    /// Writes the stamp durably.
    ///
    /// # Errors
    /// `Io` if it cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), ManifestError> {
        let text = toml::to_string(self).map_err(|e| ManifestError::Io {
            op: "encoding",
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
        super::write_atomic(path, text.as_bytes())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_or_a_rename_changes_the_stamp() {
        let dir = std::env::temp_dir().join(format!("herd-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("img");
        std::fs::write(&img, vec![1u8; 8192]).unwrap();
        let url = UpstreamUrl::File(img.clone());
        let a = Stamp::of(&url, 8192).unwrap();
        assert!(a.same_image(&Stamp::of(&url, 8192).unwrap()));
        let p = dir.join("m.source");
        let mut saved = a.clone();
        saved.identity = "abc".into();
        saved.save(&p).unwrap();
        assert_eq!(Stamp::load(&p), Some(saved));
        // Rewritten in place, same size.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&img, vec![2u8; 8192]).unwrap();
        assert!(!a.same_image(&Stamp::of(&url, 8192).unwrap()));
        // Another file renamed over it.
        let b = Stamp::of(&url, 8192).unwrap();
        let other = dir.join("other");
        std::fs::write(&other, vec![2u8; 8192]).unwrap();
        std::fs::rename(&other, &img).unwrap();
        assert!(!b.same_image(&Stamp::of(&url, 8192).unwrap()));
        // Wrong size, or not a file: no stamp.
        assert!(Stamp::of(&url, 4096).is_none());
        assert!(Stamp::of(&UpstreamUrl::File(dir.clone()), 0).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
