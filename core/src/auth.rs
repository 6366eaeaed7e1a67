//! etcd-style authentication state: users, roles and key-range permissions,
//! kept as one record in the metadata group and changed only by
//! [`AuthCommand`]s applied through its Raft log.
//!
//! What this module does **not** do: it never sees a password (commands
//! carry hashes made by the node that took the request), never mints or
//! checks a token (the server does, with the [`AuthState::token_key`] this
//! state holds), and never reads a clock. It decides two things, both pure
//! functions of the state: whether a command may apply ([`AuthState::apply`],
//! with the requesting user checked *at apply*, so a revocation ordered
//! before a change in the log is always in force for it), and whether a
//! user may read or write a key range ([`Permissions::check`]).
//!
//! Semantics follow etcd 3.4/3.5 (`server/auth/store.go`): the user `root`
//! with the role `root` must exist before authentication can be enabled;
//! the role `root` grants everything; a permission's `range_end` empty means
//! the single key, `"\0"` means every key from `key` on; a range request is
//! permitted only if the union of the user's permitted intervals covers all
//! of it.
//!
//! Order of use: decode the stored state ([`AuthState::load`]), [`apply`]
//! commands to a copy and store it ([`AuthState::store`]); compile it once
//! per change ([`Permissions::compile`]) and check requests against that.
//!
//! [`apply`]: AuthState::apply

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError, WriteBatch};

/// The superuser's name and the all-permitting role's name.
pub const ROOT: &str = "root";
/// Longest user or role name, in bytes.
pub const NAME_BYTES_MAX: usize = 256;
/// Most users and most roles one cluster keeps. The whole state is one
/// record rewritten on every change, so it stays small by design: auth
/// changes are rare administrative acts, not a data path.
pub const USERS_MAX: usize = 10_000;
pub const ROLES_MAX: usize = 10_000;
/// Most permissions of one role.
pub const PERMISSIONS_PER_ROLE_MAX: usize = 1_000;
/// Largest encoded state; a change that would exceed it is refused.
pub const STATE_BYTES_MAX: usize = 8 << 20;
/// Longest key or range end in a permission (etcd's key limit is far
/// above any key anyone permits by name; this bounds the state).
pub const PERMISSION_KEY_BYTES_MAX: usize = 4096;
/// Longest stored password hash (a PHC string is about 100 bytes).
pub const PASSWORD_HASH_BYTES_MAX: usize = 512;

/// What a permission allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PermType {
    Read,
    Write,
    ReadWrite,
}

impl PermType {
    fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (PermType::ReadWrite, _) | (PermType::Read, Access::Read) | (PermType::Write, Access::Write)
        )
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A key or a key range a role may read, write or both.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Permission {
    pub key: Vec<u8>,
    /// Empty: the single key; `"\0"`: every key from `key` on.
    pub range_end: Vec<u8>,
    pub kind: PermType,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// A PHC string (the server's password hashing); `None` for a user
    /// created without a password, who can only be authenticated otherwise
    /// (and never by `Authenticate`).
    pub password_hash: Option<String>,
    pub roles: BTreeSet<String>,
    /// The auth revision at which this user's password was last set (or the
    /// user created): a token names it, so changing a password or deleting
    /// and re-adding the user invalidates every token issued before.
    pub password_revision: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Sorted by (key, range_end); at most one per (key, range_end).
    pub permissions: Vec<Permission>,
}

/// The whole authentication state of a cluster.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthState {
    pub enabled: bool,
    /// Increases by one with every change applied (etcd's auth revision).
    pub revision: u64,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
    /// The secret tokens are signed with, set when authentication is
    /// enabled (drawn by the node that took the request, so replicas agree).
    /// Follower clusters mirror it, so a token works at either cluster.
    pub token_key: Vec<u8>,
}

/// A change to the authentication state. `Debug` shows what it changes but
/// never a password hash or a key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthCommand {
    /// `token_key` becomes the signing secret (a fresh one at every enable,
    /// so tokens of an earlier enabled period stop working).
    Enable {
        token_key: Vec<u8>,
    },
    Disable,
    UserAdd {
        name: String,
        password_hash: Option<String>,
    },
    UserDelete {
        name: String,
    },
    UserChangePassword {
        name: String,
        password_hash: String,
    },
    UserGrantRole {
        user: String,
        role: String,
    },
    UserRevokeRole {
        user: String,
        role: String,
    },
    RoleAdd {
        name: String,
    },
    RoleDelete {
        name: String,
    },
    RoleGrantPermission {
        role: String,
        perm: Permission,
    },
    RoleRevokePermission {
        role: String,
        key: Vec<u8>,
        range_end: Vec<u8>,
    },
    /// A follower cluster's copy of the leader cluster's state: replaces
    /// this state if its revision is higher (never goes back). Proposed
    /// only by the follower's catalog worker, never from a client request.
    Mirror {
        state: AuthState,
    },
}

// Secrets (password hashes, the token key) never reach a log or an error
// through `Debug`.
impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("password", &self.password_hash.as_ref().map(|_| "<hash>"))
            .field("roles", &self.roles)
            .field("password_revision", &self.password_revision)
            .finish()
    }
}

impl std::fmt::Debug for AuthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthState")
            .field("enabled", &self.enabled)
            .field("revision", &self.revision)
            .field("users", &self.users)
            .field("roles", &self.roles)
            .field("token_key", &format_args!("<{} bytes>", self.token_key.len()))
            .finish()
    }
}

impl AuthCommand {
    /// The command's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthCommand::Enable { .. } => "enable",
            AuthCommand::Disable => "disable",
            AuthCommand::UserAdd { .. } => "user_add",
            AuthCommand::UserDelete { .. } => "user_delete",
            AuthCommand::UserChangePassword { .. } => "user_change_password",
            AuthCommand::UserGrantRole { .. } => "user_grant_role",
            AuthCommand::UserRevokeRole { .. } => "user_revoke_role",
            AuthCommand::RoleAdd { .. } => "role_add",
            AuthCommand::RoleDelete { .. } => "role_delete",
            AuthCommand::RoleGrantPermission { .. } => "role_grant_permission",
            AuthCommand::RoleRevokePermission { .. } => "role_revoke_permission",
            AuthCommand::Mirror { .. } => "mirror",
        }
    }
}

impl std::fmt::Debug for AuthCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthCommand::UserAdd { name, .. } | AuthCommand::UserChangePassword { name, .. } => {
                write!(f, "{}({name:?})", self.kind())
            }
            AuthCommand::UserDelete { name } | AuthCommand::RoleAdd { name } | AuthCommand::RoleDelete { name } => {
                write!(f, "{}({name:?})", self.kind())
            }
            AuthCommand::UserGrantRole { user, role } | AuthCommand::UserRevokeRole { user, role } => {
                write!(f, "{}({user:?}, {role:?})", self.kind())
            }
            AuthCommand::RoleGrantPermission { role, perm } => write!(f, "{}({role:?}, {perm:?})", self.kind()),
            AuthCommand::RoleRevokePermission { role, key, range_end } => {
                write!(f, "{}({role:?}, {key:?}..{range_end:?})", self.kind())
            }
            AuthCommand::Mirror { state } => write!(f, "mirror(revision {})", state.revision),
            AuthCommand::Enable { .. } | AuthCommand::Disable => f.write_str(self.kind()),
        }
    }
}

/// What an applied command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthReply {
    /// The state changed to this revision.
    Changed { revision: u64 },
    /// Nothing to do (enabling an enabled state, granting a granted role, a
    /// mirror not newer than the state): the revision is unchanged.
    Unchanged { revision: u64 },
}

/// Why a command was refused. The texts are etcd's where etcd has one, since
/// clients recognise errors by their text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("root user does not exist")]
    RootUserNotExist,
    #[error("root user does not have root role")]
    RootRoleNotExist,
    #[error("user name already exists")]
    UserAlreadyExist,
    #[error("user name is empty")]
    UserEmpty,
    #[error("user name not found")]
    UserNotFound,
    #[error("role name already exists")]
    RoleAlreadyExist,
    #[error("role name not found")]
    RoleNotFound,
    #[error("role name is empty")]
    RoleEmpty,
    #[error("permission denied")]
    PermissionDenied,
    #[error("role is not granted to the user")]
    RoleNotGranted,
    #[error("permission is not granted to the role")]
    PermissionNotGranted,
    #[error("invalid auth management")]
    InvalidAuthMgmt,
    /// Refused by a limit of this module; the text says which.
    #[error("{0}")]
    Limit(String),
    #[error("authentication is not enabled")]
    AuthNotEnabled,
    #[error("password was given for a user created without one")]
    NoPasswordUser,
}

impl AuthState {
    /// The state stored under `key` (default: empty and disabled).
    pub fn load(engine: &dyn Engine, key: &[u8]) -> Result<AuthState, EngineError> {
        match engine.get(key)? {
            Some(v) => crate::codec::decode(&v, "auth state").map_err(EngineError::from),
            None => Ok(AuthState::default()),
        }
    }

    /// Adds the write of this state under `key` to `batch`.
    pub fn store(&self, key: Vec<u8>, batch: &mut WriteBatch) {
        batch.put(key, crate::codec::encode(self));
    }

    /// Whether `user` has the role `root`.
    pub fn is_root(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.contains(ROOT))
    }

    /// May `by` (the authenticated user, or `None` when no user is known)
    /// manage authentication? Everyone may while it is disabled.
    pub fn check_admin(&self, by: Option<&str>) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let by = by.filter(|b| !b.is_empty()).ok_or(AuthError::UserEmpty)?;
        if !self.users.contains_key(by) {
            return Err(AuthError::UserNotFound);
        }
        if !self.is_root(by) {
            return Err(AuthError::PermissionDenied);
        }
        Ok(())
    }

    /// Applies `cmd`, requested by `by`, to this state. On `Err` the state
    /// is unchanged. Administrative commands need `by` to be a root user
    /// while authentication is enabled; [`AuthCommand::Mirror`] is internal
    /// and needs no user.
    pub fn apply(&mut self, by: Option<&str>, cmd: &AuthCommand) -> Result<AuthReply, AuthError> {
        if !matches!(cmd, AuthCommand::Mirror { .. }) {
            self.check_admin(by)?;
        }
        let mut next = self.clone();
        let changed = next.change(cmd)?;
        if !changed {
            return Ok(AuthReply::Unchanged { revision: self.revision });
        }
        if !matches!(cmd, AuthCommand::Mirror { .. }) {
            next.revision = self.revision + 1;
        }
        let len = postcard::to_allocvec(&next).map_or(usize::MAX, |b| b.len());
        if len > STATE_BYTES_MAX {
            return Err(AuthError::Limit(format!(
                "the authentication state would take {len} bytes, more than its limit of {STATE_BYTES_MAX}"
            )));
        }
        *self = next;
        Ok(AuthReply::Changed { revision: self.revision })
    }

    /// Carries out `cmd` on `self`; `Ok(false)` if it changes nothing.
    fn change(&mut self, cmd: &AuthCommand) -> Result<bool, AuthError> {
        let next_revision = self.revision + 1;
        match cmd {
            AuthCommand::Enable { token_key } => {
                if self.enabled {
                    return Ok(false);
                }
                let root = self.users.get(ROOT).ok_or(AuthError::RootUserNotExist)?;
                if !root.roles.contains(ROOT) {
                    return Err(AuthError::RootRoleNotExist);
                }
                if token_key.len() < 16 {
                    return Err(AuthError::Limit("a token key needs at least 16 bytes".into()));
                }
                self.enabled = true;
                self.token_key = token_key.clone();
            }
            AuthCommand::Disable => {
                if !self.enabled {
                    return Ok(false);
                }
                self.enabled = false;
            }
            AuthCommand::UserAdd { name, password_hash } => {
                check_name(name, AuthError::UserEmpty)?;
                if let Some(h) = password_hash {
                    check_hash(h)?;
                }
                if self.users.contains_key(name) {
                    return Err(AuthError::UserAlreadyExist);
                }
                if self.users.len() >= USERS_MAX {
                    return Err(AuthError::Limit(format!("a cluster keeps at most {USERS_MAX} users")));
                }
                let user = User {
                    password_hash: password_hash.clone(),
                    roles: BTreeSet::new(),
                    password_revision: next_revision,
                };
                self.users.insert(name.clone(), user);
            }
            AuthCommand::UserDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                self.users.remove(name).ok_or(AuthError::UserNotFound)?;
            }
            AuthCommand::UserChangePassword { name, password_hash } => {
                check_hash(password_hash)?;
                let user = self.users.get_mut(name).ok_or(AuthError::UserNotFound)?;
                if user.password_hash.is_none() {
                    return Err(AuthError::NoPasswordUser);
                }
                user.password_hash = Some(password_hash.clone());
                user.password_revision = next_revision;
            }
            AuthCommand::UserGrantRole { user, role } => {
                if !self.users.contains_key(user) {
                    return Err(AuthError::UserNotFound);
                }
                // As in etcd, the role `root` may be granted before it is
                // created (it grants everything whether or not it exists).
                if role != ROOT && !self.roles.contains_key(role) {
                    return Err(AuthError::RoleNotFound);
                }
                let u = self.users.get_mut(user).expect("checked just above that the user exists");
                if !u.roles.insert(role.clone()) {
                    return Ok(false);
                }
            }
            AuthCommand::UserRevokeRole { user, role } => {
                if self.enabled && user == ROOT && role == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                let u = self.users.get_mut(user).ok_or(AuthError::UserNotFound)?;
                if !u.roles.remove(role) {
                    return Err(AuthError::RoleNotGranted);
                }
            }
            AuthCommand::RoleAdd { name } => {
                check_name(name, AuthError::RoleEmpty)?;
                if self.roles.contains_key(name) {
                    return Err(AuthError::RoleAlreadyExist);
                }
                if self.roles.len() >= ROLES_MAX {
                    return Err(AuthError::Limit(format!("a cluster keeps at most {ROLES_MAX} roles")));
                }
                self.roles.insert(name.clone(), Role::default());
            }
            AuthCommand::RoleDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                self.roles.remove(name).ok_or(AuthError::RoleNotFound)?;
                for u in self.users.values_mut() {
                    u.roles.remove(name);
                }
            }
            AuthCommand::RoleGrantPermission { role, perm } => {
                if !valid_permission_range(&perm.key, &perm.range_end) {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                if perm.key.len() > PERMISSION_KEY_BYTES_MAX || perm.range_end.len() > PERMISSION_KEY_BYTES_MAX {
                    return Err(AuthError::Limit(format!(
                        "a permission's key and range end are at most {PERMISSION_KEY_BYTES_MAX} bytes"
                    )));
                }
                let r = self.roles.get_mut(role).ok_or(AuthError::RoleNotFound)?;
                match r.permissions.binary_search_by(|p| (&p.key, &p.range_end).cmp(&(&perm.key, &perm.range_end))) {
                    Ok(i) => {
                        if r.permissions[i].kind == perm.kind {
                            return Ok(false);
                        }
                        r.permissions[i].kind = perm.kind;
                    }
                    Err(i) => {
                        if r.permissions.len() >= PERMISSIONS_PER_ROLE_MAX {
                            return Err(AuthError::Limit(format!(
                                "a role has at most {PERMISSIONS_PER_ROLE_MAX} permissions"
                            )));
                        }
                        r.permissions.insert(i, perm.clone());
                    }
                }
            }
            AuthCommand::RoleRevokePermission { role, key, range_end } => {
                let r = self.roles.get_mut(role).ok_or(AuthError::RoleNotFound)?;
                match r.permissions.binary_search_by(|p| (&p.key, &p.range_end).cmp(&(key, range_end))) {
                    Ok(i) => {
                        r.permissions.remove(i);
                    }
                    Err(_) => return Err(AuthError::PermissionNotGranted),
                }
            }
            AuthCommand::Mirror { state } => {
                if state.revision <= self.revision {
                    return Ok(false);
                }
                *self = state.clone();
            }
        }
        Ok(true)
    }
}

fn check_name(name: &str, empty: AuthError) -> Result<(), AuthError> {
    if name.is_empty() {
        return Err(empty);
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(AuthError::Limit(format!("user and role names are at most {NAME_BYTES_MAX} bytes")));
    }
    Ok(())
}

fn check_hash(hash: &str) -> Result<(), AuthError> {
    if hash.is_empty() || hash.len() > PASSWORD_HASH_BYTES_MAX {
        return Err(AuthError::Limit(format!("a password hash is 1 to {PASSWORD_HASH_BYTES_MAX} bytes")));
    }
    Ok(())
}

/// etcd's rule for a permission's range: a key, and a range end that is
/// empty (the key alone), `"\0"` (every key from `key`), or above the key.
pub fn valid_permission_range(key: &[u8], range_end: &[u8]) -> bool {
    if key.is_empty() {
        return false;
    }
    range_end.is_empty() || range_end == b"\0" || key < range_end
}

/// One end of an interval: a key, or past every key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Key(Vec<u8>),
    Infinite,
}

/// The half-open interval a (key, range_end) pair names, in etcd's terms:
/// empty end is the single key, `"\0"` is unbounded.
fn interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, End) {
    if range_end.is_empty() {
        let mut next = key.to_vec();
        next.push(0);
        (key.to_vec(), End::Key(next))
    } else if range_end == b"\0" {
        (key.to_vec(), End::Infinite)
    } else {
        (key.to_vec(), End::Key(range_end.to_vec()))
    }
}

/// Sorted, disjoint, non-adjacent intervals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct IntervalSet(Vec<(Vec<u8>, End)>);

impl IntervalSet {
    fn from_unsorted(mut v: Vec<(Vec<u8>, End)>) -> Self {
        v.sort();
        let mut out: Vec<(Vec<u8>, End)> = Vec::with_capacity(v.len());
        for (start, end) in v {
            if let Some(last) = out.last_mut() {
                // Overlapping or touching: `start <= last.end`.
                let touches = match &last.1 {
                    End::Infinite => true,
                    End::Key(k) => start <= *k,
                };
                if touches {
                    if end > last.1 {
                        last.1 = end;
                    }
                    continue;
                }
            }
            out.push((start, end));
        }
        IntervalSet(out)
    }

    /// Whether `[start, end)` lies inside one interval of the set (the set
    /// is merged, so inside the union means inside one of them).
    fn covers(&self, start: &[u8], end: &End) -> bool {
        // The last interval starting at or before `start`.
        let i = self.0.partition_point(|(s, _)| s.as_slice() <= start);
        if i == 0 {
            return false;
        }
        let (_, e) = &self.0[i - 1];
        e >= end
            && match e {
                End::Infinite => true,
                End::Key(k) => start < k.as_slice(),
            }
    }
}

/// The permissions of every user of a state, compiled for checking:
/// per user, the merged intervals they may read and may write.
#[derive(Debug, Clone, Default)]
pub struct Permissions {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, UserPerms>,
}

#[derive(Debug, Clone, Default)]
struct UserPerms {
    root: bool,
    read: IntervalSet,
    write: IntervalSet,
    password_revision: u64,
}

/// Why a request is not permitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// No user (authentication is enabled and the request had no token).
    #[error("user name is empty")]
    NoUser,
    /// The token's user no longer exists or its password changed since.
    #[error("invalid auth token")]
    StaleUser,
    #[error("permission denied")]
    PermissionDenied,
}

impl Permissions {
    pub fn compile(state: &AuthState) -> Permissions {
        let mut users = BTreeMap::new();
        for (name, u) in &state.users {
            let (mut read, mut write) = (Vec::new(), Vec::new());
            for role in &u.roles {
                let Some(r) = state.roles.get(role) else { continue };
                for p in &r.permissions {
                    let iv = interval(&p.key, &p.range_end);
                    if p.kind.allows(Access::Read) {
                        read.push(iv.clone());
                    }
                    if p.kind.allows(Access::Write) {
                        write.push(iv);
                    }
                }
            }
            users.insert(
                name.clone(),
                UserPerms {
                    root: u.roles.contains(ROOT),
                    read: IntervalSet::from_unsorted(read),
                    write: IntervalSet::from_unsorted(write),
                    password_revision: u.password_revision,
                },
            );
        }
        Permissions { enabled: state.enabled, revision: state.revision, users }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The auth revision these permissions were compiled from.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Whether `user` still exists with the password set at
    /// `password_revision` (what a token names).
    pub fn user_current(&self, user: &str, password_revision: u64) -> bool {
        self.users.get(user).is_some_and(|u| u.password_revision == password_revision)
    }

    pub fn is_root(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.root)
    }

    /// May `user` (`None`: no token) access `[key, range_end)` (etcd's
    /// encoding: empty end is the single key, `"\0"` every key from `key`)?
    /// Always yes while authentication is disabled. A range whose end is
    /// at or below its key selects nothing; it is checked as its key alone.
    pub fn check(&self, user: Option<&str>, access: Access, key: &[u8], range_end: &[u8]) -> Result<(), Denied> {
        if !self.enabled {
            return Ok(());
        }
        let user = user.ok_or(Denied::NoUser)?;
        let u = self.users.get(user).ok_or(Denied::StaleUser)?;
        if u.root {
            return Ok(());
        }
        let range_end =
            if !range_end.is_empty() && range_end != b"\0" && range_end <= key { &[][..] } else { range_end };
        let (start, end) = interval(key, range_end);
        let set = match access {
            Access::Read => &u.read,
            Access::Write => &u.write,
        };
        let covered = if crate::canary::active(crate::canary::Canary::AuthChecksRangeStartOnly) {
            set.covers(&start, &interval(&start, &[]).1)
        } else {
            set.covers(&start, &end)
        };
        if covered {
            Ok(())
        } else {
            Err(Denied::PermissionDenied)
        }
    }

    /// May `user` manage authentication (or see other users and roles)?
    pub fn check_admin(&self, user: Option<&str>) -> Result<(), Denied> {
        if !self.enabled {
            return Ok(());
        }
        let user = user.ok_or(Denied::NoUser)?;
        let u = self.users.get(user).ok_or(Denied::StaleUser)?;
        if u.root {
            Ok(())
        } else {
            Err(Denied::PermissionDenied)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn perm(key: &str, end: &str, kind: PermType) -> Permission {
        Permission { key: key.as_bytes().to_vec(), range_end: end.as_bytes().to_vec(), kind }
    }

    fn hash() -> Option<String> {
        Some("$argon2id$v=19$m=8,t=1,p=1$c2FsdA$aGFzaA".into())
    }

    fn run(s: &mut AuthState, by: Option<&str>, cmd: AuthCommand) -> Result<AuthReply, AuthError> {
        s.apply(by, &cmd)
    }

    /// The state etcd's documented setup leaves: root with role root, and
    /// a user "alice" with role "app" over `app/`.
    fn setup() -> AuthState {
        let mut s = AuthState::default();
        run(&mut s, None, AuthCommand::UserAdd { name: ROOT.into(), password_hash: hash() }).unwrap();
        assert_eq!(
            run(&mut s, None, AuthCommand::Enable { token_key: vec![7; 32] }),
            Err(AuthError::RootRoleNotExist),
            "root needs the root role first"
        );
        run(&mut s, None, AuthCommand::UserGrantRole { user: ROOT.into(), role: ROOT.into() }).unwrap();
        run(&mut s, None, AuthCommand::UserAdd { name: "alice".into(), password_hash: hash() }).unwrap();
        run(&mut s, None, AuthCommand::RoleAdd { name: "app".into() }).unwrap();
        run(
            &mut s,
            None,
            AuthCommand::RoleGrantPermission { role: "app".into(), perm: perm("app/", "app0", PermType::ReadWrite) },
        )
        .unwrap();
        run(&mut s, None, AuthCommand::UserGrantRole { user: "alice".into(), role: "app".into() }).unwrap();
        run(&mut s, None, AuthCommand::Enable { token_key: vec![7; 32] }).unwrap();
        s
    }

    #[test]
    fn enabling_needs_root_and_then_changes_need_a_root_user() {
        let mut empty = AuthState::default();
        assert_eq!(
            run(&mut empty, None, AuthCommand::Enable { token_key: vec![1; 32] }),
            Err(AuthError::RootUserNotExist)
        );
        let mut s = setup();
        assert!(s.enabled);
        let rev = s.revision;
        assert_eq!(run(&mut s, None, AuthCommand::RoleAdd { name: "x".into() }), Err(AuthError::UserEmpty));
        assert_eq!(
            run(&mut s, Some("alice"), AuthCommand::RoleAdd { name: "x".into() }),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(
            run(&mut s, Some("nobody"), AuthCommand::RoleAdd { name: "x".into() }),
            Err(AuthError::UserNotFound)
        );
        assert_eq!(s.revision, rev, "refused commands change nothing");
        assert_eq!(
            run(&mut s, Some(ROOT), AuthCommand::RoleAdd { name: "x".into() }),
            Ok(AuthReply::Changed { revision: rev + 1 })
        );
        // root cannot lose its role or be deleted while enabled.
        assert_eq!(
            run(&mut s, Some(ROOT), AuthCommand::UserRevokeRole { user: ROOT.into(), role: ROOT.into() }),
            Err(AuthError::InvalidAuthMgmt)
        );
        assert_eq!(
            run(&mut s, Some(ROOT), AuthCommand::UserDelete { name: ROOT.into() }),
            Err(AuthError::InvalidAuthMgmt)
        );
        assert_eq!(run(&mut s, Some(ROOT), AuthCommand::Disable), Ok(AuthReply::Changed { revision: rev + 2 }));
        assert_eq!(run(&mut s, None, AuthCommand::Disable), Ok(AuthReply::Unchanged { revision: rev + 2 }));
    }

    #[test]
    fn etcd_errors_for_users_roles_and_permissions() {
        let mut s = setup();
        let r = Some(ROOT);
        assert_eq!(
            run(&mut s, r, AuthCommand::UserAdd { name: "alice".into(), password_hash: hash() }),
            Err(AuthError::UserAlreadyExist)
        );
        assert_eq!(
            run(&mut s, r, AuthCommand::UserAdd { name: "".into(), password_hash: hash() }),
            Err(AuthError::UserEmpty)
        );
        assert_eq!(run(&mut s, r, AuthCommand::RoleAdd { name: "".into() }), Err(AuthError::RoleEmpty));
        assert_eq!(run(&mut s, r, AuthCommand::RoleAdd { name: "app".into() }), Err(AuthError::RoleAlreadyExist));
        assert_eq!(
            run(&mut s, r, AuthCommand::UserGrantRole { user: "alice".into(), role: "nope".into() }),
            Err(AuthError::RoleNotFound)
        );
        assert_eq!(
            run(&mut s, r, AuthCommand::UserGrantRole { user: "bob".into(), role: "app".into() }),
            Err(AuthError::UserNotFound)
        );
        assert!(matches!(
            run(&mut s, r, AuthCommand::UserGrantRole { user: "alice".into(), role: "app".into() }),
            Ok(AuthReply::Unchanged { .. })
        ));
        assert_eq!(
            run(&mut s, r, AuthCommand::UserRevokeRole { user: "alice".into(), role: "x".into() }),
            Err(AuthError::RoleNotGranted)
        );
        assert_eq!(
            run(
                &mut s,
                r,
                AuthCommand::RoleRevokePermission { role: "app".into(), key: b"app/".to_vec(), range_end: vec![] }
            ),
            Err(AuthError::PermissionNotGranted)
        );
        assert_eq!(
            run(
                &mut s,
                r,
                AuthCommand::RoleGrantPermission { role: "app".into(), perm: perm("b", "a", PermType::Read) }
            ),
            Err(AuthError::InvalidAuthMgmt)
        );
        assert_eq!(
            run(&mut s, r, AuthCommand::RoleGrantPermission { role: "app".into(), perm: perm("", "", PermType::Read) }),
            Err(AuthError::InvalidAuthMgmt)
        );
        // Deleting a role takes it from every user.
        run(&mut s, r, AuthCommand::RoleDelete { name: "app".into() }).unwrap();
        assert!(s.users["alice"].roles.is_empty());
    }

    #[test]
    fn a_password_change_moves_the_users_password_revision() {
        let mut s = setup();
        let before = s.users["alice"].password_revision;
        run(&mut s, Some(ROOT), AuthCommand::UserChangePassword { name: "alice".into(), password_hash: "h2".into() })
            .unwrap();
        assert!(s.users["alice"].password_revision > before);
        let p = Permissions::compile(&s);
        assert!(!p.user_current("alice", before));
        assert!(p.user_current("alice", s.users["alice"].password_revision));
        run(&mut s, Some(ROOT), AuthCommand::UserAdd { name: "nopw".into(), password_hash: None }).unwrap();
        assert_eq!(
            run(&mut s, Some(ROOT), AuthCommand::UserChangePassword { name: "nopw".into(), password_hash: "h".into() }),
            Err(AuthError::NoPasswordUser)
        );
    }

    #[test]
    fn a_mirror_replaces_only_with_a_newer_state() {
        let leader = setup();
        let mut follower = AuthState::default();
        assert!(matches!(
            follower.apply(None, &AuthCommand::Mirror { state: leader.clone() }),
            Ok(AuthReply::Changed { .. })
        ));
        assert_eq!(follower, leader);
        let mut older = leader.clone();
        older.revision -= 1;
        older.enabled = false;
        assert!(matches!(follower.apply(None, &AuthCommand::Mirror { state: older }), Ok(AuthReply::Unchanged { .. })));
        assert_eq!(follower, leader);
    }

    #[test]
    fn permission_checks_follow_etcds_ranges() {
        let mut s = setup();
        run(&mut s, Some(ROOT), AuthCommand::RoleAdd { name: "ro".into() }).unwrap();
        run(
            &mut s,
            Some(ROOT),
            AuthCommand::RoleGrantPermission { role: "ro".into(), perm: perm("cfg/", "\0", PermType::Read) },
        )
        .unwrap();
        run(
            &mut s,
            Some(ROOT),
            AuthCommand::RoleGrantPermission { role: "ro".into(), perm: perm("one", "", PermType::Write) },
        )
        .unwrap();
        run(&mut s, Some(ROOT), AuthCommand::UserGrantRole { user: "alice".into(), role: "ro".into() }).unwrap();
        let p = Permissions::compile(&s);
        let a = Some("alice");
        assert_eq!(p.check(a, Access::Read, b"app/x", b""), Ok(()));
        assert_eq!(p.check(a, Access::Write, b"app/x", b""), Ok(()));
        assert_eq!(p.check(a, Access::Read, b"app/", b"app0"), Ok(()));
        assert_eq!(p.check(a, Access::Read, b"app/", b"app1"), Err(Denied::PermissionDenied), "past the permitted end");
        assert_eq!(
            p.check(a, Access::Read, b"cfg/zzz", b"\0"),
            Ok(()),
            "an unbounded read inside an unbounded permission"
        );
        assert_eq!(p.check(a, Access::Write, b"cfg/a", b""), Err(Denied::PermissionDenied), "read-only");
        assert_eq!(p.check(a, Access::Write, b"one", b""), Ok(()));
        assert_eq!(
            p.check(a, Access::Write, b"one", b"one\0\0"),
            Err(Denied::PermissionDenied),
            "a single-key permission covers only the key"
        );
        assert_eq!(p.check(a, Access::Read, b"", b"\0"), Err(Denied::PermissionDenied));
        assert_eq!(p.check(Some(ROOT), Access::Write, b"", b"\0"), Ok(()));
        assert_eq!(p.check(None, Access::Read, b"app/x", b""), Err(Denied::NoUser));
        assert_eq!(p.check(Some("gone"), Access::Read, b"app/x", b""), Err(Denied::StaleUser));
        assert_eq!(p.check_admin(a), Err(Denied::PermissionDenied));
        assert_eq!(p.check_admin(Some(ROOT)), Ok(()));
        // Adjacent permissions cover a range across their boundary.
        run(
            &mut s,
            Some(ROOT),
            AuthCommand::RoleGrantPermission { role: "app".into(), perm: perm("app0", "app5", PermType::Read) },
        )
        .unwrap();
        let p = Permissions::compile(&s);
        assert_eq!(p.check(a, Access::Read, b"app/", b"app5"), Ok(()));
        assert_eq!(p.check(a, Access::Write, b"app/", b"app5"), Err(Denied::PermissionDenied));
    }

    /// A naive reference: a request is permitted iff every key of a small
    /// alphabet's universe in it lies in some permission.
    fn permitted_by_brute_force(perms: &[(Vec<u8>, Vec<u8>)], key: &[u8], end: &[u8], universe: &[Vec<u8>]) -> bool {
        let inside = |k: &[u8], s: &[u8], e: &[u8]| {
            if e.is_empty() {
                k == s
            } else if e == b"\0" {
                k >= s
            } else {
                k >= s && k < e
            }
        };
        let end = if !end.is_empty() && end != b"\0" && end <= key { &[][..] } else { end };
        universe.iter().filter(|k| inside(k, key, end)).all(|k| perms.iter().any(|(s, e)| inside(k, s, e)))
    }

    fn small_key() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a'), Just(b'b'), Just(b'c')], 0..4)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::mvcc::fuzz_tests::fuzz_cases()))]

        /// The stored auth state damaged (bytes replaced, truncated,
        /// extended) or replaced by random bytes: decoding answers an error
        /// or a state, and a state that decodes compiles and checks without
        /// a panic (the record comes from the disk, and from the leader
        /// cluster over the network).
        #[test]
        fn a_damaged_auth_record_never_panics(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in proptest::option::of(any::<usize>()),
            tail in proptest::collection::vec(any::<u8>(), 0..8),
            random in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = crate::codec::encode(&setup());
            for (at, b) in edits {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            if let Some(c) = cut {
                bytes.truncate(c % (bytes.len() + 1));
            }
            bytes.extend(tail);
            for candidate in [bytes, random] {
                if let Ok(state) = crate::codec::decode::<AuthState>(&candidate, "auth state") {
                    let p = Permissions::compile(&state);
                    for user in state.users.keys().take(4) {
                        let _ = p.check(Some(user), Access::Read, b"app/", b"\0");
                        let _ = p.check(Some(user), Access::Write, b"a", b"");
                    }
                    let mut s = state.clone();
                    let _ = s.apply(Some(ROOT), &AuthCommand::RoleAdd { name: "x".into() });
                }
            }
        }

        /// Interval coverage agrees with a per-key check over every key of
        /// up to 4 bytes of {0, a, b, c}.
        #[test]
        fn coverage_matches_a_per_key_check(
            perms in proptest::collection::vec((small_key(), prop_oneof![Just(vec![]), Just(vec![0u8]), small_key()]), 0..5),
            key in small_key(),
            end in prop_oneof![Just(vec![]), Just(vec![0u8]), small_key()],
        ) {
            let perms: Vec<_> = perms.into_iter().filter(|(k, e)| valid_permission_range(k, e)).collect();
            let mut universe = Vec::new();
            let alphabet = [0u8, b'a', b'b', b'c'];
            let mut frontier = vec![vec![]];
            for _ in 0..5 {
                let mut next = Vec::new();
                for k in &frontier {
                    universe.push(k.clone());
                    for c in alphabet {
                        let mut n: Vec<u8> = k.clone();
                        n.push(c);
                        next.push(n);
                    }
                }
                frontier = next;
            }
            let set = IntervalSet::from_unsorted(perms.iter().map(|(k, e)| interval(k, e)).collect());
            let end_norm: &[u8] = if !end.is_empty() && end != b"\0" && end <= key { &[] } else { &end };
            let (s, e) = interval(&key, end_norm);
            let fast = set.covers(&s, &e);
            let slow = permitted_by_brute_force(&perms, &key, &end, &universe);
            // Exact: the first key of a range no permission covers is the
            // range's own start or a permission's end, both at most 4
            // bytes long, so the universe holds it.
            prop_assert_eq!(fast, slow);
        }
    }
}
