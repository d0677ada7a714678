//! `cargo xtask appliance`: the herd appliance image, a self-contained
//! qcow2 built from Debian packages only.
//!
//! - Debian bookworm minbase + systemd, udev, sshd, networkd (DHCP on every
//!   wired interface), Debian's packaged kernel with its initramfs — which
//!   carries LIO (target_core_*, iscsi_target_mod), nbd and iscsi_tcp as
//!   modules — plus targetcli-fb, nbd-client and open-iscsi (the kernel
//!   initiator, to attach a parent's herd iSCSI target);
//! - herd at /usr/bin/herd, its eBPF object at /usr/lib/herd/herd-ebpf.o,
//!   `herd.service` (reads /etc/herd/herd.toml) after `herd-setup.service`,
//!   which takes the node's role and config from a disk labelled HERDCFG at
//!   every boot (files in `appliance/`);
//! - booted by extlinux installed in the ext4 file system's boot sector (one
//!   unpartitioned file system, so the image needs nothing from the host:
//!   no `-kernel`, any BIOS boots it).
//!
//! The debootstrapped base is cached (`target/herd/appliance/base`); the
//! image is rebuilt when herd, the eBPF object or `appliance/` change.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::util::{output, run, spinner, step, with_mounted, work_dir};

/// Bump when the base package set changes: invalidates the cached base.
const BASE_RECIPE: &str = "bookworm-minbase-v2";
const PACKAGES: &str = "systemd-sysv,udev,kmod,dbus,openssh-server,sudo,iproute2,netbase,\
iputils-ping,procps,linux-image-amd64,initramfs-tools,targetcli-fb,nbd-client,open-iscsi,e2fsprogs";
pub const ROOT_LABEL: &str = "herd-appliance";
/// Label of the per-node config disk `herd-setup` looks for.
pub const CONFIG_LABEL: &str = "HERDCFG";

const HERD_SERVICE: &str = include_str!("../../appliance/herd.service");
const SETUP_SERVICE: &str = include_str!("../../appliance/herd-setup.service");
const SETUP_SCRIPT: &str = include_str!("../../appliance/herd-setup");
const DHCP_NETWORK: &str = include_str!("../../appliance/99-dhcp.network");

/// Builds (or reuses) the appliance and returns the qcow2's path.
pub fn build() -> Result<PathBuf> {
    crate::deps::ensure(&[
        "debootstrap",
        "e2fsprogs",
        "extlinux",
        "syslinux-common",
        "qemu-utils",
    ])?;
    let herd = crate::demo::build_herd()?;
    let object = crate::ebpf::build()?;
    let dir = work_dir("appliance");
    fs::create_dir_all(&dir)?;
    let mut h = Sha256::new();
    h.update(BASE_RECIPE);
    h.update(fs::read(&herd)?);
    h.update(fs::read(&object)?);
    for part in [HERD_SERVICE, SETUP_SERVICE, SETUP_SCRIPT, DHCP_NETWORK] {
        h.update(part);
    }
    let key: String = h.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = dir.join("herd-appliance.qcow2");
    let stamp = dir.join("herd-appliance.key");
    if out.exists() && fs::read_to_string(&stamp).is_ok_and(|k| k == key) {
        step(&format!("appliance up to date: {}", out.display()));
        return Ok(out);
    }
    let t = Instant::now();
    let base = ensure_base(&dir)?;
    let staging = dir.join("staging");
    let _ = fs::remove_dir_all(&staging);
    let pb = spinner("appliance: copying the base");
    run(Command::new("cp").arg("-a").arg(&base).arg(&staging))?;
    pb.finish_and_clear();
    customise(&staging, &herd, &object)?;
    let raw = dir.join("herd-appliance.raw");
    make_bootable_fs(&staging, &raw)?;
    fs::remove_dir_all(&staging)?;
    let pb = spinner("appliance: converting to qcow2");
    let tmp = out.with_extension("tmp");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&raw)
        .arg(&tmp))?;
    fs::rename(&tmp, &out)?;
    fs::remove_file(&raw)?;
    pb.finish_and_clear();
    fs::write(&stamp, &key)?;
    step(&format!(
        "appliance {} ({} MiB) built in {:.0} s",
        out.display(),
        fs::metadata(&out)?.len() >> 20,
        t.elapsed().as_secs_f64()
    ));
    Ok(out)
}

/// debootstrap once per recipe.
fn ensure_base(dir: &Path) -> Result<PathBuf> {
    let base = dir.join("base");
    let stamp = dir.join("base.recipe");
    if base.join("usr/bin").is_dir() && fs::read_to_string(&stamp).is_ok_and(|r| r == BASE_RECIPE) {
        return Ok(base);
    }
    let _ = fs::remove_dir_all(&base);
    let pb = spinner(
        "appliance: debootstrap bookworm minbase + kernel, sshd, targetcli, open-iscsi (3-5 min)",
    );
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={PACKAGES}"),
            "bookworm",
        ])
        .arg(&base)
        .arg("http://deb.debian.org/debian"))?;
    pb.finish_and_clear();
    // Package caches are not part of an appliance.
    let _ = fs::remove_dir_all(base.join("var/cache/apt/archives"));
    let _ = fs::remove_dir_all(base.join("var/lib/apt/lists"));
    fs::create_dir_all(base.join("var/lib/apt/lists/partial"))?;
    fs::write(&stamp, BASE_RECIPE)?;
    Ok(base)
}

fn write(root: &Path, path: &str, text: &str, mode: u32) -> Result<()> {
    let p = root.join(path.trim_start_matches('/'));
    if let Some(d) = p.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn enable(root: &Path, unit: &str, target: &str) -> Result<()> {
    let wants = root.join(format!("etc/systemd/system/{target}.wants"));
    fs::create_dir_all(&wants)?;
    let link = wants.join(unit.rsplit('/').next().unwrap_or(unit));
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(unit, link)?;
    Ok(())
}

fn customise(root: &Path, herd: &Path, object: &Path) -> Result<()> {
    fs::copy(herd, root.join("usr/bin/herd"))?;
    fs::create_dir_all(root.join("usr/lib/herd"))?;
    fs::copy(object, root.join("usr/lib/herd/herd-ebpf.o"))?;
    write(root, "etc/systemd/system/herd.service", HERD_SERVICE, 0o644)?;
    write(
        root,
        "etc/systemd/system/herd-setup.service",
        SETUP_SERVICE,
        0o644,
    )?;
    write(root, "usr/lib/herd/herd-setup", SETUP_SCRIPT, 0o755)?;
    write(
        root,
        "etc/systemd/network/99-dhcp.network",
        DHCP_NETWORK,
        0o644,
    )?;
    enable(
        root,
        "/etc/systemd/system/herd.service",
        "multi-user.target",
    )?;
    enable(
        root,
        "/etc/systemd/system/herd-setup.service",
        "multi-user.target",
    )?;
    enable(
        root,
        "/lib/systemd/system/systemd-networkd.service",
        "multi-user.target",
    )?;
    enable(
        root,
        "/lib/systemd/system/systemd-networkd-wait-online.service",
        "network-online.target",
    )?;
    enable(root, "/lib/systemd/system/ssh.service", "multi-user.target")?;
    // Every VM must get its own machine id (and so its own DHCP client id):
    // empty means "generate at first boot" (shared/MACHINE-NOTES.md).
    write(root, "etc/machine-id", "", 0o444)?;
    let dbus_id = root.join("var/lib/dbus/machine-id");
    let _ = fs::remove_file(&dbus_id);
    if let Some(d) = dbus_id.parent() {
        fs::create_dir_all(d)?;
    }
    std::os::unix::fs::symlink("/etc/machine-id", &dbus_id)?;
    write(root, "etc/hostname", "herd\n", 0o644)?;
    write(
        root,
        "etc/hosts",
        "127.0.0.1 localhost\n127.0.1.1 herd\n",
        0o644,
    )?;
    write(
        root,
        "etc/fstab",
        &format!("LABEL={ROOT_LABEL} / ext4 rw,noatime 0 1\n"),
        0o644,
    )?;
    // Keys for SSH come from the config disk; passwords never work.
    write(
        root,
        "etc/ssh/sshd_config.d/herd.conf",
        "PasswordAuthentication no\nPermitRootLogin prohibit-password\nUseDNS no\n",
        0o644,
    )?;
    // Host keys are generated per VM at first boot, not baked in.
    for e in fs::read_dir(root.join("etc/ssh"))? {
        let p = e?.path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ssh_host_"))
        {
            fs::remove_file(p)?;
        }
    }
    write(
        root,
        "etc/systemd/system/ssh-keygen.service",
        "[Unit]\nDescription=Generate SSH host keys\nBefore=ssh.service\n\
         ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key\n\
         [Service]\nType=oneshot\nExecStart=/usr/bin/ssh-keygen -A\n\
         [Install]\nWantedBy=multi-user.target\n",
        0o644,
    )?;
    enable(
        root,
        "/etc/systemd/system/ssh-keygen.service",
        "multi-user.target",
    )?;
    // Host nodes attach their leaf's export with the kernel NBD client.
    write(root, "etc/modules-load.d/herd.conf", "nbd\n", 0o644)?;
    // The boot loader: the kernel and initrd Debian installed.
    let boot = root.join("boot");
    let name = |prefix: &str| -> Result<String> {
        fs::read_dir(&boot)?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(prefix))
            .with_context(|| format!("no /boot/{prefix}* in the base"))
    };
    let (kernel, initrd) = (name("vmlinuz-")?, name("initrd.img-")?);
    write(
        root,
        "boot/extlinux/extlinux.conf",
        &format!(
            "DEFAULT herd\nTIMEOUT 1\nPROMPT 0\nLABEL herd\n  KERNEL /boot/{kernel}\n  INITRD /boot/{initrd}\n  \
             APPEND root=LABEL={ROOT_LABEL} rw console=ttyS0,115200 net.ifnames=0 quiet\n"
        ),
        0o644,
    )?;
    Ok(())
}

/// One ext4 file system (no 64bit feature: extlinux 6.04 cannot boot it)
/// with extlinux in its boot sector.
fn make_bootable_fs(staging: &Path, raw: &Path) -> Result<()> {
    let used = output(Command::new("du").args(["-sm"]).arg(staging))?;
    let used_mib: u64 = used
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024);
    let size = used_mib + used_mib / 2 + 256;
    let _ = fs::remove_file(raw);
    let pb = spinner(format!("appliance: mkfs.ext4 {size} MiB"));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^64bit", "-L", ROOT_LABEL, "-d"])
        .arg(staging)
        .arg(raw)
        .arg(format!("{size}M")))?;
    pb.finish_and_clear();
    with_mounted(raw, &raw.with_extension("mnt"), |mnt| {
        run(Command::new("extlinux")
            .arg("--install")
            .arg(mnt.join("boot/extlinux")))
        .context("extlinux --install failed")
    })
}
