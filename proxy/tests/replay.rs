//! `herd replay` end to end: a synthetic image and its rebased trace from
//! `herd replay image`, replayed as several VMs through a real herd chain and
//! against the file; damage and a trace of another image are caught.

mod common;

use std::path::Path;
use std::process::Command;

use common::{scratch, Herd, HERD};
use herd::profile::{Extent, ImageId, Profile};

/// A small "boot": 3 bursts over an 8 MiB image, ~60 ms of think time.
fn trace(dir: &Path) -> std::path::PathBuf {
    let p = Profile {
        granule: 4096,
        image_size: 8 << 20,
        identity: ImageId([0; 32]),
        recorded_at: 0,
        extents: vec![
            Extent {
                offset: 0,
                len: 8192,
                at_us: 0,
            },
            Extent {
                offset: 1 << 20,
                len: 65536,
                at_us: 200,
            },
            Extent {
                offset: 3 << 20,
                len: 4096,
                at_us: 30_000,
            },
            Extent {
                offset: 5 << 20,
                len: 1 << 20,
                at_us: 60_000,
            },
        ],
    };
    let path = dir.join("boot.profile");
    std::fs::write(&path, p.encode()).expect("write trace");
    path
}

fn image(dir: &Path, scale: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let (img, prof) = (
        dir.join(format!("x{scale}.img")),
        dir.join(format!("x{scale}.profile")),
    );
    let out = Command::new(HERD)
        .args([
            "replay",
            "image",
            "--seed",
            "7",
            "--image-scale",
            &scale.to_string(),
            "--trace",
        ])
        .arg(trace(dir))
        .arg("--out")
        .arg(&img)
        .arg("--profile-out")
        .arg(&prof)
        .output()
        .expect("run herd replay image");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (img, prof)
}

/// Runs `herd replay run`; returns (success, VM lines, summary, stderr).
fn replay(args: &[&str]) -> (bool, Vec<serde_json::Value>, serde_json::Value, String) {
    let out = Command::new(HERD)
        .args(["replay", "run", "--json"])
        .args(args)
        .output()
        .expect("run herd replay");
    let mut vms = Vec::new();
    let mut summary = serde_json::Value::Null;
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
        match v.get("summary") {
            Some(s) => summary = s.clone(),
            None => vms.push(v),
        }
    }
    (
        out.status.success(),
        vms,
        summary,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn vms_replay_through_a_chain_with_every_byte_verified() {
    let dir = scratch("replay-chain");
    let (img, prof) = image(&dir, 2);
    assert_eq!(std::fs::metadata(&img).expect("image").len(), 16 << 20);
    let root = Herd::start(
        &dir,
        "root",
        img.to_str().expect("utf8"),
        &["--chunk-size", "64KiB"],
    );
    let leaf = Herd::start(&dir, "leaf", &root.url(), &["--chunk-size", "64KiB"]);
    let (ok, vms, s, err) = replay(&[
        "--trace",
        prof.to_str().expect("utf8"),
        "--uri",
        &leaf.url(),
        "--vms",
        "4",
        "--verify-seed",
        "7",
    ]);
    assert!(ok, "{err}");
    assert_eq!(vms.len(), 4);
    // The scaled trace: every extent ×2, the 2 MiB one split in 1 MiB reads.
    let bytes = 2 * (8192 + 65536 + 4096 + (1 << 20));
    for v in &vms {
        assert_eq!(v["bytes"], bytes, "{v}");
        assert_eq!(v["verified_bytes"], bytes, "{v}");
        assert_eq!(v["requests"], 5, "{v}");
        assert_eq!(
            (v["errors"].as_u64(), v["mismatches"].as_u64()),
            (Some(0), Some(0))
        );
        // Two gaps of ~30 ms each.
        assert!(v["boot_secs"].as_f64().is_some_and(|b| b >= 0.059), "{v}");
    }
    assert_eq!(s["verified_bytes"], 4 * bytes);
    assert_eq!(s["trace_requests"], 5);
    // The four VMs read the same bytes: the root served them once.
    assert!(leaf.metric("herd_served_bytes_total") >= f64::from(4 * bytes));
    assert!(root.metric("herd_served_bytes_total") < f64::from(2 * bytes));
}

#[test]
fn damage_is_reported_with_its_offset_and_fails_the_run() {
    let dir = scratch("replay-damage");
    let (img, prof) = image(&dir, 1);
    // Flip one byte inside the 1 MiB extent at 5 MiB.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a], (5 << 20) + 4242).expect("damage");
    let (ok, vms, s, err) = replay(&[
        "--trace",
        prof.to_str().expect("utf8"),
        "--uri",
        img.to_str().expect("utf8"),
        "--vms",
        "2",
        "--verify-seed",
        "7",
    ]);
    assert!(!ok, "a wrong byte must fail the run");
    assert!(err.contains("wrong read"), "{err}");
    assert_eq!(s["mismatches"], 2);
    for v in &vms {
        let e = v["first_error"].as_str().expect("first_error");
        assert!(e.contains(&format!("offset {}", (5 << 20) + 4242)), "{e}");
    }
}

#[test]
fn a_trace_of_another_image_size_is_refused_with_the_fitting_scale() {
    let dir = scratch("replay-size");
    let (img, _) = image(&dir, 3);
    let (ok, vms, _, err) = replay(&[
        "--trace",
        trace(&dir).to_str().expect("utf8"),
        "--uri",
        img.to_str().expect("utf8"),
        "--verify-seed",
        "7",
    ]);
    assert!(!ok && vms.is_empty());
    assert!(
        err.contains("8388608-byte image") && err.contains("--image-scale 3"),
        "{err}"
    );
}
