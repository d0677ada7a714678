//! The daemon-side recorder (`herd serve --record-profile FILE`): records
//! what this proxy's own NBD clients read, for hosts where BPF is not
//! allowed. Same profile format as the eBPF recorder; time starts at the
//! first read. The file is rewritten (atomically) every few seconds while
//! reads come in, and at shutdown.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use crate::profile::{ImageId, Profile, ProfileBuilder};

/// Granule of daemon recordings: the smallest NBD read qemu issues.
pub const GRANULE: u32 = 4096;

pub struct ClientRecorder {
    path: PathBuf,
    identity: ImageId,
    builder: Mutex<ProfileBuilder>,
    t0: OnceLock<Instant>,
    dirty: AtomicBool,
}

impl ClientRecorder {
    #[must_use]
    pub fn new(path: PathBuf, image_size: u64, identity: ImageId) -> Self {
        Self {
            path,
            identity,
            builder: Mutex::new(ProfileBuilder::new(image_size, GRANULE)),
            t0: OnceLock::new(),
            dirty: AtomicBool::new(false),
        }
    }

    /// Notes a client READ.
    pub fn note(&self, offset: u64, len: u64) {
        let t0 = *self.t0.get_or_init(Instant::now);
        let at_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.builder
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .add(offset, len, at_us);
        self.dirty.store(true, Ordering::Release);
    }

    /// Writes the profile if anything changed since the last save.
    ///
    /// # Errors
    /// The write or rename error.
    pub fn save(&self) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let profile = {
            let b = self
                .builder
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            b.snapshot(self.identity, crate::profile::unix_now())
        };
        profile.save(&self.path)
    }

    /// The profile so far.
    #[must_use]
    pub fn profile(&self) -> Profile {
        self.builder
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .snapshot(self.identity, crate::profile::unix_now())
    }
}
