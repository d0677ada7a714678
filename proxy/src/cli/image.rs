//! `herd image list`: the images and versions a running node serves, from
//! its export list (`NBD_OPT_LIST`): identity, size, cache fill and
//! clients of each.

use anyhow::{Context, Result};
use clap::Subcommand;
use herd::export::nbd::image_fields;
use herd::upstream::UpstreamUrl;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// List a node's images and versions: name, identity, size, chunks
    /// cached, clients, source. `NAME` is the latest; `NAME@ID` pins a version.
    List {
        /// The node: nbd://HOST[:PORT] or nbd+unix:///?socket=PATH.
        node: String,
        /// Also list side exports (manifests, profiles).
        #[arg(long)]
        all: bool,
    },
}

/// Runs a `herd image` subcommand.
///
/// # Errors
/// A bad URL, or a node that cannot be reached or does not list.
pub fn run(cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::List { node, all } => list(&node, all),
    }
}

fn list(node: &str, all: bool) -> Result<()> {
    let url: UpstreamUrl = node.parse()?;
    anyhow::ensure!(url.is_nbd(), "{node} is not an NBD URL of a herd node");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let exports = rt
        .block_on(herd::upstream::nbd::list_exports(&url))
        .with_context(|| format!("cannot list the images of {node}"))?;
    print!("{}", render(&exports, all));
    Ok(())
}

/// The table `herd image list` prints.
fn render(exports: &[(String, String)], all: bool) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "{:<24} {:<18} {:>10} {:>16} {:>7}  {}\n",
        "IMAGE", "IDENTITY", "SIZE", "CACHED", "CLIENTS", "SOURCE"
    );
    let (mut images, mut versions) = (0, 0);
    for (name, description) in exports {
        let fields = image_fields(description);
        if fields.is_empty() {
            if all {
                let _ = writeln!(out, "{name:<24} {description}");
            }
            continue;
        }
        // `NAME@IDENTITY` rows are the versions; 16 digits pin one.
        let name = match name.split_once('@') {
            Some((image, id)) => {
                versions += 1;
                format!("{image}@{}", id.get(..16).unwrap_or(id))
            }
            None => {
                images += 1;
                name.clone()
            }
        };
        let get = |k: &str| {
            fields
                .iter()
                .find(|(key, _)| *key == k)
                .map_or("?", |(_, v)| *v)
        };
        let identity = get("identity");
        let short = identity.get(..16).unwrap_or(identity);
        let size = get("size")
            .parse::<u64>()
            .map_or_else(|_| "?".to_owned(), herd::size::human);
        let cached = get("cached");
        let pct = cached
            .split_once('/')
            .and_then(|(p, t)| Some((p.parse::<f64>().ok()?, t.parse::<f64>().ok()?)))
            .filter(|(_, t)| *t > 0.0)
            .map_or(String::new(), |(p, t)| format!(" {:.0}%", 100.0 * p / t));
        let source = description.split("; ").next().unwrap_or("");
        let _ = writeln!(
            out,
            "{name:<24} {short:<18} {size:>10} {:>16} {:>7}  {source}",
            format!("{cached}{pct}"),
            get("clients"),
        );
    }
    let _ = writeln!(out, "{images} images, {versions} versions");
    out
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn the_table_shows_images_and_hides_side_exports() {
        let exports = vec![
            (
                "deb".to_owned(),
                "herd proxy of file /srv/deb.img; identity=0123456789abcdef0123; size=1048576; cached=4/16; zero=2; clients=3".to_owned(),
            ),
            (
                "deb@0123456789abcdef0123".to_owned(),
                "herd proxy of file /srv/deb.img; identity=0123456789abcdef0123; size=1048576; cached=4/16; zero=2; clients=3".to_owned(),
            ),
            ("herd-manifest".to_owned(), "manifest of image deb".to_owned()),
        ];
        let t = render(&exports, false);
        assert!(t.contains("deb"), "{t}");
        assert!(t.contains("0123456789abcdef "), "{t}");
        assert!(t.contains("4/16 25%"), "{t}");
        assert!(t.contains("1 images, 1 versions"), "{t}");
        assert!(t.contains("deb@0123456789abcdef "), "{t}");
        assert!(!t.contains("herd-manifest"), "{t}");
        assert!(render(&exports, true).contains("herd-manifest"));
    }
}
