//! `herd manifest build | show`: make an image's manifest ahead of time
//! (so a root starts serving at once) and read one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use herd::io::Engine;
use herd::manifest::{self, stamp::Stamp, Manifest};
use herd::upstream::file::FileUpstream;
use herd::upstream::nbd::NbdUpstream;
use herd::upstream::{Upstream, UpstreamUrl};

#[derive(clap::Subcommand)]
pub enum ManifestCmd {
    /// Read the whole image once and write its manifest.
    Build {
        /// A file or block device, or nbd://HOST[:PORT]/EXPORT.
        image: String,
        /// Where to write it (default: IMAGE.herd-manifest beside a file;
        /// `herd serve --upstream IMAGE` finds it there).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Chunk size; nodes serving this image use it or a multiple.
        #[arg(long, default_value = "64KiB")]
        chunk_size: String,
        /// Read through the page cache instead of O_DIRECT.
        #[arg(long)]
        no_direct_io: bool,
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a manifest's header and identity.
    Show {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: ManifestCmd) -> Result<()> {
    match cmd {
        ManifestCmd::Build {
            image,
            out,
            chunk_size,
            no_direct_io,
            json,
        } => build(&image, out, &chunk_size, !no_direct_io, json),
        ManifestCmd::Show { file, json } => {
            let m = manifest::load(&file)?;
            let v = summary(&m);
            if json {
                println!("{v}");
            } else {
                println!(
                    "identity {}\nimage size {} bytes, {} chunks of {} bytes, BLAKE3-256\n{} chunks all zeros, {} bytes of data",
                    m.identity(),
                    m.image_size(),
                    m.chunks(),
                    m.chunk_size(),
                    m.zero_chunks(),
                    m.data_bytes()
                );
            }
            Ok(())
        }
    }
}

fn summary(m: &Manifest) -> serde_json::Value {
    serde_json::json!({
        "identity": m.identity().to_string(),
        "image_size": m.image_size(),
        "chunk_size": m.chunk_size(),
        "chunks": m.chunks(),
        "zero_chunks": m.zero_chunks(),
        "data_bytes": m.data_bytes(),
        "allocation_granule": m.granule(),
        "algorithm": "blake3-256",
        "version": manifest::format::VERSION,
    })
}

fn build(image: &str, out: Option<PathBuf>, chunk: &str, direct: bool, json: bool) -> Result<()> {
    let url: UpstreamUrl = image
        .parse()
        .with_context(|| format!("`{image}` is not an image"))?;
    let chunk_size = u32::try_from(
        herd::size::parse_size(chunk).with_context(|| format!("bad chunk size `{chunk}`"))?,
    )
    .context("chunk size over 4 GiB")?;
    let out = match (&out, &url) {
        (Some(o), _) => o.clone(),
        (None, UpstreamUrl::File(p)) => manifest::beside(p),
        (None, _) => bail!("--out is needed for an image that is not a file"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let engine = Engine::start(64, false).context("cannot start the I/O engine")?;
        let up: Arc<dyn Upstream> = match &url {
            UpstreamUrl::File(p) => Arc::new(
                FileUpstream::open(p, engine, direct)
                    .with_context(|| format!("cannot open {}", p.display()))?,
            ),
            UpstreamUrl::NbdTcp { .. } | UpstreamUrl::NbdUnix { .. } => Arc::new(
                NbdUpstream::connect(url.clone(), 4)
                    .await
                    .with_context(|| format!("cannot reach {url}"))?,
            ),
            UpstreamUrl::Iscsi { .. } => bail!(
                "an iSCSI LUN's manifest is built by the root at start (`herd serve --upstream {url}`), where its CHAP settings live"
            ),
        };
        let size = up.size();
        // Taken before reading: a write during the build makes it stale.
        let stamp = Stamp::of(&url, size);
        let bar = if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(size)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let started = Instant::now();
        let mut read = 0;
        let m = manifest::build::build(Arc::clone(&up), chunk_size, |done, total| {
            read = done;
            bar.set_length(total);
            bar.set_position(done);
        })
        .await
        .with_context(|| format!("cannot build the manifest of {image}"))?;
        bar.finish_and_clear();
        let secs = started.elapsed().as_secs_f64();
        manifest::save(&out, &m)?;
        if let Some(mut s) = stamp {
            s.identity = m.identity().to_string();
            s.save(&manifest::stamp::path_for(&out))?;
        }
        #[allow(clippy::cast_precision_loss)]
        let rate = read as f64 / f64::from(1 << 20) / secs.max(1e-9);
        if json {
            let mut v = summary(&m);
            v["out"] = serde_json::json!(out.display().to_string());
            v["seconds"] = serde_json::json!(secs);
            v["mib_per_s"] = serde_json::json!(rate);
            v["read_bytes"] = serde_json::json!(read);
            println!("{v}");
        } else {
            println!(
                "{}: identity {}, {} chunks of {} bytes ({} all zeros), read {} MiB of {} at {:.1} MiB/s ({secs:.2} s)",
                out.display(),
                m.identity(),
                m.chunks(),
                m.chunk_size(),
                m.zero_chunks(),
                read >> 20,
                size >> 20,
                rate
            );
        }
        Ok(())
    })
}
