//! Process-level shutdown: one root [`CancellationToken`] cancelled by SIGTERM or SIGINT.
//!
//! Services take the token as an argument, so tests can start and stop a whole service
//! in-process without signals.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled on the first SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received: stopping intake and draining in-flight work");
        child.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    // Registering a handler only fails if the runtime has no signal driver, which
    // `main` always enables; without it we could not shut down cleanly at all.
    let mut term = signal(SignalKind::terminate()).expect("signal driver is enabled in main");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
