//! The binaries' `tracing` set-up, one for all of them.

use std::io::IsTerminal;

/// Logs to stderr at `default_level` unless `RUST_LOG` says otherwise; colours only on a
/// terminal, so that journald, `docker logs` and a test reading the log get plain text.
pub fn init(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
