//! In-process transport: a shared router from address to handler. For plain
//! `cargo test` of several nodes in one runtime; it has no faults.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{BoxFuture, Handler, Transport, TransportError};

/// Address → handler. Cloning shares the routes.
#[derive(Clone, Default)]
pub struct LocalRouter {
    routes: Arc<Mutex<BTreeMap<String, Arc<dyn Handler>>>>,
}

impl LocalRouter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&self, addr: &str, handler: Arc<dyn Handler>) {
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).insert(addr.to_string(), handler);
    }

    /// Removes a node's route, as if it stopped.
    pub fn unregister(&self, addr: &str) {
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(addr);
    }

    pub fn transport(&self) -> LocalTransport {
        LocalTransport { router: self.clone() }
    }
}

pub struct LocalTransport {
    router: LocalRouter,
}

impl Transport for LocalTransport {
    fn call(
        &self,
        target: &str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<u8>, TransportError>> {
        let handler = self.router.routes.lock().unwrap_or_else(|p| p.into_inner()).get(target).cloned();
        let addr = target.to_string();
        Box::pin(async move {
            crate::check_message_size(&request)?;
            let Some(h) = handler else {
                return Err(TransportError::Unreachable { addr, reason: "no such node".into() });
            };
            match crate::time::timeout(timeout, h.handle(request)).await {
                Ok(Some(r)) => Ok(r),
                Ok(None) => Err(TransportError::Unreachable { addr, reason: "no response".into() }),
                Err(_) => Err(TransportError::Timeout { addr, timeout_ms: timeout.as_millis() as u64 }),
            }
        })
    }
}
