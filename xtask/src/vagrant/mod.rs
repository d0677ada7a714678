//! `cargo xtask vagrant box | up | check | bench | report | down | cycle`:
//! the multi-node testbed (vagrant-libvirt) built from the appliance image,
//! and the boot storm on it (`bench.rs`).
//!
//! libvirt runs without an init system here, so `up` starts `virtlogd` and
//! `libvirtd` itself (recipe in shared/MACHINE-NOTES.md) and `down` stops
//! what it started, after removing every domain, network and volume the
//! testbed created.

pub mod bench;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::appliance_test::{config_disk, root_toml, ssh_key, NodeConfig, IQN};
use crate::demo;
use crate::image::{self, Kind};
use crate::util::{
    output, raw_overlay, root, run, run_visible, spinner, ssh_root, step, with_mounted, work_dir,
};

/// Packages of the testbed. With backports enabled apt picks libvirt 11,
/// whose storage and network drivers are packages of their own (they are
/// part of libvirt-daemon in bookworm's 9.0, so only backports has them).
pub const PACKAGES: &[&str] = &[
    "vagrant",
    "vagrant-libvirt",
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-daemon-driver-storage",
    "libvirt-daemon-driver-network",
    "libvirt-daemon-config-network",
    "libvirt-clients",
    "dnsmasq-base",
    "ebtables",
    "iptables",
];
const POOL_DIR: &str = "/var/lib/libvirt/images";
const BOX: &str = "herd-appliance";
const NET: &str = "192.168.77";
const NETWORKS: &[&str] = &["herd-testbed", "vagrant-libvirt"];
/// Port of every node's herd iSCSI target: 3260 is LIO's on the root.
const ISCSI_PORT: u16 = 3261;

#[derive(clap::Subcommand, Debug, Clone, Copy)]
pub enum Action {
    /// Build the Vagrant box from the appliance image.
    Box,
    /// Start libvirt if needed, then bring the testbed up.
    Up,
    /// Run the checks on a running testbed; metrics go to results/testbed/.
    Check,
    /// Destroy the testbed and everything it created.
    Down,
    /// The boot storm on the running testbed (see `bench.rs`); results
    /// go to results/testbed/.
    Bench,
    /// Write the bench's report again from results/testbed/storm.json,
    /// beside the emulated fleet's run in results/testbed/emulated/.
    Report,
    /// up, check (and bench with --bench), down (down also when a step
    /// fails).
    Cycle,
    /// `vagrant validate` (no daemon needed).
    Validate,
}

#[derive(clap::Args, Debug)]
pub struct Options {
    #[command(subcommand)]
    pub action: Action,
    /// Nodes in the tree (root included).
    #[arg(long, global = true, default_value_t = 3)]
    pub nodes: usize,
    /// Children per node.
    #[arg(long, global = true, default_value_t = 2)]
    pub fanout: usize,
    /// With cycle: run the storm bench between check and down.
    #[arg(long, global = true)]
    pub bench: bool,
    #[command(flatten)]
    pub storm: bench::Args,
}

/// A node of the tree, as the Vagrantfile names it.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub ip: String,
    pub parent: Option<usize>,
    pub role: &'static str,
}

/// The same tree the Vagrantfile builds.
pub fn tree(nodes: usize, fanout: usize) -> Vec<Node> {
    (0..nodes)
        .map(|i| {
            let role = if i == 0 {
                "root"
            } else if i * fanout + 1 < nodes {
                "relay"
            } else {
                "host"
            };
            Node {
                name: if i == 0 {
                    "root".into()
                } else {
                    format!("{role}{i}")
                },
                ip: format!("{NET}.{}", 10 + i),
                parent: (i > 0).then(|| (i - 1) / fanout),
                role,
            }
        })
        .collect()
}

fn vagrant(o: &Options) -> Command {
    let mut c = Command::new("vagrant");
    c.current_dir(root().join("vagrant"))
        .env("VAGRANT_DEFAULT_PROVIDER", "libvirt")
        .env("HERD_NODES", o.nodes.to_string())
        .env("HERD_FANOUT", o.fanout.to_string())
        .env("HERD_BOX", BOX)
        .env("HERD_NET", NET)
        .env("HERD_LIBVIRT_DRIVER", driver());
    c
}

fn driver() -> &'static str {
    let kvm = image::ensure(Kind::Busybox).is_ok_and(|d| demo::auto_accel(&d) == "kvm");
    if kvm {
        "kvm"
    } else {
        "qemu"
    }
}

fn virsh(args: &[&str]) -> Result<String> {
    output(
        Command::new("virsh")
            .args(["-q", "-c", "qemu:///system"])
            .args(args),
    )
}

pub fn run_action(o: &Options) -> Result<()> {
    anyhow::ensure!(
        (1..=4).contains(&o.nodes),
        "--nodes must be 1..=4 (each VM takes ~400 MB and a share of 2 cores)"
    );
    anyhow::ensure!(o.fanout >= 1, "--fanout must be at least 1");
    match o.action {
        Action::Validate => validate(),
        Action::Box => build_box().map(drop),
        Action::Up => up(o),
        Action::Check => check(o).map(|r| println!("{r}")),
        Action::Down => down(o),
        Action::Bench => bench::run(o.nodes, o.fanout, &o.storm).map(drop),
        Action::Report => bench::report(&o.storm),
        Action::Cycle => cycle(o).map(|r| println!("{r}")),
    }
}

/// up, check, down — down also when up or check failed.
pub fn cycle(o: &Options) -> Result<Report> {
    let t = Instant::now();
    let res = up(o).and_then(|()| check(o)).and_then(|mut r| {
        if o.bench {
            r.storm = Some(bench::run(o.nodes, o.fanout, &o.storm)?);
        }
        Ok(r)
    });
    let d = down(o);
    let r = res?;
    d?;
    step(&format!(
        "testbed cycle: {:.0} s",
        t.elapsed().as_secs_f64()
    ));
    Ok(r)
}

/// `vagrant validate`: the Vagrantfile parses and the provider settings
/// are accepted.
pub fn validate() -> Result<()> {
    crate::deps::ensure(&["vagrant", "vagrant-libvirt"])?;
    let o = Options {
        action: Action::Validate,
        nodes: 3,
        fanout: 2,
        bench: false,
        storm: bench::Args::quick(PathBuf::new()),
    };
    let out = output(
        vagrant(&o)
            .env("HERD_LIBVIRT_DRIVER", "qemu")
            .arg("validate"),
    )?;
    anyhow::ensure!(
        out.contains("validated successfully"),
        "vagrant validate: {out}"
    );
    Ok(())
}

/// Names what is missing for vagrant-libvirt, or starts libvirt.
fn ensure_libvirt() -> Result<()> {
    crate::deps::ensure(PACKAGES)?;
    let plugins = output(Command::new("vagrant").args(["plugin", "list"])).unwrap_or_default();
    if !plugins.contains("vagrant-libvirt") {
        bail!("vagrant has no libvirt support: the vagrant-libvirt plugin is missing (`apt-get install vagrant-libvirt`)");
    }
    for tool in ["virsh", "libvirtd", "virtlogd", "qemu-system-x86_64"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("vagrant-libvirt needs `{tool}`, which is not installed");
        }
    }
    if virsh(&["version"]).is_ok() {
        return ensure_pool();
    }
    // No init system starts libvirt here: do what its units would.
    for (group, user) in [("libvirt-qemu", Some("libvirt-qemu")), ("libvirt", None)] {
        let _ = Command::new("groupadd").args(["-f", "-r", group]).status();
        if let Some(u) = user {
            let exists = Command::new("id")
                .arg(u)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !exists {
                run(Command::new("useradd").args([
                    "-r",
                    "-g",
                    group,
                    "-s",
                    "/usr/sbin/nologin",
                    u,
                ]))?;
            }
        }
    }
    let conf = Path::new("/etc/libvirt/qemu.conf");
    let text = fs::read_to_string(conf).unwrap_or_default();
    if !text.contains("# herd testbed") {
        fs::write(
            conf,
            format!("{text}\n# herd testbed: no init system, no SELinux/AppArmor\nuser = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n"),
        )?;
    }
    for d in [
        "/var/log/libvirt/qemu",
        "/var/lib/libvirt/qemu",
        POOL_DIR,
        "/run/libvirt",
    ] {
        fs::create_dir_all(d)?;
    }
    let pids = work_dir("libvirt");
    fs::create_dir_all(&pids)?;
    run(Command::new("virtlogd")
        .args(["-d", "-p"])
        .arg(pids.join("virtlogd.pid")))?;
    run(Command::new("libvirtd")
        .args(["-d", "-p"])
        .arg(pids.join("libvirtd.pid")))?;
    let t = Instant::now();
    while virsh(&["version"]).is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("libvirtd did not answer within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    step("libvirtd started");
    ensure_pool()
}

fn ensure_pool() -> Result<()> {
    let pools = virsh(&["pool-list", "--all", "--name"])?;
    if !pools.lines().any(|l| l.trim() == "default") {
        virsh(&["pool-define-as", "default", "dir", "--target", POOL_DIR])?;
    }
    let active = virsh(&["pool-list", "--name"])?;
    if !active.lines().any(|l| l.trim() == "default") {
        virsh(&["pool-start", "default"])?;
    }
    Ok(())
}

/// The box: the appliance plus a `vagrant` user with Vagrant's insecure
/// key and passwordless sudo. Rebuilt when the appliance changes.
pub fn build_box() -> Result<PathBuf> {
    crate::deps::ensure(&["vagrant"])?;
    let appliance = crate::appliance::build()?;
    let dir = work_dir("vagrant-box");
    fs::create_dir_all(&dir)?;
    let boxfile = dir.join("herd-appliance.box");
    let key = fs::read(
        dir.parent()
            .unwrap_or(&dir)
            .join("appliance/herd-appliance.key"),
    )
    .unwrap_or_default();
    let stamp = dir.join("box.key");
    if boxfile.exists() && fs::read(&stamp).is_ok_and(|k| k == key) {
        return Ok(boxfile);
    }
    let insecure = vagrant_insecure_key()?;
    let t = Instant::now();
    let raw = dir.join("box.raw");
    let pb = spinner("vagrant box: adding the vagrant user to a copy of the appliance");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-O", "raw"])
        .arg(&appliance)
        .arg(&raw))?;
    with_mounted(&raw, &dir.join("mnt"), |mnt| {
        add_vagrant_user(mnt, &insecure)
    })?;
    let img = dir.join("box.img");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img))?;
    fs::remove_file(&raw)?;
    let info = output(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&img),
    )?;
    let virtual_gb = serde_json::from_str::<serde_json::Value>(&info)?["virtual-size"]
        .as_u64()
        .map_or(2, |b| b.div_ceil(1 << 30));
    fs::write(
        dir.join("metadata.json"),
        format!(
            "{{\"provider\":\"libvirt\",\"format\":\"qcow2\",\"virtual_size\":{virtual_gb}}}\n"
        ),
    )?;
    run(Command::new("tar")
        .current_dir(&dir)
        .args(["cf"])
        .arg(&boxfile)
        .args(["metadata.json", "box.img"]))?;
    fs::remove_file(&img)?;
    run(Command::new("vagrant")
        .args(["box", "add", "--force", "--name", BOX])
        .arg(&boxfile))?;
    pb.finish_and_clear();
    fs::write(&stamp, key)?;
    step(&format!(
        "vagrant box {BOX}: {} MiB in {:.0} s",
        fs::metadata(&boxfile)?.len() >> 20,
        t.elapsed().as_secs_f64()
    ));
    Ok(boxfile)
}

fn vagrant_insecure_key() -> Result<String> {
    let found = output(Command::new("sh").args([
        "-c",
        "ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub /usr/share/vagrant/keys/vagrant.pub 2>/dev/null | head -1",
    ]))?;
    let path = found.trim();
    anyhow::ensure!(
        !path.is_empty(),
        "the vagrant package ships no keys/vagrant.pub"
    );
    Ok(fs::read_to_string(path)?)
}

fn add_vagrant_user(mnt: &Path, key: &str) -> Result<()> {
    let exists = fs::read_to_string(mnt.join("etc/passwd"))?.contains("\nvagrant:");
    if !exists {
        run(Command::new("chroot")
            .arg(mnt)
            .args(["useradd", "-m", "-s", "/bin/bash", "vagrant"]))?;
    }
    let ssh = mnt.join("home/vagrant/.ssh");
    fs::create_dir_all(&ssh)?;
    fs::write(ssh.join("authorized_keys"), key)?;
    run(Command::new("chroot")
        .arg(mnt)
        .args(["chown", "-R", "vagrant:vagrant", "/home/vagrant"]))?;
    run(Command::new("chmod").arg("700").arg(&ssh))?;
    fs::write(
        mnt.join("etc/sudoers.d/vagrant"),
        "vagrant ALL=(ALL) NOPASSWD: ALL\n",
    )?;
    run(Command::new("chmod")
        .arg("440")
        .arg(mnt.join("etc/sudoers.d/vagrant")))?;
    Ok(())
}

fn golden() -> Result<PathBuf> {
    Ok(image::ensure(Kind::Busybox)?.root)
}

fn up(o: &Options) -> Result<()> {
    ensure_libvirt()?;
    build_box()?;
    let (_, public) = ssh_key()?;
    let nodes = tree(o.nodes, o.fanout);
    for n in &nodes {
        let herd_toml = match n.parent {
            None => root_toml(),
            Some(p) => format!(
                "upstream = \"nbd://{}:10809/herd\"\nlisten = [\"0.0.0.0:10809\"]\n\
                 cache_dir = \"/var/cache/herd\"\nmetrics = \"0.0.0.0:9100\"\nparent_timeout = 300\n",
                nodes[p].ip
            ),
        } + &format!("listen_iscsi = [\"0.0.0.0:{ISCSI_PORT}\"]\n");
        config_disk(
            &Path::new(POOL_DIR).join(format!("herd-cfg-{}.img", n.name)),
            &NodeConfig {
                role: n.role,
                herd_toml,
                lio_env: (n.role == "root")
                    .then(|| format!("GOLDEN_DEVICE=/dev/vdc\nSTORM_DEVICE=/dev/vdd\nIQN={IQN}\n")),
                authorized_keys: Some(public.clone()),
            },
        )?;
    }
    fs::copy(golden()?, Path::new(POOL_DIR).join("herd-golden.img"))?;
    // The storm bench's image, LIO's LUN 1 on the root.
    let (storm_image, _) = bench::synthetic()?;
    fs::copy(storm_image, Path::new(POOL_DIR).join("herd-storm.img"))?;
    virsh(&["pool-refresh", "default"])?;
    let t = Instant::now();
    step(&format!(
        "vagrant up: {} nodes ({})",
        nodes.len(),
        nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    run_visible(vagrant(o).args(["up", "--provider", "libvirt"]))?;
    step(&format!("testbed up in {:.0} s", t.elapsed().as_secs_f64()));
    Ok(())
}

fn ssh(ip: &str, cmd: &str) -> Result<String> {
    let (key, _) = ssh_key()?;
    ssh_root(&key, ip, 22, cmd)
}

fn sha256_of(cmd: &mut Command) -> Result<String> {
    Ok(output(cmd)?
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// What the checks measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub version: u32,
    pub nodes: Vec<NodeMetrics>,
    pub vm_boot_secs: f64,
    pub lio_sha256_matches: bool,
    pub kernel_nbd_file: String,
    /// What the host node's kernel initiator (open-iscsi) read from its
    /// parent's herd iSCSI target.
    pub kernel_iscsi: KernelIscsi,
    /// The storm bench, when the cycle ran it (written to its own file).
    #[serde(skip)]
    pub storm: Option<bench::TestbedStorm>,
}

#[derive(Debug, serde::Serialize)]
pub struct KernelIscsi {
    pub node: String,
    pub target: String,
    pub iqn: String,
    /// /etc/hostname of the mounted file system.
    pub file: String,
    /// The kernel's read-only flag of the SCSI disk (MODE SENSE's WP bit).
    pub read_only: bool,
    pub size_bytes: u64,
    /// SCSI commands the parent's target answered during the check.
    pub target_commands: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct NodeMetrics {
    pub name: String,
    pub role: String,
    pub upstream_bytes: u64,
    pub served_bytes: u64,
    pub chunks_present: u64,
    pub chunks_total: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "testbed: VM booted from a leaf in {:.2} s; LIO → herd checksum {}; kernel NBD client read /etc/hostname = {:?}",
            self.vm_boot_secs,
            if self.lio_sha256_matches { "matches" } else { "DIFFERS" },
            self.kernel_nbd_file)?;
        let k = &self.kernel_iscsi;
        writeln!(f, "testbed: {}'s kernel initiator logged in to {} ({}), {} MiB {}, read /etc/hostname = {:?}; the target answered {} SCSI commands",
            k.node, k.target, k.iqn, k.size_bytes >> 20,
            if k.read_only { "read-only" } else { "WRITABLE" }, k.file, k.target_commands)?;
        for n in &self.nodes {
            writeln!(
                f,
                "  {:8} {:5}: fetched {:7.2} MiB from its upstream, served {:7.2} MiB, cache {}/{} chunks",
                n.name,
                n.role,
                n.upstream_bytes as f64 / f64::from(1 << 20),
                n.served_bytes as f64 / f64::from(1 << 20),
                n.chunks_present,
                n.chunks_total
            )?;
        }
        Ok(())
    }
}

fn check(o: &Options) -> Result<Report> {
    let nodes = tree(o.nodes, o.fanout);
    // Every node's export answers.
    for n in &nodes {
        let url = format!("nbd://{}:10809/herd", n.ip);
        let t = Instant::now();
        while !Command::new("nbdinfo")
            .args(["--size", &url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            if t.elapsed() > Duration::from_secs(300) {
                let journal = ssh(
                    &n.ip,
                    "journalctl -b -u herd-setup -u herd --no-pager | tail -30",
                )
                .unwrap_or_default();
                bail!(
                    "{}'s export {url} does not answer after 300 s:\n{journal}",
                    n.name
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let leaf = nodes
        .iter()
        .rev()
        .find(|n| n.role == "host")
        .unwrap_or(&nodes[nodes.len() - 1]);
    // 1. The physical host boots a VM from a leaf's export.
    let disk = image::ensure(Kind::Busybox)?;
    let dir = work_dir("testbed");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let overlay = dir.join("vm.qcow2");
    let size = fs::metadata(&disk.root)?.len();
    raw_overlay(&overlay, &format!("nbd://{}:10809/herd", leaf.ip), size)?;
    let pb = spinner(format!(
        "booting a VM on this host from {}'s export",
        leaf.name
    ));
    let boot = demo::boot(
        &disk,
        &overlay,
        "qcow2",
        "tcg",
        Duration::from_secs(180),
        Some(&pb),
    );
    pb.finish_and_clear();
    let vm_boot_secs = boot.context("VM boot from the testbed leaf")?;
    // Per-node metrics after that one boot.
    let results = root().join("results/testbed");
    fs::create_dir_all(&results)?;
    let mut metrics = Vec::new();
    for n in &nodes {
        let prom =
            output(Command::new("curl").args(["-sf", &format!("http://{}:9100/metrics", n.ip)]))
                .with_context(|| format!("metrics of {}", n.name))?;
        fs::write(results.join(format!("{}.prom", n.name)), &prom)?;
        let get = |name: &str| crate::util::prom_require(&prom, name);
        metrics.push(NodeMetrics {
            name: n.name.clone(),
            role: n.role.to_owned(),
            upstream_bytes: get("herd_upstream_read_bytes_total")?,
            served_bytes: get("herd_served_bytes_total")?,
            chunks_present: get("herd_cache_chunks_present")?,
            chunks_total: get("herd_cache_chunks_total")?,
        });
    }
    // 2. A host node's kernel NBD client mounts its own export.
    let kernel_nbd_file = ssh(
        &leaf.ip,
        "modprobe nbd && nbd-client 127.0.0.1 10809 /dev/nbd0 -N herd -readonly >/dev/null && \
         mount -o ro /dev/nbd0 /mnt && cat /mnt/etc/hostname; rc=$?; umount /mnt; nbd-client -d /dev/nbd0 >/dev/null; exit $rc",
    )
    .context("kernel NBD client on the host node")?
    .trim()
    .to_owned();
    anyhow::ensure!(
        kernel_nbd_file == "herd-demo",
        "read {kernel_nbd_file:?} through /dev/nbd0"
    );
    // 3. herd's iSCSI initiator reads the LIO LUN byte-identically.
    let root_node = &nodes[0];
    let want = sha256_of(Command::new("sha256sum").arg(golden()?))?;
    let lio = ssh(&root_node.ip, "sha256sum /dev/vdc")?;
    let via_herd = sha256_of(Command::new("sh").args([
        "-c",
        &format!("nbdcopy nbd://{}:10809/herd - | sha256sum", root_node.ip),
    ]))?;
    let lio_sha256_matches = lio.starts_with(&want) && via_herd == want;
    anyhow::ensure!(
        lio_sha256_matches,
        "golden {want}, LIO disk {lio}, through herd {via_herd}"
    );
    // 4. A host node's kernel initiator attaches its parent's herd target.
    let parent = &nodes[leaf.parent.unwrap_or(0)];
    let kernel_iscsi = kernel_iscsi(leaf, parent).context("open-iscsi on the host node")?;
    let r = Report {
        version: 2,
        nodes: metrics,
        vm_boot_secs,
        lio_sha256_matches,
        kernel_nbd_file,
        kernel_iscsi,
        storm: None,
    };
    fs::write(
        results.join("testbed.json"),
        serde_json::to_string_pretty(&r)?,
    )?;
    Ok(r)
}

/// open-iscsi on `node` discovers `parent`'s herd target, logs in, mounts
/// the LUN read-only and reads a known file; then logs out and forgets the
/// node record, also when a step failed.
fn kernel_iscsi(node: &Node, parent: &Node) -> Result<KernelIscsi> {
    let portal = format!("{}:{ISCSI_PORT}", parent.ip);
    let commands = |what: &str| -> Result<u64> {
        let prom = output(
            Command::new("curl").args(["-sf", &format!("http://{}:9100/metrics", parent.ip)]),
        )
        .with_context(|| format!("metrics of {} {what}", parent.name))?;
        crate::util::prom_require(&prom, "herd_iscsi_target_commands_total")
    };
    let before = commands("before the login")?;
    let out = ssh(
        &node.ip,
        &format!(
            r#"set -u
modprobe iscsi_tcp || exit 1
iqn=$(iscsiadm -m discovery -t sendtargets -p {portal} | awk '{{print $2; exit}}')
[ -n "$iqn" ] || {{ echo "discovery at {portal} found no target" >&2; exit 1; }}
echo "iqn=$iqn"
cleanup() {{
    umount /mnt 2>/dev/null
    iscsiadm -m node -T "$iqn" -p {portal} --logout >/dev/null 2>&1
    iscsiadm -m node -T "$iqn" -p {portal} -o delete >/dev/null 2>&1
}}
trap cleanup EXIT
iscsiadm -m node -T "$iqn" -p {portal} --login >/dev/null || exit 1
dev=""
for i in $(seq 1 100); do
    dev=$(iscsiadm -m session -P 3 | awk '/Attached scsi disk/ {{print $4; exit}}')
    [ -n "$dev" ] && [ -b "/dev/$dev" ] && break
    sleep 0.2
done
[ -n "$dev" ] && [ -b "/dev/$dev" ] || {{ echo "no SCSI disk attached after the login" >&2; exit 1; }}
echo "ro=$(cat /sys/block/$dev/ro)"
echo "size=$(blockdev --getsize64 /dev/$dev)"
mount -o ro "/dev/$dev" /mnt || exit 1
echo "file=$(cat /mnt/etc/hostname)"
"#
        ),
    )?;
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_owned)
            .with_context(|| {
                format!(
                    "no {k}= in the initiator's output:
{out}"
                )
            })
    };
    let r = KernelIscsi {
        node: node.name.clone(),
        target: portal,
        iqn: field("iqn")?,
        file: field("file")?,
        read_only: field("ro")? == "1",
        size_bytes: field("size")?.parse()?,
        target_commands: commands("after the check")?.saturating_sub(before),
    };
    let want = fs::metadata(golden()?)?.len();
    anyhow::ensure!(
        r.file == "herd-demo" && r.read_only && r.size_bytes == want && r.target_commands > 0,
        "kernel initiator: {r:?} (want herd-demo, read-only, {want} bytes, commands counted)"
    );
    Ok(r)
}

fn is_testbed_volume(name: &str) -> bool {
    name.starts_with("herd-") || name.starts_with(BOX) || name.starts_with("vagrant_")
}

fn down(o: &Options) -> Result<()> {
    // libvirt keeps domain definitions across restarts: talk to it even if
    // it has to be started for that.
    if ensure_libvirt().is_ok() {
        let _ = run_visible(vagrant(o).args(["destroy", "-f"]));
        // Whatever vagrant left: domains, networks, volumes of the testbed.
        for d in virsh(&["list", "--all", "--name"])
            .unwrap_or_default()
            .lines()
        {
            let d = d.trim();
            if d.starts_with("vagrant_") {
                let _ = virsh(&["destroy", d]);
                let _ = virsh(&["undefine", d, "--remove-all-storage"]);
            }
        }
        for net in NETWORKS {
            let _ = virsh(&["net-destroy", net]);
            let _ = virsh(&["net-undefine", net]);
        }
        let left = virsh(&["list", "--all", "--name"]).unwrap_or_default();
        anyhow::ensure!(left.trim().is_empty(), "domains left behind: {left}");
        let nets = virsh(&["net-list", "--all", "--name"]).unwrap_or_default();
        anyhow::ensure!(
            !NETWORKS
                .iter()
                .any(|n| nets.lines().any(|l| l.trim() == *n)),
            "networks left behind: {nets}"
        );
        let _ = virsh(&["pool-destroy", "default"]);
        let _ = virsh(&["pool-undefine", "default"]);
    }
    // Volumes: the config disks, the golden image and the box image
    // vagrant-libvirt uploaded are files of the `default` pool.
    if let Ok(entries) = fs::read_dir(POOL_DIR) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_testbed_volume(&name) {
                fs::remove_file(e.path())?;
            }
        }
    }
    let _ = fs::remove_dir_all(root().join("vagrant/.vagrant"));
    // Stop the daemons this job started (not ones an init system runs).
    for name in ["libvirtd", "virtlogd"] {
        let pid = work_dir("libvirt").join(format!("{name}.pid"));
        if let Ok(p) = fs::read_to_string(&pid) {
            let _ = Command::new("kill").arg(p.trim()).status();
            let _ = fs::remove_file(&pid);
        }
    }
    let left: Vec<String> = fs::read_dir(POOL_DIR)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| is_testbed_volume(n))
                .collect()
        })
        .unwrap_or_default();
    anyhow::ensure!(left.is_empty(), "volumes left behind: {left:?}");
    step("testbed down: no domains, networks or volumes left");
    Ok(())
}
