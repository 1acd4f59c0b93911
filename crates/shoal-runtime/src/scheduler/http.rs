//! The dashboard's HTTP server (axum): the embedded single-page app, its
//! JSON API (answered by the owner task, see `api.rs`), a server-sent event
//! stream of live updates, and `/metrics` for Prometheus.
//!
//! Every request must carry the dashboard token (derived from the cluster's
//! secret): `?token=` once (it is then kept in a cookie), or
//! `Authorization: Bearer` (Prometheus). It runs on the scheduler's I/O
//! thread; it computes nothing itself and updates are aggregated, so an
//! open browser costs the scheduler a few small JSON answers a second.

use super::api::{param, Reply};
use super::Event;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Response, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use std::convert::Infallible;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot, watch};

/// The single-page app, embedded in the binary.
pub const INDEX_HTML: &str = include_str!("assets/index.html");
/// Its script.
pub const APP_JS: &str = include_str!("assets/app.js");
/// Its style sheet.
pub const APP_CSS: &str = include_str!("assets/app.css");

/// How often the live stream sends an update.
const UPDATE_EVERY: Duration = Duration::from_millis(1000);

#[derive(Clone)]
struct App {
    events: mpsc::UnboundedSender<Event>,
    token: String,
    /// The cookie that keeps the token: named after the port, since
    /// browsers share cookies between all ports of a host and another
    /// cluster's dashboard there must not overwrite ours.
    cookie: String,
}

/// Serves until `stop` turns true; over HTTPS with `tls` (a TLS cluster's
/// certificate).
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    events: mpsc::UnboundedSender<Event>,
    token: String,
    mut stop: watch::Receiver<bool>,
) {
    let port = listener.local_addr().map_or(0, |a| a.port());
    let cookie = format!("shoal_token_{port}");
    let app = App {
        events,
        token,
        cookie,
    };
    let router = axum::Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/index.html",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route("/api/events", get(live))
        // The JSON API and /metrics: answered by the owner task (api.rs).
        .fallback(query)
        .layer(middleware::from_fn_with_state(app.clone(), require_token))
        .with_state(app);
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let served = match tls {
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(acceptor) => {
            axum::serve(TlsListener::new(listener, acceptor), router)
                .with_graceful_shutdown(shutdown)
                .await
        }
    };
    if let Err(e) = served {
        tracing::warn!("dashboard server stopped: {e}");
    }
}

/// Accepts TCP connections and hands over those whose TLS handshake
/// succeeded; handshakes run in their own tasks, so a slow or silent peer
/// holds up nobody.
struct TlsListener {
    local: std::net::SocketAddr,
    ready: mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
}

impl TlsListener {
    fn new(tcp: tokio::net::TcpListener, acceptor: tokio_rustls::TlsAcceptor) -> TlsListener {
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
        let (tx, ready) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("dashboard accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, conn_tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(Duration::from_secs(10), handshake).await {
                        Ok(Ok(tls)) => {
                            let _ = conn_tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::info!("dashboard TLS handshake with {peer}: {e}"),
                        Err(_) => tracing::info!("dashboard TLS handshake with {peer} timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        TlsListener { local, ready }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The acceptor task never ends while we hold its receiver.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Compares without an early exit (the token is a secret).
fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

fn given_token(uri: &Uri, headers: &HeaderMap, cookie: &str) -> (Option<String>, bool) {
    if let Some(t) = uri.query().and_then(|q| param(q, "token")) {
        return (Some(t), true);
    }
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return (Some(t.trim().to_string()), false);
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == cookie)
        .map(|(_, v)| v.to_string());
    (cookie, false)
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Every request carries the token: in the query (then kept in a cookie
/// for the page's own requests), as a bearer token, or in that cookie.
async fn require_token(State(app): State<App>, req: Request, next: Next) -> Response<Body> {
    let (token, in_query) = given_token(req.uri(), req.headers(), &app.cookie);
    if !token.is_some_and(|t| same(&t, &app.token)) {
        return text(
            StatusCode::UNAUTHORIZED,
            "This Shoal dashboard needs its token: open the link that `shoal scheduler` \
             printed, or `client.dashboard_link` (it ends in ?token=...). Prometheus: send \
             it as `Authorization: Bearer TOKEN`.\n"
                .into(),
        );
    }
    let mut resp = next.run(req).await;
    if in_query {
        // Not readable by scripts.
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{}={}; HttpOnly; SameSite=Strict; Path=/",
            app.cookie, app.token
        )) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

/// A path of the JSON API or `/metrics`, answered by the owner task.
async fn query(State(app): State<App>, uri: Uri) -> Response<Body> {
    let pq = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    match ask(&app.events, pq.to_string()).await {
        Some((Ok((ctype, body)), _)) => ([(header::CONTENT_TYPE, ctype)], body).into_response(),
        Some((Err((code, msg)), _)) => text(
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
            msg + "\n",
        ),
        None => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the scheduler is stopping\n".into(),
        ),
    }
}

fn asset(ctype: &'static str, body: &'static str) -> Response<Body> {
    (
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Asks the owner task; None if it is gone.
async fn ask(events: &mpsc::UnboundedSender<Event>, path: String) -> Option<(Reply, u64)> {
    let (tx, rx) = oneshot::channel();
    events.send(Event::Query(path, tx)).ok()?;
    rx.await.ok()
}

/// Server-sent events: `/api/status` every second, each with the task
/// stream entries since the previous one.
async fn live(State(app): State<App>, uri: Uri) -> Response<Body> {
    let mut since: u64 = param(uri.query().unwrap_or(""), "since")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stream = async_stream(move |tx: mpsc::Sender<sse::Event>| async move {
        let mut every = tokio::time::interval(UPDATE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let Some((Ok((_, body)), seq)) =
                ask(&app.events, format!("/api/status?since={since}")).await
            else {
                return;
            };
            since = seq;
            if tx.send(sse::Event::default().data(body)).await.is_err() {
                return; // the browser went away
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// A stream fed by a spawned producer (stops when the receiver is dropped).
fn async_stream<F, Fut>(
    producer: F,
) -> impl futures::Stream<Item = Result<sse::Event, Infallible>> + Send + 'static
where
    F: FnOnce(mpsc::Sender<sse::Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(producer(tx));
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_comparison() {
        assert!(super::same("abc", "abc"));
        assert!(!super::same("abc", "abd"));
        assert!(!super::same("abc", "ab"));
    }
}
