//! The accept loop both mocks share: TCP (optionally TLS) on `127.0.0.1:0`, hyper's auto
//! builder (HTTP/1.1 and HTTP/2, h2c prior knowledge on plain TCP), connection and
//! in-flight counters, a per-connection "drop it now" signal and shutdown on drop.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;

/// Facts about the connection a request came in on.
#[derive(Clone)]
pub(crate) struct ConnInfo {
    pub id: u64,
    /// The client presented a certificate the CA signed.
    pub client_cert: bool,
    /// Notify to make the server drop this connection at once (simulated connection loss).
    pub drop_now: Arc<Notify>,
}

pub(crate) type Handler = Arc<
    dyn Fn(ConnInfo, Request<Incoming>) -> BoxFuture<'static, Response<Full<Bytes>>> + Send + Sync,
>;

/// Counters shared with the mock's owner.
#[derive(Default)]
pub(crate) struct ServerStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
}

/// A running server; dropping it stops accepting and closes its connections.
pub(crate) struct Server {
    pub addr: SocketAddr,
    pub stats: Arc<ServerStats>,
    shutdown: watch::Sender<bool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

pub(crate) async fn spawn(
    tls: Option<Arc<rustls::ServerConfig>>,
    max_streams: u32,
    handler: Handler,
) -> std::io::Result<Server> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(ServerStats::default());
    let (shutdown, mut stop) = watch::channel(false);
    let acceptor = tls.map(TlsAcceptor::from);
    let loop_stats = stats.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.changed() => break,
            };
            let Ok((tcp, _)) = accepted else { continue };
            let _ = tcp.set_nodelay(true);
            let id = loop_stats.connections.fetch_add(1, Ordering::SeqCst) + 1;
            let acceptor = acceptor.clone();
            let handler = handler.clone();
            let stats = loop_stats.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let drop_now = Arc::new(Notify::new());
                match acceptor {
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let client_cert = tls.get_ref().1.peer_certificates().is_some();
                        let info = ConnInfo {
                            id,
                            client_cert,
                            drop_now,
                        };
                        serve(TokioIo::new(tls), info, max_streams, handler, stats, stop).await;
                    }
                    None => {
                        let info = ConnInfo {
                            id,
                            client_cert: false,
                            drop_now,
                        };
                        serve(TokioIo::new(tcp), info, max_streams, handler, stats, stop).await;
                    }
                }
            });
        }
    });
    Ok(Server {
        addr,
        stats,
        shutdown,
    })
}

async fn serve<I>(
    io: I,
    info: ConnInfo,
    max_streams: u32,
    handler: Handler,
    stats: Arc<ServerStats>,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let drop_now = info.drop_now.clone();
    let service = service_fn(move |req| {
        let handler = handler.clone();
        let info = info.clone();
        let stats = stats.clone();
        async move {
            stats.requests.fetch_add(1, Ordering::Relaxed);
            let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let response = handler(info, req).await;
            stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(max_streams);
    let conn = builder.serve_connection(io, service);
    tokio::select! {
        _ = conn => {}
        _ = drop_now.notified() => {}
        _ = stop.changed() => {}
    }
}
