//! `herd profile show | merge | compare`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use herd::profile::{identity_of_file, merge, Profile, Summary};

#[derive(clap::Subcommand)]
pub enum ProfileCmd {
    /// Print a profile's bytes, chunks, time span and a histogram.
    Show {
        file: PathBuf,
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
        /// Count chunks of this size (default 64KiB).
        #[arg(long, default_value = "64KiB")]
        chunk_size: String,
        /// Refuse unless the profile was recorded on this image (file or device).
        #[arg(long)]
        image: Option<PathBuf>,
    },
    /// Union of recordings of one image, in earliest first-access order.
    Merge {
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// How far two recordings agree, chunk by chunk.
    Compare {
        a: PathBuf,
        b: PathBuf,
        #[arg(long, default_value = "64KiB")]
        chunk_size: String,
        #[arg(long)]
        json: bool,
    },
}

/// Reads and decodes a profile file.
pub fn load(path: &Path) -> Result<Profile> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Profile::decode(&bytes).with_context(|| format!("{} is not a usable profile", path.display()))
}

fn chunk(s: &str) -> Result<u64> {
    let n = herd::size::parse_size(s).with_context(|| format!("bad chunk size `{s}`"))?;
    anyhow::ensure!(n > 0, "chunk size must be above 0");
    Ok(n)
}

pub fn run(cmd: ProfileCmd) -> Result<()> {
    match cmd {
        ProfileCmd::Show {
            file,
            json,
            chunk_size,
            image,
        } => {
            let p = load(&file)?;
            if let Some(img) = image {
                let f = std::fs::File::open(&img)
                    .with_context(|| format!("cannot open image {}", img.display()))?;
                let size =
                    image_size(&f).with_context(|| format!("cannot size {}", img.display()))?;
                let id = identity_of_file(&f, size)
                    .with_context(|| format!("cannot read {}", img.display()))?;
                p.check_image(size, &id).with_context(|| {
                    format!("{} does not belong to {}", file.display(), img.display())
                })?;
            }
            let s = Summary::of(&p, chunk(&chunk_size)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.render());
            }
        }
        ProfileCmd::Merge { files, out } => {
            let all = files.iter().map(|f| load(f)).collect::<Result<Vec<_>>>()?;
            let m = merge(&all).context("cannot merge these profiles")?;
            m.save(&out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!(
                "merged {} profiles: {} extents, {:.1} MiB → {}",
                all.len(),
                m.extents.len(),
                m.bytes() as f64 / f64::from(1 << 20),
                out.display()
            );
        }
        ProfileCmd::Compare {
            a,
            b,
            chunk_size,
            json,
        } => {
            let (pa, pb) = (load(&a)?, load(&b)?);
            let cs = chunk(&chunk_size)?;
            let sa: std::collections::HashSet<u64> = pa.chunks(cs).into_iter().collect();
            let sb: std::collections::HashSet<u64> = pb.chunks(cs).into_iter().collect();
            let common = sa.intersection(&sb).count();
            let union = sa.union(&sb).count().max(1);
            let v = serde_json::json!({
                "chunk_size": cs,
                "a_chunks": sa.len(),
                "b_chunks": sb.len(),
                "common_chunks": common,
                "agreement": common as f64 / union as f64,
                "a_in_b": common as f64 / sa.len().max(1) as f64,
                "b_in_a": common as f64 / sb.len().max(1) as f64,
                "same_image": pa.identity == pb.identity && pa.image_size == pb.image_size,
            });
            if json {
                println!("{v}");
            } else {
                println!(
                    "{} chunks in A, {} in B, {common} in both: {:.1} % agreement ({:.1} % of A in B, {:.1} % of B in A)",
                    sa.len(),
                    sb.len(),
                    common as f64 * 100.0 / union as f64,
                    common as f64 * 100.0 / sa.len().max(1) as f64,
                    common as f64 * 100.0 / sb.len().max(1) as f64
                );
            }
        }
    }
    Ok(())
}

/// Length of a regular file, or of a block device (seek to its end).
fn image_size(f: &std::fs::File) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = f;
    f.seek(std::io::SeekFrom::End(0))
}
