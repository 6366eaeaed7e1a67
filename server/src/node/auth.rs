//! The node's side of etcd authentication: the applied auth state, cached
//! and compiled for permission checks, and changes proposed to the
//! metadata group (forwarded to its leader like any catalog change).
//!
//! Permission checks read this node's *applied* state, as etcd's
//! serializable reads do: a change is in force at a node once it applied
//! it. Tokens carry the auth revision they were issued at, and a node whose
//! state is older refuses them (the client retries), so a user who logs in
//! after a change is checked against it everywhere. Changes themselves are
//! checked when they apply (the requesting user must be root then).

use std::sync::Arc;
use std::time::Duration;

use armada_core::auth::{AuthCommand, AuthReply, AuthState, Permissions};
use armada_core::command::{MetaCommand, MetaError, MetaReply};
use armada_core::{Command, CommandResponse, GroupId};

use super::forward::Miss;
use super::wire::{ClientReply, ClientRequest};
use super::Node;
use crate::types::ApiError;

/// How etcd authentication hashes passwords and how long its tokens live.
#[derive(Debug, Clone)]
pub struct EtcdAuthConfig {
    /// A token's lifetime (etcd's `--auth-token-ttl`, 300 s by default).
    /// etcd clients log in again when told a token is invalid.
    pub token_ttl: Duration,
    /// Argon2id memory cost in KiB and passes: OWASP's first recommended
    /// setting (19 MiB, 2 passes) by default, about 20-40 ms of one core
    /// per login or password change here. Stored with each hash, so a
    /// change applies to passwords set afterwards.
    pub hash_memory_kib: u32,
    pub hash_passes: u32,
}

impl Default for EtcdAuthConfig {
    fn default() -> Self {
        Self { token_ttl: Duration::from_secs(300), hash_memory_kib: 19 * 1024, hash_passes: 2 }
    }
}

/// An applied auth state and its compiled permissions.
#[derive(Debug, Default)]
pub struct AuthView {
    pub state: AuthState,
    pub perms: Permissions,
}

impl Node {
    /// The auth state this node has applied, from a cache refreshed when
    /// the metadata group applies anything (the catalog epoch moves).
    pub fn auth_view(&self) -> Result<Arc<AuthView>, ApiError> {
        let epoch = self.notifier.catalog_epoch.load(std::sync::atomic::Ordering::SeqCst);
        {
            let cache = self.auth_cache.read().unwrap_or_else(|p| p.into_inner());
            if cache.0 == epoch {
                return Ok(cache.1.clone());
            }
        }
        let state = self.read_catalog(|c| c.auth_state())?;
        let view = Arc::new(AuthView { perms: Permissions::compile(&state), state });
        let mut cache = self.auth_cache.write().unwrap_or_else(|p| p.into_inner());
        // Read before the state: a change applied meanwhile moved the epoch
        // on, and the next call reloads.
        *cache = (epoch, view.clone());
        Ok(view)
    }

    /// Applies an auth change requested by `by` through the metadata group
    /// of this cluster. Follower clusters refuse it: their state is the
    /// leader cluster's, mirrored.
    pub async fn auth_change(&self, by: Option<String>, cmd: AuthCommand) -> Result<AuthReply, ApiError> {
        if self.upstream.get().is_some() {
            return Err(ApiError::ReadOnly(
                "this is a follower cluster: users, roles and authentication are managed at the leader cluster and \
                 reach followers by replication"
                    .into(),
            ));
        }
        self.auth_change_internal(by, cmd).await
    }

    /// [`Node::auth_change`] without the follower check (the follower's
    /// catalog worker mirrors the leader cluster's state with it).
    pub async fn auth_change_internal(&self, by: Option<String>, cmd: AuthCommand) -> Result<AuthReply, ApiError> {
        match self.execute(ClientRequest::Auth { by, cmd, hops: 0 }).await? {
            ClientReply::Auth(r) => Ok(r),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    pub(super) async fn auth_change_local(
        &self,
        by: Option<String>,
        cmd: AuthCommand,
        hops: u32,
    ) -> Result<AuthReply, Miss> {
        let meta = self.group(GroupId::META).ok_or_else(|| ApiError::Internal("no metadata group".into()))?;
        match self.propose(&meta, Command::Meta(MetaCommand::Auth { by, cmd }), hops).await? {
            CommandResponse::Meta(Ok(MetaReply::Auth(r))) => Ok(r),
            CommandResponse::Meta(Err(e)) => Err(ApiError::Meta(e).into()),
            other => Err(ApiError::Internal(format!("unexpected response {other:?}")).into()),
        }
    }
}

/// The auth error inside an [`ApiError`], if it is one.
pub fn auth_error(e: &ApiError) -> Option<&armada_core::auth::AuthError> {
    match e {
        ApiError::Meta(MetaError::Auth(a)) => Some(a),
        _ => None,
    }
}
