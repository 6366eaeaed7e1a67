//! TLS on the client listeners, against a node launched in this process
//! with certificates made here (a test CA, a foreign CA):
//! - etcdctl with `--cacert/--cert/--key` works over mutual TLS; a client
//!   without a certificate, with one the CA did not issue, or with one
//!   whose name is not allowed, is refused at once with a TLS alert, and a
//!   plaintext client is told that the port requires TLS;
//! - the armada.v1 API over TLS through Armada's own CLI, and the CLI's
//!   clear errors for a missing CA or a plaintext endpoint;
//! - the certificate is rotated under load (new files on disk, no restart)
//!   with no failed request, and files that cannot be used keep the
//!   previous certificate.
#![cfg(not(madsim))]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use armada_server::config::{ListenersTls, TlsFiles};
use armada_server::listen::ListenerKind;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

mod common;
use common::*;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
}

/// A certificate for `cn` (and `sans`) issued by `ca`: (cert PEM, key PEM).
fn leaf(ca: &Ca, cn: &str, sans: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Writes a certificate and its key atomically (a rename each), as
/// cert-manager's secret volume does.
fn install(dir: &Path, stem: &str, (cert, key): &(String, String)) -> (PathBuf, PathBuf) {
    let c = write(dir, &format!("{stem}.crt.tmp"), cert);
    let k = write(dir, &format!("{stem}.key.tmp"), key);
    let (cf, kf) = (dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key")));
    std::fs::rename(c, &cf).unwrap();
    std::fs::rename(k, &kf).unwrap();
    (cf, kf)
}

fn etcdctl(endpoint: &str, tls: &[String], args: &[&str]) -> (bool, String, Duration) {
    let started = Instant::now();
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(["--command-timeout=3s", "--dial-timeout=2s"])
        .args(tls)
        .args(args)
        .output()
        .expect("etcdctl (ci/install-deps installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text, started.elapsed())
}

fn armada(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The serial of the certificate a TLS server presents now.
async fn presented_serial(addr: std::net::SocketAddr, ca: &Path) -> Vec<u8> {
    let config = armada_server::tls::client_config(ca, None, &[b"h2"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    parsed.raw_serial().to_vec()
}

/// What a TLS client presenting `identity` (or no certificate) meets on
/// its first request: the error text, empty when it was let in.
async fn handshake_error(addr: std::net::SocketAddr, ca: &Path, identity: Option<&(PathBuf, PathBuf)>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config =
        armada_server::tls::client_config(ca, identity.map(|(c, k)| (c.as_path(), k.as_path())), &[b"h2"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = match tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await {
        Ok(t) => t,
        Err(e) => return e.to_string(),
    };
    // TLS 1.3: the server judges the client's certificate after the
    // client finished; its verdict arrives with the first read.
    if let Err(e) = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await {
        return e.to_string();
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => String::new(),
        Ok(Ok(_)) => "closed without an alert".into(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 5 s".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listeners_admit_the_right_clients_and_rotate_without_a_failed_request() {
    let dir = std::env::temp_dir().join(format!("armada-tls-certs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca_ = ca("Armada test CA");
    let foreign = ca("Someone else's CA");
    let ca_file = write(&dir, "ca.pem", &ca_.pem);
    let (server_cert, server_key) = install(&dir, "server", &leaf(&ca_, "armada-0", &["127.0.0.1", "localhost"]));
    let app = install(&dir, "app", &leaf(&ca_, "app-1", &[]));
    let intruder = install(&dir, "intruder", &leaf(&ca_, "intruder", &[]));
    let stranger = install(&dir, "stranger", &leaf(&foreign, "app-1", &[]));
    let files = |client_ca: Option<&Path>, allowed: &[&str]| TlsFiles {
        cert: server_cert.clone(),
        key: server_key.clone(),
        client_ca: client_ca.map(Path::to_path_buf),
        allowed_clients: allowed.iter().map(|s| s.to_string()).collect(),
    };
    let tls = ListenersTls {
        api: Some(files(None, &[])),
        etcd: Some(files(Some(&ca_file), &["app-1"])),
        ..Default::default()
    };
    let (node, _data) = launch_in_process_with_tls("tls", tls).await;
    let etcd = format!("127.0.0.1:{}", node.address(ListenerKind::Etcd).unwrap().port());
    let api = node.address(ListenerKind::Api).unwrap();
    let stats = |kind| node.listener_stats().into_iter().find(|(k, _)| *k == kind).unwrap().1;

    // etcdctl over mutual TLS with an allowed client certificate.
    let id = |(c, k): &(PathBuf, PathBuf)| {
        vec![
            format!("--cacert={}", ca_file.display()),
            format!("--cert={}", c.display()),
            format!("--key={}", k.display()),
        ]
    };
    let (ok, out, _) = etcdctl(&etcd, &id(&app), &["put", "greeting", "hello"]);
    assert!(ok, "{out}");
    let (ok, out, _) = etcdctl(&etcd, &id(&app), &["get", "greeting", "--print-value-only"]);
    assert!(ok && out.trim() == "hello", "{out}");

    // Refused at once, each with its reason in the server's counters.
    let failures = stats(ListenerKind::Etcd).tls_failures();
    let no_cert = vec![format!("--cacert={}", ca_file.display())];
    // (etcdctl's gRPC retries a refused connection until its deadline:
    // its exit, not its time, is what counts here; the raw handshakes
    // below show the server's answer is immediate.)
    for (who, tls) in
        [("no certificate", no_cert), ("a name not allowed", id(&intruder)), ("a foreign CA", id(&stranger))]
    {
        let (ok, out, _) = etcdctl(&etcd, &tls, &["get", "greeting"]);
        assert!(!ok, "{who}: let in: {out}");
    }
    assert!(stats(ListenerKind::Etcd).tls_failures() >= failures + 3, "each refusal is a failed handshake");
    let etcd_addr = node.address(ListenerKind::Etcd).unwrap();
    for (who, identity, alert) in [
        ("no certificate", None, "CertificateRequired"),
        ("a name not allowed", Some(&intruder), "AccessDenied"),
        ("a foreign CA", Some(&stranger), "UnknownCA"),
    ] {
        let started = Instant::now();
        let e = handshake_error(etcd_addr, &ca_file, identity).await;
        assert!(e.contains(alert), "{who}: {e}");
        assert!(started.elapsed() < Duration::from_secs(2), "{who}: answered after {:?}", started.elapsed());
    }
    assert!(handshake_error(etcd_addr, &ca_file, Some(&app)).await.is_empty(), "the allowed client is let in");
    // A plaintext client is refused and told in its own protocol.
    let (ok, out, _) = etcdctl(&etcd, &[], &["get", "greeting"]);
    assert!(!ok, "plaintext: {out}");
    assert!(stats(ListenerKind::Etcd).plaintext_refused() >= 1);
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(etcd_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("requires TLS"), "{answer}");

    // The armada.v1 API over TLS (server certificate only), with the CLI.
    let https = format!("https://127.0.0.1:{}", api.port());
    let ca_arg = ca_file.display().to_string();
    let (ok, out) = armada(&["table", "create", "t", "--endpoint", &https, "--tls-ca", &ca_arg]);
    assert!(ok, "{out}");
    let (ok, out) = armada(&["kv", "put", "t", "k", "v", "--endpoint", &https, "--tls-ca", &ca_arg]);
    assert!(ok, "{out}");
    let (ok, out) = armada(&["kv", "put", "t", "k", "v", "--endpoint", &https]);
    assert!(!ok && out.contains("--tls-ca"), "https without a CA: {out}");
    let (ok, out) = armada(&["kv", "put", "t", "k", "v", "--endpoint", &format!("http://{api}")]);
    assert!(!ok && out.contains("use https://"), "plaintext to the TLS API: {out}");
    let foreign_ca = write(&dir, "foreign.pem", &foreign.pem);
    let (ok, out) =
        armada(&["kv", "put", "t", "k", "v", "--endpoint", &https, "--tls-ca", &foreign_ca.display().to_string()]);
    assert!(!ok && out.to_lowercase().contains("certificate"), "a server the CA did not issue: {out}");

    // Rotation under load: clients keep writing over TLS, on one long
    // connection and on fresh ones, while the certificate changes on disk.
    let client_tls = Arc::new(armada_server::tls::client_config(&ca_file, None, &[b"h2"]).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for fresh_connections in [false, true] {
        let (stop, done, failed, client_tls, https) =
            (stop.clone(), done.clone(), failed.clone(), client_tls.clone(), https.clone());
        load.push(tokio::spawn(async move {
            let connect = || async {
                let ep = armada_server::listen::endpoint(&https).unwrap().timeout(Duration::from_secs(5));
                armada_server::listen::connect(ep, Some(client_tls.clone())).await
            };
            let mut kv = armada_proto::v1::kv_client::KvClient::new(connect().await.unwrap());
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if fresh_connections {
                    match connect().await {
                        Ok(ch) => kv = armada_proto::v1::kv_client::KvClient::new(ch),
                        Err(e) => {
                            eprintln!("connect failed during rotation: {e:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
                i += 1;
                let put = armada_proto::v1::PutRequest {
                    table: "t".into(),
                    key: format!("load-{fresh_connections}-{i}").into_bytes(),
                    value: b"v".to_vec(),
                    ..Default::default()
                };
                match kv.put(put).await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("put failed during rotation: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    let before = presented_serial(api, &ca_file).await;
    eventually(Duration::from_secs(10), "load runs", || async {
        if done.load(Ordering::Relaxed) >= 20 {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    // Files that cannot be used keep the previous certificate.
    write(&dir, "server.key", "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(presented_serial(api, &ca_file).await, before, "a broken key file must not replace the certificate");
    // A new certificate and key: used by the next handshakes.
    install(&dir, "server", &leaf(&ca_, "armada-0", &["127.0.0.1", "localhost"]));
    let after = eventually(Duration::from_secs(10), "the new certificate is presented", || async {
        let serial = presented_serial(api, &ca_file).await;
        if serial != before {
            Ok(serial)
        } else {
            Err("still the old certificate".to_string())
        }
    })
    .await;
    assert_ne!(after, before);
    let at_rotation = done.load(Ordering::Relaxed);
    eventually(Duration::from_secs(10), "load continues after the rotation", || async {
        if done.load(Ordering::Relaxed) >= at_rotation + 20 {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during the rotation");
    eprintln!("rotation under load: {} puts, none failed", done.load(Ordering::Relaxed));
    node.run_until(async {}).await.expect("clean shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mutual TLS between nodes: a 3-node cluster whose nodes hold
/// certificates of the cluster CA forms and replicates; in a cluster where
/// one member holds a certificate of another CA, the other two elect a
/// leader and serve writes, and the outsider never joins, votes or reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_without_the_cluster_certificate_cannot_join() {
    let dir = std::env::temp_dir().join(format!("armada-tls-raft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster_ca = ca("Armada cluster CA");
    let foreign = ca("Another cluster's CA");
    let ca_file = write(&dir, "cluster-ca.pem", &cluster_ca.pem);
    let foreign_file = write(&dir, "foreign-ca.pem", &foreign.pem);
    let args = |stem: &str, issuer: &Ca, ca: &Path| {
        let (cert, key) = install(&dir, stem, &leaf(issuer, stem, &[]));
        vec![
            "--raft-tls-cert".to_string(),
            cert.display().to_string(),
            "--raft-tls-key".into(),
            key.display().to_string(),
            "--raft-tls-ca".into(),
            ca.display().to_string(),
        ]
    };
    let start = |name: &str, certs: Vec<Vec<String>>| {
        let nodes: Vec<Node> = certs
            .into_iter()
            .enumerate()
            .map(|(i, extra)| {
                let mut n = Node::new(i as u64 + 1, dir.join(format!("{name}-n{}", i + 1)));
                n.extra = extra;
                n
            })
            .collect();
        let members = nodes.iter().map(|n| format!("{}={}", n.id, n.raft)).collect::<Vec<_>>().join(",");
        let mut c = Cluster::from_nodes(nodes, members, dir.join(format!("{name}-root")));
        c.start_all();
        c
    };
    let read = |node: &Node| {
        let ep = node.etcd.clone();
        async move {
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={ep}"))
                .args(["--command-timeout=2s", "get", "k", "--print-value-only", "--consistency=s"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
    };

    // Every node holds a certificate of the cluster CA.
    let good = start("good", (1..=3).map(|i| args(&format!("node-{i}"), &cluster_ca, &ca_file)).collect());
    good.wait_ready(Duration::from_secs(60)).await;
    let (ok, out, _) = etcdctl(&good.nodes[0].etcd, &[], &["put", "k", "v1"]);
    assert!(ok, "{out}");
    for n in &good.nodes {
        eventually(Duration::from_secs(20), "every member applies the write", || async {
            match read(n).await.as_str() {
                "v1" => Ok(()),
                other => Err(format!("node {} reads {other:?}", n.id)),
            }
        })
        .await;
    }

    // Node 3 holds another CA's certificate (and trusts only that CA).
    let mut mixed = start(
        "mixed",
        vec![
            args("m-node-1", &cluster_ca, &ca_file),
            args("m-node-2", &cluster_ca, &ca_file),
            args("m-node-3", &foreign, &foreign_file),
        ],
    );
    wait_ready(&mixed.nodes[0].http, Duration::from_secs(60)).await;
    let (ok, out, _) = etcdctl(&mixed.nodes[0].etcd, &[], &["put", "k", "v2"]);
    assert!(ok, "two members of three are a quorum: {out}");
    eventually(Duration::from_secs(20), "node 2 applies the write", || async {
        match read(&mixed.nodes[1]).await.as_str() {
            "v2" => Ok(()),
            other => Err(format!("node 2 reads {other:?}")),
        }
    })
    .await;
    // By now node 2 has had the write for a while; node 3 has had the same
    // heartbeats offered and must still hold nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(read(&mixed.nodes[2]).await, "", "the outsider must not read the cluster's data");
    let (code, _) = http_get(&mixed.nodes[2].http, "/readyz").unwrap_or((0, String::new()));
    assert_ne!(code, 200, "the outsider must not be ready");
    mixed.nodes[2].kill9();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Follower clusters over mutual TLS with a replication token: the leader
/// cluster's replication listener lets in the follower whose certificate
/// is allowed and which sends the token, which then replicates and serves
/// etcdctl over mutual TLS on its own etcd listener; a follower
/// with a certificate of the same CA but another name, one with the right
/// certificate but a wrong token, and one without TLS, get nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cluster_replicates_over_mutual_tls_and_others_are_refused() {
    let dir = std::env::temp_dir().join(format!("armada-tls-repl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca_ = ca("Armada replication CA");
    let ca_file = write(&dir, "ca.pem", &ca_.pem);
    let (cert, key) = install(&dir, "leader", &leaf(&ca_, "leader", &["127.0.0.1"]));
    let path = |p: &Path| p.display().to_string();
    let leader_args = vec![
        "--replication-tls-cert".to_string(),
        path(&cert),
        "--replication-tls-key".into(),
        path(&key),
        "--replication-tls-client-ca".into(),
        path(&ca_file),
        "--replication-tls-allowed-clients".into(),
        "edge-1".into(),
        "--replication-token".into(),
        "replication-secret".into(),
    ];
    let mut leader_node = Node::new(1, dir.join("leader"));
    leader_node.extra = leader_args;
    let members = format!("1={}", leader_node.raft);
    let mut leader = Cluster::from_nodes(vec![leader_node], members, dir.join("leader-root"));
    leader.start_all();
    leader.wait_ready(Duration::from_secs(30)).await;
    let (ok, out, _) = etcdctl(&leader.nodes[0].etcd, &[], &["put", "k", "replicated"]);
    assert!(ok, "{out}");
    let https = format!("https://{}", leader.nodes[0].replication);
    let follower = |name: &str, url: &str, identity: Option<&(PathBuf, PathBuf)>, token: &str| {
        let mut node = Node::new(1, dir.join(name));
        node.leader_address = Some(url.to_string());
        if url.starts_with("https://") {
            node.extra = vec!["--leader-tls-ca".into(), path(&ca_file)];
        }
        if let Some((c, k)) = identity {
            node.extra.extend(["--leader-tls-cert".into(), path(c), "--leader-tls-key".into(), path(k)]);
        }
        if url.starts_with("https://") {
            node.extra.extend(["--leader-token".into(), token.into()]);
        }
        let members = format!("1={}", node.raft);
        let mut c = Cluster::from_nodes(vec![node], members, dir.join(format!("{name}-root")));
        c.start_all();
        c
    };
    let edge = install(&dir, "edge-1", &leaf(&ca_, "edge-1", &[]));
    let other = install(&dir, "edge-2", &leaf(&ca_, "edge-2", &[]));
    // The allowed follower's own etcd listener serves mutual TLS too.
    let (fcert, fkey) = install(&dir, "edge-1-etcd", &leaf(&ca_, "edge-1-etcd", &["127.0.0.1"]));
    let app = install(&dir, "app", &leaf(&ca_, "app", &[]));
    let mut allowed = follower("allowed", &https, Some(&edge), "replication-secret");
    allowed.nodes[0].kill9();
    allowed.nodes[0].extra.extend([
        "--etcd-tls-cert".into(),
        path(&fcert),
        "--etcd-tls-key".into(),
        path(&fkey),
        "--etcd-tls-client-ca".into(),
        path(&ca_file),
    ]);
    allowed.start_all();
    let app_tls = vec![
        format!("--cacert={}", path(&ca_file)),
        format!("--cert={}", path(&app.0)),
        format!("--key={}", path(&app.1)),
    ];
    let not_allowed = follower("not-allowed", &https, Some(&other), "replication-secret");
    let wrong_token = follower("wrong-token", &https, Some(&edge), "not-the-secret");
    let plaintext = follower("plaintext", &format!("http://{}", leader.nodes[0].replication), None, "");
    let read_with = |c: &Cluster, tls: &[String]| {
        let (ok, out, _) = etcdctl(&c.nodes[0].etcd, tls, &["get", "k", "--print-value-only", "--consistency=s"]);
        if ok {
            out.trim().to_string()
        } else {
            String::new()
        }
    };
    let read = |c: &Cluster| read_with(c, &[]);
    eventually(Duration::from_secs(60), "the allowed follower replicates (etcdctl over mutual TLS)", || async {
        match read_with(&allowed, &app_tls).as_str() {
            "replicated" => Ok(()),
            other => Err(format!("reads {other:?}")),
        }
    })
    .await;
    // The allowed follower has caught up; the others have been trying to
    // connect all along and hold nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(read(&not_allowed), "", "a follower whose certificate name is not allowed");
    assert_eq!(read(&plaintext), "", "a follower without TLS");
    assert_eq!(read(&wrong_token), "", "a follower with the right certificate but a wrong token");
    // etcdctl over mutual TLS at the follower: a write is forwarded to the
    // leader cluster and read back; without a client certificate, refused.
    let (ok, out, _) = etcdctl(&allowed.nodes[0].etcd, &app_tls, &["put", "k2", "via-follower"]);
    assert!(ok, "{out}");
    let (ok, out, _) = etcdctl(&allowed.nodes[0].etcd, &app_tls, &["get", "k2", "--print-value-only"]);
    assert!(ok && out.trim() == "via-follower", "{out}");
    let (ok, out, _) = etcdctl(&leader.nodes[0].etcd, &[], &["get", "k2", "--print-value-only"]);
    assert!(ok && out.trim() == "via-follower", "the leader cluster has the forwarded write: {out}");
    assert_eq!(read_with(&allowed, &[format!("--cacert={}", path(&ca_file))]), "", "no client certificate");
    let log = std::fs::read_to_string(dir.join("leader").with_extension("log")).unwrap_or_default();
    assert!(log.contains("names no allowed client"), "the leader logs the refused follower:\n{log}");
    assert!(log.contains("plaintext"), "the leader logs the plaintext follower:\n{log}");
    drop((allowed, not_allowed, wrong_token, plaintext, leader));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bearer tokens: the KV and Tables APIs each need their own token (one
/// from a file, rotated on disk), other APIs stay open, and a missing or
/// wrong token gets `UNAUTHENTICATED` with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_api_needs_its_own_token_and_a_rotated_token_file_takes_effect() {
    use armada_server::auth::{Secret, TokenSpec};
    let dir = std::env::temp_dir().join(format!("armada-tls-tokens-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca_ = ca("Armada token test CA");
    let ca_file = write(&dir, "ca.pem", &ca_.pem);
    let (cert, key) = install(&dir, "server", &leaf(&ca_, "armada-0", &["127.0.0.1"]));
    let kv_token_file = write(&dir, "kv-token", "kv-secret-1\n");
    let tls = ListenersTls {
        api: Some(TlsFiles { cert, key, client_ca: None, allowed_clients: Vec::new() }),
        ..Default::default()
    };
    let tokens = armada_server::config::TokenSpecs {
        kv: Some(TokenSpec::File(kv_token_file.clone())),
        tables: Some(TokenSpec::Value(Secret::new("tables-secret"))),
        ..Default::default()
    };
    let (node, _data) = launch_in_process_with("tokens", tls, tokens).await;
    let https = format!("https://127.0.0.1:{}", node.address(ListenerKind::Api).unwrap().port());
    let ca_arg = ca_file.display().to_string();
    let run = |token: Option<&str>, args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(["--endpoint".into(), https.clone(), "--tls-ca".into(), ca_arg.clone()]);
        if let Some(t) = token {
            all.extend(["--token".into(), t.into()]);
        }
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        armada(&refs)
    };
    let (ok, out) = run(None, &["table", "create", "t"]);
    assert!(!ok && out.contains("Unauthenticated") && out.contains("needs a token"), "{out}");
    let (ok, out) = run(Some("kv-secret-1"), &["table", "create", "t"]);
    assert!(!ok && out.contains("not this API's"), "the KV token does not open Tables: {out}");
    let (ok, out) = run(Some("tables-secret"), &["table", "create", "t"]);
    assert!(ok, "{out}");
    let (ok, out) = run(Some("kv-secret-1"), &["kv", "put", "t", "k", "v"]);
    assert!(ok, "{out}");
    let (ok, out) = run(None, &["kv", "get", "t", "k"]);
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    let (ok, out) = run(None, &["cluster", "status"]);
    assert!(ok, "the Cluster API has no token here: {out}");
    // The token file is rotated: the new token works, the old one no longer.
    // (The node checks token files every reload interval, 100 ms here.)
    std::fs::write(&kv_token_file, "kv-secret-2\n").unwrap();
    let (ok, out) = eventually(Duration::from_secs(10), "the rotated token is in use", || async {
        match run(Some("kv-secret-2"), &["kv", "get", "t", "k"]) {
            (true, out) => Ok((true, out)),
            (false, out) => Err(out),
        }
    })
    .await;
    assert!(ok && out.contains('v'), "{out}");
    let (ok, out) = run(Some("kv-secret-1"), &["kv", "get", "t", "k"]);
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    node.run_until(async {}).await.expect("clean shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The client APIs on Unix sockets, beside their TCP ports: etcdctl over
/// `unix://` (plaintext) and over `unixs://` (TLS with the etcd listener's
/// certificate), the armada CLI over both, the same data as over TCP; a
/// plaintext client at the TLS socket is refused at once; a stale socket
/// file from an earlier run is replaced, any other file in the way stops
/// the start with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_apis_serve_unix_sockets_with_and_without_tls() {
    let dir = std::env::temp_dir().join(format!("armada-unix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca_ = ca("Armada unix socket test CA");
    let ca_file = write(&dir, "ca.pem", &ca_.pem);
    let (cert, key) = install(&dir, "server", &leaf(&ca_, "armada-0", &["127.0.0.1", "localhost"]));
    let (api_sock, etcd_sock) = (dir.join("api.sock"), dir.join("etcd.sock"));
    // A socket file left by an earlier run does not stop the start.
    drop(std::os::unix::net::UnixListener::bind(&etcd_sock).unwrap());
    let mut node = common::Node::new(1, dir.join("data"));
    node.extra = vec![
        "--etcd-unix-socket".into(),
        format!("unix://{}", etcd_sock.display()),
        "--api-tls-cert".into(),
        cert.display().to_string(),
        "--api-tls-key".into(),
        key.display().to_string(),
        "--api-unix-socket".into(),
        format!("unixs://{}", api_sock.display()),
    ];
    let members = format!("1={}", node.raft);
    node.start(&members);
    wait_ready(&node.http, Duration::from_secs(30)).await;
    let unix_etcd = format!("unix://{}", etcd_sock.display());
    // etcdctl 3.4 sends the socket path as the HTTP/2 authority, which must
    // be a host name (a path's slashes are refused): it is run from the
    // socket's directory with the bare file name, as etcd's own docs name
    // sockets (`unix://localhost:2379`).
    let out = Command::new("etcdctl")
        .current_dir(&dir)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints=unix://etcd.sock", "--command-timeout=3s", "put", "greeting", "hello"])
        .output()
        .expect("etcdctl (ci/install-deps installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "etcdctl over unix://: {text}");
    let (ok, out, _) = etcdctl(&node.etcd, &[], &["get", "greeting"]);
    assert!(ok && out.contains("hello"), "the TCP port serves the same data: {out}");
    let unixs_api = format!("unixs://{}", api_sock.display());
    let ca_arg = ca_file.display().to_string();
    let (ok, out) = armada(&["kv", "get", "default", "greeting", "--endpoint", &unixs_api, "--tls-ca", &ca_arg]);
    assert!(ok && out.contains("hello"), "armada CLI over unixs://: {out}");
    let (ok, out) = armada(&["kv", "get", "default", "greeting", "--endpoint", &unixs_api]);
    assert!(!ok && out.contains("--tls-ca"), "a TLS socket without a CA is a clear client error: {out}");
    // Plaintext at the TLS socket: refused at once, never a hang.
    let plain_at_tls = format!("unix://{}", api_sock.display());
    let started = Instant::now();
    let (ok, out) = armada(&["kv", "get", "default", "greeting", "--endpoint", &plain_at_tls]);
    assert!(!ok, "plaintext accepted on a TLS socket: {out}");
    assert!(started.elapsed() < Duration::from_secs(5), "refusal took {:?}: {out}", started.elapsed());
    let (ok, out) = armada(&["cluster", "status", "--endpoint", &unix_etcd]);
    assert!(!ok, "the etcd socket does not serve armada.v1: {out}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&etcd_sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660, "socket permissions");
    node.terminate();

    // A regular file where the socket goes: a clear error at start.
    std::fs::remove_file(&etcd_sock).ok();
    std::fs::write(&etcd_sock, "not a socket").unwrap();
    let out = Command::new(BIN)
        .args(["leader", "--data-dir", dir.join("data2").to_str().unwrap()])
        .args(["--api-address", &format!("127.0.0.1:{}", free_tcp_port())])
        .args(["--etcd-address", &format!("127.0.0.1:{}", free_tcp_port())])
        .args(["--rest-address", &format!("127.0.0.1:{}", free_tcp_port())])
        .args(["--raft-address", &format!("127.0.0.1:{}", free_udp_port())])
        .args(["--replication-address", &format!("127.0.0.1:{}", free_tcp_port())])
        .args(["--etcd-unix-socket", &unix_etcd])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("not a socket"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn etcd_kv_client(
    endpoint: &str,
) -> Result<armada_proto::etcd::kv_client::KvClient<tonic::transport::Channel>, String> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| armada_server::listen::error_chain(&e))?;
    Ok(armada_proto::etcd::kv_client::KvClient::new(ch))
}

/// Put latencies (ms) of `n` puts on `c`, sorted; panics on a failed put.
async fn put_latencies(
    c: &mut armada_proto::etcd::kv_client::KvClient<tonic::transport::Channel>,
    n: usize,
) -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..n {
        let started = Instant::now();
        c.put(armada_proto::etcd::PutRequest {
            key: format!("victim/{i}").into_bytes(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .expect("the other client's put");
        out.push(started.elapsed().as_secs_f64() * 1e3);
    }
    out.sort_by(f64::total_cmp);
    out
}

/// Connections opened by the flood (override: ARMADA_FLOOD_CONNECTIONS;
/// `ci/bench-limits` runs more).
const FLOOD_CONNECTIONS: usize = 2000;

/// One client opens thousands of connections to the etcd port of a node
/// whose listeners hold at most 256 (overrides: ARMADA_FLOOD_CONNECTIONS,
/// ARMADA_FLOOD_LIMIT; `ci/bench-limits`): the connections past the limit are
/// refused at once ("too many connections" to a new gRPC client), another
/// client already connected keeps being served, the node's memory grows by
/// what 256 idle connections cost, and once the flood goes, new clients are
/// admitted again. Prints the numbers (memory, the other client's latency).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_capped_and_does_not_starve_another_client() {
    let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let flood_n = env("ARMADA_FLOOD_CONNECTIONS", FLOOD_CONNECTIONS);
    let limit = env("ARMADA_FLOOD_LIMIT", 256);
    let dir = std::env::temp_dir().join(format!("armada-limits-conn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut node = common::Node::new(1, dir.join("data"));
    node.extra = vec!["--max-connections".into(), limit.to_string()];
    let members = format!("1={}", node.raft);
    node.start(&members);
    wait_ready(&node.http, Duration::from_secs(30)).await;
    let pid = node.child.as_ref().unwrap().id();
    let mut victim = etcd_kv_client(&node.etcd).await.unwrap();
    let before = put_latencies(&mut victim, 50).await;
    let rss_before = rss_kib(pid);

    // The flood: raw TCP connections that say nothing, held open.
    let mut flood = Vec::new();
    for _ in 0..flood_n {
        match tokio::net::TcpStream::connect(&node.etcd).await {
            Ok(s) => flood.push(s),
            Err(e) => panic!("connect {}: {e}", flood.len()),
        }
    }
    // Refused connections are closed by the node (a GOAWAY, then EOF);
    // admitted ones stay open (the server's HTTP/2 SETTINGS, then silence
    // while it waits for the client's preface).
    let checks = flood.into_iter().map(|mut s| async move {
        let mut buf = [0u8; 512];
        let eof = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await
        .is_ok();
        (s, eof)
    });
    let checked: Vec<(tokio::net::TcpStream, bool)> = futures::future::join_all(checks).await;
    let refused = checked.iter().filter(|(_, eof)| *eof).count();
    let flood: Vec<_> = checked.into_iter().map(|(s, _)| s).collect();
    let rss_during = rss_kib(pid);
    let during = put_latencies(&mut victim, 50).await;
    let e = etcd_kv_client(&node.etcd).await.err();
    let e = match e {
        Some(e) => e,
        None => {
            let mut c = etcd_kv_client(&node.etcd).await.unwrap();
            c.range(armada_proto::etcd::RangeRequest { key: b"x".to_vec(), ..Default::default() })
                .await
                .err()
                .map(|s| format!("{s:?}"))
                .unwrap_or_default()
        }
    };
    assert!(e.contains("too many connections"), "a new client at the limit is told why: {e:?}");
    let admitted = flood_n - refused;
    assert!(admitted <= limit, "{admitted} flood connections admitted past the limit of {limit}");
    assert!(refused >= flood_n.saturating_sub(limit), "{refused} of {flood_n} refused");
    drop(flood);
    // Slots come back as the flood's connections close.
    eventually(Duration::from_secs(10), "a new client is admitted after the flood", || async {
        let mut c = etcd_kv_client(&node.etcd).await?;
        c.range(armada_proto::etcd::RangeRequest { key: b"x".to_vec(), ..Default::default() })
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    })
    .await;
    let pct = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "flood of {flood_n} connections (limit {limit}): {refused} refused; node RSS {} -> {} KiB; other client's put \
         p50/max {:.2}/{:.2} ms before, {:.2}/{:.2} ms during",
        rss_before,
        rss_during,
        pct(&before, 0.5),
        pct(&before, 1.0),
        pct(&during, 0.5),
        pct(&during, 1.0)
    );
    node.terminate();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Streams per connection are capped by HTTP/2 SETTINGS: one connection
/// asking for 200 watch streams from a node that allows 64 gets 64 at
/// once (the client queues the rest); a client address over its request
/// rate gets RESOURCE_EXHAUSTED with the reason, and is served again once
/// its bucket refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_and_request_rates_are_capped() {
    use armada_proto::etcd as epb;
    use futures::StreamExt;
    let dir = std::env::temp_dir().join(format!("armada-limits-streams-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut node = common::Node::new(1, dir.join("data"));
    let sock = format!("unix://{}", dir.join("etcd.sock").display());
    node.extra = ["--max-streams-per-connection", "64", "--requests-per-second", "50", "--request-burst", "100"]
        .map(String::from)
        .to_vec();
    // The watch streams come over TCP (address 127.0.0.1), the rate test
    // over the Unix socket (its clients share one bucket), so each starts
    // with a full bucket of its own.
    node.extra.extend(["--etcd-unix-socket".to_string(), sock.clone()]);
    let members = format!("1={}", node.raft);
    node.start(&members);
    wait_ready(&node.http, Duration::from_secs(30)).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", node.etcd)).unwrap().connect().await.unwrap();
    let created = Arc::new(AtomicU64::new(0));
    let mut streams = Vec::new();
    for i in 0..200 {
        let (ch, created) = (ch.clone(), created.clone());
        streams.push(tokio::spawn(async move {
            let mut w = epb::watch_client::WatchClient::new(ch);
            let req = epb::WatchRequest {
                request_union: Some(epb::watch_request::RequestUnion::CreateRequest(epb::WatchCreateRequest {
                    key: format!("w/{i}").into_bytes(),
                    ..Default::default()
                })),
            };
            let Ok(r) = w.watch(futures::stream::iter([req]).chain(futures::stream::pending())).await else { return };
            let mut r = r.into_inner();
            if let Ok(Some(m)) = r.message().await {
                if m.created {
                    created.fetch_add(1, Ordering::SeqCst);
                }
            }
            std::future::pending::<()>().await;
        }));
    }
    eventually(Duration::from_secs(20), "64 watch streams open", || async {
        match created.load(Ordering::SeqCst) {
            64.. => Ok(()),
            n => Err(format!("{n} open")),
        }
    })
    .await;
    // The rest wait for a stream slot: none opens while the first 64 live.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(created.load(Ordering::SeqCst), 64, "streams past the connection's limit were opened");
    for s in &streams {
        s.abort();
    }
    drop(streams);

    // The request rate: 50/s with bursts of 100, from the socket's clients.
    let ch = armada_server::listen::connect_url(&sock, None, Duration::from_secs(2)).await.unwrap();
    let mut c = epb::kv_client::KvClient::new(ch);
    let mut refused = None;
    let mut served = 0;
    for i in 0..300 {
        match c
            .put(epb::PutRequest { key: format!("r/{i}").into_bytes(), value: b"v".to_vec(), ..Default::default() })
            .await
        {
            Ok(_) => served += 1,
            Err(s) => {
                refused = Some(s);
                break;
            }
        }
    }
    let s = refused.expect("300 puts at once from one address all served at 50/s with a burst of 100");
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("request rate"), "{s:?}");
    assert!(served >= 100, "the burst was served first: {served}");
    eventually(Duration::from_secs(5), "served again once the bucket refills", || {
        let mut c = c.clone();
        async move {
            c.range(epb::RangeRequest { key: b"r/0".to_vec(), ..Default::default() })
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
    })
    .await;
    node.terminate();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node asks a TLS cluster to add it (`--join` over TLS): it verifies the
/// cluster's API certificate with the cluster CA and is added and promoted;
/// a write at the first node is then read at the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_a_tls_cluster_by_itself() {
    let dir = std::env::temp_dir().join(format!("armada-tls-join-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster_ca = ca("Armada cluster CA");
    let ca_file = write(&dir, "cluster-ca.pem", &cluster_ca.pem);
    let tls = |stem: &str| {
        let (cert, key) = install(&dir, stem, &leaf(&cluster_ca, stem, &["127.0.0.1", "localhost"]));
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        vec![
            "--api-tls-cert".to_string(),
            cert.clone(),
            "--api-tls-key".into(),
            key.clone(),
            "--raft-tls-cert".into(),
            cert,
            "--raft-tls-key".into(),
            key,
            "--raft-tls-ca".into(),
            ca_file.display().to_string(),
        ]
    };
    let mut n1 = Node::new(1, dir.join("n1"));
    n1.extra = tls("n1");
    let m1 = format!("1={}", n1.raft);
    n1.start(&m1);
    wait_ready(&n1.http, Duration::from_secs(60)).await;
    let mut n2 = Node::new(2, dir.join("n2"));
    n2.extra = tls("n2");
    n2.extra.extend(["--initial-cluster-state".to_string(), "existing".into(), "--join".into(), n1.api.clone()]);
    let m2 = format!("2={}", n2.raft);
    n2.start(&m2);
    let endpoint = format!("https://{}", n1.api);
    let ca_arg = ca_file.display().to_string();
    eventually(Duration::from_secs(60), "node 2 joined as a voter and every group has it", || async {
        let (ok, out) =
            armada(&["cluster", "member", "list", "--endpoint", &endpoint, "--tls-ca", &ca_arg, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).map_err(|e| format!("{e}: {out}"))?;
        let voters = v["members"].as_array().map_or(0, |m| m.iter().filter(|m| m["learner"] == false).count());
        if ok && voters == 2 && v["epoch"] == v["settled_epoch"] {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    let (ok, out, _) = etcdctl(&n1.etcd, &[], &["put", "joined", "yes"]);
    assert!(ok, "{out}");
    eventually(Duration::from_secs(20), "the new member serves the write", || async {
        let (ok, out, _) = etcdctl(&n2.etcd, &[], &["get", "joined", "--print-value-only"]);
        if ok && out.trim() == "yes" {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    n1.kill9();
    n2.kill9();
    let _ = std::fs::remove_dir_all(&dir);
}
