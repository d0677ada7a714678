//! `herd cache verify DIR`: check every chunk a cache directory holds
//! against the manifest recorded in it, offline, and drop the damaged ones
//! (the daemon fetches them again).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use herd::cache::bitmap::{self, Bitmap, Decoded};
use herd::cache::{BITMAP_FILE, DATA_FILE};
use herd::manifest;

#[derive(clap::Subcommand)]
pub enum CacheCmd {
    /// Check every present chunk against the directory's manifest; drop
    /// damaged ones. Exits 1 if any were damaged.
    Verify {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: CacheCmd) -> Result<()> {
    match cmd {
        CacheCmd::Verify { dir, json } => verify(&dir, json),
    }
}

#[derive(Debug, serde::Serialize)]
struct Report {
    identity: String,
    chunks_present: u64,
    chunks_checked: u64,
    bytes_checked: u64,
    damaged: Vec<u64>,
    seconds: f64,
    mib_per_s: f64,
}

fn verify(dir: &Path, json: bool) -> Result<()> {
    let m = manifest::load(&dir.join(manifest::CACHE_FILE))
        .with_context(|| format!("{} records no usable manifest", dir.display()))?;
    let bpath = dir.join(BITMAP_FILE);
    let raw = std::fs::read(&bpath).with_context(|| format!("cannot read {}", bpath.display()))?;
    let header = match bitmap::decode_header(&raw) {
        Decoded::Current(h) => h,
        Decoded::V1 => bail!(
            "{} is a version-1 cache, which records no image; herd serve starts a fresh one",
            bpath.display()
        ),
        Decoded::Unknown(v) => bail!(
            "{} has format version {v}, unknown to this herd",
            bpath.display()
        ),
        Decoded::Foreign => bail!("{} is not a herd cache bitmap", bpath.display()),
    };
    anyhow::ensure!(
        header.identity == m.identity(),
        "{} holds image {}, but its manifest is image {}",
        bpath.display(),
        header.identity,
        m.identity()
    );
    m.fits(
        "the directory's manifest",
        header.image_size,
        header.chunk_size,
    )?;
    let bm = Bitmap::open(&bpath, header.image_size, header.chunk_size, m.identity())?;
    let data = std::fs::File::open(dir.join(DATA_FILE))
        .with_context(|| format!("cannot open {}", dir.join(DATA_FILE).display()))?;
    let cs = u64::from(header.chunk_size);
    let present = bm.count();
    let bar = if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(present)
    };
    let started = Instant::now();
    let mut buf = vec![0u8; usize::try_from(cs).context("chunk size")?];
    let (mut checked, mut bytes, mut damaged) = (0u64, 0u64, Vec::new());
    for c in 0..bm.chunks() {
        if !bm.is_set(c) {
            continue;
        }
        let off = c * cs;
        let len = usize::try_from(cs.min(header.image_size - off)).context("chunk size")?;
        data.read_exact_at(&mut buf[..len], off)
            .with_context(|| format!("cannot read chunk {c} at offset {off}"))?;
        if !m.bad_chunks(off, &buf[..len]).is_empty() {
            bm.clear(c)?;
            damaged.push(c);
        }
        checked += 1;
        bytes += len as u64;
        bar.inc(1);
    }
    bm.sync()?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let r = Report {
        identity: m.identity().to_string(),
        chunks_present: present,
        chunks_checked: checked,
        bytes_checked: bytes,
        mib_per_s: bytes as f64 / f64::from(1 << 20) / seconds.max(1e-9),
        damaged,
        seconds,
    };
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: image {}, {} chunks checked ({:.1} MiB/s), {} damaged{}",
            dir.display(),
            r.identity,
            r.chunks_checked,
            r.mib_per_s,
            r.damaged.len(),
            if r.damaged.is_empty() {
                String::new()
            } else {
                format!(" and dropped: {:?}", r.damaged)
            }
        );
    }
    if !r.damaged.is_empty() {
        bail!(
            "{} damaged chunks dropped from {}; herd fetches them again",
            r.damaged.len(),
            dir.display()
        );
    }
    Ok(())
}
