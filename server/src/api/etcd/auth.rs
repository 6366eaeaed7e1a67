//! The etcd Auth service, and who each etcd request comes from.
//!
//! Users, roles and permissions live in the metadata group
//! (`armada_core::auth`); this module hashes passwords (Argon2id, on a
//! blocking thread, before anything is proposed: no password enters the
//! Raft log), mints and checks tokens, and maps every refusal to etcd's
//! error text and code (clients recognise errors by their text).
//!
//! A token is `armada1.<claims>.<mac>`: the claims (user, the auth revision
//! of the user's password, the auth revision the issuing node had applied,
//! the expiry) and an HMAC-SHA-256 over them with the cluster's signing key,
//! both hex. Any node of the cluster, and of its follower clusters (they
//! mirror the key), checks it without a round trip. A token stops working
//! when it expires, when the user's password changes or the user is
//! deleted, and when authentication is disabled and enabled again (a new
//! key). A node that has applied an older auth state than the token's
//! refuses it as Unavailable (retry), so a user who logs in after a change
//! is always checked against that change.

use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use armada_core::auth::{Access, AuthCommand, AuthError, AuthReply, Denied, PermType, Permission};
use armada_proto::etcd as pb;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::{etcd_status, EtcdApi};
use crate::node::auth::AuthView;
pub use crate::node::auth::EtcdAuthConfig;

/// The metadata key etcd clients send their token under.
pub const TOKEN_METADATA: &str = "token";
/// Longest token accepted (a real one is about 200 characters).
const TOKEN_BYTES_MAX: usize = 4096;
/// Longest password accepted, so one request cannot make hashing costly
/// beyond its configured cost.
pub const PASSWORD_BYTES_MAX: usize = 1024;
const TOKEN_PREFIX: &str = "armada1";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    user: String,
    password_revision: u64,
    auth_revision: u64,
    expires_ms: u64,
}

/// etcd's text and code for an auth refusal.
pub fn auth_status(e: &AuthError) -> Status {
    let text = format!("etcdserver: {e}");
    match e {
        AuthError::UserEmpty | AuthError::RoleEmpty | AuthError::InvalidAuthMgmt | AuthError::Limit(_) => {
            Status::invalid_argument(text)
        }
        AuthError::PermissionDenied => Status::permission_denied(text),
        _ => Status::failed_precondition(text),
    }
}

fn denied_status(d: &Denied) -> Status {
    match d {
        Denied::NoUser => Status::invalid_argument("etcdserver: user name is empty"),
        Denied::StaleUser => invalid_token(),
        _ => Status::permission_denied("etcdserver: permission denied"),
    }
}

fn invalid_token() -> Status {
    Status::unauthenticated("etcdserver: invalid auth token")
}

fn auth_failed() -> Status {
    Status::invalid_argument("etcdserver: authentication failed, invalid user ID or password")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-case hex only, so that a token has exactly one spelling.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn mac(key: &[u8], claims: &[u8]) -> Hmac<sha2::Sha256> {
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    m.update(claims);
    m
}

/// A token for `user` signed with `view`'s key, valid for `ttl` from `now_ms`.
pub fn mint_token(view: &AuthView, user: &str, ttl: Duration, now_ms: u64) -> Option<String> {
    let u = view.state.users.get(user)?;
    let claims = Claims {
        user: user.to_string(),
        password_revision: u.password_revision,
        auth_revision: view.state.revision,
        expires_ms: now_ms.saturating_add(ttl.as_millis() as u64),
    };
    let bytes = postcard::to_allocvec(&claims).ok()?;
    let tag = mac(&view.state.token_key, &bytes).finalize().into_bytes();
    Some(format!("{TOKEN_PREFIX}.{}.{}", hex(&bytes), hex(&tag)))
}

/// Refuses (retry) when this node's auth state is older than `floor`, the
/// state a token was issued from.
fn behind(view: &AuthView, floor: u64) -> Result<(), Status> {
    if view.state.revision < floor && !armada_core::canary::active(armada_core::canary::Canary::AuthTokenFloorIgnored) {
        armada_core::probe!(AuthTokenAheadOfNode);
        return Err(Status::unavailable(format!(
            "etcdserver: this member has applied authentication changes up to revision {}, older than the token's {}; \
             retry",
            view.state.revision, floor
        )));
    }
    Ok(())
}

/// The auth revision a token was issued at, read without checking it (the
/// simulator's A1 uses it as the least state a node may check it against).
pub fn token_auth_revision(token: &str) -> Option<u64> {
    let claims = unhex(token.split('.').nth(1)?)?;
    postcard::from_bytes::<Claims>(&claims).ok().map(|c| c.auth_revision)
}

/// The user a token names, if it is valid at this node now.
pub fn check_token(view: &AuthView, token: &str, now_ms: u64) -> Result<String, Status> {
    if token.len() > TOKEN_BYTES_MAX {
        return Err(invalid_token());
    }
    let mut parts = token.split('.');
    let (Some(TOKEN_PREFIX), Some(claims), Some(tag), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid_token());
    };
    let (Some(claims), Some(tag)) = (unhex(claims), unhex(tag)) else { return Err(invalid_token()) };
    if view.state.token_key.is_empty() || mac(&view.state.token_key, &claims).verify_slice(&tag).is_err() {
        return Err(invalid_token());
    }
    let c: Claims = postcard::from_bytes(&claims).map_err(|_| invalid_token())?;
    if c.expires_ms <= now_ms {
        return Err(invalid_token());
    }
    behind(view, c.auth_revision)?;
    if !view.perms.user_current(&c.user, c.password_revision) {
        return Err(invalid_token());
    }
    Ok(c.user)
}

/// Hashes `password` with Argon2id and a fresh salt (a PHC string).
pub fn hash_password(cfg: &EtcdAuthConfig, password: &str) -> Result<String, Status> {
    let salt = crate::rt::random_bytes(16).map_err(|e| Status::internal(format!("etcdserver: {e}")))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| Status::internal(format!("etcdserver: salt: {e}")))?;
    let params = argon2::Params::new(cfg.hash_memory_kib, cfg.hash_passes, 1, None)
        .map_err(|e| Status::internal(format!("etcdserver: password hashing parameters: {e}")))?;
    let hasher = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    hasher
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Status::internal(format!("etcdserver: hashing a password: {e}")))
}

/// Whether `password` matches `hash` (a PHC string; its own parameters).
pub fn verify_password(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(h) => argon2::Argon2::default().verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// Who an etcd request comes from, with the auth state it is checked
/// against.
pub struct Caller {
    pub view: Arc<AuthView>,
    /// `None`: no token (or authentication is disabled, when every token is
    /// ignored, as etcd does).
    pub user: Option<String>,
}

impl Caller {
    /// May the caller read or write `[key, range_end)` (etcd's encoding)?
    pub fn check(&self, access: Access, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
        self.view.perms.check(self.user.as_deref(), access, key, range_end).map_err(|d| {
            armada_core::probe!(AuthDenied);
            denied_status(&d)
        })
    }

    /// Is the caller root (or authentication disabled)?
    pub fn check_admin(&self) -> Result<(), Status> {
        self.view.perms.check_admin(self.user.as_deref()).map_err(|d| denied_status(&d))
    }

    /// Is there a user (or authentication disabled)? For calls that need
    /// no permission on keys but must not be anonymous.
    pub fn check_user(&self) -> Result<(), Status> {
        if self.view.perms.enabled() && self.user.is_none() {
            return Err(denied_status(&Denied::NoUser));
        }
        Ok(())
    }

    /// Checks a Put as etcd does: write on the key, read too for `prev_kv`.
    pub fn check_put(&self, p: &pb::PutRequest) -> Result<(), Status> {
        self.check(Access::Write, &p.key, &[])?;
        if p.prev_kv {
            self.check(Access::Read, &p.key, &[])?;
        }
        Ok(())
    }

    /// Checks a DeleteRange: write on the range, read too for `prev_kv`.
    pub fn check_delete(&self, d: &pb::DeleteRangeRequest) -> Result<(), Status> {
        self.check(Access::Write, &d.key, &d.range_end)?;
        if d.prev_kv {
            self.check(Access::Read, &d.key, &d.range_end)?;
        }
        Ok(())
    }

    /// Checks a Txn: read on every compared range, and every operation of
    /// both branches (whichever runs).
    pub fn check_txn(&self, t: &pb::TxnRequest) -> Result<(), Status> {
        if !self.view.perms.enabled() {
            return Ok(());
        }
        for c in &t.compare {
            self.check(Access::Read, &c.key, &c.range_end)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            use pb::request_op::Request as R;
            match &op.request {
                Some(R::RequestRange(r)) => self.check(Access::Read, &r.key, &r.range_end)?,
                Some(R::RequestPut(p)) => self.check_put(p)?,
                Some(R::RequestDeleteRange(d)) => self.check_delete(d)?,
                // Armada refuses nested transactions anyway; checking them
                // here would only change which error the client sees.
                Some(R::RequestTxn(inner)) => self.check_txn(inner)?,
                None => {}
            }
        }
        Ok(())
    }
}

impl EtcdApi {
    /// Who sent a request with `metadata`: the user its token names, checked
    /// against this node's applied auth state.
    pub fn caller_from(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let view = self.node.auth_view().map_err(|e| etcd_status(&e))?;
        let token = match metadata.get(TOKEN_METADATA) {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| invalid_token())?),
        };
        if !view.state.enabled {
            // A token issued from a newer state than this node's: the node
            // may not know yet that authentication was enabled again (or
            // how), so it must not serve the request as if anyone could
            // (found by the simulator: a lagging follower node, disabled in
            // its state, served a token's user what the newer state denied).
            if let Some(floor) = token.and_then(token_auth_revision) {
                behind(&view, floor)?;
            }
            // Otherwise etcd ignores tokens while authentication is off.
            return Ok(Caller { view, user: None });
        }
        let user = match token {
            None => None,
            Some(token) => Some(check_token(&view, token, crate::rt::token_clock_ms())?),
        };
        Ok(Caller { view, user })
    }

    pub fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        self.caller_from(request.metadata())
    }

    fn auth_header(&self) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.cluster_id(),
            member_id: self.node.config().id,
            revision: 0,
            raft_term: 0,
        })
    }

    /// Proposes an auth change on behalf of `caller`.
    async fn change(&self, caller: &Caller, cmd: AuthCommand) -> Result<AuthReply, Status> {
        self.node.auth_change(caller.user.clone(), cmd).await.map_err(|e| match crate::node::auth::auth_error(&e) {
            Some(a) => auth_status(a),
            None => etcd_status(&e),
        })
    }

    async fn hash(&self, password: String) -> Result<String, Status> {
        if password.len() > PASSWORD_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "etcdserver: a password is at most {PASSWORD_BYTES_MAX} bytes"
            )));
        }
        let cfg = self.auth.clone();
        crate::rt::blocking(move || hash_password(&cfg, &password))
            .await
            .map_err(|e| Status::unavailable(format!("etcdserver: {e}")))?
    }
}

fn perm_in(p: pb::Permission) -> Result<Permission, Status> {
    use pb::permission::Type;
    let kind = match Type::try_from(p.perm_type) {
        Ok(Type::Read) => PermType::Read,
        Ok(Type::Write) => PermType::Write,
        Ok(Type::Readwrite) => PermType::ReadWrite,
        Err(_) => return Err(Status::invalid_argument(format!("etcdserver: unknown permission type {}", p.perm_type))),
    };
    Ok(Permission { key: p.key, range_end: p.range_end, kind })
}

fn perm_out(p: &Permission) -> pb::Permission {
    use pb::permission::Type;
    let t = match p.kind {
        PermType::Read => Type::Read,
        PermType::Write => Type::Write,
        PermType::ReadWrite => Type::Readwrite,
    };
    pb::Permission { perm_type: t as i32, key: p.key.clone(), range_end: p.range_end.clone() }
}

fn no_hashed_password(h: &str) -> Result<(), Status> {
    if h.is_empty() {
        return Ok(());
    }
    Err(Status::invalid_argument(
        "etcdserver: hashedPassword is not supported: Armada hashes passwords itself (Argon2id); send the password",
    ))
}

#[tonic::async_trait]
impl pb::auth_server::Auth for EtcdApi {
    async fn auth_enable(
        &self,
        request: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        let caller = self.caller(&request)?;
        let token_key = crate::rt::random_bytes(32).map_err(|e| Status::internal(format!("etcdserver: {e}")))?;
        self.change(&caller, AuthCommand::Enable { token_key }).await?;
        Ok(Response::new(pb::AuthEnableResponse { header: self.auth_header() }))
    }

    async fn auth_disable(
        &self,
        request: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        let caller = self.caller(&request)?;
        self.change(&caller, AuthCommand::Disable).await?;
        Ok(Response::new(pb::AuthDisableResponse { header: self.auth_header() }))
    }

    async fn auth_status(
        &self,
        _request: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        let view = self.node.auth_view().map_err(|e| etcd_status(&e))?;
        Ok(Response::new(pb::AuthStatusResponse {
            header: self.auth_header(),
            enabled: view.state.enabled,
            auth_revision: view.state.revision,
        }))
    }

    /// Checks the password against this node's applied state and mints a
    /// token (no round trip to a leader: logins at the edge stay local).
    async fn authenticate(
        &self,
        request: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let r = request.into_inner();
        let view = self.node.auth_view().map_err(|e| etcd_status(&e))?;
        if !view.state.enabled {
            return Err(auth_status(&AuthError::AuthNotEnabled));
        }
        if r.password.len() > PASSWORD_BYTES_MAX {
            return Err(auth_failed());
        }
        let Some(hash) = view.state.users.get(&r.name).and_then(|u| u.password_hash.clone()) else {
            return Err(auth_failed());
        };
        let password = r.password;
        let ok = crate::rt::blocking(move || verify_password(&hash, &password))
            .await
            .map_err(|e| Status::unavailable(format!("etcdserver: {e}")))?;
        if !ok {
            return Err(auth_failed());
        }
        let token =
            mint_token(&view, &r.name, self.auth.token_ttl, crate::rt::token_clock_ms()).ok_or_else(auth_failed)?;
        Ok(Response::new(pb::AuthenticateResponse { header: self.auth_header(), token }))
    }

    async fn user_add(
        &self,
        request: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        let caller = self.caller(&request)?;
        // Checked here too, before the costly hash; the apply checks again.
        caller.check_admin()?;
        let r = request.into_inner();
        no_hashed_password(&r.hashed_password)?;
        let no_password = r.options.is_some_and(|o| o.no_password);
        let password_hash = if no_password { None } else { Some(self.hash(r.password).await?) };
        self.change(&caller, AuthCommand::UserAdd { name: r.name, password_hash }).await?;
        Ok(Response::new(pb::AuthUserAddResponse { header: self.auth_header() }))
    }

    async fn user_get(
        &self,
        request: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        // A user may see their own roles; others' need root.
        if caller.user.as_deref() != Some(r.name.as_str()) {
            caller.check_admin()?;
        }
        let user = caller.view.state.users.get(&r.name).ok_or_else(|| auth_status(&AuthError::UserNotFound))?;
        Ok(Response::new(pb::AuthUserGetResponse {
            header: self.auth_header(),
            roles: user.roles.iter().cloned().collect(),
        }))
    }

    async fn user_list(
        &self,
        request: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        let caller = self.caller(&request)?;
        caller.check_admin()?;
        Ok(Response::new(pb::AuthUserListResponse {
            header: self.auth_header(),
            users: caller.view.state.users.keys().cloned().collect(),
        }))
    }

    async fn user_delete(
        &self,
        request: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        let caller = self.caller(&request)?;
        let name = request.into_inner().name;
        self.change(&caller, AuthCommand::UserDelete { name }).await?;
        Ok(Response::new(pb::AuthUserDeleteResponse { header: self.auth_header() }))
    }

    async fn user_change_password(
        &self,
        request: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        let caller = self.caller(&request)?;
        caller.check_admin()?;
        let r = request.into_inner();
        no_hashed_password(&r.hashed_password)?;
        let password_hash = self.hash(r.password).await?;
        self.change(&caller, AuthCommand::UserChangePassword { name: r.name, password_hash }).await?;
        Ok(Response::new(pb::AuthUserChangePasswordResponse { header: self.auth_header() }))
    }

    async fn user_grant_role(
        &self,
        request: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        self.change(&caller, AuthCommand::UserGrantRole { user: r.user, role: r.role }).await?;
        Ok(Response::new(pb::AuthUserGrantRoleResponse { header: self.auth_header() }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        self.change(&caller, AuthCommand::UserRevokeRole { user: r.name, role: r.role }).await?;
        Ok(Response::new(pb::AuthUserRevokeRoleResponse { header: self.auth_header() }))
    }

    async fn role_add(
        &self,
        request: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        let caller = self.caller(&request)?;
        let name = request.into_inner().name;
        self.change(&caller, AuthCommand::RoleAdd { name }).await?;
        Ok(Response::new(pb::AuthRoleAddResponse { header: self.auth_header() }))
    }

    async fn role_get(
        &self,
        request: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        let caller = self.caller(&request)?;
        let role = request.into_inner().role;
        // A user may see the roles they have; others need root.
        let has =
            caller.user.as_ref().and_then(|u| caller.view.state.users.get(u)).is_some_and(|u| u.roles.contains(&role));
        if !has {
            caller.check_admin()?;
        }
        let r = caller.view.state.roles.get(&role).ok_or_else(|| auth_status(&AuthError::RoleNotFound))?;
        let perm = if role == armada_core::auth::ROOT {
            // etcd reports the root role as read-write on every key.
            vec![pb::Permission { perm_type: pb::permission::Type::Readwrite as i32, key: vec![], range_end: vec![0] }]
        } else {
            r.permissions.iter().map(perm_out).collect()
        };
        Ok(Response::new(pb::AuthRoleGetResponse { header: self.auth_header(), perm }))
    }

    async fn role_list(
        &self,
        request: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        let caller = self.caller(&request)?;
        caller.check_admin()?;
        Ok(Response::new(pb::AuthRoleListResponse {
            header: self.auth_header(),
            roles: caller.view.state.roles.keys().cloned().collect(),
        }))
    }

    async fn role_delete(
        &self,
        request: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        let caller = self.caller(&request)?;
        let name = request.into_inner().role;
        self.change(&caller, AuthCommand::RoleDelete { name }).await?;
        Ok(Response::new(pb::AuthRoleDeleteResponse { header: self.auth_header() }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let perm = perm_in(r.perm.ok_or_else(|| Status::invalid_argument("etcdserver: permission not given"))?)?;
        self.change(&caller, AuthCommand::RoleGrantPermission { role: r.name, perm }).await?;
        Ok(Response::new(pb::AuthRoleGrantPermissionResponse { header: self.auth_header() }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        self.change(&caller, AuthCommand::RoleRevokePermission { role: r.role, key: r.key, range_end: r.range_end })
            .await?;
        Ok(Response::new(pb::AuthRoleRevokePermissionResponse { header: self.auth_header() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use armada_core::auth::{AuthState, Permissions, ROOT};

    fn view(state: AuthState) -> AuthView {
        AuthView { perms: Permissions::compile(&state), state }
    }

    fn enabled() -> AuthState {
        let mut s = AuthState::default();
        let add = |s: &mut AuthState, c| s.apply(None, &c).unwrap();
        add(&mut s, AuthCommand::UserAdd { name: ROOT.into(), password_hash: Some("h".into()) });
        add(&mut s, AuthCommand::UserGrantRole { user: ROOT.into(), role: ROOT.into() });
        add(&mut s, AuthCommand::UserAdd { name: "alice".into(), password_hash: Some("h".into()) });
        add(&mut s, AuthCommand::Enable { token_key: vec![9; 32] });
        s
    }

    #[test]
    fn a_token_names_its_user_until_it_expires_or_the_password_changes() {
        let s = enabled();
        let v = view(s.clone());
        let t = mint_token(&v, "alice", Duration::from_secs(10), 1_000).unwrap();
        assert_eq!(check_token(&v, &t, 2_000).unwrap(), "alice");
        assert_eq!(check_token(&v, &t, 11_000).unwrap_err().code(), tonic::Code::Unauthenticated, "expired");
        // Tampered claims or tag, another key, garbage.
        let mut bad = t.clone().into_bytes();
        let i = bad.len() - 1;
        bad[i] = if bad[i] == b'0' { b'1' } else { b'0' };
        assert!(check_token(&v, std::str::from_utf8(&bad).unwrap(), 2_000).is_err());
        let mut other = s.clone();
        other.token_key = vec![8; 32];
        assert!(check_token(&view(other), &t, 2_000).is_err());
        for junk in ["", "armada1", "armada1..", "armada1.zz.zz", "x.y.z", "armada1.00.00.00"] {
            assert_eq!(check_token(&v, junk, 2_000).unwrap_err().code(), tonic::Code::Unauthenticated, "{junk}");
        }
        // A password change invalidates it.
        let mut changed = s.clone();
        changed
            .apply(Some(ROOT), &AuthCommand::UserChangePassword { name: "alice".into(), password_hash: "h2".into() })
            .unwrap();
        assert_eq!(check_token(&view(changed), &t, 2_000).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn a_node_behind_the_token_says_retry() {
        let mut s = enabled();
        s.apply(Some(ROOT), &AuthCommand::RoleAdd { name: "r".into() }).unwrap();
        let newer = view(s.clone());
        let t = mint_token(&newer, "alice", Duration::from_secs(10), 0).unwrap();
        let mut older = s.clone();
        older.revision -= 1;
        assert_eq!(check_token(&view(older), &t, 1).unwrap_err().code(), tonic::Code::Unavailable);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("ARMADA_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
        ))]

        /// Tokens come from any client: a real one damaged (characters
        /// replaced, cut, extended) or any string is answered with a user
        /// or a status, never a panic, and a damaged one never names a
        /// user (the MAC covers every byte of the claims).
        #[test]
        fn a_damaged_or_random_token_never_panics_nor_passes(
            edits in proptest::collection::vec((proptest::prelude::any::<usize>(), 0u8..128), 1..6),
            cut in proptest::option::of(proptest::prelude::any::<usize>()),
            random in ".{0,300}",
        ) {
            let v = view(enabled());
            let good = mint_token(&v, "alice", Duration::from_secs(10), 0).unwrap();
            let mut bytes = good.clone().into_bytes();
            for (at, b) in edits {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            if let Some(c) = cut {
                bytes.truncate(c % (bytes.len() + 1));
            }
            let damaged = String::from_utf8_lossy(&bytes).into_owned();
            let r = check_token(&v, &damaged, 1);
            if damaged != good {
                proptest::prop_assert!(r.is_err(), "a damaged token passed: {damaged}");
            }
            let _ = check_token(&v, &random, 1);
            let _ = token_auth_revision(&random);
        }
    }

    #[test]
    fn passwords_verify_against_their_argon2id_hash() {
        let cfg = EtcdAuthConfig { hash_memory_kib: 64, hash_passes: 1, ..Default::default() };
        let h = hash_password(&cfg, "s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password(&h, "s3cret"));
        assert!(!verify_password(&h, "s3cret "));
        assert!(!verify_password("not a hash", "s3cret"));
        assert_ne!(hash_password(&cfg, "s3cret").unwrap(), h, "salted");
    }
}
