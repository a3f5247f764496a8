//! The accept loop, with limits on what a client may hold: every connection's headers must
//! arrive within `server.header_timeout`, a connection with no request in progress is closed
//! after `server.idle_timeout`, a request (body and answer) ends within
//! `server.request_timeout`, and at most `server.max_connections` are open, well below the
//! open-file limit so deliveries and the store always have descriptors.
//!
//! At the cap, a new connection closes the longest-idle open one (a silent or half-sent
//! connection first, since those count as idle from their first byte): normal traffic goes
//! on while idle connections fill the table. Only when every open connection has a request
//! in progress is a new one refused, with a 503.
//!
//! A sweeper looks at every connection four times a second; each connection's I/O records
//! when it last read and whether a request is in progress.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::plan::ServerSettings;
use crate::telemetry::{Telemetry, CONNECTION_CLOSE_REASONS};

/// How often the sweeper looks for connections past a deadline.
const SWEEP: Duration = Duration::from_millis(250);
/// How long a graceful stop waits for requests in progress.
const DRAIN: Duration = Duration::from_secs(10);
/// File descriptors kept for everything but incoming connections, beyond two per delivery
/// slot (the outgoing connection and a pooled one): the store, logs, the watcher, the runtime.
const RESERVED_FDS: usize = 64;
/// The cap is never below this, however low the open-file limit.
const MIN_CONNECTIONS: usize = 16;

/// What one connection is doing, shared by its I/O, its service and the sweeper.
struct Conn {
    /// Unix ms of the last read or of the end of the last request.
    last_activity: AtomicI64,
    /// Unix ms when the current request's first byte arrived (0: none pending).
    header_started: AtomicI64,
    /// Unix ms when the request in progress was handed to its handler (0: none).
    request_started: AtomicI64,
    /// Closed by the sweeper or by an eviction: the connection's task drops it.
    close: Notify,
    closing: AtomicBool,
}

impl Conn {
    fn new(now: i64) -> Conn {
        Conn {
            last_activity: AtomicI64::new(now),
            header_started: AtomicI64::new(0),
            request_started: AtomicI64::new(0),
            close: Notify::new(),
            closing: AtomicBool::new(false),
        }
    }

    fn busy(&self) -> bool {
        self.request_started.load(Ordering::Relaxed) != 0
    }

    /// Asks the connection's task to drop the connection; counted under `reason`.
    fn shut(&self, telemetry: &Telemetry, reason: &'static str) {
        if !self.closing.swap(true, Ordering::Relaxed) {
            telemetry.connection_closed(reason, 1);
            self.close.notify_one();
        }
    }

    /// Which deadline this connection has passed, if any.
    fn overdue(&self, now: i64, s: &ServerSettings) -> Option<&'static str> {
        let ms = |d: Duration| d.as_millis() as i64;
        let request = self.request_started.load(Ordering::Relaxed);
        if request != 0 {
            return (now - request > ms(s.request_timeout)).then_some("request_timeout");
        }
        let header = self.header_started.load(Ordering::Relaxed);
        if header != 0 {
            return (now - header > ms(s.header_timeout)).then_some("header_timeout");
        }
        let idle = self.last_activity.load(Ordering::Relaxed);
        (now - idle > ms(s.idle_timeout)).then_some("idle_timeout")
    }

    /// Since when it has been idle (a half-sent request counts from its first byte).
    fn idle_since(&self) -> i64 {
        match self.header_started.load(Ordering::Relaxed) {
            0 => self.last_activity.load(Ordering::Relaxed),
            t => t,
        }
    }
}

/// The open connections.
struct Table {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Woken when a connection is removed.
    freed: Notify,
    /// Where closes are counted.
    telemetry: Telemetry,
}

impl Table {
    fn new(telemetry: Telemetry) -> Table {
        Table {
            conns: Mutex::default(),
            next_id: AtomicU64::new(0),
            freed: Notify::new(),
            telemetry,
        }
    }

    fn add(&self, now: i64) -> (u64, Arc<Conn>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(Conn::new(now));
        self.lock().insert(id, c.clone());
        (id, c)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
        self.freed.notify_waiters();
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the connection idle the longest; false if every one has a request in progress.
    fn evict_idle(&self) -> bool {
        let victim = self
            .lock()
            .values()
            .filter(|c| !c.busy() && !c.closing.load(Ordering::Relaxed))
            .min_by_key(|c| c.idle_since())
            .cloned();
        match victim {
            Some(c) => {
                c.shut(&self.telemetry, "evicted");
                true
            }
            None => false,
        }
    }

    fn sweep(&self, now: i64, s: &ServerSettings) {
        for c in self.lock().values() {
            if let Some(reason) = c.overdue(now, s) {
                c.shut(&self.telemetry, reason);
            }
        }
    }
}

/// A connection's socket, noting when bytes arrive.
struct Tracked<S> {
    stream: S,
    conn: Arc<Conn>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = crate::now_ms();
            let c = &self.conn;
            c.last_activity.store(now, Ordering::Relaxed);
            if !c.busy() && c.header_started.load(Ordering::Relaxed) == 0 {
                c.header_started.store(now, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Marks a request as in progress until dropped (answered, or the connection went away).
struct InProgress(Arc<Conn>);

impl InProgress {
    fn start(conn: &Arc<Conn>) -> InProgress {
        conn.header_started.store(0, Ordering::Relaxed);
        conn.request_started
            .store(crate::now_ms().max(1), Ordering::Relaxed);
        InProgress(conn.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.request_started.store(0, Ordering::Relaxed);
        self.0
            .last_activity
            .store(crate::now_ms(), Ordering::Relaxed);
    }
}

/// The connection cap in force: the setting, or the open-file limit minus what deliveries
/// and the store need.
pub fn connection_cap(s: &ServerSettings, delivery_slots: usize) -> usize {
    if let Some(n) = s.max_connections {
        return n;
    }
    let reserve = 2 * delivery_slots + RESERVED_FDS;
    open_file_limit()
        .map_or(4096, |l| l.saturating_sub(reserve))
        .max(MIN_CONNECTIONS)
}

/// The soft limit on open files (`ulimit -n`), if there is one.
pub fn open_file_limit() -> Option<usize> {
    #[cfg(unix)]
    {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into `l`, which lives for the call.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) };
        if rc == 0 && l.rlim_cur != libc::RLIM_INFINITY {
            return Some(l.rlim_cur as usize);
        }
    }
    None
}

/// Raises the soft open-file limit to the hard one, as a server should: the soft default
/// (often 1,024) is for interactive shells.
pub fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into `l`; setrlimit only reads it.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
                l.rlim_cur = l.rlim_max;
                let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            }
        }
    }
}

/// The body of the answer to a connection refused because every open one is busy.
const REFUSED: &str =
    r#"{"error":"too many connections, all busy: send again in a second (Retry-After)"}"#;

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, lets the
/// requests in progress finish (up to 10 s) and returns. `settings` is read again for each
/// connection and sweep, so a reload changes the limits.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    settings: impl Fn() -> (ServerSettings, usize) + Send + Sync + 'static,
    telemetry: Telemetry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    for reason in CONNECTION_CLOSE_REASONS {
        telemetry.connection_closed(reason, 0);
    }
    let table = Arc::new(Table::new(telemetry.clone()));
    let settings = Arc::new(settings);
    let (stop_tx, stop_rx) = watch::channel(false);
    let sweeper = tokio::spawn({
        let (table, settings, mut stop) = (table.clone(), settings.clone(), stop_rx.clone());
        async move {
            let mut tick = tokio::time::interval(SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let (s, slots) = settings();
                table.sweep(crate::now_ms(), &s);
                table
                    .telemetry
                    .connections(table.len(), connection_cap(&s, slots));
            }
        }
    });
    let mut shutdown = std::pin::pin!(shutdown);
    let mut fd_warned = false;
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE): the cap was set too high for what
                // else runs. Free one by closing an idle connection, or wait for one.
                let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                if out_of_fds && !fd_warned {
                    tracing::warn!(error = %e, open = table.len(), "out of file descriptors while accepting; closing idle connections (lower server.max_connections or raise ulimit -n)");
                    fd_warned = true;
                }
                if !(out_of_fds && table.evict_idle()) {
                    let _ = tokio::time::timeout(Duration::from_millis(50), table.freed.notified())
                        .await;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (s, slots) = settings();
        if table.len() >= connection_cap(&s, slots) && !table.evict_idle() {
            telemetry.connection_closed("refused", 1);
            tokio::spawn(refuse(stream));
            continue;
        }
        let (id, conn) = table.add(crate::now_ms());
        let tracked = Tracked {
            stream,
            conn: conn.clone(),
        };
        let app = app.clone();
        let svc_conn = conn.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let guard = InProgress::start(&svc_conn);
                req.extensions_mut()
                    .insert(crate::ingest::guard::Peer(peer));
                let mut app = app.clone();
                async move {
                    let answer =
                        tower_service::Service::call(&mut app, req.map(axum::body::Body::new))
                            .await;
                    drop(guard);
                    answer
                }
            });
        let table = table.clone();
        let stop = stop_rx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_one(TokioIo::new(tracked), service, &conn, stop).await,
                Some(acceptor) => {
                    // The handshake's bytes count as the first request's header: a client
                    // that stalls in it is cut off at header_timeout, like any other.
                    let handshake = tokio::select! {
                        h = acceptor.accept(tracked) => Some(h),
                        _ = conn.close.notified() => None,
                    };
                    match handshake {
                        Some(Ok(stream)) => {
                            serve_one(TokioIo::new(stream), service, &conn, stop).await
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            table.telemetry.connection_closed("tls_handshake", 1);
                        }
                        None => {}
                    }
                }
            }
            table.remove(id);
        });
    }
    let _ = stop_tx.send(true);
    let _ = sweeper.await;
    // Idle connections close at once on a graceful stop; wait for the busy ones.
    let deadline = tokio::time::Instant::now() + DRAIN;
    while table.len() > 0 && tokio::time::Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(100), table.freed.notified()).await;
    }
}

/// Serves HTTP/1.1 on one connection until it ends, is closed by the sweeper or an
/// eviction, or the listener stops (then gracefully: idle at once, busy when answered).
async fn serve_one<I, S>(io: I, service: S, conn: &Conn, mut stop: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send + 'static,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(io, service);
    let mut served = std::pin::pin!(served);
    let mut draining = false;
    loop {
        tokio::select! {
            _ = served.as_mut() => break,
            _ = conn.close.notified() => break,
            _ = stop.changed(), if !draining => {
                draining = true;
                served.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Answers a connection that cannot be served now with a 503, then closes it.
async fn refuse(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{REFUSED}",
        REFUSED.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
