//! Shutdown on SIGTERM and SIGINT, one policy for every long-running command (`edge-agent
//! serve` and `run`, `cloud-worker serve`): the first signal asks for a graceful shutdown, the
//! second ends the process at once.

use tokio_util::sync::CancellationToken;

/// Cancels `graceful` on the first SIGTERM or SIGINT (Ctrl-C); on a second one the process
/// exits at once with 128 + the signal's number, the shell's convention (130 for SIGINT, 143
/// for SIGTERM), without finishing anything. The handlers are installed before this returns,
/// so a signal that comes right after is not lost to the default action. Call it inside a
/// tokio runtime; outside Unix only Ctrl-C is watched.
pub fn shutdown_on_signals(graceful: CancellationToken) -> std::io::Result<()> {
    let mut signals = Signals::install()?;
    tokio::spawn(async move {
        let first = signals.next().await;
        tracing::info!(
            signal = first.name,
            "shutting down gracefully (again to stop at once)"
        );
        graceful.cancel();
        let second = signals.next().await;
        tracing::warn!(signal = second.name, "stopping at once");
        std::process::exit(128 + second.number);
    });
    Ok(())
}

struct Signal {
    name: &'static str,
    number: i32,
}

#[cfg(unix)]
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal (a stream that ended, which tokio's never do, counts as none).
    async fn next(&mut self) -> Signal {
        tokio::select! {
            Some(()) = self.terminate.recv() => Signal { name: "SIGTERM", number: 15 },
            Some(()) = self.interrupt.recv() => Signal { name: "SIGINT", number: 2 },
            else => std::future::pending().await,
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self)
    }

    async fn next(&mut self) -> Signal {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        Signal {
            name: "Ctrl-C",
            number: 2,
        }
    }
}
