//! Several images in one tree: a root and a leaf each serve two images
//! from `[[image]]` tables; every image is its own export with its own
//! manifest, cache and metric series; `NBD_OPT_LIST`, `nbdinfo` and `herd
//! image list` show them; an unknown name gets `NBD_REP_ERR_UNKNOWN`.
//! Two similar images store their common chunks once on a node.

mod common;

use std::path::Path;
use std::process::Command;

use common::{have, random_image, scratch, Herd, RawClient, HERD};
use herd::nbd::proto;

const MIB: usize = 1 << 20;

/// A config file of `[[image]]` tables: (name, upstream) each.
fn tables(dir: &Path, node: &str, images: &[(&str, String)]) -> String {
    let mut text = String::new();
    for (name, upstream) in images {
        text.push_str(&format!(
            "[[image]]\nname = \"{name}\"\nupstream = \"{upstream}\"\n"
        ));
    }
    let path = dir.join(format!("{node}.toml"));
    std::fs::write(&path, text).expect("write config");
    path.to_str().expect("utf8").to_owned()
}

/// A root serving `a.img` and `b.img` of `dir` as alpha and beta, and a
/// leaf of it serving both: (root, leaf, the leaf's config path).
fn tree(dir: &Path) -> (Herd, Herd, String) {
    let file = |n: &str| dir.join(n).to_str().expect("utf8").to_owned();
    let rcfg = tables(
        dir,
        "root",
        &[("alpha", file("a.img")), ("beta", file("b.img"))],
    );
    let root = Herd::start(dir, "root", "", &["--config", &rcfg]);
    let parent = |n: &str| format!("nbd://127.0.0.1:{}/{n}", root.port);
    let lcfg = tables(
        dir,
        "leaf",
        &[("alpha", parent("alpha")), ("beta", parent("beta"))],
    );
    let leaf = Herd::start(dir, "leaf", "", &["--config", &lcfg]);
    (root, leaf, lcfg)
}

/// Reads all of `export` from `port`.
fn read_all(port: u16, export: &str) -> Vec<u8> {
    RawClient::connect(port, export).read_all()
}

#[test]
fn two_images_in_one_tree_are_separate_exports() {
    let dir = scratch("images-two");
    let a = random_image(&dir.join("a.img"), 8 * MIB);
    // B: another size, its own bytes.
    let b = random_image(&dir.join("b.img"), 6 * MIB);
    let (_root, leaf, _) = tree(&dir);

    // Each name serves its own image; "" is the first.
    assert!(read_all(leaf.port, "beta") == b, "beta is B's bytes");
    assert!(read_all(leaf.port, "alpha") == a, "alpha is A's bytes");
    assert!(read_all(leaf.port, "")[..] == a[..], "the default is alpha");
    // Each image fetched its own bytes once, counted under its label.
    let fetched = |h: &Herd, image: &str| {
        h.metric(&format!(
            "herd_upstream_read_bytes_total{{image=\"{image}\"}}"
        ))
    };
    assert_eq!(fetched(&leaf, "alpha"), (8 * MIB) as f64);
    assert_eq!(fetched(&leaf, "beta"), (6 * MIB) as f64);
    assert_eq!(
        leaf.metric("herd_upstream_read_bytes_total"),
        (14 * MIB) as f64
    );
    assert_eq!(
        leaf.metric("herd_cache_chunks_present{image=\"beta\"}"),
        6.0
    );
    // The leaf checked each image against its own manifest (distinct
    // identities, read from herd-manifest/NAME).
    let llog = std::fs::read_to_string(&leaf.log).expect("log");
    assert_eq!(
        llog.matches("manifest from the parent").count(),
        2,
        "{llog}"
    );
    assert_eq!(leaf.metric("herd_chunk_digest_failures_total"), 0.0);
    // Each image's cache is a directory of its own.
    for name in ["alpha", "beta"] {
        assert!(
            dir.join("leaf-cache")
                .join(name)
                .join("herd-cache.bitmap")
                .exists(),
            "{name} has its own cache directory"
        );
    }

    // A connected client counts for its image only.
    let held = RawClient::connect(leaf.port, "beta");
    assert_eq!(leaf.metric("herd_image_clients{image=\"beta\"}"), 1.0);
    assert_eq!(leaf.metric("herd_image_clients{image=\"alpha\"}"), 0.0);
    // `herd image list` reads the node's list with descriptions.
    let out = Command::new(HERD)
        .args(["image", "list", &format!("nbd://127.0.0.1:{}", leaf.port)])
        .output()
        .expect("herd image list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no line for {name}:\n{text}"))
            .to_owned()
    };
    assert!(line("alpha").contains("8/8 100%"), "{text}");
    assert!(line("beta").contains("6/6 100%"), "{text}");
    assert!(line("beta").contains(" 1  "), "one client of beta:\n{text}");
    assert!(text.contains("2 images, 2 versions"), "{text}");
    drop(held);
    leaf.metric_eventually("herd_image_clients{image=\"beta\"}", 0.0);

    // A name that matches nothing: NBD_REP_ERR_UNKNOWN, and the log says
    // which images there are.
    let Err((replies, msg)) = RawClient::try_connect(leaf.port, "gamma") else {
        panic!("gamma is no export");
    };
    assert_eq!(replies, [proto::REP_ERR_UNKNOWN], "{msg}");
    assert!(
        leaf.log_lines("\"alpha\", \"beta\"") >= 1,
        "the log lists the images"
    );

    // A real client sees both images listed (and their side exports).
    if have("nbdinfo") {
        let out = Command::new("nbdinfo")
            .args(["--list", &format!("nbd://127.0.0.1:{}", leaf.port)])
            .output()
            .expect("nbdinfo");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        for want in ["alpha", "beta", "herd-manifest/beta", "identity="] {
            assert!(text.contains(want), "nbdinfo --list lacks {want}:\n{text}");
        }
    }
}

/// Allocated bytes of a cache's data file.
fn on_disk(dir: &Path, image: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir.join(image).join("herd-cache.data"))
        .expect("data file")
        .blocks()
        * 512
}

#[test]
fn chunks_shared_between_images_are_stored_once() {
    let dir = scratch("images-shared");
    let a = random_image(&dir.join("a.img"), 8 * MIB);
    // B: A with one MiB rewritten and one MiB moved elsewhere.
    let mut b = a.clone();
    b[2 * MIB..3 * MIB].copy_from_slice(&random_image(&dir.join("new.img"), MIB));
    b.copy_within(6 * MIB..7 * MIB, 4 * MIB);
    std::fs::write(dir.join("b.img"), &b).expect("write B");
    let (root, mut leaf, lcfg) = tree(&dir);
    assert!(read_all(leaf.port, "alpha") == a, "alpha is A's bytes");
    assert!(read_all(leaf.port, "beta") == b, "beta is B's bytes");
    // Beta fetched and stored only the MiB it does not share with alpha;
    // the other 7 MiB it read from alpha's cache.
    let fetched = |h: &Herd, image: &str| {
        h.metric(&format!(
            "herd_upstream_read_bytes_total{{image=\"{image}\"}}"
        ))
    };
    assert_eq!(fetched(&leaf, "alpha"), (8 * MIB) as f64);
    assert_eq!(fetched(&leaf, "beta"), MIB as f64);
    assert_eq!(
        leaf.metric("herd_cache_shared_bytes_total{image=\"beta\"}"),
        (7 * MIB) as f64
    );
    assert_eq!(leaf.metric("herd_chunk_digest_failures_total"), 0.0);
    leaf.stop();
    let cache = dir.join("leaf-cache");
    assert_eq!(on_disk(&cache, "alpha"), 8 * MIB as u64);
    assert_eq!(
        on_disk(&cache, "beta"),
        MIB as u64,
        "beta stores its own MiB only"
    );
    // The root (file upstreams) shares the same way.
    assert_eq!(fetched(&root, "beta"), MIB as f64);

    // Restarted, beta finds its shared chunks in alpha's cache again:
    // nothing moves.
    let leaf = Herd::start(&dir, "leaf", "", &["--config", &lcfg]);
    assert!(read_all(leaf.port, "beta") == b, "beta again");
    assert_eq!(fetched(&leaf, "beta"), 0.0);
    assert_eq!(
        leaf.metric("herd_cache_shared_bytes_total{image=\"beta\"}"),
        (7 * MIB) as f64
    );
}
