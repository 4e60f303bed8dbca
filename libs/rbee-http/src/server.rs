//! The HTTP server loop of all three daemons: a router on hyper's HTTP/1 connections (over TLS
//! when given), with the limits `axum::serve` does not set. Without them one slow client could
//! hold a daemon's connections open forever (a request head sent a byte a minute) until it runs
//! out of file descriptors; on the queen, heartbeats then fail and every hive is marked down.
//!
//! - A request head must arrive within [`ServerLimits::header_read_timeout`], counted from the
//!   connection's start and, on a kept-alive connection, from the end of the previous exchange,
//!   so an idle keep-alive connection is closed after the same time.
//! - At most [`ServerLimits::max_connections`] connections are open at once, and at most
//!   [`ServerLimits::max_connections_per_peer`] from one IP address; beyond that a new
//!   connection is closed at once (logged at most once a minute).
//!
//! Each request carries its peer's address as `axum::extract::ConnectInfo<SocketAddr>`.
//!
//! Shutdown: when `shutdown` completes the listener is closed, idle connections are closed and
//! busy ones finish their exchange (the daemons' own drain decides how long streams may run).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::tls::{ClientCertificate, ServerTls};
use tokio::sync::{Notify, watch};
use tower::ServiceExt;

/// How long the daemons' own HTTP clients keep an idle connection for reuse: shorter than any
/// header timeout a server here accepts (3 s at least), so a client never picks a pooled
/// connection the server is closing at that moment.
pub const CLIENT_POOL_IDLE: Duration = Duration::from_secs(2);

/// Bytes buffered per connection (a request head must fit).
const MAX_BUFFER: usize = 64 * 1024;

/// The kernel's send buffer per connection (it doubles it). Without a fixed size Linux grows
/// it to megabytes for a client that reads nothing, which hides a stalled reader for that
/// long; responses here are token streams and small JSON documents, which this carries at
/// several MB/s even at a 20 ms round trip.
const SEND_BUFFER: usize = 64 * 1024;

/// Connection limits of one daemon's server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Longest wait for a complete request head (and for the next one on a kept-alive
    /// connection).
    pub header_read_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most connections open at once from one IP address.
    pub max_connections_per_peer: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_peer: 1024,
        }
    }
}

/// Open connections, in all and per peer.
#[derive(Default)]
struct Open {
    total: AtomicUsize,
    per_peer: Mutex<HashMap<IpAddr, usize>>,
    closed: Notify,
}

/// One admitted connection; dropping it frees its place.
struct Admitted {
    open: Arc<Open>,
    peer: IpAddr,
}

impl Open {
    fn admit(self: &Arc<Self>, peer: IpAddr, limits: &ServerLimits) -> Option<Admitted> {
        let mut per_peer = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = per_peer.get(&peer).copied().unwrap_or(0);
        if mine >= limits.max_connections_per_peer
            || self.total.load(Ordering::SeqCst) >= limits.max_connections
        {
            return None;
        }
        per_peer.insert(peer, mine + 1);
        self.total.fetch_add(1, Ordering::SeqCst);
        Some(Admitted {
            open: self.clone(),
            peer,
        })
    }

    async fn all_closed(&self) {
        loop {
            let closed = self.closed.notified();
            if self.total.load(Ordering::SeqCst) == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per_peer = self
            .open
            .per_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                per_peer.remove(&self.peer);
            }
        }
        drop(per_peer);
        self.open.total.fetch_sub(1, Ordering::SeqCst);
        self.open.closed.notify_waiters();
    }
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` completes, then closes the
/// listener and waits for the open connections to end. The TLS handshake must also finish
/// within the header timeout.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let open = Arc::new(Open::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut last_refusal_log: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(admitted) = open.admit(peer.ip(), &limits) else {
            if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                last_refusal_log = Some(Instant::now());
                tracing::warn!(%peer, max = limits.max_connections, per_peer = limits.max_connections_per_peer, "connection limit reached; closing new connections (logged once a minute)");
            }
            drop(stream);
            continue;
        };
        if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER) {
            tracing::debug!(error = %e, "could not set the send buffer size");
        }
        // Each request learns its peer's address and, over TLS, whether it showed a client
        // certificate the daemon's client CA signed.
        let app = app.clone();
        let service = move |client_cert: Option<ClientCertificate>| {
            TowerToHyperService::new(app.map_request(
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo::<SocketAddr>(peer));
                    if let Some(c) = client_cert {
                        req.extensions_mut().insert(c);
                    }
                    req
                },
            ))
        };
        let stop = stop_rx.clone();
        let acceptor = tls.as_ref().map(ServerTls::acceptor);
        tokio::spawn(async move {
            let _admitted = admitted;
            match acceptor {
                None => serve_connection(TokioIo::new(stream), service(None), limits, stop).await,
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                        Ok(Ok(tls)) => {
                            let cert = tls.get_ref().1.peer_certificates().is_some();
                            let svc = service(Some(ClientCertificate(cert)));
                            serve_connection(TokioIo::new(tls), svc, limits, stop).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    open.all_closed().await;
    Ok(())
}

/// One HTTP/1 connection, until it ends or the server stops (then gracefully).
async fn serve_connection<I, S>(
    io: I,
    svc: S,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as http_body::Body>::Data: Send,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper buffers up to this much of a response a client does not read (400 KB by
        // default); less lets a stalled reader show sooner. Request heads must fit.
        .max_buf_size(MAX_BUFFER)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    let stopping = async move {
        // The guard `wait_for` returns must not live across the await below.
        let _ = stop.wait_for(|s| *s).await.map(|_| ());
    };
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopping => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
