//! A second etcd client library beside etcdctl: the `etcd-client` crate
//! (the Rust ecosystem's etcd v3 client), with its own request building and
//! stream handling, against a leader cluster and a follower cluster of real
//! processes: KV and transactions, a prefix watch with history and
//! `prev_kv` at the follower, leases granted, kept alive, listed and
//! revoked through the follower, a lease expiring, a watcher moving from
//! the follower to the leader at the revision it last saw, the compacted
//! answer, progress requests, Status and MemberList.
#![cfg(not(madsim))]

use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};

mod common;
use common::*;

/// Connects once the endpoint serves the etcd table (a follower cluster
/// has it once the leader's catalog reached it).
async fn connect(endpoint: &str) -> Client {
    eventually(Duration::from_secs(60), "etcd-client connects and reads", || async {
        let options =
            ConnectOptions::new().with_connect_timeout(Duration::from_secs(1)).with_timeout(Duration::from_secs(10));
        let mut c = Client::connect([format!("http://{endpoint}")], Some(options)).await.map_err(|e| e.to_string())?;
        c.get("probe", None).await.map_err(|e| e.to_string())?;
        Ok(c)
    })
    .await
}

/// One event as compared here: (type, key, mod revision, value, prev value).
type Seen = (EventType, String, i64, String, Option<String>);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The next events on `stream` (skipping the creation answer and empty
/// responses), waiting at most 20 s for them.
async fn next_events(stream: &mut WatchStream) -> Vec<Seen> {
    loop {
        let r = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("a watch response within 20 s")
            .expect("the watch stream is healthy")
            .expect("the watch stream is open");
        assert!(!r.canceled(), "watch cancelled: {}", r.cancel_reason());
        if r.events().is_empty() {
            continue;
        }
        return r
            .events()
            .iter()
            .map(|e| {
                let kv = e.kv().expect("an event has its key");
                (
                    e.event_type(),
                    text(kv.key()),
                    kv.mod_revision(),
                    text(kv.value()),
                    e.prev_kv().map(|p| text(p.value())),
                )
            })
            .collect();
    }
}

/// Reads events until `n` of them arrived.
async fn events(stream: &mut WatchStream, n: usize) -> Vec<Seen> {
    let mut seen = Vec::new();
    while seen.len() < n {
        seen.extend(next_events(stream).await);
    }
    assert_eq!(seen.len(), n, "more events than expected: {seen:?}");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_client_crate_works_at_a_leader_and_at_a_follower_cluster() {
    let leader = Cluster::new(1, "etcd-client-leader");
    wait_ready(&leader.nodes[0].http, Duration::from_secs(30)).await;
    let root = std::env::temp_dir().join(format!("armada-proc-etcd-client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let follower = start_follower(&root, "f", &leader.nodes[0].replication);
    let mut l = connect(&leader.nodes[0].etcd).await;
    let mut f = connect(&follower.nodes[0].etcd).await;

    // KV and a transaction at the leader.
    let first = l.put("config/a", "1", None).await.unwrap().header().unwrap().revision();
    l.put("config/b", "2", None).await.unwrap();
    let got = l.get("config/", Some(GetOptions::new().with_prefix())).await.unwrap();
    let kvs: Vec<_> = got.kvs().iter().map(|kv| (text(kv.key()), text(kv.value()))).collect();
    assert_eq!(kvs, [("config/a".into(), "1".into()), ("config/b".into(), "2".into())]);
    let cas = || {
        Txn::new()
            .when([Compare::version("config/a", CompareOp::Equal, 1)])
            .and_then([TxnOp::put("config/a", "1b", None)])
            .or_else([TxnOp::get("config/a", None)])
    };
    assert!(l.txn(cas()).await.unwrap().succeeded(), "version 1: the put branch");
    assert!(!l.txn(cas()).await.unwrap().succeeded(), "version 2 now: the else branch");

    // A prefix watch at the follower from the first write: its history,
    // in the leader's revisions, with previous values.
    let watch = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(first);
    let mut fw = f.watch("config/", Some(watch.clone())).await.unwrap();
    let history = events(&mut fw, 3).await;
    assert_eq!(
        history,
        [
            (EventType::Put, "config/a".into(), first, "1".into(), None),
            (EventType::Put, "config/b".into(), first + 1, "2".into(), None),
            (EventType::Put, "config/a".into(), first + 2, "1b".into(), Some("1".into())),
        ]
    );

    // A lease granted through the follower (forwarded), a key put on it at
    // the leader, kept alive, inspected and listed through the follower.
    let lease = f.lease_grant(60, None).await.unwrap();
    assert_eq!(lease.ttl(), 60);
    let put_rev = l
        .put("config/leased", "x", Some(PutOptions::new().with_lease(lease.id())))
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(events(&mut fw, 1).await, [(EventType::Put, "config/leased".into(), put_rev, "x".into(), None)]);
    let (mut keeper, mut renewals) = f.lease_keep_alive(lease.id()).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let renewed = renewals.message().await.unwrap().expect("a keep-alive answer");
    assert_eq!((renewed.id(), renewed.ttl()), (lease.id(), 60));
    let ttl = f.lease_time_to_live(lease.id(), Some(LeaseTimeToLiveOptions::new().with_keys())).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 60);
    assert!(ttl.ttl() > 50 && ttl.ttl() <= 60, "remaining {}", ttl.ttl());
    assert_eq!(ttl.keys(), [b"config/leased".to_vec()]);
    let listed: Vec<i64> = f.leases().await.unwrap().leases().iter().map(|s| s.id()).collect();
    assert!(listed.contains(&lease.id()), "{listed:?}");

    // Revoked through the follower: the follower's watcher sees the
    // deletion at the leader's revision.
    f.lease_revoke(lease.id()).await.unwrap();
    let revoked = events(&mut fw, 1).await;
    assert_eq!(revoked, [(EventType::Delete, "config/leased".into(), put_rev + 1, String::new(), Some("x".into()))]);
    assert!(l.get("config/leased", None).await.unwrap().kvs().is_empty());

    // A 2-second lease nobody keeps alive: its key is deleted after its
    // TTL, and the follower's watcher sees that as an ordinary deletion.
    let before_grant = Instant::now();
    let short = l.lease_grant(2, None).await.unwrap();
    let short_rev = l
        .put("config/short", "s", Some(PutOptions::new().with_lease(short.id())))
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(events(&mut fw, 1).await, [(EventType::Put, "config/short".into(), short_rev, "s".into(), None)]);
    let expired = events(&mut fw, 1).await;
    let after = before_grant.elapsed();
    assert_eq!(expired, [(EventType::Delete, "config/short".into(), short_rev + 1, String::new(), Some("s".into()))]);
    assert!(after >= Duration::from_secs(2), "deleted {after:?} after the grant, before its TTL");

    // The watcher moves to the leader and resumes after the last revision
    // it saw: the next event is the next write, nothing twice.
    let last_seen = short_rev + 1;
    drop(fw);
    let next = l.put("config/c", "3", None).await.unwrap().header().unwrap().revision();
    let mut lw = l.watch("config/", Some(watch.clone().with_start_revision(last_seen + 1))).await.unwrap();
    assert_eq!(events(&mut lw, 1).await, [(EventType::Put, "config/c".into(), next, "3".into(), None)]);
    // The whole history at the leader equals what the follower delivered.
    let mut all = l.watch("config/", Some(watch.clone())).await.unwrap();
    let mut expected = history.clone();
    expected.push((EventType::Put, "config/leased".into(), put_rev, "x".into(), None));
    expected.push((EventType::Delete, "config/leased".into(), put_rev + 1, String::new(), Some("x".into())));
    expected.push((EventType::Put, "config/short".into(), short_rev, "s".into(), None));
    expected.push(expired[0].clone());
    expected.push((EventType::Put, "config/c".into(), next, "3".into(), None));
    assert_eq!(events(&mut all, expected.len()).await, expected);

    // A progress request on a stream in step answers the current revision.
    lw.request_progress().await.unwrap();
    let progress = tokio::time::timeout(Duration::from_secs(10), lw.message()).await.unwrap().unwrap().unwrap();
    assert!(progress.events().is_empty());
    assert_eq!(progress.header().unwrap().revision(), next);

    // Compaction: a watch from below it gets the compacted answer.
    l.compact(next, None).await.unwrap();
    let mut old = l.watch("config/", Some(watch.clone())).await.unwrap();
    let cancelled = loop {
        let r = tokio::time::timeout(Duration::from_secs(10), old.message()).await.unwrap().unwrap().unwrap();
        if r.canceled() {
            break r;
        }
    };
    assert_eq!(cancelled.compact_revision(), next);

    // Maintenance and cluster calls.
    let status = l.status().await.unwrap();
    assert!(status.version().starts_with("3."), "version {}", status.version());
    let members = l.member_list().await.unwrap();
    assert_eq!(members.members().len(), 1);
    assert_eq!(members.members()[0].client_urls(), [format!("http://{}", leader.nodes[0].etcd)]);
}

/// etcd authentication through the etcd-client crate's login (it calls
/// Authenticate and sends the token with every request) at a leader
/// cluster and at a follower cluster, which mirrors users, roles and the
/// signing key: a token from either cluster works at both; a refusal is
/// etcd's; a write through the follower is checked and forwarded; a
/// password change and a revoked role reach the follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_users_log_in_at_a_leader_and_at_a_follower_cluster() {
    use etcd_client::{Permission, UserAddOptions};
    let leader = Cluster::new(1, "etcd-auth-leader");
    wait_ready(&leader.nodes[0].http, Duration::from_secs(30)).await;
    let root = std::env::temp_dir().join(format!("armada-proc-etcd-auth-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let follower = start_follower(&root, "f", &leader.nodes[0].replication);
    let mut admin = connect(&leader.nodes[0].etcd).await;
    connect(&follower.nodes[0].etcd).await;
    admin.user_add("root", "rootpw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.role_add("app").await.unwrap();
    admin.role_grant_permission("app", Permission::read_write("app/").with_prefix()).await.unwrap();
    admin.user_add("alice", "alicepw", None).await.unwrap();
    admin.user_add("svc", "", Some(UserAddOptions::new().with_no_pwd())).await.unwrap();
    admin.user_grant_role("alice", "app").await.unwrap();
    admin.auth_enable().await.unwrap();

    let login = |endpoint: String, user: &'static str, password: &'static str| async move {
        let options = ConnectOptions::new().with_user(user, password).with_timeout(Duration::from_secs(10));
        Client::connect([format!("http://{endpoint}")], Some(options)).await
    };
    let mut alice_l =
        login(leader.nodes[0].etcd.clone(), "alice", "alicepw").await.expect("alice logs in at the leader");
    alice_l.put("app/x", "1", None).await.unwrap();
    let denied = alice_l.put("other", "1", None).await.unwrap_err().to_string();
    assert!(denied.contains("permission denied"), "{denied}");
    // The follower mirrors the state: alice logs in there (her password is
    // checked locally) and reads what she may.
    let mut alice_f = eventually(Duration::from_secs(30), "alice logs in at the follower", || async {
        let mut c = login(follower.nodes[0].etcd.clone(), "alice", "alicepw").await.map_err(|e| e.to_string())?;
        let r = c.get("app/x", None).await.map_err(|e| e.to_string())?;
        if r.kvs().is_empty() {
            return Err("app/x not replicated yet".into());
        }
        Ok(c)
    })
    .await;
    let denied = alice_f.get("other", None).await.unwrap_err().to_string();
    assert!(denied.contains("permission denied"), "{denied}");
    // etcdctl --user at the follower, as at the leader.
    let etcdctl = |endpoint: &str, args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg("--command-timeout=10s")
            .args(args)
            .output()
            .expect("etcdctl (ci/install-deps installs it)");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    for ep in [&leader.nodes[0].etcd, &follower.nodes[0].etcd] {
        let (ok, out) = etcdctl(ep, &["--user", "alice:alicepw", "get", "app/x"]);
        assert!(ok && out.contains("app/x\n1"), "etcdctl --user at {ep}: {out}");
        let (ok, out) = etcdctl(ep, &["--user", "alice:alicepw", "get", "other"]);
        assert!(!ok && out.contains("permission denied"), "etcdctl --user at {ep}: {out}");
        let (ok, out) = etcdctl(ep, &["--user", "alice:wrong", "get", "app/x"]);
        assert!(!ok && out.contains("authentication failed"), "etcdctl --user at {ep}: {out}");
    }
    // A write through the follower: checked there, forwarded, applied.
    alice_f.put("app/y", "from-edge", None).await.unwrap();
    let got = alice_l.get("app/y", None).await.unwrap();
    assert_eq!(got.kvs().first().map(|kv| text(kv.value())), Some("from-edge".into()));
    // Anonymous requests and a user without a password are refused there.
    let mut anon = connect_anonymous(&follower.nodes[0].etcd).await;
    let e = anon.get("app/x", None).await.unwrap_err().to_string();
    assert!(e.contains("user name is empty"), "{e}");
    let e = login(follower.nodes[0].etcd.clone(), "svc", "").await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("authentication failed"), "a user without a password cannot log in: {e}");
    // The follower cluster does not manage users: that is the leader's.
    let mut root_f = login(follower.nodes[0].etcd.clone(), "root", "rootpw").await.unwrap();
    let e = root_f.role_add("edge").await.unwrap_err().to_string();
    assert!(e.contains("leader cluster"), "{e}");
    // A token from the follower works at the leader (one signing key).
    let token = root_f.auth_client().authenticate("alice".into(), "alicepw".into()).await.unwrap().token().to_string();
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", leader.nodes[0].etcd))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = armada_proto::etcd::kv_client::KvClient::new(ch);
    let mut req =
        tonic::Request::new(armada_proto::etcd::RangeRequest { key: b"app/x".to_vec(), ..Default::default() });
    req.metadata_mut().insert("token", token.parse().unwrap());
    assert_eq!(raw.range(req).await.unwrap().into_inner().kvs.len(), 1);

    // Revoking alice's role at the leader reaches the follower.
    let mut root_l = login(leader.nodes[0].etcd.clone(), "root", "rootpw").await.unwrap();
    root_l.user_revoke_role("alice", "app").await.unwrap();
    eventually(Duration::from_secs(30), "the revocation reaches the follower", || async {
        let mut c = login(follower.nodes[0].etcd.clone(), "alice", "alicepw").await.map_err(|e| e.to_string())?;
        match c.get("app/x", None).await {
            Err(e) if e.to_string().contains("permission denied") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // A password change: the old password stops working at the follower.
    root_l.user_change_password("alice", "newpw").await.unwrap();
    eventually(Duration::from_secs(30), "the new password reaches the follower", || async {
        login(follower.nodes[0].etcd.clone(), "alice", "newpw").await.map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
    let e = login(follower.nodes[0].etcd.clone(), "alice", "alicepw")
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("authentication failed"), "{e}");
}

/// A client without a user, connected without reading anything (reads are
/// refused once authentication is on).
async fn connect_anonymous(endpoint: &str) -> Client {
    let options = ConnectOptions::new().with_timeout(Duration::from_secs(10));
    Client::connect([format!("http://{endpoint}")], Some(options)).await.unwrap()
}
