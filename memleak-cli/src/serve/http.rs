//! The HTTP side: hyper's HTTP/1 server on memleak's own tokio runtime,
//! GET and HEAD only, on a few paths, with bounds on what clients can hold.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Semaphore};

use super::{Shared, Snapshot};
use crate::error::{Kind, user_error};

/// `/`: one self-contained page (no script, style or font from elsewhere:
/// fleet machines are often offline) that reads the paths below.
const PAGE: &str = include_str!("page.html");

/// Connections served at once; one more is closed as soon as accepted. A
/// scraper needs one; 32 leaves room for people and a few scrapers.
const MAX_CONNECTIONS: usize = 32;

/// A connection, request and response together, gets this long: a client
/// that sends its request slowly (or reads slowly) cannot hold a slot.
const CONNECTION_TIME: Duration = Duration::from_secs(10);

/// The listening socket, bound before tracing starts: a port in use fails
/// then, not after the probes are in.
pub struct Server {
    listener: TcpListener,
}

impl Server {
    pub fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let cannot = |e: std::io::Error| user_error(Kind::Usage, format!("--listen {addr}: {e}"));
        let listener = std::net::TcpListener::bind(addr).map_err(cannot)?;
        listener.set_nonblocking(true).map_err(cannot)?;
        let addr = listener.local_addr().map_err(cannot)?;
        // Says the port when port 0 let the kernel pick one.
        eprintln!("memleak: serving http://{addr}/metrics");
        if !addr.ip().is_loopback() {
            eprintln!(
                "memleak: warning: --listen {addr} serves process names and call stacks to anyone who can reach it; \
                 a bare port binds 127.0.0.1"
            );
        }
        Ok(Self { listener: TcpListener::from_std(listener).map_err(cannot)? })
    }

    /// Serves `shared` until the runtime ends.
    pub fn spawn(self, shared: Shared) {
        tokio::spawn(accept(self.listener, shared));
    }
}

async fn accept(listener: TcpListener, shared: Shared) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: try again shortly, quietly.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let snapshot = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
                async move { Ok::<_, Infallible>(respond(&request, &snapshot)) }
            });
            // One request per connection: a slot is never held idle.
            let connection = http1::Builder::new().keep_alive(false).serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIME, connection).await;
            drop(slot);
        });
    }
}

fn respond(request: &Request<Incoming>, snapshot: &Snapshot) -> Response<Full<Bytes>> {
    const PPROF: &str = "application/octet-stream";
    let body: (&str, Bytes) = match request.uri().path() {
        "/" => ("text/html; charset=utf-8", Bytes::from_static(PAGE.as_bytes())),
        "/metrics" => ("text/plain; version=0.0.4; charset=utf-8", snapshot.metrics.clone()),
        "/debug/pprof/heap" => (PPROF, snapshot.heap.clone()),
        "/debug/pprof/allocs" => (PPROF, snapshot.allocs.clone()),
        "/report.json" => ("application/json", snapshot.report_json.clone()),
        "/history.json" => ("application/json", snapshot.history.clone()),
        "/flamegraph.svg" => ("image/svg+xml", snapshot.flamegraph.clone()),
        _ => return plain(StatusCode::NOT_FOUND, "not found\n"),
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    // hyper leaves the body out of a response to HEAD.
    let mut response = Response::new(Full::new(body.1));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(body.0));
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
