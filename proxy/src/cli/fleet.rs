//! `herd fleet status`: the tree, each node's health, cache fill, bytes
//! served and failovers, from the fleet source and each node's metrics.

use anyhow::{Context, Result};
use clap::Subcommand;
use herd::fleet::{self, status, Source};

#[derive(Subcommand)]
pub enum FleetCmd {
    /// Print the tree: node, parent, health, cache fill, bytes served, failovers.
    Status {
        /// A fleet TOML file or etcd://HOST:PORT[,HOST:PORT]/PREFIX.
        fleet: String,
        /// One JSON object per node instead of the tree.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `herd fleet` subcommand.
///
/// # Errors
/// An unreadable fleet source.
pub fn run(cmd: FleetCmd) -> Result<()> {
    match cmd {
        FleetCmd::Status { fleet, json } => status_cmd(&fleet, json),
    }
}

fn status_cmd(source: &str, json: bool) -> Result<()> {
    let source: Source = source.parse()?;
    let view = match &source {
        Source::File(p) => fleet::file::load(p)?,
        Source::Etcd { endpoints, prefix } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(async {
                let mut c = fleet::etcd::connect(endpoints).await?;
                fleet::etcd::read_view(&mut c, endpoints, prefix).await
            })?
            .0
        }
    };
    let nodes = status::gather(&view);
    if json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
    } else {
        print!("{}", status::render(&view, &nodes));
        let down = nodes.iter().filter(|n| n.health == "unreachable").count();
        println!(
            "{} nodes, fanout {}, {} unreachable ({source})",
            nodes.len(),
            view.fanout,
            down
        );
    }
    Ok(())
}
