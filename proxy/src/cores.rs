//! Thread-per-core placement of client connections.
//!
//! ```text
//!   accept loops, fleet, versions, prefetch ──▶ the control runtime
//!   each client connection ──▶ one core: a thread running a current-thread
//!                              runtime, chosen by fewest live connections
//! ```
//!
//! A connection's task, the tasks it spawns and the socket's wakeups stay on
//! one thread for the connection's life. On tokio's work-stealing runtime a
//! woken task runs on whichever worker took the event, so a request at queue
//! depth 1 often crosses threads (and wakes an idle vCPU) once more than it
//! must; DESIGN.md ("Runtime model") has what that costs here.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::{Builder, Handle};

/// The control runtime: one worker (`herd-control`) for the accept loops,
/// the fleet, versions, prefetch and the parent links.
///
/// # Errors
/// When the runtime cannot be created.
pub fn control_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("herd-control")
        .build()
}

thread_local! {
    /// The core this thread is, if it is one (`enter`).
    static CORE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the calling thread as core `i`: what runs on it can keep
/// per-core state (the iSCSI upstream's session per core).
pub fn enter(i: usize) {
    CORE.with(|c| c.set(Some(i)));
}

/// The core the calling thread is, `None` off the cores (the control
/// runtime, tools).
#[must_use]
pub fn current() -> Option<usize> {
    CORE.with(Cell::get)
}

/// The connection threads: one current-thread runtime each.
pub struct Cores {
    cores: Vec<Core>,
}

struct Core {
    handle: Handle,
    /// Connections placed here and not yet finished.
    live: Arc<AtomicUsize>,
}

/// Counts a connection out of its core when its task ends (or is dropped).
struct Live {
    live: Arc<AtomicUsize>,
    core: usize,
}

impl Drop for Live {
    fn drop(&mut self) {
        let n = self.live.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        report(self.core, n);
    }
}

/// `herd_core_connections{core}`: live client connections on each core.
fn report(core: usize, n: usize) {
    metrics::gauge!("herd_core_connections", "core" => core.to_string()).set(n as f64);
}

impl Cores {
    /// Starts `n` threads (`herd-core-N`), each driving a current-thread
    /// runtime until the process exits.
    ///
    /// # Errors
    /// When a runtime or a thread cannot be created.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let n = n.max(1);
        let mut cores = Vec::with_capacity(n);
        for i in 0..n {
            let rt = Builder::new_current_thread().enable_all().build()?;
            let handle = rt.handle().clone();
            std::thread::Builder::new()
                .name(format!("herd-core-{i}"))
                .spawn(move || {
                    enter(i);
                    rt.block_on(std::future::pending::<()>());
                })?;
            cores.push(Core {
                handle,
                live: Arc::default(),
            });
        }
        Ok(Self { cores })
    }

    /// Runs `conn` on the core with the fewest live connections. A socket
    /// belongs to the reactor of the runtime it is registered in, so `conn`
    /// should take its socket as a std one and register it itself.
    pub fn place<F>(&self, conn: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Some((i, core)) = self
            .cores
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.live.load(Ordering::Relaxed))
        else {
            return;
        };
        report(i, core.live.fetch_add(1, Ordering::Relaxed) + 1);
        let live = Live {
            live: Arc::clone(&core.live),
            core: i,
        };
        core.handle.spawn(async move {
            let _live = live;
            conn.await;
        });
    }

    /// Exports every core's gauge, so an idle core reads 0 rather than
    /// missing (call once the metrics recorder is installed).
    pub fn register_metrics(&self) {
        for (i, c) in self.cores.iter().enumerate() {
            report(i, c.live.load(Ordering::Relaxed));
        }
    }

    /// Live connections per core.
    #[must_use]
    pub fn live(&self) -> Vec<usize> {
        self.cores
            .iter()
            .map(|c| c.live.load(Ordering::Relaxed))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The threads `n` placed tasks ran on, all live at once; released
    /// before returning.
    async fn where_placed(cores: &Cores, n: usize) -> Vec<String> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (release, held) = tokio::sync::watch::channel(false);
        for _ in 0..n {
            let (tx, mut held) = (tx.clone(), held.clone());
            cores.place(async move {
                let name = std::thread::current().name().unwrap_or("?").to_owned();
                tx.send(name).unwrap();
                let _ = held.wait_for(|r| *r).await;
            });
        }
        let mut names = Vec::new();
        for _ in 0..n {
            names.push(
                tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        release.send_replace(true);
        names
    }

    #[tokio::test]
    async fn a_task_on_a_core_knows_which_and_one_off_the_cores_does_not() {
        assert_eq!(current(), None);
        let cores = Cores::start(2).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Held live until both reported, so they go to different cores.
        let (release, held) = tokio::sync::watch::channel(false);
        for _ in 0..2 {
            let (tx, mut held) = (tx.clone(), held.clone());
            cores.place(async move {
                let name = std::thread::current().name().unwrap_or("?").to_owned();
                tx.send((name, current())).unwrap();
                let _ = held.wait_for(|r| *r).await;
            });
        }
        let mut seen = Vec::new();
        for _ in 0..2 {
            let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
            seen.push(got.unwrap().unwrap());
        }
        release.send_replace(true);
        seen.sort();
        assert_eq!(
            seen,
            [
                ("herd-core-0".to_owned(), Some(0)),
                ("herd-core-1".to_owned(), Some(1))
            ]
        );
    }

    #[tokio::test]
    async fn connections_spread_over_the_cores_and_are_counted_out_when_they_end() {
        let cores = Cores::start(2).unwrap();
        assert_eq!(cores.live(), [0, 0]);
        let mut names = where_placed(&cores, 4).await;
        names.sort();
        assert_eq!(
            names,
            ["herd-core-0", "herd-core-0", "herd-core-1", "herd-core-1"],
            "four live connections on two cores are not two each"
        );
        // Released, each task ends and counts itself out.
        for _ in 0..200 {
            if cores.live() == [0, 0] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(cores.live(), [0, 0], "ended connections still counted");
    }
}
