//! Boot profiles through the tree: propagation over the `herd-profile` side
//! export, prefetch in profile order with single-flight, demand before
//! prefetch, the daemon-side recorder, and refusal of foreign profiles.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, have, random_image, scratch, wait_port, Herd, Peer, RawClient, HERD};
use herd::profile::{identity_of_file, Extent, ImageId, Profile, ProfileBuilder};

const CHUNK: u64 = 64 << 10;

fn image_id(path: &Path) -> ImageId {
    let f = std::fs::File::open(path).expect("open image");
    let size = f.metadata().expect("stat").len();
    identity_of_file(&f, size).expect("identity")
}

/// A profile of scattered reads of `img`, in a shuffled order.
fn write_profile(img: &Path, out: &Path, reads: &[(u64, u64)]) -> Profile {
    let size = std::fs::metadata(img).expect("stat").len();
    let mut b = ProfileBuilder::new(size, 4096);
    for (i, &(off, len)) in reads.iter().enumerate() {
        b.add(off, len, i as u64 * 1000);
    }
    let p = b.finish(image_id(img), 0);
    p.save(out).expect("save profile");
    p
}

fn scattered(n: u64, stride: u64, len: u64) -> Vec<(u64, u64)> {
    // Reverse order: prefetch must follow the profile, not offsets.
    (0..n).rev().map(|i| (i * stride + 4096, len)).collect()
}

#[test]
fn profile_reaches_four_leaves_and_the_root_fetches_each_chunk_once() {
    let dir = scratch("prefetch-tree");
    let img = dir.join("golden.img");
    let data = random_image(&img, 64 << 20);
    let prof = dir.join("boot.profile");
    let p = write_profile(&img, &prof, &scattered(40, 1 << 20, 100 << 10));
    let chunks = p.chunks(CHUNK).len() as f64;
    let cs = ["--chunk-size", "64KiB"];
    let root = Herd::start(
        &dir,
        "root",
        img.to_str().expect("utf8"),
        &[&cs[..], &["--profile", prof.to_str().expect("utf8")]].concat(),
    );
    let leaves: Vec<Herd> = (0..4)
        .map(|i| Herd::start(&dir, &format!("leaf{i}"), &root.url(), &cs))
        .collect();
    assert_eq!(root.wait_prefetched(Duration::from_secs(60)), chunks);
    for leaf in &leaves {
        assert_eq!(leaf.wait_prefetched(Duration::from_secs(60)), chunks);
    }
    // Single-flight across the root's own prefetch and four children:
    // every profile chunk left the root's disk exactly once.
    assert_eq!(
        root.metric_eventually("herd_upstream_read_bytes_total", chunks * CHUNK as f64),
        chunks * CHUNK as f64
    );
    // Each leaf fetched each profile chunk once, and nothing else.
    for leaf in &leaves {
        assert_eq!(
            leaf.metric("herd_upstream_read_bytes_total"),
            chunks * CHUNK as f64
        );
        assert_eq!(leaf.metric("herd_profile_extents"), p.extents.len() as f64);
    }
    // A boot that reads the profile now finds everything on the leaf,
    // byte-identical to the golden image.
    let mut c = RawClient::connect(leaves[0].port, "herd");
    for e in &p.extents {
        let got = c.read(e.offset, u32::try_from(e.len).expect("len"));
        assert!(
            got == data[e.offset as usize..e.end() as usize],
            "extent {e:?} differs"
        );
    }
    assert_eq!(
        leaves[0].metric("herd_upstream_read_bytes_total"),
        chunks * CHUNK as f64
    );
    // The profile export itself is plain NBD: any client can fetch it.
    if have("nbdcopy") {
        let copy = dir.join("copy.profile");
        let url = format!("nbd://127.0.0.1:{}/herd-profile", leaves[3].port);
        common::nbdcopy(&url, &copy);
        assert_eq!(
            std::fs::read(&copy).expect("read"),
            std::fs::read(&prof).expect("read")
        );
    }
}

#[test]
fn prefetch_full_fetches_the_profile_first_then_the_whole_image() {
    let dir = scratch("prefetch-full");
    let img = dir.join("golden.img");
    let data = random_image(&img, 16 << 20);
    let root = Herd::start(
        &dir,
        "root",
        img.to_str().expect("utf8"),
        &["--chunk-size", "64KiB"],
    );
    let leaf = Herd::start(
        &dir,
        "leaf",
        &root.url(),
        &["--chunk-size", "64KiB", "--prefetch", "full"],
    );
    assert_eq!(leaf.wait_prefetched(Duration::from_secs(60)), 256.0);
    assert_eq!(
        leaf.metric_eventually("herd_cache_chunks_present", 256.0),
        256.0
    );
    assert_eq!(
        leaf.metric("herd_upstream_read_bytes_total"),
        data.len() as f64
    );
    // Everything is local: stop the root, the leaf still serves it all.
    drop(root);
    let mut c = RawClient::connect(leaf.port, "herd");
    assert!(c.read(0, 1 << 20) == data[..1 << 20]);
    assert!(c.read(15 << 20, 1 << 20) == data[15 << 20..]);
}

#[test]
fn a_profile_of_another_image_is_refused_with_a_clear_error() {
    let dir = scratch("prefetch-foreign");
    let img = dir.join("golden.img");
    random_image(&img, 8 << 20);
    let other = dir.join("other.img");
    random_image(&other, 8 << 20);
    let prof = dir.join("other.profile");
    write_profile(&other, &prof, &[(0, 4096)]);
    let out = Command::new(HERD)
        .args(["serve", "--upstream", img.to_str().expect("utf8")])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--cache-dir", dir.join("c").to_str().expect("utf8")])
        .args(["--profile", prof.to_str().expect("utf8")])
        .output()
        .expect("run herd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("does not fit this image") && err.contains("another image"),
        "{err}"
    );
    let out = Command::new(HERD)
        .args(["profile", "show", prof.to_str().expect("utf8"), "--image"])
        .arg(&img)
        .output()
        .expect("run herd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another image"),
        "{err}"
    );
    // A damaged file names the problem instead of being used.
    let mut bytes = std::fs::read(&prof).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&prof, &bytes).expect("write");
    let out = Command::new(HERD)
        .args(["profile", "show", prof.to_str().expect("utf8")])
        .output()
        .expect("run herd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("checksum"), "{err}");
}

#[test]
fn daemon_recorder_writes_exactly_what_clients_read() {
    let dir = scratch("prefetch-daemon-rec");
    let img = dir.join("golden.img");
    random_image(&img, 16 << 20);
    let out = dir.join("seen.profile");
    let mut h = Herd::start(
        &dir,
        "root",
        img.to_str().expect("utf8"),
        &["--record-profile", out.to_str().expect("utf8")],
    );
    let mut c = RawClient::connect(h.port, "herd");
    c.read(5 << 20, 8192);
    c.read((5 << 20) + 8192, 4096); // continues the previous extent
    c.read(1 << 20, 4096);
    c.read(1 << 20, 4096); // seen already
    c.read(100, 10); // rounds out to the first 4 KiB
    drop(c);
    assert!(h.stop().success());
    let p = Profile::decode(&std::fs::read(&out).expect("profile written")).expect("valid");
    let got: Vec<(u64, u64)> = p.extents.iter().map(|e| (e.offset, e.len)).collect();
    assert_eq!(got, vec![(5 << 20, 12288), (1 << 20, 4096), (0, 4096)]);
    assert_eq!(p.identity, image_id(&img));
    assert!(p.extents.windows(2).all(|w| w[0].at_us <= w[1].at_us));
}

/// Times one cold 1 MiB read through a fresh root whose upstream is a
/// rate-limited nbdkit, with or without a profile keeping prefetch busy.
fn timed_demand_read(
    dir: &Path,
    name: &str,
    parent: &str,
    manifest: &Path,
    profile: Option<&Path>,
) -> Duration {
    // Given, not built: building would read the whole image over the link.
    let mut extra = vec![
        "--chunk-size",
        "64KiB",
        "--manifest",
        manifest.to_str().expect("utf8"),
    ];
    if let Some(p) = profile {
        extra.extend(["--profile", p.to_str().expect("utf8")]);
    }
    let h = Herd::start(dir, name, parent, &extra);
    if profile.is_some() {
        // Prefetch is on the wire before the demand read arrives.
        h.wait_metric_at_least("herd_prefetch_bytes_total", 1.0, Duration::from_secs(20));
        assert!(
            h.metric("herd_prefetch_bytes_total") > 0.0,
            "prefetch never started"
        );
    }
    let mut c = RawClient::connect(h.port, "herd");
    if profile.is_none() {
        // nbdkit's rate filter starts with a full token bucket, so a lone
        // first read is not throttled at all (~9 ms) while one behind
        // prefetch finds it drained: drain it here too, with reads far
        // from the timed range, so both reads pay the same link.
        c.read(40 << 20, 4 << 20);
    }
    let t = Instant::now();
    c.read(60 << 20, 1 << 20);
    let took = t.elapsed();
    if profile.is_some() {
        // Prefetch was still going when the demand read finished.
        assert!(h.metric("herd_prefetch_chunks_done") < h.metric("herd_prefetch_chunks_total"));
    }
    took
}

#[test]
fn a_demand_read_during_prefetch_waits_at_most_twice_as_long() {
    if !have("nbdkit") {
        return;
    }
    let dir = scratch("prefetch-priority");
    let img = dir.join("golden.img");
    random_image(&img, 64 << 20);
    // 16 Mbit/s ≈ 2 MiB/s: a 1 MiB read takes ~0.5 s alone, and the 48 MiB
    // profile keeps prefetch busy for ~24 s.
    let port = free_port();
    let _nbdkit = Peer(
        Command::new("nbdkit")
            .args([
                "--foreground",
                "--exit-with-parent",
                "-p",
                &port.to_string(),
            ])
            .args(["--filter=rate", "file"])
            .arg(&img)
            .arg("rate=16M")
            .spawn()
            .expect("nbdkit"),
    );
    wait_port(port);
    let parent = format!("nbd://127.0.0.1:{port}");
    let prof = dir.join("boot.profile");
    write_profile(&img, &prof, &[(0, 48 << 20)]);
    let manifest = common::build_manifest(&img);
    let alone = timed_demand_read(&dir, "alone", &parent, &manifest, None);
    let during = timed_demand_read(&dir, "during", &parent, &manifest, Some(&prof));
    eprintln!("demand read alone {alone:?}, during prefetch {during:?}");
    assert!(
        during <= alone * 2,
        "a demand read took {during:?} during prefetch vs {alone:?} alone"
    );
}

#[test]
fn profile_extents_survive_a_round_trip_through_the_cli() {
    let dir = scratch("prefetch-cli");
    let img = dir.join("golden.img");
    random_image(&img, 4 << 20);
    let a = dir.join("a.profile");
    let b = dir.join("b.profile");
    write_profile(&img, &a, &[(0, 8192), (1 << 20, 4096)]);
    write_profile(&img, &b, &[(2 << 20, 4096), (0, 4096)]);
    let merged = dir.join("m.profile");
    let st = Command::new(HERD)
        .args(["profile", "merge"])
        .args([&a, &b])
        .arg("--out")
        .arg(&merged)
        .status()
        .expect("merge");
    assert!(st.success());
    let m = Profile::decode(&std::fs::read(&merged).expect("read")).expect("valid");
    assert_eq!(
        m.extents,
        vec![
            Extent {
                offset: 0,
                len: 8192,
                at_us: 0
            },
            Extent {
                offset: 2 << 20,
                len: 4096,
                at_us: 0
            },
            Extent {
                offset: 1 << 20,
                len: 4096,
                at_us: 1000
            },
        ]
    );
    let out = Command::new(HERD)
        .args(["profile", "show", "--json"])
        .arg(&merged)
        .output()
        .expect("show");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["bytes"], 16384);
    assert_eq!(v["chunks"], 3);
    let out = Command::new(HERD)
        .args(["profile", "compare", "--json"])
        .args([&a, &merged])
        .output()
        .expect("compare");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["a_in_b"], 1.0);
    assert_eq!(v["common_chunks"], 2);
}
