//! The appliance's boot test: qemu (TCG) boots the image with user-mode
//! networking and host port forwards, with a config disk making it a
//! **root** node — LIO serves a golden image from a third disk, herd's
//! iSCSI initiator reads it on the same node and serves it over NBD. The
//! host then checks herd.service over SSH and reads the export with
//! `nbdcopy`, byte for byte. A second boot with a wrong role must leave
//! herd stopped with a clear message in the journal, and SSH working.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::appliance::{self, CONFIG_LABEL};
use crate::image::{self, Kind};
use crate::util::{free_port, output, run, spinner, ssh_root, step, work_dir};

pub const IQN: &str = "iqn.2026-11.dev.herd:golden";

/// What the boot test measured.
#[derive(Debug)]
pub struct Report {
    pub image_bytes: u64,
    pub boot_to_export_secs: f64,
    pub golden_bytes: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "appliance ({} MiB qcow2, TCG): root node's NBD export up {:.0} s after power-on; \
             {} MiB read back through LIO → herd byte-identical; wrong role refused, SSH up",
            self.image_bytes >> 20,
            self.boot_to_export_secs,
            self.golden_bytes >> 20
        )
    }
}

/// Files for a node's HERDCFG disk.
pub struct NodeConfig<'a> {
    pub role: &'a str,
    pub herd_toml: String,
    pub lio_env: Option<String>,
    pub authorized_keys: Option<String>,
}

/// Writes a small ext4 disk labelled HERDCFG holding the node's config.
pub fn config_disk(out: &Path, cfg: &NodeConfig<'_>) -> Result<()> {
    let staging = out.with_extension("d");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    fs::write(staging.join("role"), format!("{}\n", cfg.role))?;
    fs::write(staging.join("herd.toml"), &cfg.herd_toml)?;
    if let Some(l) = &cfg.lio_env {
        fs::write(staging.join("lio.env"), l)?;
    }
    if let Some(k) = &cfg.authorized_keys {
        fs::write(staging.join("authorized_keys"), k)?;
    }
    let _ = fs::remove_file(out);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", CONFIG_LABEL, "-d"])
        .arg(&staging)
        .arg(out)
        .arg("8M"))?;
    fs::remove_dir_all(&staging)?;
    Ok(())
}

/// herd.toml of a root node reading LIO on the same node.
pub fn root_toml() -> String {
    format!(
        "upstream = \"iscsi://127.0.0.1/{IQN}/0\"\nlisten = [\"0.0.0.0:10809\"]\n\
         cache_dir = \"/var/cache/herd\"\nmetrics = \"0.0.0.0:9100\"\n"
    )
}

/// An SSH key pair for reaching test VMs, made once per checkout.
pub fn ssh_key() -> Result<(PathBuf, String)> {
    let dir = work_dir("ssh");
    fs::create_dir_all(&dir)?;
    let key = dir.join("id_ed25519");
    if !key.exists() {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "herd-test", "-f"])
            .arg(&key))?;
    }
    let public = fs::read_to_string(key.with_extension("pub"))?;
    Ok((key, public))
}

/// A qemu VM of the appliance; killed on drop.
struct Vm {
    child: Child,
    nbd: u16,
    ssh: u16,
    key: PathBuf,
    console: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    fn boot(
        dir: &Path,
        name: &str,
        base: &Path,
        config: &Path,
        golden: &Path,
        key: &Path,
    ) -> Result<Self> {
        let overlay = dir.join(format!("{name}.qcow2"));
        let _ = fs::remove_file(&overlay);
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(&overlay))?;
        let (nbd, ssh) = (free_port()?, free_port()?);
        let console = dir.join(format!("{name}.console"));
        let child = Command::new("qemu-system-x86_64")
            .args(["-M", "pc", "-accel", "tcg", "-m", "1024", "-smp", "1"])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                config.display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                golden.display()
            ))
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{nbd}-:10809,hostfwd=tcp:127.0.0.1:{ssh}-:22"
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start qemu-system-x86_64")?;
        Ok(Self {
            child,
            nbd,
            ssh,
            key: key.to_owned(),
            console,
        })
    }

    fn ssh(&self, cmd: &str) -> Result<String> {
        ssh_root(&self.key, "127.0.0.1", self.ssh, cmd)
    }

    fn console_tail(&self) -> String {
        let text = fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(25).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Polls `probe` until it succeeds or `limit` passes.
    fn wait(&mut self, what: &str, limit: Duration, probe: impl Fn(&Self) -> bool) -> Result<f64> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(s) = self.child.try_wait()? {
                bail!(
                    "the VM exited ({s}) while waiting for {what}:\n{}",
                    self.console_tail()
                );
            }
            if probe(self) {
                return Ok(t.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        bail!(
            "no {what} after {} s; console:\n{}",
            limit.as_secs(),
            self.console_tail()
        )
    }
}

fn sha256(path: &Path) -> Result<String> {
    let out = output(Command::new("sha256sum").arg(path))?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

/// Boots the appliance as a root node and checks it end to end.
pub fn run_check() -> Result<Report> {
    let base = appliance::build()?;
    let golden = image::ensure(Kind::Busybox)?.root;
    let (key, public) = ssh_key()?;
    let dir = work_dir("appliance-test");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;

    let cfg = dir.join("root-cfg.img");
    config_disk(
        &cfg,
        &NodeConfig {
            role: "root",
            herd_toml: root_toml(),
            lio_env: Some(format!("GOLDEN_DEVICE=/dev/vdc\nIQN={IQN}\n")),
            authorized_keys: Some(public.clone()),
        },
    )?;
    let mut vm = Vm::boot(&dir, "root", &base, &cfg, &golden, &key)?;
    let pb = spinner("appliance: booting (TCG) until its NBD export answers");
    let url = format!("nbd://127.0.0.1:{}/herd", vm.nbd);
    let secs = vm.wait("NBD export", Duration::from_secs(420), |_| {
        Command::new("nbdinfo")
            .args(["--size", &url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    pb.finish_and_clear();
    let secs = secs?;
    step(&format!("appliance export up {secs:.0} s after boot"));
    // The export can answer before sshd does (seen once under TCG).
    vm.wait("SSH", Duration::from_secs(120), |v| v.ssh("true").is_ok())?;
    let active = vm.ssh("systemctl is-active herd.service")?;
    anyhow::ensure!(active.trim() == "active", "herd.service is {active}");
    let journal = vm.ssh("journalctl -b -u herd --no-pager")?;
    anyhow::ensure!(
        journal.contains("iSCSI") || journal.contains("iscsi"),
        "herd did not log its iSCSI upstream:\n{journal}"
    );
    let copy = dir.join("export.img");
    run(Command::new("nbdcopy").arg(&url).arg(&copy))?;
    anyhow::ensure!(
        sha256(&copy)? == sha256(&golden)?,
        "the export differs from the golden image LIO serves"
    );
    let golden_bytes = fs::metadata(&golden)?.len();
    drop(vm);

    // Wrong role: herd stays down with a clear message; SSH still works.
    let bad = dir.join("bad-cfg.img");
    config_disk(
        &bad,
        &NodeConfig {
            role: "bogus",
            herd_toml: root_toml(),
            lio_env: None,
            authorized_keys: Some(public),
        },
    )?;
    let mut vm = Vm::boot(&dir, "bad", &base, &bad, &golden, &key)?;
    let pb = spinner("appliance: booting with a wrong role until SSH answers");
    let r = vm.wait("SSH", Duration::from_secs(420), |v| v.ssh("true").is_ok());
    pb.finish_and_clear();
    r?;
    let journal = vm.ssh("journalctl -b -u herd-setup --no-pager")?;
    anyhow::ensure!(
        journal.contains("unknown role 'bogus'"),
        "herd-setup did not explain the wrong role:\n{journal}"
    );
    let state = vm.ssh("systemctl is-active herd.service || true")?;
    anyhow::ensure!(
        state.trim() != "active",
        "herd.service runs without a valid role"
    );
    Ok(Report {
        image_bytes: fs::metadata(&base)?.len(),
        boot_to_export_secs: secs,
        golden_bytes,
    })
}
