//! Parsing of `--upstream` values: a path, `file://`, `nbd://`, `nbd+unix://`,
//! their TLS forms `nbds://` and `nbds+unix://`, and `iscsi://`.
//!
//! The NBD forms follow the NBD URI spec (`doc/uri.md` of the NBD project),
//! which qemu, nbdkit and libnbd also accept.

use std::path::PathBuf;

use thiserror::Error;

/// Default NBD port (IANA).
pub const NBD_PORT: u16 = 10809;

/// Where an upstream lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamUrl {
    File(PathBuf),
    NbdTcp {
        host: String,
        port: u16,
        export: String,
        /// `nbds://`: TLS is required on this link.
        tls: bool,
    },
    NbdUnix {
        socket: PathBuf,
        export: String,
        /// `nbds+unix://`.
        tls: bool,
    },
    /// `iscsi://[user@]host[:port]/<target-iqn>/<lun>` (libiscsi / qemu syntax).
    Iscsi {
        host: String,
        port: u16,
        target: String,
        lun: u16,
        user: Option<String>,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("upstream `{input}` is not a valid URL: {reason}")]
    Syntax { input: String, reason: String },
    #[error(
        "upstream scheme `{scheme}` is not supported (use a path, file://, nbd://, nbds://, nbd+unix://, nbds+unix:// or iscsi://)"
    )]
    Scheme { scheme: String },
    #[error("upstream `{input}` lacks a host")]
    NoHost { input: String },
    #[error("upstream `{input}` lacks ?socket=PATH")]
    NoSocket { input: String },
    #[error("upstream `{input}` must look like iscsi://[user@]host[:port]/<target-iqn>/<lun>")]
    IscsiPath { input: String },
    #[error("upstream `{input}` carries a password; put the CHAP secret in --iscsi-secret-file or HERD_ISCSI_SECRET instead")]
    SecretInUrl { input: String },
}

impl std::str::FromStr for UpstreamUrl {
    type Err = UrlError;

    fn from_str(input: &str) -> Result<Self, UrlError> {
        if !input.contains("://") && !input.starts_with("file:") {
            return Ok(Self::File(PathBuf::from(input)));
        }
        let u = url::Url::parse(input).map_err(|e| UrlError::Syntax {
            input: input.to_owned(),
            reason: e.to_string(),
        })?;
        let export = || {
            let p = u.path();
            let p = p.strip_prefix('/').unwrap_or(p);
            percent_decode(p)
        };
        // The host without IPv6 brackets; required for TCP schemes.
        let host = || {
            u.host_str()
                .filter(|h| !h.is_empty())
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                .ok_or_else(|| UrlError::NoHost {
                    input: input.to_owned(),
                })
        };
        match u.scheme() {
            "file" => Ok(Self::File(PathBuf::from(percent_decode(u.path())))),
            "nbd" | "nbds" => Ok(Self::NbdTcp {
                host: host()?,
                port: u.port().unwrap_or(NBD_PORT),
                export: export(),
                tls: u.scheme() == "nbds",
            }),
            "nbd+unix" | "nbds+unix" => {
                let socket = u
                    .query_pairs()
                    .find(|(k, _)| k == "socket")
                    .map(|(_, v)| PathBuf::from(v.into_owned()))
                    .ok_or_else(|| UrlError::NoSocket {
                        input: input.to_owned(),
                    })?;
                Ok(Self::NbdUnix {
                    socket,
                    export: export(),
                    tls: u.scheme() == "nbds+unix",
                })
            }
            "iscsi" => {
                let host = host()?;
                if u.password().is_some() {
                    return Err(UrlError::SecretInUrl {
                        input: "iscsi://…".to_owned(),
                    });
                }
                let bad = || UrlError::IscsiPath {
                    input: input.to_owned(),
                };
                let path = u.path().trim_start_matches('/');
                let (target, lun) = path.rsplit_once('/').ok_or_else(bad)?;
                let lun = lun.parse::<u16>().map_err(|_| bad())?;
                if target.is_empty() {
                    return Err(bad());
                }
                let user = (!u.username().is_empty()).then(|| percent_decode(u.username()));
                Ok(Self::Iscsi {
                    host,
                    port: u.port().unwrap_or(crate::iscsi::ISCSI_PORT),
                    target: percent_decode(target),
                    lun,
                    user,
                })
            }
            other => Err(UrlError::Scheme {
                scheme: other.to_owned(),
            }),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| char::from(c).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl UpstreamUrl {
    /// An NBD server (a parent), as opposed to the image itself.
    #[must_use]
    pub fn is_nbd(&self) -> bool {
        matches!(self, Self::NbdTcp { .. } | Self::NbdUnix { .. })
    }

    /// Another export of the same NBD server (the side exports a herd
    /// parent serves beside the image); `None` for a file or a LUN.
    #[must_use]
    pub fn with_export(&self, export: &str) -> Option<Self> {
        match self {
            Self::NbdTcp {
                host, port, tls, ..
            } => Some(Self::NbdTcp {
                host: host.clone(),
                port: *port,
                export: export.to_owned(),
                tls: *tls,
            }),
            Self::NbdUnix { socket, tls, .. } => Some(Self::NbdUnix {
                socket: socket.clone(),
                export: export.to_owned(),
                tls: *tls,
            }),
            Self::File(_) | Self::Iscsi { .. } => None,
        }
    }

    /// The export this URL names on an NBD server (`None` for a file or
    /// a LUN).
    #[must_use]
    pub fn export(&self) -> Option<&str> {
        match self {
            Self::NbdTcp { export, .. } | Self::NbdUnix { export, .. } => Some(export),
            Self::File(_) | Self::Iscsi { .. } => None,
        }
    }

    /// This URL with its export pinned to version `pin` of the image it
    /// names (`NAME@IDENTITY`), or unpinned (`NAME`) when `pin` is `None`;
    /// a file or a LUN as it is.
    #[must_use]
    pub fn pinned(&self, pin: Option<&str>) -> Self {
        let Some(export) = self.export() else {
            return self.clone();
        };
        let base = export.split_once('@').map_or(export, |(b, _)| b);
        let name = match pin {
            Some(p) => format!("{base}@{p}"),
            None => base.to_owned(),
        };
        self.with_export(&name).unwrap_or_else(|| self.clone())
    }

    /// The side export `side` (`herd-manifest`, `herd-profile`) of the
    /// image this URL names: `side/NAME` for a named image, since one herd
    /// serves several; plain `side` for the default export ("").
    #[must_use]
    pub fn side_export(&self, side: &str) -> Option<Self> {
        match self.export()? {
            "" => self.with_export(side),
            name => self.with_export(&format!("{side}/{name}")),
        }
    }
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "file://{}", p.display()),
            Self::NbdTcp {
                host,
                port,
                export,
                tls,
            } => {
                let s = if *tls { "s" } else { "" };
                write!(f, "nbd{s}://{host}:{port}/{export}")
            }
            Self::NbdUnix {
                socket,
                export,
                tls,
            } => {
                let s = if *tls { "s" } else { "" };
                write!(f, "nbd{s}+unix:///{export}?socket={}", socket.display())
            }
            Self::Iscsi {
                host,
                port,
                target,
                lun,
                user,
            } => {
                let u = user.as_ref().map_or(String::new(), |u| format!("{u}@"));
                write!(f, "iscsi://{u}{host}:{port}/{target}/{lun}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<UpstreamUrl, UrlError> {
        s.parse()
    }

    #[test]
    fn versions_pin_and_unpin_the_export() {
        let u = p("nbd://10.0.0.1:10809/deb").expect("url");
        let pinned = u.pinned(Some("abc123"));
        assert_eq!(pinned.to_string(), "nbd://10.0.0.1:10809/deb@abc123");
        assert_eq!(pinned.pinned(Some("def")).export(), Some("deb@def"));
        assert_eq!(pinned.pinned(None), u);
        assert_eq!(
            pinned
                .side_export("herd-manifest")
                .and_then(|m| m.export().map(str::to_owned)),
            Some("herd-manifest/deb@abc123".to_owned())
        );
        let file = p("/srv/deb.img").expect("path");
        assert_eq!(file.pinned(Some("abc")), file);
    }

    #[test]
    fn paths_and_file_urls() {
        assert_eq!(p("/srv/a.img"), Ok(UpstreamUrl::File("/srv/a.img".into())));
        assert_eq!(p("rel.img"), Ok(UpstreamUrl::File("rel.img".into())));
        assert_eq!(
            p("file:///srv/a%20b.img"),
            Ok(UpstreamUrl::File("/srv/a b.img".into()))
        );
    }

    #[test]
    fn nbd_urls() {
        assert_eq!(
            p("nbd://127.0.0.1:10900/golden"),
            Ok(UpstreamUrl::NbdTcp {
                host: "127.0.0.1".into(),
                port: 10900,
                export: "golden".into(),
                tls: false,
            })
        );
        assert_eq!(
            p("nbd://parent"),
            Ok(UpstreamUrl::NbdTcp {
                host: "parent".into(),
                port: NBD_PORT,
                export: String::new(),
                tls: false,
            })
        );
        assert_eq!(
            p("nbd+unix:///golden?socket=/run/herd.sock"),
            Ok(UpstreamUrl::NbdUnix {
                socket: "/run/herd.sock".into(),
                export: "golden".into(),
                tls: false,
            })
        );
        let tls = p("nbds://10.0.0.1:10900/golden").expect("nbds");
        assert!(matches!(tls, UpstreamUrl::NbdTcp { tls: true, .. }));
        assert_eq!(tls.to_string(), "nbds://10.0.0.1:10900/golden");
        let tls = p("nbds+unix:///g?socket=/s").expect("nbds+unix");
        assert!(matches!(tls, UpstreamUrl::NbdUnix { tls: true, .. }));
        assert_eq!(tls.to_string(), "nbds+unix:///g?socket=/s");
    }

    #[test]
    fn iscsi_urls() {
        assert_eq!(
            p("iscsi://herd@10.0.0.1/iqn.2026-11.dev.herd:golden/1"),
            Ok(UpstreamUrl::Iscsi {
                host: "10.0.0.1".into(),
                port: 3260,
                target: "iqn.2026-11.dev.herd:golden".into(),
                lun: 1,
                user: Some("herd".into())
            })
        );
        assert!(matches!(
            p("iscsi://h/iqn.x"),
            Err(UrlError::IscsiPath { .. })
        ));
        assert!(matches!(
            p("iscsi://h/iqn.x/lun"),
            Err(UrlError::IscsiPath { .. })
        ));
        let e = p("iscsi://u:hunter2@h/iqn.x/1").expect_err("secret refused");
        assert!(
            !e.to_string().contains("hunter2"),
            "the secret is never echoed"
        );
    }

    #[test]
    fn bad_urls_name_the_problem() {
        assert!(matches!(p("http://x/y"), Err(UrlError::Scheme { .. })));
        assert!(matches!(
            p("nbd+unix:///golden"),
            Err(UrlError::NoSocket { .. })
        ));
        assert!(matches!(
            p("nbd://:99/x"),
            Err(UrlError::Syntax { .. } | UrlError::NoHost { .. })
        ));
        assert!(matches!(
            p("nbd://host:99999/x"),
            Err(UrlError::Syntax { .. })
        ));
    }
}
