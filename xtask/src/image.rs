//! Builds the demo's boot disk from Debian packages only, cached under
//! target/herd/images:
//!
//! - `vmlinux`: the ELF kernel unpacked from linux-image-amd64's bzImage
//!   (boots through PVH with `-kernel`, skipping the ~3.5 s XZ
//!   decompression under TCG);
//! - `initrd.gz`: busybox-static plus the virtio/ext4 modules, loaded in the
//!   order `modinfo -F depends` gives for the kernel actually downloaded;
//! - `busybox.img` (16 MiB, boots in seconds) or `debian.img` (debootstrap
//!   minbase + systemd), ext4 roots whose init prints [`MARKER`] to ttyS0
//!   and powers off.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::deps;
use crate::util::{output, run, spinner, step, work_dir};

/// What a booted guest prints on its serial console when boot is complete.
pub const MARKER: &str = "HERD-BOOT-OK";

/// Modules the initramfs needs to mount an ext4 root on virtio-blk.
const ROOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// busybox-only root: 16 MiB, boots in a few seconds (tests)
    Busybox,
    /// Debian bookworm minbase + systemd (~300 MiB; the realistic default)
    Debian,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Busybox => "busybox",
            Self::Debian => "debian",
        }
    }
}

/// Paths of a complete boot disk.
pub struct Disk {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub root: PathBuf,
}

/// Builds whatever is missing and returns the paths.
pub fn ensure(kind: Kind) -> Result<Disk> {
    deps::ensure(&[
        "busybox-static",
        "e2fsprogs",
        "cpio",
        "kmod",
        "xz-utils",
        "debootstrap",
    ])?;
    let dir = work_dir("images");
    fs::create_dir_all(&dir)?;
    let kernel_tree = dir.join("kernel");
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initrd.gz");
    if !kernel.exists() || !initrd.exists() {
        if !kernel_tree.join("lib/modules").exists() {
            fetch_kernel(&kernel_tree)?;
        }
        extract_vmlinux(&kernel_tree, &kernel)?;
        build_initrd(&kernel_tree, &initrd)?;
    }
    let root = dir.join(format!("{}.img", kind.name()));
    if !root.exists() {
        match kind {
            Kind::Busybox => build_busybox_root(&root)?,
            Kind::Debian => build_debian_root(&root)?,
        }
    }
    Ok(Disk {
        kernel,
        initrd,
        root,
    })
}

fn fetch_kernel(tree: &Path) -> Result<()> {
    deps::ensure_lists()?;
    let opts = deps::apt_opts();
    let depends = output(
        Command::new("apt-cache")
            .args(&opts)
            .args(["depends", "linux-image-amd64"]),
    )?;
    let Some(pkg) = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
    else {
        bail!("linux-image-amd64 names no kernel package:\n{depends}");
    };
    let pb = spinner(format!("downloading {pkg}"));
    let dl = work_dir("images/deb");
    let _ = fs::remove_dir_all(&dl);
    fs::create_dir_all(&dl)?;
    run(Command::new("apt-get")
        .current_dir(&dl)
        .args(&opts)
        .args(["download", pkg]))?;
    let deb = fs::read_dir(&dl)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let _ = fs::remove_dir_all(tree);
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(tree))?;
    fs::remove_dir_all(&dl)?;
    pb.finish_and_clear();
    step(&format!("kernel {pkg} unpacked"));
    Ok(())
}

fn kernel_version(tree: &Path) -> Result<String> {
    let mods = tree.join("lib/modules");
    fs::read_dir(&mods)
        .with_context(|| format!("no {}", mods.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("kernel package has no modules")
}

/// Finds the XZ stream in the bzImage and decompresses it: the result is the
/// ELF vmlinux, which qemu boots directly through its PVH note.
fn extract_vmlinux(tree: &Path, out: &Path) -> Result<()> {
    let ver = kernel_version(tree)?;
    let bz = tree.join(format!("boot/vmlinuz-{ver}"));
    let data = fs::read(&bz).with_context(|| format!("cannot read {}", bz.display()))?;
    let magic = [0xfd, b'7', b'z', b'X', b'Z', 0x00];
    let at = data
        .windows(magic.len())
        .position(|w| w == magic)
        .context("no XZ stream in the kernel image")?;
    let xz = out.with_extension("xz");
    fs::write(&xz, &data[at..])?;
    let elf = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .arg(&xz)
        .output()
        .context("cannot run xz")?;
    fs::remove_file(&xz)?;
    // xz reports trailing garbage after the stream; the ELF is what counts.
    if !elf.stdout.starts_with(b"\x7fELF") {
        bail!("decompressed kernel is not an ELF file");
    }
    let tmp = out.with_extension("tmp");
    fs::write(&tmp, &elf.stdout)?;
    fs::rename(&tmp, out)?;
    step(&format!("vmlinux {} MiB", elf.stdout.len() >> 20));
    Ok(())
}

fn module_index(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().contains(".ko") {
                out.push(p);
            }
        }
    }
    Ok(out)
}

fn module_name(p: &Path) -> String {
    let f = p
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    f.split(".ko").next().unwrap_or_default().replace('-', "_")
}

/// Depth-first: a module's dependencies come before it.
fn load_order(
    index: &[PathBuf],
    name: &str,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<PathBuf>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) {
        return Ok(());
    }
    let path = index
        .iter()
        .find(|p| module_name(p) == name)
        .with_context(|| format!("kernel has no module {name}"))?;
    let deps = output(Command::new("modinfo").args(["-F", "depends"]).arg(path))?;
    for d in deps.trim().split(',').filter(|d| !d.is_empty()) {
        load_order(index, d, seen, order)?;
    }
    order.push(path.clone());
    Ok(())
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "herd-initrd: insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
if ! mount -t ext4 -o rw /dev/vda /newroot; then
  echo "herd-initrd: cannot mount /dev/vda"; poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
"#;

fn build_initrd(tree: &Path, out: &Path) -> Result<()> {
    let pb = spinner("building initramfs");
    let ver = kernel_version(tree)?;
    let index = module_index(&tree.join("lib/modules").join(&ver))?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for m in ROOT_MODULES {
        load_order(&index, m, &mut seen, &mut order)?;
    }
    let staging = work_dir("images/initrd");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(staging.join("bin"))?;
    fs::create_dir_all(staging.join("lib/modules"))?;
    fs::copy("/bin/busybox", staging.join("bin/busybox")).context("busybox-static is missing")?;
    let mut list = String::new();
    for m in &order {
        let name = format!("{}.ko", module_name(m));
        let dst = staging.join("lib/modules").join(&name);
        let s = m.to_string_lossy();
        if s.ends_with(".ko.xz") {
            let raw = Command::new("xz").arg("-dc").arg(m).output()?;
            fs::write(&dst, raw.stdout)?;
        } else if s.ends_with(".ko.zst") {
            bail!("zstd-compressed modules are not supported: {s}");
        } else {
            fs::copy(m, &dst)?;
        }
        list.push_str(&name);
        list.push('\n');
    }
    fs::write(staging.join("modules.order"), list)?;
    fs::write(staging.join("init"), INIT)?;
    fs::set_permissions(staging.join("init"), fs::Permissions::from_mode(0o755))?;
    let cpio = format!(
        "cd {} && find . -print0 | cpio --null -o -H newc --quiet | gzip -9 > {}",
        staging.display(),
        out.display()
    );
    let tmp = out.with_extension("tmp");
    let cpio = cpio.replace(&out.display().to_string(), &tmp.display().to_string());
    run(Command::new("sh").args(["-c", &cpio]))?;
    fs::rename(&tmp, out)?;
    fs::remove_dir_all(&staging)?;
    pb.finish_and_clear();
    step(&format!(
        "initramfs: {} modules ({}), {} KiB",
        order.len(),
        order
            .iter()
            .map(|p| module_name(p))
            .collect::<Vec<_>>()
            .join(" "),
        fs::metadata(out)?.len() >> 10
    ));
    Ok(())
}

const BUSYBOX_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
# Read the userland like a real boot does, so the demo has a working set.
cat /bin/busybox /etc/* > /dev/null 2>&1
echo "HERD-BOOT-OK" > /dev/ttyS0
sync
poweroff -f
"#;

fn build_busybox_root(out: &Path) -> Result<()> {
    let staging = work_dir("images/busybox-root");
    let _ = fs::remove_dir_all(&staging);
    for d in ["bin", "sbin", "etc", "proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(staging.join(d))?;
    }
    fs::copy("/bin/busybox", staging.join("bin/busybox"))?;
    fs::write(staging.join("sbin/init"), BUSYBOX_INIT)?;
    fs::set_permissions(staging.join("sbin/init"), fs::Permissions::from_mode(0o755))?;
    fs::write(staging.join("etc/hostname"), "herd-demo\n")?;
    mkfs(&staging, out, 16)?;
    fs::remove_dir_all(&staging)?;
    step(&format!(
        "busybox root {} MiB",
        fs::metadata(out)?.len() >> 20
    ));
    Ok(())
}

const MARKER_UNIT: &str = "[Unit]
Description=herd demo: report boot complete and power off
After=basic.target
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo HERD-BOOT-OK > /dev/ttyS0; systemctl --no-block poweroff'
[Install]
WantedBy=multi-user.target
";

fn build_debian_root(out: &Path) -> Result<()> {
    let staging = work_dir("images/debian-root");
    let _ = fs::remove_dir_all(&staging);
    let pb = spinner("debootstrap bookworm minbase + systemd (about 1-2 minutes)");
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=systemd-sysv", "bookworm"])
        .arg(&staging)
        .arg("http://deb.debian.org/debian"))?;
    pb.finish_and_clear();
    let unit = staging.join("etc/systemd/system/herd-marker.service");
    fs::write(&unit, MARKER_UNIT)?;
    let wants = staging.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/herd-marker.service",
        wants.join("herd-marker.service"),
    )?;
    // minbase has no udev, so device units such as dev-ttyS0.device never
    // appear and the serial getty would hold the boot for 90 s: mask it.
    for unit in ["serial-getty@.service", "getty@.service"] {
        std::os::unix::fs::symlink("/dev/null", staging.join("etc/systemd/system").join(unit))?;
    }
    fs::write(staging.join("etc/hostname"), "herd-demo\n")?;
    fs::write(
        staging.join("etc/fstab"),
        "/dev/vda / ext4 rw,noatime 0 1\n",
    )?;
    // Caches apt left behind are not part of a golden image.
    let _ = fs::remove_dir_all(staging.join("var/cache/apt/archives"));
    let _ = fs::remove_dir_all(staging.join("var/lib/apt/lists"));
    let used = output(Command::new("du").args(["-sm"]).arg(&staging))?;
    let used_mib: u64 = used
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    mkfs(&staging, out, used_mib * 2 + 32)?;
    fs::remove_dir_all(&staging)?;
    step(&format!(
        "debian root {} MiB ({used_mib} MiB used)",
        fs::metadata(out)?.len() >> 20
    ));
    Ok(())
}

fn mkfs(dir: &Path, out: &Path, mib: u64) -> Result<()> {
    let tmp = out.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "herd-root", "-d"])
        .arg(dir)
        .arg(&tmp)
        .arg(format!("{mib}M")))?;
    // Rename last so an interrupted build is never mistaken for a cached one.
    fs::rename(&tmp, out)?;
    Ok(())
}
