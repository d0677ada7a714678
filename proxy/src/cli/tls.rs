//! `herd tls certs DIR`: a CA and certificates for a fleet's NBD links, in
//! the layout qemu, libnbd and nbdkit read (`ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, `client-cert.pem`, ...).

use std::path::PathBuf;

use anyhow::{Context, Result};
use herd::tls::certs::{self, Request};

#[derive(clap::Subcommand)]
pub enum TlsCmd {
    /// Make a CA in DIR (kept if DIR already has one) and certificates it
    /// signs. Each is good for serving and as a client certificate.
    Certs {
        dir: PathBuf,
        /// Names the server certificate holds (the first is its CN);
        /// repeat. Clients check the host they dial against these.
        #[arg(long = "server", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()])]
        server: Vec<String>,
        /// Also make client-cert.pem for this name (the name `--tls-allow`
        /// matches); repeat for `client-NAME-*` files after the first.
        #[arg(long = "client")]
        client: Vec<String>,
        /// Days the certificates are valid.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

pub fn run(cmd: TlsCmd) -> Result<()> {
    match cmd {
        TlsCmd::Certs {
            dir,
            server,
            client,
            days,
        } => {
            anyhow::ensure!(days > 0, "--days must be positive");
            let mut reqs = vec![Request {
                stem: "server".into(),
                names: server,
                days,
            }];
            for (i, c) in client.iter().enumerate() {
                reqs.push(Request {
                    stem: if i == 0 {
                        "client".into()
                    } else {
                        format!("client-{c}")
                    },
                    names: vec![c.clone()],
                    days,
                });
            }
            let written = certs::make(&dir, &reqs)
                .with_context(|| format!("cannot make certificates in {}", dir.display()))?;
            for f in written {
                println!("{}", f.display());
            }
            Ok(())
        }
    }
}
