//! `cargo xtask run`: boot a real VM through a chain of herd proxies.
//!
//! ```text
//!  image file ─▶ herd root ─▶ herd mid ─▶ herd leaf ─▶ qcow2 overlay ─▶ qemu VM
//!               (io_uring)    (NBD)       (NBD)        (per-VM writes)
//! ```
//!
//! Prints boot time, bytes the VM read, bytes fetched from the root, and the
//! fraction of the image that crossed the tree; then a small boot storm
//! (8 hosts × 4 replayed VMs, `bench storm`) with its live view and table.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::{self, Disk, Kind, MARKER};
use crate::util::{cargo, free_port, raw_overlay, root, run, run_visible, spinner, step, work_dir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm boots a guest (probed once), else TCG
    Auto,
    Kvm,
    Tcg,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Root file system of the demo VM.
    #[arg(long, value_enum, default_value = "debian")]
    pub image: Kind,
    /// Proxies in the chain (1 = root only).
    #[arg(long, default_value_t = 3)]
    pub levels: usize,
    /// Chunk size of every proxy.
    #[arg(long, default_value = "64KiB")]
    pub chunk_size: String,
    /// Read-ahead of every proxy for sequential misses (0 disables).
    #[arg(long, default_value = "256KiB")]
    pub read_ahead: String,
    /// Hardware acceleration for the guest.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: Accel,
    /// Also boot from the local image file, for comparison.
    #[arg(long)]
    pub compare_local: bool,
    /// Skip the small boot storm that follows the VM boot.
    #[arg(long)]
    pub no_storm: bool,
}

/// What one demo run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub image: Kind,
    pub image_size: u64,
    pub levels: usize,
    pub accel: &'static str,
    pub boot_secs: f64,
    pub vm_read_bytes: u64,
    pub root_served_bytes: u64,
    pub root_file_bytes: u64,
    pub local_boot_secs: Option<f64>,
}

impl std::fmt::Display for Report {
    #[allow(clippy::cast_precision_loss)] // byte counts shown as MiB
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        writeln!(
            f,
            "herd demo ({:?} image, {} proxies, {})",
            self.image, self.levels, self.accel
        )?;
        writeln!(
            f,
            "  boot time through the chain : {:6.2} s",
            self.boot_secs
        )?;
        if let Some(l) = self.local_boot_secs {
            writeln!(f, "  boot time from local file   : {l:6.2} s")?;
        }
        writeln!(
            f,
            "  image size                  : {:8.1} MiB",
            mib(self.image_size)
        )?;
        writeln!(
            f,
            "  bytes the VM read (leaf)    : {:8.1} MiB",
            mib(self.vm_read_bytes)
        )?;
        writeln!(
            f,
            "  bytes fetched from the root : {:8.1} MiB",
            mib(self.root_served_bytes)
        )?;
        writeln!(
            f,
            "  bytes the root read off disk: {:8.1} MiB",
            mib(self.root_file_bytes)
        )?;
        write!(
            f,
            "  fraction of the image moved : {:6.1} %",
            100.0 * self.root_served_bytes as f64 / self.image_size.max(1) as f64
        )
    }
}

fn wait_port(port: u16, child: &mut Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("herd exited ({status}) before listening:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("herd did not listen on port {port} within 30 s")
}

/// Reads one counter from a herd metrics endpoint.
pub fn metric(port: u16, name: &str) -> Result<u64> {
    let body = crate::util::http_get(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "/metrics",
    )
    .context("metrics endpoint unreachable")?;
    crate::util::prom_require(&body, name)
}

/// A herd daemon of the demo; killed on drop.
pub struct Proxy {
    child: Child,
    pub port: u16,
    pub metrics: u16,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    pub fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        upstream: &str,
        chunk: &str,
        read_ahead: &str,
    ) -> Result<Self> {
        Self::start_with(bin, dir, name, upstream, chunk, read_ahead, &[])
    }

    /// As [`Proxy::start`], with more `herd serve` flags.
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        name: &str,
        upstream: &str,
        chunk: &str,
        read_ahead: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let (port, metrics) = (free_port()?, free_port()?);
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--upstream",
                upstream,
                "--chunk-size",
                chunk,
                "--read-ahead",
                read_ahead,
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics", &format!("127.0.0.1:{metrics}")])
            .arg("--cache-dir")
            .arg(dir.join(format!("{name}-cache")))
            .args(extra)
            .env("NO_COLOR", "1")
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        wait_port(port, &mut child, &log)?;
        wait_port(metrics, &mut child, &log)?;
        Ok(Self {
            child,
            port,
            metrics,
        })
    }

    pub fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/herd", self.port)
    }

    /// The daemon's process id (to signal it).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and a graceful exit (the daemon flushes what it records).
    pub fn stop(mut self) -> Result<()> {
        run(Command::new("kill").args(["-TERM", &self.child.id().to_string()]))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait()? {
                anyhow::ensure!(s.success(), "herd exited with {s} on SIGTERM");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("herd did not exit within 15 s of SIGTERM")
    }
}

/// Builds the release herd binary and returns its path.
pub fn build_herd() -> Result<PathBuf> {
    step("building herd (release)");
    run_visible(cargo().current_dir(root()).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "herd",
    ]))?;
    Ok(root().join("target/release/herd"))
}

/// "kvm" if KVM boots guests here, else "tcg".
pub fn auto_accel(disk: &Disk) -> &'static str {
    if kvm_works(disk) {
        "kvm"
    } else {
        "tcg"
    }
}

fn kvm_works(disk: &Disk) -> bool {
    if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let verdict = work_dir("kvm-verdict");
    if let Ok(v) = std::fs::read_to_string(&verdict) {
        return v.trim() == "works";
    }
    // /dev/kvm can open yet guests hang (nested virtualisation); a real
    // boot of the busybox root decides, once per checkout.
    let pb = spinner("probing KVM with a short boot");
    let ok = image::ensure(Kind::Busybox)
        .and_then(|bb| boot(disk, &bb.root, "raw", "kvm", Duration::from_secs(15), None))
        .is_ok();
    pb.finish_and_clear();
    let _ = std::fs::write(&verdict, if ok { "works" } else { "hangs" });
    step(&format!(
        "KVM {}",
        if ok {
            "works"
        } else {
            "does not boot guests here; using TCG"
        }
    ));
    ok
}

/// qemu-system-x86_64's arguments to boot `drive` with the demo's kernel,
/// serial console on stdout, no reboot.
pub fn qemu_args(disk: &Disk, drive: &Path, format: &str, accel: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        "-M",
        "pc",
        "-accel",
        accel,
        "-m",
        "512",
        "-smp",
        "1",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.push("-kernel".into());
    v.push(disk.kernel.display().to_string());
    v.push("-initrd".into());
    v.push(disk.initrd.display().to_string());
    v.push("-append".into());
    v.push("console=ttyS0 root=/dev/vda rw panic=-1 quiet loglevel=3".into());
    v.push("-drive".into());
    v.push(format!(
        "file={},if=virtio,format={format},cache=unsafe",
        drive.display()
    ));
    if accel == "kvm" {
        v.push("-cpu".into());
        v.push("host".into());
    }
    v
}

/// Boots `drive` and waits for the marker; returns seconds to marker.
pub fn boot(
    disk: &Disk,
    drive: &Path,
    format: &str,
    accel: &str,
    timeout: Duration,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<f64> {
    boot_wrapped(disk, drive, format, accel, timeout, progress, &[])
}

/// As [`boot`], with qemu started by `wrap` (e.g. `herd record … --`),
/// which must exit when qemu does.
pub fn boot_wrapped(
    disk: &Disk,
    drive: &Path,
    format: &str,
    accel: &str,
    timeout: Duration,
    progress: Option<&indicatif::ProgressBar>,
    wrap: &[String],
) -> Result<f64> {
    let mut cmd = match wrap.split_first() {
        Some((prog, args)) => {
            let mut c = Command::new(prog);
            c.args(args).arg("qemu-system-x86_64");
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    cmd.args(qemu_args(disk, drive, format, accel));
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut last = Vec::new();
    let result = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let clean: String = line.chars().filter(|c| !c.is_control()).collect();
                if clean.contains(MARKER) {
                    break Ok(start.elapsed().as_secs_f64());
                }
                if let Some(pb) = progress {
                    pb.set_message(format!(
                        "booting: {}",
                        clean.chars().take(70).collect::<String>()
                    ));
                }
                last.push(clean);
                if last.len() > 30 {
                    last.remove(0);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                break Err(anyhow::anyhow!(
                    "the VM stopped before printing {MARKER}\nconsole:\n{}\nqemu: {err}",
                    last.join("\n")
                ));
            }
        }
        if start.elapsed() > timeout {
            break Err(anyhow::anyhow!(
                "no {MARKER} within {} s\nconsole:\n{}",
                timeout.as_secs(),
                last.join("\n")
            ));
        }
    };
    // The guest powers itself off after the marker; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && child.try_wait()?.is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let status = child.wait()?;
    let t = result?;
    // A wrapper reports its own failure through its exit status.
    anyhow::ensure!(
        wrap.is_empty() || status.success(),
        "{} exited with {status}",
        wrap.join(" ")
    );
    Ok(t)
}

/// Runs the demo and returns what it measured.
pub fn run_demo(opts: &Options) -> Result<Report> {
    anyhow::ensure!((1..=8).contains(&opts.levels), "--levels must be 1..=8");
    crate::deps::ensure(crate::deps::PACKAGES)?;
    let bin = build_herd()?;
    let disk = image::ensure(opts.image)?;
    let image_size = std::fs::metadata(&disk.root)?.len();
    let accel = match opts.accel {
        Accel::Tcg => "tcg",
        Accel::Kvm => "kvm",
        Accel::Auto => {
            if kvm_works(&disk) {
                "kvm"
            } else {
                "tcg"
            }
        }
    };
    let dir = work_dir(&format!("demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let res = chain_boot(opts, &bin, &disk, &dir, accel, image_size);
    let _ = std::fs::remove_dir_all(&dir);
    res
}

fn chain_boot(
    opts: &Options,
    bin: &Path,
    disk: &Disk,
    dir: &Path,
    accel: &str,
    image_size: u64,
) -> Result<Report> {
    let upstream = disk.root.to_string_lossy().into_owned();
    let mut chain: Vec<Proxy> = Vec::new();
    for level in 0..opts.levels {
        let name = if level == 0 {
            "root".to_owned()
        } else if level + 1 == opts.levels {
            "leaf".to_owned()
        } else {
            format!("relay{level}")
        };
        let up = chain.last().map_or_else(|| upstream.clone(), Proxy::url);
        chain.push(Proxy::start(
            bin,
            dir,
            &name,
            &up,
            &opts.chunk_size,
            &opts.read_ahead,
        )?);
    }
    step(&format!(
        "chain up: {} -> {}",
        disk.root.display(),
        chain
            .iter()
            .map(|p| format!("127.0.0.1:{}", p.port))
            .collect::<Vec<_>>()
            .join(" -> ")
    ));
    let (root, leaf) = match (chain.first(), chain.last()) {
        (Some(r), Some(l)) => (r, l),
        _ => bail!("empty chain"),
    };
    let overlay = dir.join("vm.qcow2");
    raw_overlay(&overlay, &leaf.url(), image_size)?;
    let timeout = match opts.image {
        Kind::Busybox => Duration::from_secs(120),
        Kind::Debian => Duration::from_secs(300),
    };
    let pb = spinner(format!(
        "booting the {:?} VM through the chain ({accel})",
        opts.image
    ));
    let boot_secs = boot(disk, &overlay, "qcow2", accel, timeout, Some(&pb))?;
    pb.finish_and_clear();
    // With one level the root is the leaf: the same endpoint answers both.
    let vm_read_bytes = metric(leaf.metrics, "herd_served_bytes_total")?;
    let root_served_bytes = metric(root.metrics, "herd_served_bytes_total")?;
    let root_file_bytes = metric(root.metrics, "herd_upstream_read_bytes_total")?;
    drop(chain);
    let local_boot_secs = if opts.compare_local {
        let ov = dir.join("local.qcow2");
        raw_overlay(&ov, &disk.root.to_string_lossy(), image_size)?;
        let pb = spinner("booting the same VM from the local file");
        let t = boot(disk, &ov, "qcow2", accel, timeout, Some(&pb))?;
        pb.finish_and_clear();
        Some(t)
    } else {
        None
    };
    Ok(Report {
        image: opts.image,
        image_size,
        levels: opts.levels,
        accel: if accel == "kvm" { "KVM" } else { "TCG" },
        boot_secs,
        vm_read_bytes,
        root_served_bytes,
        root_file_bytes,
        local_boot_secs,
    })
}

/// The storm that ends the demo: small enough for a few minutes on a fresh
/// machine, every baseline.
pub fn small_storm() -> Result<()> {
    step("a small boot storm: 8 hosts x 4 replayed VMs and a real one, herd's tree against full copy and all-from-root");
    let mut o = crate::bench::storm::Options::quick(work_dir("demo-storm"));
    o.hosts = 8;
    o.vms = 4;
    o.all_from_root_hosts = 8;
    o.real_vms = 1;
    crate::bench::storm::run_bench(&o).map(drop)
}
