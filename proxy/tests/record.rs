//! The eBPF recorder against a real kernel: a loop device read at known
//! offsets, 1 GiB of 4 KiB direct reads (every event, none dropped), an
//! image file read through the page cache, and the refusal without
//! CAP_BPF. Needs root and the object from `cargo xtask build-ebpf`; under
//! HERD_STRICT (CI) their absence fails instead of skipping.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{scratch, HERD};
use herd::profile::Profile;

/// Whether recording can run here; panics under HERD_STRICT if not.
fn can_record() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let object = PathBuf::from(HERD)
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("herd/herd-ebpf.o"));
    let have_object =
        std::env::var_os("HERD_BPF_OBJECT").is_some() || object.is_some_and(|o| o.is_file());
    let ok = root && have_object;
    if !ok {
        assert!(
            std::env::var_os("HERD_STRICT").is_none(),
            "recorder tests need root and the eBPF object (cargo xtask build-ebpf)"
        );
        eprintln!("SKIP: not root or no eBPF object");
    }
    ok
}

/// A read-only loop device over `file`; detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["-r", "-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Runs `herd record … --json -- sh -c SCRIPT`; returns its JSON and profile.
fn record(target: &[&str], out: &Path, script: &str) -> (serde_json::Value, Profile) {
    let o = Command::new(HERD)
        .arg("record")
        .args(target)
        .arg("--out")
        .arg(out)
        .args(["--json", "--", "sh", "-c", script])
        .output()
        .expect("run herd record");
    assert!(
        o.status.success(),
        "herd record failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let json = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(json).expect("record JSON");
    let p = Profile::decode(&std::fs::read(out).expect("profile")).expect("valid profile");
    (v, p)
}

#[test]
fn a_loop_device_read_at_known_offsets_yields_exactly_those_extents() {
    if !can_record() {
        return;
    }
    let dir = scratch("record-known");
    let img = dir.join("disk.img");
    common::random_image(&img, 64 << 20);
    let dev = Loop::attach(&img);
    let d = &dev.0;
    // Direct reads: 4 KiB at 1 MiB, 64 KiB at 8 MiB, 12 KiB at 40 MiB+4 KiB.
    let script = format!(
        "dd if={d} of=/dev/null bs=4k skip=256 count=1 iflag=direct status=none && \
         dd if={d} of=/dev/null bs=64k skip=128 count=1 iflag=direct status=none && \
         dd if={d} of=/dev/null bs=4k skip=10241 count=3 iflag=direct status=none"
    );
    let (v, p) = record(&["--device", d], &dir.join("known.profile"), &script);
    let got: Vec<(u64, u64)> = p.extents.iter().map(|e| (e.offset, e.len)).collect();
    assert_eq!(
        got,
        vec![
            (1 << 20, 4096),
            (8 << 20, 65536),
            ((40 << 20) + 4096, 12288)
        ]
    );
    assert_eq!(v["drops"], 0);
    assert_eq!(p.image_size, 64 << 20);
}

#[test]
fn one_gib_of_4k_direct_reads_is_262144_events_and_no_drops() {
    if !can_record() {
        return;
    }
    let dir = scratch("record-1g");
    let img = dir.join("sparse.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 30))
        .expect("sparse image");
    let dev = Loop::attach(&img);
    let script = format!(
        "dd if={} of=/dev/null bs=4k iflag=direct status=none",
        dev.0
    );
    let (v, p) = record(&["--device", &dev.0], &dir.join("all.profile"), &script);
    eprintln!("1 GiB of 4 KiB reads: {v}");
    assert_eq!(v["events"], 262_144);
    assert_eq!(v["drops"], 0);
    assert_eq!(p.bytes(), 1 << 30);
}

#[test]
fn a_file_read_through_the_page_cache_is_recorded() {
    if !can_record() {
        return;
    }
    let dir = scratch("record-file");
    let img = dir.join("disk.img");
    common::random_image(&img, 32 << 20);
    let img_s = img.to_str().expect("utf8");
    // Buffered 64 KiB at 20 MiB: the page cache adds pages (plus its own
    // read-ahead), which the recorder must see even though the file was
    // just written (it drops the cached pages first).
    let script = format!("dd if={img_s} of=/dev/null bs=64k skip=320 count=1 status=none");
    let (_, p) = record(&["--file", img_s], &dir.join("file.profile"), &script);
    let covered = |at: u64| p.extents.iter().any(|e| e.offset <= at && at < e.end());
    assert!(
        (20 << 20..(20 << 20) + 65536).step_by(4096).all(covered),
        "{:?}",
        p.extents
    );
    // Read-ahead aside, nothing far from the read shows up.
    assert!(p.bytes() <= 4 << 20, "{} bytes recorded", p.bytes());
}

#[test]
fn recording_without_cap_bpf_fails_with_a_clear_message() {
    if !common::have("setpriv") {
        return;
    }
    let dir = scratch("record-nocap");
    let img = dir.join("disk.img");
    common::random_image(&img, 1 << 20);
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(HERD)
        .args(["record", "--file"])
        .arg(&img)
        .args(["--out", "/nonexistent/x.profile", "--duration", "1"])
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("CAP_BPF") && err.contains("--record-profile"),
        "{err}"
    );
}
