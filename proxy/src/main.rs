//! `herd`: the herd proxy daemon and its command-line tools.

use std::path::PathBuf;

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "herd",
    version,
    about = "Serve VM images to a fleet through a tree of caching NBD proxies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve an image over NBD, fetching chunks from the upstream on demand.
    Serve(Box<cli::serve::ServeArgs>),
    /// iSCSI tools.
    #[command(subcommand)]
    Iscsi(IscsiCmd),
    /// Record which bytes of an image a boot reads (eBPF; needs root).
    Record(cli::record::RecordArgs),
    /// Inspect, merge and compare boot profiles.
    #[command(subcommand)]
    Profile(cli::profile::ProfileCmd),
    /// Replay recorded boots as many emulated VMs (the boot-storm client).
    #[command(subcommand)]
    Replay(cli::replay::ReplayCmd),
    /// Image manifests: the per-chunk digests every node checks fetches against.
    #[command(subcommand)]
    Manifest(cli::manifest::ManifestCmd),
    /// Cache directories, offline.
    #[command(subcommand)]
    Cache(cli::cache::CacheCmd),
    /// The fleet: its tree and each node's health.
    #[command(subcommand)]
    Fleet(cli::fleet::FleetCmd),
    /// The images a running node serves: versions, clients, cache fill.
    #[command(subcommand)]
    Image(cli::image::ImageCmd),
    /// TLS for NBD links: certificates.
    #[command(subcommand)]
    Tls(cli::tls::TlsCmd),
}

#[derive(Subcommand)]
enum IscsiCmd {
    /// Show what a target offers: targets, LUNs, capacity, block size, vendor, limits.
    Probe {
        /// iscsi://[user@]host[:port][/<target-iqn>[/<lun>]]
        url: String,
        /// File holding the CHAP secret (else HERD_ISCSI_SECRET).
        #[arg(long)]
        iscsi_secret_file: Option<PathBuf>,
        /// Our initiator IQN.
        #[arg(long, default_value = herd::config::DEFAULT_INITIATOR)]
        iscsi_initiator: String,
    },
    /// Measure the initiator alone: read a LUN for a while, print JSON.
    Bench(cli::iscsi::BenchArgs),
}

/// Allocations of this size and up are mmap'd and unmapped on free.
/// glibc otherwise raises the threshold after the first large free, and
/// the relay's 1 MiB buffers then stay in its heap: a root under load held
/// 94 MiB with the default and 51 MiB with this (`cargo xtask bench rss`).
const MMAP_THRESHOLD: libc::c_int = 256 << 10;

fn main() -> std::process::ExitCode {
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists. No safe wrapper for it exists (nix has none).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // rustls warns on every gnutls client that sends an IP address as
        // SNI (qemu, libnbd dialling 127.0.0.1): legal for them, noise here.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Cli::parse();
    let res = match args.command {
        Command::Serve(args) => cli::serve::run(*args),
        Command::Image(cmd) => cli::image::run(cmd),
        Command::Iscsi(IscsiCmd::Probe {
            url,
            iscsi_secret_file,
            iscsi_initiator,
        }) => cli::iscsi::probe(&url, iscsi_secret_file, iscsi_initiator),
        Command::Iscsi(IscsiCmd::Bench(b)) => cli::iscsi::bench(&b),
        Command::Record(r) => cli::record::record(&r),
        Command::Profile(p) => cli::profile::run(p),
        Command::Replay(r) => cli::replay::run(r),
        Command::Manifest(m) => cli::manifest::run(m),
        Command::Cache(c) => cli::cache::run(c),
        Command::Fleet(f) => cli::fleet::run(f),
        Command::Tls(t) => cli::tls::run(t),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
