//! etcd authentication in the simulated world, and checker A1.
//!
//! An admin client sets authentication up through etcd's Auth API (root,
//! users `u0..`, roles `r0..` with permissions over the keys `A/a`..`A/f`),
//! enables it, then keeps changing it while faults run: permissions granted
//! and revoked (single keys, ranges, open ranges), roles granted to and
//! revoked from users, passwords changed, and now and then authentication
//! disabled and enabled again. User clients log in as their user at random
//! nodes of every cluster (follower clusters mirror the state) and read,
//! write and delete over `A/..` with their token at random nodes, recording
//! each answer that was a decision: done (permitted) or PermissionDenied.
//!
//! A1 (every seed): each decision agrees with the auth state at some auth
//! revision `r` the serving node may have used: at least the revision the
//! token was issued at (nodes refuse tokens newer than their state) and at
//! most the newest revision the leader cluster had applied when the answer
//! came. The states are rebuilt from the auth commands as the leader
//! cluster first applied them, by this module's own model (a per-key
//! coverage check over the points where coverage can change), not by
//! `armada_core::auth`.

use std::collections::{BTreeMap, BTreeSet};

use armada_core::auth::{AuthCommand, PermType};
use armada_proto::etcd as epb;

use super::*;

/// Keys the auth clients use; they sort before the lease clients' (`L..`)
/// and the workload's (`k..`), so no other client's reads cover them (and
/// their deletes never reach past `A/`).
const KEYS: [&str; 6] = ["A/a", "A/b", "A/c", "A/d", "A/e", "A/f"];
const ROLES: u64 = 3;
const CALL: Duration = Duration::from_secs(2);

fn password(user: &str, generation: u64) -> String {
    format!("pw-{user}-{generation}")
}

/// One decision a user client saw.
#[derive(Debug, Clone)]
pub(super) struct AuthUse {
    pub user: String,
    pub write: bool,
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// The auth revision the token was issued at.
    pub floor: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub host: String,
    pub permitted: bool,
}

/// What the auth clients did and the auth changes the leader cluster applied.
#[derive(Debug, Default)]
pub(super) struct AuthLog {
    /// Every auth command by the revision it produced, as first applied on
    /// the leader cluster, with the time.
    pub changes: BTreeMap<u64, (u64, AuthCommand)>,
    pub uses: Vec<AuthUse>,
    pub logins: u64,
    /// Answers that were no decision (unavailable, a stale token, a timeout).
    pub undecided: u64,
    /// Passwords as the admin last set them (acknowledged or not: a client
    /// tries the newest, then the one before).
    pub passwords: BTreeMap<String, (u64, u64)>,
}

impl AuthLog {
    pub fn applied(&mut self, revision: u64, now_ns: u64, cmd: &AuthCommand) {
        self.changes.entry(revision).or_insert_with(|| (now_ns, cmd.clone()));
    }
}

type RolePerms = BTreeMap<(Vec<u8>, Vec<u8>), PermType>;

/// A1's model of the auth state.
#[derive(Debug, Clone, Default)]
struct Model {
    enabled: bool,
    users: BTreeMap<String, BTreeSet<String>>,
    /// Per role: (key, range_end) -> permission type.
    roles: BTreeMap<String, RolePerms>,
}

/// An interval end: `None` is past every key.
fn end_of(key: &[u8], range_end: &[u8]) -> Option<Vec<u8>> {
    if range_end.is_empty() {
        let mut k = key.to_vec();
        k.push(0);
        Some(k)
    } else if range_end == b"\0" {
        None
    } else {
        Some(range_end.to_vec())
    }
}

fn inside(p: &[u8], start: &[u8], end: &Option<Vec<u8>>) -> bool {
    p >= start && end.as_ref().is_none_or(|e| p < e.as_slice())
}

impl Model {
    /// Applies a command the leader cluster applied with a change.
    fn apply(&mut self, cmd: &AuthCommand) {
        match cmd {
            AuthCommand::Enable { .. } => self.enabled = true,
            AuthCommand::Disable => self.enabled = false,
            AuthCommand::UserAdd { name, .. } => {
                self.users.insert(name.clone(), BTreeSet::new());
            }
            AuthCommand::UserDelete { name } => {
                self.users.remove(name);
            }
            AuthCommand::UserChangePassword { .. } => {}
            AuthCommand::UserGrantRole { user, role } => {
                self.users.entry(user.clone()).or_default().insert(role.clone());
            }
            AuthCommand::UserRevokeRole { user, role } => {
                self.users.entry(user.clone()).or_default().remove(role);
            }
            AuthCommand::RoleAdd { name } => {
                self.roles.insert(name.clone(), BTreeMap::new());
            }
            AuthCommand::RoleDelete { name } => {
                self.roles.remove(name);
                for r in self.users.values_mut() {
                    r.remove(name);
                }
            }
            AuthCommand::RoleGrantPermission { role, perm } => {
                self.roles
                    .entry(role.clone())
                    .or_default()
                    .insert((perm.key.clone(), perm.range_end.clone()), perm.kind);
            }
            AuthCommand::RoleRevokePermission { role, key, range_end } => {
                if let Some(r) = self.roles.get_mut(role) {
                    r.remove(&(key.clone(), range_end.clone()));
                }
            }
            AuthCommand::Mirror { .. } => {}
        }
    }

    /// Whether `user` may access `[key, range_end)`: every key of the range
    /// lies in some permitted interval. The first key no interval covers,
    /// if any, is the range's start or an interval's end, so checking those
    /// points decides it.
    fn permits(&self, user: &str, write: bool, key: &[u8], range_end: &[u8]) -> bool {
        if !self.enabled {
            return true;
        }
        let Some(roles) = self.users.get(user) else { return false };
        if roles.contains("root") {
            return true;
        }
        let intervals: Vec<(Vec<u8>, Option<Vec<u8>>)> = roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|perms| perms.iter())
            .filter(|(_, kind)| {
                matches!((write, kind), (_, PermType::ReadWrite) | (true, PermType::Write) | (false, PermType::Read))
            })
            .map(|((k, e), _)| (k.clone(), end_of(k, e)))
            .collect();
        // A range ending at or below its key selects nothing; the server
        // checks it as its key alone.
        let range_end =
            if !range_end.is_empty() && range_end != b"\0" && range_end <= key { &[][..] } else { range_end };
        let req_end = end_of(key, range_end);
        let mut points = vec![key.to_vec()];
        points.extend(intervals.iter().filter_map(|(_, e)| e.clone()));
        points.iter().filter(|p| inside(p, key, &req_end)).all(|p| intervals.iter().any(|(s, e)| inside(p, s, e)))
    }
}

fn random_key() -> Vec<u8> {
    KEYS[rand_range(0, KEYS.len() as u64 - 1) as usize].as_bytes().to_vec()
}

/// A range end for `key`: the key alone, every key from it, or up to another
/// key (sometimes below it: an empty range).
fn random_end(key: &[u8]) -> Vec<u8> {
    match rand_range(0, 3) {
        0 => Vec::new(),
        1 => vec![0],
        2 => {
            let mut k = key.to_vec();
            k.push(b'z');
            k
        }
        _ => random_key(),
    }
}

fn random_host(sc: &Scenario) -> String {
    if let Some(fl) = &sc.followers {
        if rand_range(0, 2) == 0 {
            return cluster_ip(rand_range(1, u64::from(fl.clusters)), rand_range(1, u64::from(fl.nodes)));
        }
    }
    cluster_ip(0, rand_range(1, sc.nodes as u64))
}

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        if let Ok(v) = t.parse() {
            r.metadata_mut().insert("token", v);
        }
    }
    r
}

async fn auth_client(host: &str) -> Option<epb::auth_client::AuthClient<Channel>> {
    Some(epb::auth_client::AuthClient::new(connect(&format!("{host}:{ETCD_PORT}")).await?))
}

async fn login(host: &str, user: &str, password: &str) -> Option<String> {
    let mut c = auth_client(host).await?;
    let req = epb::AuthenticateRequest { name: user.to_string(), password: password.to_string() };
    let r = tokio::time::timeout(CALL, c.authenticate(req)).await.ok()?.ok()?;
    Some(r.into_inner().token)
}

/// One admin call at a random leader-cluster node: `Ok` if done, else the
/// error text.
async fn admin_call(sc: &Scenario, token: Option<&str>, cmd: &AdminCall) -> Result<(), String> {
    let host = cluster_ip(0, rand_range(1, sc.nodes as u64));
    let Some(mut c) = auth_client(&host).await else { return Err("cannot connect".into()) };
    let r = match cmd.clone() {
        AdminCall::UserAdd(name, pw) => {
            let req = epb::AuthUserAddRequest { name, password: pw, ..Default::default() };
            tokio::time::timeout(CALL, c.user_add(with_token(req, token))).await.map(|r| r.map(|_| ()))
        }
        AdminCall::ChangePassword(name, pw) => {
            let req = epb::AuthUserChangePasswordRequest { name, password: pw, ..Default::default() };
            tokio::time::timeout(CALL, c.user_change_password(with_token(req, token))).await.map(|r| r.map(|_| ()))
        }
        AdminCall::GrantRole(user, role) => {
            let req = epb::AuthUserGrantRoleRequest { user, role };
            tokio::time::timeout(CALL, c.user_grant_role(with_token(req, token))).await.map(|r| r.map(|_| ()))
        }
        AdminCall::RevokeRole(name, role) => {
            let req = epb::AuthUserRevokeRoleRequest { name, role };
            tokio::time::timeout(CALL, c.user_revoke_role(with_token(req, token))).await.map(|r| r.map(|_| ()))
        }
        AdminCall::RoleAdd(name) => {
            let req = epb::AuthRoleAddRequest { name };
            tokio::time::timeout(CALL, c.role_add(with_token(req, token))).await.map(|r| r.map(|_| ()))
        }
        AdminCall::Grant(role, key, range_end, kind) => {
            let perm = epb::Permission { perm_type: kind, key, range_end };
            let req = epb::AuthRoleGrantPermissionRequest { name: role, perm: Some(perm) };
            tokio::time::timeout(CALL, c.role_grant_permission(with_token(req, token))).await.map(|r| r.map(|_| ()))
        }
        AdminCall::Revoke(role, key, range_end) => {
            let req = epb::AuthRoleRevokePermissionRequest { role, key, range_end };
            tokio::time::timeout(CALL, c.role_revoke_permission(with_token(req, token))).await.map(|r| r.map(|_| ()))
        }
        AdminCall::Enable => tokio::time::timeout(CALL, c.auth_enable(with_token(epb::AuthEnableRequest {}, token)))
            .await
            .map(|r| r.map(|_| ())),
        AdminCall::Disable => tokio::time::timeout(CALL, c.auth_disable(with_token(epb::AuthDisableRequest {}, token)))
            .await
            .map(|r| r.map(|_| ())),
    };
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[derive(Debug, Clone)]
enum AdminCall {
    UserAdd(String, String),
    ChangePassword(String, String),
    GrantRole(String, String),
    RevokeRole(String, String),
    RoleAdd(String),
    Grant(String, Vec<u8>, Vec<u8>, i32),
    Revoke(String, Vec<u8>, Vec<u8>),
    Enable,
    Disable,
}

/// Errors worth retrying: no answer, or no leader yet. Every other answer
/// (done, or refused for good, e.g. "already exists" or a range end below
/// its key) settles a set-up call.
fn transient(e: &str) -> bool {
    !e.starts_with("etcdserver:") || e.contains("no leader") || e.contains("timed out") || e.contains("retry")
}

/// The admin: sets authentication up, then changes it until `until_ns`.
pub(super) async fn admin_main(sc: Scenario, shared: Arc<Shared>, until_ns: u64) {
    let users: Vec<String> = (0..u64::from(sc.auth_users)).map(|i| format!("u{i}")).collect();
    let set_password = |user: &str, generation: u64| {
        let mut log = shared.auth.lock().unwrap_or_else(|p| p.into_inner());
        let prev = log.passwords.get(user).map_or(0, |p| p.0);
        log.passwords.insert(user.to_string(), (generation, prev));
    };
    // Set-up, before authentication is enabled: every call retried until
    // done (they need no token yet).
    let mut setup = vec![
        AdminCall::UserAdd("root".into(), password("root", 0)),
        AdminCall::GrantRole("root".into(), "root".into()),
    ];
    for r in 0..ROLES {
        setup.push(AdminCall::RoleAdd(format!("r{r}")));
        let key = random_key();
        setup.push(AdminCall::Grant(format!("r{r}"), key.clone(), random_end(&key), rand_range(0, 2) as i32));
    }
    for u in &users {
        set_password(u, 0);
        setup.push(AdminCall::UserAdd(u.clone(), password(u, 0)));
        setup.push(AdminCall::GrantRole(u.clone(), format!("r{}", rand_range(0, ROLES - 1))));
    }
    setup.push(AdminCall::Enable);
    for call in &setup {
        loop {
            match admin_call(&sc, None, call).await {
                Err(e) if transient(&e) => tokio::time::sleep(Duration::from_millis(200)).await,
                _ => break,
            }
            if shared.now_ns() > until_ns {
                return;
            }
        }
    }
    let mut token: Option<String> = None;
    let mut generation = 0u64;
    let mut enabled = true;
    while shared.now_ns() < until_ns {
        tokio::time::sleep(Duration::from_millis(rand_range(200, 1200))).await;
        if token.is_none() && enabled {
            token = login(&cluster_ip(0, rand_range(1, sc.nodes as u64)), "root", &password("root", 0)).await;
            if token.is_none() {
                continue;
            }
        }
        let role = format!("r{}", rand_range(0, ROLES - 1));
        let user = users[rand_range(0, users.len() as u64 - 1) as usize].clone();
        let call = match rand_range(0, 19) {
            0..=7 => {
                let key = random_key();
                AdminCall::Grant(role, key.clone(), random_end(&key), rand_range(0, 2) as i32)
            }
            8..=10 => {
                let key = random_key();
                AdminCall::Revoke(role, key.clone(), random_end(&key))
            }
            11..=13 => AdminCall::GrantRole(user, role),
            14..=16 => AdminCall::RevokeRole(user, role),
            17 => {
                generation += 1;
                set_password(&user, generation);
                AdminCall::ChangePassword(user.clone(), password(&user, generation))
            }
            18 => {
                enabled = !enabled;
                if enabled {
                    AdminCall::Enable
                } else {
                    AdminCall::Disable
                }
            }
            _ => AdminCall::RevokeRole(user, role),
        };
        match admin_call(&sc, token.as_deref(), &call).await {
            Ok(()) => {
                if matches!(call, AdminCall::Enable) {
                    // A new signing key: the old token is dead.
                    token = None;
                }
            }
            Err(e) if e.contains("invalid auth token") => token = None,
            Err(_) => {
                if matches!(call, AdminCall::Enable | AdminCall::Disable) {
                    // Unknown outcome: find out which way it went next time
                    // by trying to log in (fails while disabled).
                    enabled = !enabled;
                    token = None;
                }
            }
        }
    }
    // End with authentication enabled, so the last decisions are checked
    // against a non-trivial state.
    for _ in 0..20 {
        if admin_call(&sc, token.as_deref(), &AdminCall::Enable).await.is_ok() {
            break;
        }
        token = login(&cluster_ip(0, rand_range(1, sc.nodes as u64)), "root", &password("root", 0)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One user client: logs in, uses the token a few times at random nodes,
/// logs in again, until `until_ns`.
pub(super) async fn user_main(cid: u32, sc: Scenario, shared: Arc<Shared>, until_ns: u64) {
    let user = format!("u{}", u64::from(cid) % u64::from(sc.auth_users.max(1)));
    while shared.now_ns() < until_ns {
        tokio::time::sleep(Duration::from_millis(rand_range(50, 400))).await;
        let (newest, before) =
            shared.auth.lock().unwrap_or_else(|p| p.into_inner()).passwords.get(&user).copied().unwrap_or((0, 0));
        let host = random_host(&sc);
        let mut token = login(&host, &user, &password(&user, newest)).await;
        if token.is_none() && before != newest {
            token = login(&host, &user, &password(&user, before)).await;
        }
        let Some(token) = token else { continue };
        shared.auth.lock().unwrap_or_else(|p| p.into_inner()).logins += 1;
        let Some(floor) = armada_server::api::etcd::auth::token_auth_revision(&token) else { continue };
        for _ in 0..rand_range(1, 5) {
            let host = random_host(&sc);
            let Some(ch) = connect(&format!("{host}:{ETCD_PORT}")).await else { continue };
            let mut kv = epb::kv_client::KvClient::new(ch);
            let key = random_key();
            let start_ns = shared.now_ns();
            let (write, range_end, result) = match rand_range(0, 2) {
                0 => {
                    let range_end = random_end(&key);
                    let req = epb::RangeRequest {
                        key: key.clone(),
                        range_end: range_end.clone(),
                        serializable: rand_range(0, 1) == 0,
                        ..Default::default()
                    };
                    let r = tokio::time::timeout(CALL, kv.range(with_token(req, Some(&token)))).await;
                    (false, range_end, r.map(|r| r.map(|_| ())))
                }
                1 => {
                    let req = epb::PutRequest { key: key.clone(), value: b"v".to_vec(), ..Default::default() };
                    let r = tokio::time::timeout(CALL, kv.put(with_token(req, Some(&token)))).await;
                    (true, Vec::new(), r.map(|r| r.map(|_| ())))
                }
                _ => {
                    // Deletes stay inside `A/`: the etcd table is also the
                    // workload's, and "every key from here" would delete
                    // its keys behind its history's back.
                    let range_end = match random_end(&key) {
                        e if e == [0] => b"A0".to_vec(),
                        e => e,
                    };
                    let req = epb::DeleteRangeRequest {
                        key: key.clone(),
                        range_end: range_end.clone(),
                        ..Default::default()
                    };
                    let r = tokio::time::timeout(CALL, kv.delete_range(with_token(req, Some(&token)))).await;
                    (true, range_end, r.map(|r| r.map(|_| ())))
                }
            };
            let end_ns = shared.now_ns();
            let permitted = match result {
                Ok(Ok(())) => Some(true),
                Ok(Err(s)) if s.code() == tonic::Code::PermissionDenied => Some(false),
                _ => None,
            };
            let mut log = shared.auth.lock().unwrap_or_else(|p| p.into_inner());
            match permitted {
                Some(permitted) => log.uses.push(AuthUse {
                    user: user.clone(),
                    write,
                    key,
                    range_end,
                    floor,
                    start_ns,
                    end_ns,
                    host,
                    permitted,
                }),
                None => log.undecided += 1,
            }
        }
    }
}

/// A1 (see the module docs). Returns the failures and (decisions checked,
/// auth revisions, logins, answers that were no decision).
pub(super) fn check(shared: &Shared) -> (Vec<String>, (usize, u64, u64, u64)) {
    let log = shared.auth.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::new();
    // The state after each revision, and when the leader cluster first had it.
    let mut states: Vec<(u64, Model)> = vec![(0, Model::default())];
    let mut model = Model::default();
    for (rev, (at, cmd)) in &log.changes {
        if *rev != states.len() as u64 {
            out.push(format!(
                "A1 auth revision {} was never applied on the leader cluster (next seen: {rev})",
                states.len()
            ));
            break;
        }
        model.apply(cmd);
        states.push((*at, model.clone()));
    }
    let secs = |ns: u64| ns as f64 / 1e9;
    for u in &log.uses {
        let ceiling = states.iter().rposition(|(at, _)| *at <= u.end_ns).unwrap_or(0) as u64;
        let agrees = (u.floor..=ceiling)
            .filter_map(|r| states.get(r as usize))
            .any(|(_, m)| m.permits(&u.user, u.write, &u.key, &u.range_end) == u.permitted);
        if !agrees && out.len() < 5 {
            let what = if u.write { "write" } else { "read" };
            out.push(format!(
                "A1 {} of {:?}..{:?} by {} at {} ({:.3}-{:.3} s) was {}, but no auth state from revision {} (the \
                 token's) to {} (the leader cluster's newest by then) {} it",
                what,
                String::from_utf8_lossy(&u.key),
                String::from_utf8_lossy(&u.range_end),
                u.user,
                u.host,
                secs(u.start_ns),
                secs(u.end_ns),
                if u.permitted { "permitted" } else { "denied" },
                u.floor,
                ceiling,
                if u.permitted { "permits" } else { "denies" },
            ));
        }
    }
    (out, (log.uses.len(), log.changes.len() as u64, log.logins, log.undecided))
}

#[cfg(test)]
mod tests {
    use super::*;
    use armada_core::auth::Permission;

    #[test]
    fn the_model_covers_ranges_point_by_point() {
        let mut m = Model::default();
        m.apply(&AuthCommand::UserAdd { name: "u".into(), password_hash: None });
        m.apply(&AuthCommand::RoleAdd { name: "r".into() });
        m.apply(&AuthCommand::UserGrantRole { user: "u".into(), role: "r".into() });
        let grant = |m: &mut Model, k: &str, e: &[u8], kind| {
            m.apply(&AuthCommand::RoleGrantPermission {
                role: "r".into(),
                perm: Permission { key: k.as_bytes().to_vec(), range_end: e.to_vec(), kind },
            })
        };
        grant(&mut m, "A/a", b"A/c", PermType::Read);
        grant(&mut m, "A/c", b"", PermType::ReadWrite);
        m.apply(&AuthCommand::Enable { token_key: vec![] });
        assert!(m.permits("u", false, b"A/a", b"A/c\0"), "two permissions meet at A/c");
        assert!(!m.permits("u", false, b"A/a", b"A/c\0\0"));
        assert!(!m.permits("u", true, b"A/a", b""));
        assert!(m.permits("u", true, b"A/c", b""));
        assert!(!m.permits("u", false, b"A/a", b"\0"));
        assert!(!m.permits("v", false, b"A/a", b""));
        m.apply(&AuthCommand::Disable);
        assert!(m.permits("v", true, b"", b"\0"));
    }
}
