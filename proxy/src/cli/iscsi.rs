//! `herd iscsi probe`: what an operator needs to know about a target before
//! pointing a root proxy at it. `herd iscsi bench`: the initiator's own read
//! rate, without cache or NBD in the way (used by `cargo xtask bench iscsi`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use herd::iscsi::{self, scsi, Chap, LoginSpec, Portal};
use herd::upstream::UpstreamUrl;

pub fn probe(url: &str, secret_file: Option<PathBuf>, initiator: String) -> Result<()> {
    // Accept iscsi://host[:port] and iscsi://host/iqn too, for discovery.
    let (host, port, target, lun, user) = match url.parse::<UpstreamUrl>() {
        Ok(UpstreamUrl::Iscsi {
            host,
            port,
            target,
            lun,
            user,
        }) => (host, port, Some(target), Some(lun), user),
        _ => {
            let u =
                url::Url::parse(url).with_context(|| format!("`{url}` is not an iscsi:// URL"))?;
            if u.scheme() != "iscsi" {
                bail!("`{url}` is not an iscsi:// URL");
            }
            let t = u.path().trim_matches('/');
            (
                u.host_str().context("URL lacks a host")?.to_owned(),
                u.port().unwrap_or(iscsi::ISCSI_PORT),
                (!t.is_empty()).then(|| t.to_owned()),
                None,
                (!u.username().is_empty()).then(|| u.username().to_owned()),
            )
        }
    };
    let chap = match user {
        Some(u) => Some(Chap {
            user: u,
            secret: herd::config::chap_secret(secret_file.as_deref())?,
        }),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let portal = Portal { host, port };
        println!("portal {portal}");
        match iscsi::discover(&portal, &initiator, chap.clone()).await {
            Ok(found) => {
                for d in &found {
                    println!("target {}  ({})", d.target, d.addresses.join(", "));
                }
            }
            Err(e) => println!("discovery failed: {}", herd::error_chain(&e)),
        }
        let Some(target) = target else {
            return Ok(());
        };
        let spec = LoginSpec {
            initiator,
            target: Some(target.clone()),
            chap,
            isid: iscsi::isid(),
            digests: false,
        };
        let s = iscsi::connect(
            &portal,
            &spec,
            0,
            herd::io::ring_stream::NetIo::default(),
            std::time::Duration::ZERO,
        )
        .await
        .with_context(|| format!("login to {target} failed"))?;
        println!(
            "session  MaxBurstLength={} MaxXmitDataSegmentLength={}",
            s.params.max_burst, s.params.max_xmit_dsl
        );
        let luns = match cmd(&s, scsi::report_luns(4096), 4096).await {
            Some(d) => scsi::parse_report_luns(&d),
            None => vec![0],
        };
        drop(s);
        for l in luns {
            if lun.is_some_and(|want| want != l) {
                continue;
            }
            let s = iscsi::connect(
                &portal,
                &spec,
                l,
                herd::io::ring_stream::NetIo::default(),
                std::time::Duration::ZERO,
            )
            .await?;
            let inq = cmd(&s, scsi::inquiry(None, 96), 96)
                .await
                .and_then(|d| scsi::parse_inquiry(&d));
            let cap = match cmd(&s, scsi::read_capacity16(), 32)
                .await
                .and_then(|d| scsi::parse_capacity16(&d))
            {
                Some(c) => Some(c),
                None => cmd(&s, scsi::read_capacity10(), 8)
                    .await
                    .and_then(|d| scsi::parse_capacity10(&d)),
            };
            let serial = cmd(&s, scsi::inquiry(Some(0x80), 255), 255)
                .await
                .and_then(|d| scsi::parse_serial(&d));
            let ident = cmd(&s, scsi::inquiry(Some(0x83), 255), 255)
                .await
                .and_then(|d| scsi::parse_designator(&d));
            let limits = cmd(&s, scsi::inquiry(Some(0xb0), 64), 64)
                .await
                .and_then(|d| scsi::parse_block_limits(&d));
            println!("lun {l}");
            if let Some(i) = inq {
                println!(
                    "  type      {:#04x}  vendor {}  product {}  revision {}",
                    i.device_type, i.vendor, i.product, i.revision
                );
            }
            if let Some(c) = cap {
                println!(
                    "  capacity  {} bytes ({} blocks of {} bytes)",
                    c.bytes(),
                    c.blocks,
                    c.block_size
                );
            }
            if let Some(v) = serial {
                println!("  serial    {v}");
            }
            if let Some(v) = ident {
                println!("  id        {v}");
            }
            if let Some((max, opt)) = limits {
                println!(
                    "  limits    max transfer {max} blocks, optimal {opt} blocks (0 = unreported)"
                );
            }
            s.logout().await;
        }
        Ok(())
    })
}

/// Runs a command, retrying UNIT ATTENTION; `None` if it keeps failing.
async fn cmd(s: &iscsi::Session, cdb: [u8; 16], len: usize) -> Option<herd::io::IoBuf> {
    for _ in 0..4 {
        match s.command(cdb, len).await {
            Ok(c) if c.status == scsi::GOOD => return Some(c.data),
            Ok(c) if c.sense.is_some_and(|x| x.key == scsi::UNIT_ATTENTION) => {}
            _ => return None,
        }
    }
    None
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// iscsi://host[:port]/<target-iqn>/<lun> (no CHAP).
    url: String,
    /// Bytes per read.
    #[arg(long, default_value_t = 65536)]
    block_size: usize,
    /// Reads in flight.
    #[arg(long, default_value_t = 16)]
    qd: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Random offsets instead of sequential.
    #[arg(long)]
    random: bool,
    /// Offer CRC32C header and data digests.
    #[arg(long)]
    digests: bool,
    /// What drives the session socket: uring (a ring it owns) or epoll.
    #[arg(long, default_value = "uring")]
    net_io: herd::io::ring_stream::NetIo,
    /// Microseconds the session polls for the answer to its one command
    /// in flight before sleeping (0: never), as `herd serve --spin-us`.
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
    /// Where the session and the callers run (default: as `herd serve`).
    #[arg(long, value_enum, default_value_t = Placement::Serve)]
    placement: Placement,
}

/// Threads for `herd iscsi bench`'s session and callers.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Placement {
    /// As `herd serve` with one client connection: logged in on the
    /// control worker, the callers on one connection thread, which reads
    /// over a session of its own (a session per core).
    Serve,
    /// Everything on one thread, as in a thread-per-core daemon: a ring is
    /// then reaped by the thread that armed it.
    OneThread,
    /// tokio's work-stealing runtime, a worker per core: any task on any
    /// thread.
    Pool,
}

pub fn bench(a: &BenchArgs) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use herd::upstream::iscsi::{IscsiTarget, IscsiUpstream};
    use herd::upstream::Upstream;

    let Ok(UpstreamUrl::Iscsi {
        host,
        port,
        target,
        lun,
        ..
    }) = a.url.parse::<UpstreamUrl>()
    else {
        bail!("`{}` is not iscsi://host[:port]/<target-iqn>/<lun>", a.url);
    };
    let t = IscsiTarget {
        portal: Portal { host, port },
        target,
        lun,
        initiator: herd::config::DEFAULT_INITIATOR.to_owned(),
        chap: None,
        recovery: std::time::Duration::from_secs(10),
        net_io: a.net_io,
        digests: a.digests,
        spin: std::time::Duration::from_micros(a.spin_us),
        // One per core the bench places, as serve with cores to spare.
        sessions: usize::MAX,
    };
    let one = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    // The runtime the session is connected (and its reader spawned) in,
    // and the one the callers run in; the session's outlives the callers'.
    let (control, rt) = match a.placement {
        Placement::Serve => (Some(herd::cores::control_runtime()?), one()?),
        Placement::OneThread => (None, one()?),
        Placement::Pool => (
            None,
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?,
        ),
    };
    let up = Arc::new(match &control {
        Some(c) => c.block_on(IscsiUpstream::connect(t))?,
        None => rt.block_on(IscsiUpstream::connect(t))?,
    });
    if control.is_some() {
        // This thread runs the callers as a connection's core does.
        herd::cores::enter(0);
    }
    rt.block_on(async move {
        let bs = a.block_size as u64;
        let slots = up.size() / bs;
        anyhow::ensure!(slots > 0, "LUN smaller than one block of {bs}");
        let next = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(a.seconds);
        let start = std::time::Instant::now();
        let mut tasks = Vec::new();
        for w in 0..a.qd {
            let (up, next, done, random, len) = (
                Arc::clone(&up),
                Arc::clone(&next),
                Arc::clone(&done),
                a.random,
                a.block_size,
            );
            tasks.push(tokio::spawn(async move {
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1);
                while tokio::time::Instant::now() < deadline {
                    let slot = if random {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % slots
                    } else {
                        next.fetch_add(1, Ordering::Relaxed) % slots
                    };
                    up.read_at(slot * bs, len).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let secs = start.elapsed().as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        let ops = done.load(Ordering::Relaxed) as f64;
        #[allow(clippy::cast_precision_loss)]
        let mib = ops * bs as f64 / f64::from(1 << 20) / secs;
        println!("{{\"iops\": {:.1}, \"mib_s\": {:.1}}}", ops / secs, mib);
        Ok(())
    })
}
