//! An emulated fleet: hosts as network namespaces on one bridge, every host
//! link shaped with `tc tbf` in both directions, as in a rack where every
//! server has the same NIC.
//!
//! ```text
//!   ns <tag>-sw:  br0 ── p0 ═tbf═ eth0 (ns <tag>-0, 198.18.0.1: the root)
//!                  ├─── p1 ═tbf═ eth0 (ns <tag>-1, 198.18.0.2)
//!                  ├─── …
//!                  └─── pm ───── <tag>m in this namespace (198.19.255.254,
//!                                unshaped: metrics only)
//! ```
//!
//! Addresses come from the benchmarking range 198.18.0.0/15 and there is no
//! default route, so nothing leaves the machine. Dropping a [`Fleet`] kills
//! every process it started and deletes every namespace (which deletes the
//! bridge and every veth with it); namespaces of an earlier run that died
//! are swept before a new one is made.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{output, run};

/// Namespace names start with this, then the owning process id.
const PREFIX: &str = "hs";
/// The monitor port's address in this namespace.
pub const MONITOR_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 254);

/// Address of host `i` (0 is the root).
#[must_use]
pub fn host_addr(i: usize) -> Ipv4Addr {
    let (a, b) = (i / 200, i % 200 + 1);
    Ipv4Addr::new(
        198,
        18,
        u8::try_from(a).unwrap_or(255),
        u8::try_from(b).unwrap_or(255),
    )
}

/// One emulated host.
pub struct Host {
    pub ns: String,
    /// Its port on the switch.
    pub port: String,
}

/// Byte counters of one host's link, seen from the switch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkBytes {
    /// What the host sent.
    pub sent: u64,
    /// What the host received.
    pub received: u64,
}

pub struct Fleet {
    tag: String,
    sw: String,
    pub hosts: Vec<Host>,
    /// Processes started, with the host each runs on.
    procs: Vec<(usize, Child)>,
    monitor: String,
}

/// Sets `PR_SET_PDEATHSIG` on `cmd`'s child, so it dies with xtask even when
/// xtask is killed before it can clean up (spawn from the main thread: the
/// signal follows the spawning thread).
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

fn ip() -> Command {
    Command::new("ip")
}

/// Deletes namespaces left by fleets whose process is gone.
pub fn sweep_stale() -> Result<usize> {
    let list = output(ip().args(["netns", "list"]))?;
    let mut n = 0;
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(ip().args(["netns", "del", name]));
            n += 1;
        }
    }
    Ok(n)
}

/// Fails with what is missing when this machine cannot make a fleet.
pub fn check_capabilities() -> Result<()> {
    for (tool, args) in [("ip", ["-V"]), ("tc", ["-V"])] {
        Command::new(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("`{tool}` is missing: install iproute2"))?;
    }
    let probe = format!("{PREFIX}{}-probe", std::process::id());
    run(ip().args(["netns", "add", &probe])).context(
        "cannot create a network namespace (needs root and CONFIG_NET_NS); the storm cannot run here",
    )?;
    let tbf = run(ip().args([
        "-n", &probe, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]))
    .and_then(|()| {
        run(Command::new("tc").args([
            "-n", &probe, "qdisc", "add", "dev", "d0", "root", "tbf", "rate", "10mbit", "burst",
            "32kb", "latency", "50ms",
        ]))
    });
    let _ = run(ip().args(["netns", "del", &probe]));
    tbf.context(
        "cannot shape a link with `tc qdisc … tbf` (needs sch_tbf); the storm cannot run here",
    )
}

impl Fleet {
    /// Makes `n` hosts (host 0 is the root) with every link shaped to
    /// `rate` (a tc rate such as "100mbit"); `progress` hears each host.
    pub fn create(n: usize, rate: &str, mut progress: impl FnMut(usize)) -> Result<Self> {
        anyhow::ensure!(
            (2..=10_000).contains(&n),
            "a fleet needs 2..=10000 hosts, not {n}"
        );
        sweep_stale()?;
        let tag = format!("{PREFIX}{}", std::process::id());
        let sw = format!("{tag}-sw");
        let monitor = format!("{tag}m");
        let mut fleet = Self {
            tag: tag.clone(),
            sw: sw.clone(),
            hosts: Vec::new(),
            procs: Vec::new(),
            monitor: monitor.clone(),
        };
        run(ip().args(["netns", "add", &sw]))?;
        let mut sw_cmds = String::from("link add br0 type bridge\nlink set br0 up\n");
        // The monitor port: this namespace reaches every host's metrics.
        run(ip().args([
            "link", "add", &monitor, "type", "veth", "peer", "name", "pm", "netns", &sw,
        ]))?;
        sw_cmds.push_str("link set pm master br0\nlink set pm up\n");
        run(ip().args([
            "addr",
            "add",
            &format!("{MONITOR_ADDR}/15"),
            "dev",
            &monitor,
        ]))
        .context("cannot address the monitor port (is another storm running?)")?;
        run(ip().args(["link", "set", &monitor, "up"]))?;
        let shape = |dev: &str| {
            format!("qdisc add dev {dev} root tbf rate {rate} burst 64kb latency 50ms\n")
        };
        let mut sw_tc = String::new();
        for i in 0..n {
            let ns = format!("{tag}-{i}");
            let port = format!("p{i}");
            run(ip().args(["netns", "add", &ns]))?;
            // Owned by the fleet from here, so a failure below still
            // deletes it.
            fleet.hosts.push(Host {
                ns: ns.clone(),
                port: port.clone(),
            });
            run(ip().args([
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]))?;
            let addr = host_addr(i);
            let host_cmds =
                format!("link set lo up\naddr add {addr}/15 dev eth0\nlink set eth0 up\n");
            batch(ip().args(["-n", &ns, "-b", "-"]), &host_cmds)?;
            batch(
                Command::new("tc").args(["-n", &ns, "-b", "-"]),
                &shape("eth0"),
            )?;
            sw_cmds.push_str(&format!("link set {port} master br0\nlink set {port} up\n"));
            sw_tc.push_str(&shape(&port));
            progress(i + 1);
        }
        batch(ip().args(["-n", &sw, "-b", "-"]), &sw_cmds)?;
        batch(Command::new("tc").args(["-n", &sw, "-b", "-"]), &sw_tc)?;
        Ok(fleet)
    }

    /// Starts `args` inside host `i`'s namespace; killed when the fleet goes.
    pub fn spawn(
        &mut self,
        i: usize,
        args: &[String],
        stdout: Stdio,
        log: &Path,
    ) -> Result<&mut Child> {
        let ns = &self.hosts[i].ns;
        let mut cmd = ip();
        cmd.args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(std::fs::File::create(log)?)
            .env("NO_COLOR", "1");
        die_with_parent(&mut cmd);
        // Its own process group: a shell's children (nbdcopy) go with it.
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {args:?} in {ns}"))?;
        self.procs.push((i, child));
        self.procs.last_mut().map(|(_, c)| c).context("just pushed")
    }

    /// Kills every process started so far (between baselines).
    pub fn kill_all(&mut self) {
        self.kill_where(|_| true);
    }

    /// Kills every process except those on host `keep` (between rounds
    /// that keep the root running).
    pub fn kill_except(&mut self, keep: usize) {
        self.kill_where(|h| h != keep);
    }

    /// Kills every process on host `i` (the host dies).
    pub fn kill_host(&mut self, i: usize) {
        self.kill_where(|h| h == i);
    }

    /// The pid of the last process started on host `i` that still runs.
    pub fn pid_of(&mut self, i: usize) -> Option<u32> {
        self.procs
            .iter_mut()
            .rev()
            .filter(|(h, _)| *h == i)
            .find_map(|(_, c)| matches!(c.try_wait(), Ok(None)).then(|| c.id()))
    }

    fn kill_where(&mut self, which: impl Fn(usize) -> bool) {
        for (_, c) in self.procs.iter_mut().filter(|(h, _)| which(*h)) {
            if let Ok(pgid) = i32::try_from(c.id()) {
                // SAFETY: kill has no memory preconditions; the group is
                // one this fleet made.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
            let _ = c.kill();
        }
        for (_, c) in self.procs.iter_mut().filter(|(h, _)| which(*h)) {
            let _ = c.wait();
        }
        self.procs.retain(|(h, _)| !which(*h));
    }

    /// Byte counters of every host's link, from the switch's side.
    pub fn link_bytes(&self) -> Result<Vec<LinkBytes>> {
        let text = output(ip().args(["-n", &self.sw, "-s", "-j", "link", "show"]))?;
        let v: serde_json::Value = serde_json::from_str(&text).context("ip -j link")?;
        let mut out = vec![LinkBytes::default(); self.hosts.len()];
        for l in v.as_array().into_iter().flatten() {
            let name = l["ifname"].as_str().unwrap_or("");
            let Some(i) = self.hosts.iter().position(|h| h.port == name) else {
                continue;
            };
            let stats = &l["stats64"];
            // The switch port receives what the host sends.
            out[i] = LinkBytes {
                sent: stats["rx"]["bytes"].as_u64().unwrap_or(0),
                received: stats["tx"]["bytes"].as_u64().unwrap_or(0),
            };
        }
        Ok(out)
    }

    /// Names of everything this fleet made (for a leak check).
    #[must_use]
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill_all();
        for h in &self.hosts {
            let _ = run(ip().args(["netns", "del", &h.ns]));
        }
        let _ = run(ip().args(["netns", "del", &self.sw]));
        // Deleting the switch namespace takes the monitor's peer, and so the
        // monitor, with it; delete it directly in case the switch never
        // existed.
        let _ = run(ip().args(["link", "del", &self.monitor]));
    }
}

/// Feeds `cmds` to a `-b -` batch command.
fn batch(cmd: &mut Command, cmds: &str) -> Result<()> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    child
        .stdin
        .take()
        .context("batch stdin")?
        .write_all(cmds.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed on:\n{cmds}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Everything left behind by fleets of this process, or of any process when
/// `any` (a leak check after a run).
pub fn leftovers(tag: &str) -> Result<Vec<String>> {
    let mut left: Vec<String> = output(ip().args(["netns", "list"]))?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{tag}-")))
        .map(str::to_owned)
        .collect();
    let links = output(ip().args(["-o", "link", "show"]))?;
    left.extend(
        links
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .filter(|n| n.starts_with(tag)),
    );
    Ok(left)
}

/// Waits until `f` holds or `timeout` passes.
pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let t = Instant::now();
    loop {
        if f()? {
            return Ok(());
        }
        if t.elapsed() > timeout {
            bail!("{what}: not within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// From now on Ctrl-C (or SIGTERM) sets a flag instead of killing xtask, so
/// the run stops at its next check and its `Drop`s tear the fleet down.
pub fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Fails once Ctrl-C was pressed.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}
