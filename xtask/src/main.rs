//! herd's task runner: `cargo xtask <job>`.

mod appliance;
mod appliance_test;
mod bench;
mod boot_profile;
mod demo;
mod deps;
mod ebpf;
mod fleet;
mod fuzz;
mod image;
mod test;
mod util;
mod vagrant;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "herd build, demo and test jobs")]
struct Cli {
    #[command(subcommand)]
    job: Job,
}

#[derive(Subcommand)]
enum Job {
    /// Boot a real VM through a chain of herd proxies and report what moved.
    Run(demo::Options),
    /// Install what is missing and run every test (what CI runs).
    Test(test::Options),
    /// Benchmarks: herd side by side with its peers.
    #[command(subcommand)]
    Bench(bench::Suite),
    /// Build every cargo-fuzz target and run each (installs cargo-fuzz).
    Fuzz(fuzz::Options),
    /// Install the Debian packages the jobs need.
    Deps,
    /// Build the herd appliance image (qcow2, Debian packages only).
    Appliance {
        /// Also boot it (TCG) as a root node and check it end to end.
        #[arg(long)]
        test: bool,
    },
    /// The multi-node testbed (vagrant-libvirt): box, up, check, down, cycle, validate.
    Vagrant(vagrant::Options),
    /// Build the eBPF recorder's programs (target/herd/herd-ebpf.o).
    BuildEbpf,
    /// Record boots with both recorders, prefetch, and boot again (needs root).
    BootProfile,
    /// The dataplane bench's byte forwarder (a relay that does nothing):
    /// started by the bench, not by hand.
    #[command(hide = true)]
    Forward {
        #[arg(long)]
        listen: u16,
        #[arg(long)]
        to: u16,
    },
    /// Build (or reuse) the demo boot disk.
    Image {
        #[arg(long, value_enum, default_value = "debian")]
        kind: image::Kind,
    },
}

fn main() -> Result<()> {
    match Cli::parse().job {
        Job::Run(o) => {
            let r = demo::run_demo(&o)?;
            println!("{r}");
            if o.no_storm {
                return Ok(());
            }
            demo::small_storm()
        }
        Job::Test(o) => test::run(&o),
        Job::Bench(s) => {
            // A bench on a fresh machine needs the peers and protoc too.
            deps::ensure(deps::PACKAGES)?;
            bench::run(&s)
        }
        Job::Deps => deps::run_all(),
        Job::Fuzz(o) => fuzz::run_fuzz(&o).map(drop),
        Job::BuildEbpf => ebpf::build().map(drop),
        Job::Forward { listen, to } => bench::forward::run(listen, to),
        Job::Vagrant(o) => vagrant::run_action(&o),
        Job::Appliance { test } => {
            crate::deps::ensure(crate::deps::PACKAGES)?;
            println!("{}", appliance::build()?.display());
            if test {
                let r = appliance_test::run_check()?;
                println!("{r}");
            }
            Ok(())
        }
        Job::BootProfile => {
            deps::ensure(deps::PACKAGES)?;
            ebpf::build()?;
            let r = boot_profile::run_checks(&demo::build_herd()?)?;
            println!("{r}");
            Ok(())
        }
        Job::Image { kind } => {
            let d = image::ensure(kind)?;
            println!(
                "kernel {}\ninitrd {}\nroot   {}",
                d.kernel.display(),
                d.initrd.display(),
                d.root.display()
            );
            Ok(())
        }
    }
}
