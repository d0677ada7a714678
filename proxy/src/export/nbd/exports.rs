//! The images a node serves and their versions, by export name.
//!
//! An image is a list of versions, oldest first; the last is its latest.
//! `NAME` is the latest, `NAME@IDENTITY` (the identity in hex, or a prefix
//! of at least [`MIN_PREFIX`] digits) pins a version. A version stays
//! while it is the latest or clients read it; a superseded one nobody
//! reads is retired (`retire_idle`). The first image is the default: the
//! one a client naming no export ("") gets, and whose side exports also go
//! by their plain names (`herd-manifest`, `herd-profile`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::{Backing, Export};
use crate::manifest::MANIFEST_EXPORT;
use crate::prefetch::propagate::PROFILE_EXPORT;

/// Fewest hex digits of an identity that pin a version by prefix.
pub const MIN_PREFIX: usize = 12;

/// Why a set of exports cannot be served together.
#[derive(Debug, thiserror::Error)]
pub enum ExportsError {
    #[error("no image to export")]
    Empty,
    #[error("two images are named `{0}`")]
    Duplicate(String),
    #[error("image name `{0}` is reserved or malformed: use letters, digits, '.', '_' or '-' (not `herd-manifest`, `herd-profile`)")]
    BadName(String),
    #[error("no image is named `{0}`")]
    Unknown(String),
}

/// Whether `name` can name an image: not empty, no `/` or `@` (side
/// exports and versions use them), not a side export's name.
#[must_use]
pub fn valid_image_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name != PROFILE_EXPORT
        && name != MANIFEST_EXPORT
}

/// One image: its versions, oldest first.
struct Image {
    name: String,
    versions: Vec<Arc<Export>>,
}

impl Image {
    fn latest(&self) -> Option<&Arc<Export>> {
        self.versions.last()
    }

    /// The version `pin` names: a full identity or a unique prefix.
    fn version(&self, pin: &str) -> Option<&Arc<Export>> {
        if pin.len() < MIN_PREFIX || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let pin = pin.to_ascii_lowercase();
        let mut found = self
            .versions
            .iter()
            .filter(|v| v.identity().to_string().starts_with(&pin));
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }
}

/// Every image a node serves, and each one's versions.
pub struct Exports {
    images: RwLock<Vec<Image>>,
}

/// A retired version, for its owner to stop and clean up after.
pub type Retired = Arc<Export>;

impl Exports {
    /// One version of each image to start with.
    ///
    /// # Errors
    /// No image, two with one name, or a name no client could ask for.
    pub fn new(list: Vec<Arc<Export>>) -> Result<Self, ExportsError> {
        if list.is_empty() {
            return Err(ExportsError::Empty);
        }
        let mut images: Vec<Image> = Vec::with_capacity(list.len());
        for e in list {
            if !valid_image_name(&e.name) {
                return Err(ExportsError::BadName(e.name.clone()));
            }
            if images.iter().any(|i| i.name == e.name) {
                return Err(ExportsError::Duplicate(e.name.clone()));
            }
            e.cache.metrics().versions(1);
            images.push(Image {
                name: e.name.clone(),
                versions: vec![e],
            });
        }
        Ok(Self {
            images: RwLock::new(images),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Image>> {
        // A panic while holding the lock leaves the list whole.
        self.images
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Image>> {
        self.images
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The default image's latest version.
    #[must_use]
    pub fn default_export(&self) -> Option<Arc<Export>> {
        self.read().first().and_then(Image::latest).cloned()
    }

    /// The latest version of image `name`.
    #[must_use]
    pub fn latest(&self, name: &str) -> Option<Arc<Export>> {
        self.read()
            .iter()
            .find(|i| i.name == name)
            .and_then(Image::latest)
            .cloned()
    }

    /// Every version of every image, images in order, oldest first.
    #[must_use]
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.read()
            .iter()
            .flat_map(|i| i.versions.iter().cloned())
            .collect()
    }

    /// The image names, for a client that asked for none of them.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        self.read().iter().map(|i| i.name.clone()).collect()
    }

    /// Makes `export` the latest version of its image; the one it
    /// supersedes keeps serving its clients until they leave.
    ///
    /// # Errors
    /// `Unknown` if no image has its name.
    pub fn publish(&self, export: Arc<Export>) -> Result<(), ExportsError> {
        let mut images = self.write();
        let image = images
            .iter_mut()
            .find(|i| i.name == export.name)
            .ok_or_else(|| ExportsError::Unknown(export.name.clone()))?;
        if let Some(old) = image.latest() {
            old.supersede();
        }
        image.versions.push(export);
        if let Some(l) = image.latest() {
            l.cache.metrics().versions(image.versions.len());
        }
        Ok(())
    }

    /// Takes out every superseded version that no client has read for
    /// `grace`, and returns them.
    pub fn retire_idle(&self, grace: Duration) -> Vec<Retired> {
        let now = Instant::now();
        let mut out = Vec::new();
        for image in self.write().iter_mut() {
            let n = image.versions.len();
            let mut keep = Vec::with_capacity(n);
            for (i, v) in image.versions.drain(..).enumerate() {
                if i + 1 < n && v.idle_for(now) >= grace {
                    out.push(v);
                } else {
                    keep.push(v);
                }
            }
            image.versions = keep;
            if let Some(l) = image.latest() {
                l.cache.metrics().versions(image.versions.len());
            }
        }
        out
    }

    fn image_of(images: &[Image], name: &str) -> Option<Arc<Export>> {
        let (image, pin) = match name.split_once('@') {
            Some((image, pin)) => (image, Some(pin)),
            None => (name, None),
        };
        let img = if image.is_empty() {
            images.first()
        } else {
            images.iter().find(|i| i.name == image)
        }?;
        match pin {
            None => img.latest().cloned(),
            Some(pin) => img.version(pin).cloned(),
        }
    }

    /// What a client asking for `name` gets, if anything: an image's
    /// latest version (`NAME`; "" is the default image, as qemu and nbdkit
    /// treat it), a pinned version (`NAME@IDENTITY`), or a side export of
    /// either (`herd-manifest/NAME[@IDENTITY]`; the plain name is the
    /// default image's).
    #[must_use]
    pub fn select(&self, name: &str) -> Option<(Arc<Export>, Backing)> {
        let images = self.read();
        if let Some(e) = Self::image_of(&images, name) {
            return Some((e, Backing::Image));
        }
        let (side, image) = name.split_once('/').unwrap_or((name, ""));
        let e = Self::image_of(&images, image)?;
        // Only the latest's manifest connection ends with a new version:
        // a child holding it learns of the update that way.
        let follows = !image.contains('@');
        let backing = match side {
            PROFILE_EXPORT => e.profile.borrow().clone().map(Backing::Profile)?,
            MANIFEST_EXPORT => Backing::Manifest(Arc::clone(e.cache.manifest()), follows),
            _ => return None,
        };
        Some((e, backing))
    }

    /// Every name `NBD_OPT_LIST` offers, with its description: each image
    /// (its latest) and each of its versions (`NAME@IDENTITY`), then the
    /// side exports of each image (plain names for the default image).
    #[must_use]
    pub fn listing(&self) -> Vec<(String, String)> {
        let images = self.read();
        let mut out = Vec::new();
        for image in images.iter() {
            let Some(latest) = image.latest() else {
                continue;
            };
            out.push((image.name.clone(), latest.describe()));
            for v in &image.versions {
                out.push((v.version_name(), v.describe()));
            }
        }
        for (i, image) in images.iter().enumerate() {
            let Some(latest) = image.latest() else {
                continue;
            };
            let name = |side: &str| {
                if i == 0 {
                    side.to_owned()
                } else {
                    format!("{side}/{}", image.name)
                }
            };
            out.push((
                name(MANIFEST_EXPORT),
                format!("manifest of image {}", image.name),
            ));
            if latest.profile.borrow().is_some() {
                out.push((
                    name(PROFILE_EXPORT),
                    format!("boot profile of image {}", image.name),
                ));
            }
        }
        out
    }
}

impl Export {
    /// Marks this version superseded: its latest-manifest connections end,
    /// and its time to retire counts from now at the earliest.
    pub fn supersede(&self) {
        self.superseded.send_replace(true);
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.is_some() {
            *idle = Some(Instant::now());
        }
    }

    /// How long this version has had no client (zero while it has some).
    fn idle_for(&self, now: Instant) -> Duration {
        if self.clients.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        now.saturating_duration_since(self.idle_since())
    }

    /// When its last client left (or it was superseded, if later).
    fn idle_since(&self) -> Instant {
        let mut at = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *at.get_or_insert_with(Instant::now)
    }
}

#[cfg(test)]
mod tests {
    use super::valid_image_name;

    #[test]
    fn image_names_leave_room_for_sides_and_versions() {
        for ok in ["debian-12", "ubuntu_24.04", "a"] {
            assert!(valid_image_name(ok), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "a@b",
            "herd-manifest",
            "herd-profile",
            "ä",
            "a b",
        ] {
            assert!(!valid_image_name(bad), "{bad}");
        }
    }
}
