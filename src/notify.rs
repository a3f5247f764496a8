//! Telling the service manager what the daemon is doing (`sd_notify`): ready once it serves,
//! reloading while a config reload runs, stopping once shutdown begins. Without
//! `NOTIFY_SOCKET` (not under systemd's `Type=notify`) every call does nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Serving: `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload began: `RELOADING=1` with the monotonic time systemd asks for.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    states.push(NotifyState::Status("reloading the config"));
    send(&states);
}

/// Shutdown began: `STOPPING=1`.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: finishing in-flight deliveries"),
    ]);
}
