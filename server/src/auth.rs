//! Bearer tokens per API: a token configured for an armada.v1 service (KV,
//! Tables, Cluster, Maintenance) or for the replication service must come
//! with every call as `authorization: Bearer TOKEN`; a call without it, or
//! with another, is answered `UNAUTHENTICATED` before the service sees it.
//!
//! - A token is given as a value (flag, environment) or as a file (a
//!   Kubernetes secret); a file is re-read when it changes (checked every
//!   reload interval, not per call), so a rotated secret takes effect
//!   without a restart.
//! - A token never appears in logs or `Debug` output ([`Secret`]).
//! - Tokens travel in the clear over plaintext: the configuration refuses
//!   them on a listener without TLS unless explicitly allowed for local
//!   testing (`--allow-tokens-over-plaintext`).
//!
//! The check wraps each service in the real runtime (`Gated`); the
//! simulated world configures no tokens.

use std::path::PathBuf;
use std::sync::Arc;

use crate::reload::Reloading;

/// A secret string: compared in constant time, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Equal to `other`, in time independent of where they differ.
    pub fn matches(&self, other: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        mine.len() == other.len() && mine.iter().zip(other).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Where a token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSpec {
    Value(Secret),
    /// The file's contents, surrounding whitespace removed.
    File(PathBuf),
}

fn read_token(path: &std::path::Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(Secret::new(token))
}

/// One API's token: fixed, or kept current with its file
/// ([`crate::reload`]: checked by the launcher's reloader, or with
/// [`TokenSource::refresh`] before a client dials, never per call).
#[derive(Debug)]
pub enum TokenSource {
    Fixed(Arc<Secret>),
    File(Arc<Reloading<Secret>>),
}

impl TokenSource {
    /// Reads the token; an error here stops the node from starting.
    pub fn load(spec: TokenSpec) -> Result<Arc<TokenSource>, String> {
        Ok(Arc::new(match spec {
            TokenSpec::Value(s) if s.expose().is_empty() => return Err("a token is empty".into()),
            TokenSpec::Value(s) => TokenSource::Fixed(Arc::new(s)),
            TokenSpec::File(p) => {
                let what = format!("token file {}", p.display());
                TokenSource::File(Reloading::load(what, vec![p.clone()], move || read_token(&p))?)
            }
        }))
    }

    /// The token now.
    pub fn current(&self) -> Arc<Secret> {
        match self {
            TokenSource::Fixed(s) => s.clone(),
            TokenSource::File(r) => r.get(),
        }
    }

    /// Re-reads a token file that changed (one that cannot be read keeps
    /// the previous token).
    pub fn refresh(&self) {
        if let TokenSource::File(r) = self {
            r.reload_if_changed();
        }
    }

    /// Re-reads a token file every `interval` while the token is in use.
    pub fn spawn_reloader(&self, interval: std::time::Duration) {
        if let TokenSource::File(r) = self {
            r.spawn_reloader(interval, |_| {});
        }
    }

    /// Whether `authorization` (the header's value) carries the token.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else { return false };
        let Some(token) = value.strip_prefix(b"Bearer ").or_else(|| value.strip_prefix(b"bearer ")) else {
            return false;
        };
        self.current().matches(token)
    }
}

/// The token of each API (none: open).
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    pub kv: Option<Arc<TokenSource>>,
    pub tables: Option<Arc<TokenSource>>,
    pub cluster: Option<Arc<TokenSource>>,
    pub maintenance: Option<Arc<TokenSource>>,
    pub replication: Option<Arc<TokenSource>>,
}

#[cfg(not(madsim))]
pub use gate::{gate, Gated};

#[cfg(not(madsim))]
mod gate {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tonic::body::Body;
    use tonic::codegen::http::{Request, Response};
    use tonic::server::NamedService;

    use super::TokenSource;

    /// A service that answers `UNAUTHENTICATED` to calls without its token,
    /// and `RESOURCE_EXHAUSTED` to calls past its client's request rate or
    /// on a connection past its listener's limit.
    #[derive(Clone)]
    pub struct Gated<S> {
        inner: S,
        token: Option<Arc<TokenSource>>,
        rate: Option<Arc<crate::limits::RateLimiter>>,
    }

    /// `svc`, checking `token` on every call when there is one, and the
    /// caller's address against `rate`.
    pub fn gate<S>(
        svc: S,
        token: &Option<Arc<TokenSource>>,
        rate: &Option<Arc<crate::limits::RateLimiter>>,
    ) -> Gated<S> {
        Gated { inner: svc, token: token.clone(), rate: rate.clone() }
    }

    impl<S: NamedService> NamedService for Gated<S> {
        const NAME: &'static str = S::NAME;
    }

    impl<S> tower::Service<Request<Body>> for Gated<S>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
        S::Future: Send + 'static,
    {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, Infallible>> + Send>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, req: Request<Body>) -> Self::Future {
            let conn = req.extensions().get::<crate::limits::ConnInfo>().copied();
            if conn.is_some_and(|c| c.over_limit) {
                let status = tonic::Status::resource_exhausted(crate::limits::TOO_MANY_CONNECTIONS);
                return Box::pin(async move { Ok(status.into_http()) });
            }
            if let Some(rate) = &self.rate {
                // A Unix socket's clients share the unspecified address.
                let address = conn.and_then(|c| c.remote_addr).map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
                if !rate.admit(address, std::time::Instant::now()) {
                    let status = tonic::Status::resource_exhausted(
                        "armada: this client address is over its request rate (--requests-per-second); slow down",
                    );
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
            if let Some(token) = &self.token {
                let header = req.headers().get("authorization").map(|v| v.as_bytes());
                if !token.admits(header) {
                    let status = tonic::Status::unauthenticated(if header.is_none() {
                        "this API needs a token: send `authorization: Bearer TOKEN`"
                    } else {
                        "the token is not this API's"
                    });
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
            Box::pin(self.inner.call(req))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_checked_exactly_and_never_printed() {
        let t = TokenSource::load(TokenSpec::Value(Secret::new("s3cret"))).unwrap();
        assert!(t.admits(Some(b"Bearer s3cret")));
        for wrong in [&b"Bearer s3cre"[..], b"Bearer s3cret ", b"s3cret", b"Basic s3cret", b"Bearer S3cret"] {
            assert!(!t.admits(Some(wrong)), "{}", String::from_utf8_lossy(wrong));
        }
        assert!(!t.admits(None));
        assert!(!format!("{t:?}").contains("s3cret"), "{t:?}");
        assert!(TokenSource::load(TokenSpec::Value(Secret::new(""))).is_err());
    }

    #[test]
    fn a_token_file_is_re_read_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("armada-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "first\n").unwrap();
        let t = TokenSource::load(TokenSpec::File(f.clone())).unwrap();
        assert!(t.admits(Some(b"Bearer first")));
        std::fs::write(&f, "second-token\n").unwrap();
        t.refresh();
        assert!(t.admits(Some(b"Bearer second-token")), "the rotated secret is used");
        assert!(!t.admits(Some(b"Bearer first")));
        std::fs::write(&f, "  \n").unwrap();
        t.refresh();
        assert!(t.admits(Some(b"Bearer second-token")), "an empty file keeps the previous token");
        std::fs::remove_file(&f).unwrap();
        assert!(TokenSource::load(TokenSpec::File(f)).is_err());
    }
}
