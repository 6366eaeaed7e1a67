//! Helpers shared by the real-process tests: starting `armada` nodes on
//! free loopback ports, plain HTTP, and polling a condition to a deadline.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_armada");

/// Ports this test process handed out already. The OS may give the same
/// free port to two `bind(0)` calls once the first socket is closed (it
/// did: one node got the same port for two listeners and refused to
/// start), so a port is never handed out twice.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn unique_port(mut probe: impl FnMut() -> u16) -> u16 {
    let mut taken = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = probe();
        if taken.insert(port) {
            return port;
        }
    }
}

pub fn free_tcp_port() -> u16 {
    unique_port(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
}

pub fn free_udp_port() -> u16 {
    unique_port(|| std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
}

pub struct Node {
    pub id: u64,
    pub api: String,
    pub raft: String,
    pub http: String,
    pub etcd: String,
    pub replication: String,
    pub dir: PathBuf,
    /// Extra arguments for every start (e.g. `--etcd-table`).
    pub extra: Vec<String>,
    /// Set: a follower-cluster node of the leader cluster at this address.
    pub leader_address: Option<String>,
    pub child: Option<Child>,
}

impl Node {
    /// A node with fresh ports whose data lives in `dir`.
    pub fn new(id: u64, dir: PathBuf) -> Node {
        Node {
            id,
            api: format!("127.0.0.1:{}", free_tcp_port()),
            raft: format!("127.0.0.1:{}", free_udp_port()),
            http: format!("127.0.0.1:{}", free_tcp_port()),
            etcd: format!("127.0.0.1:{}", free_tcp_port()),
            replication: format!("127.0.0.1:{}", free_tcp_port()),
            dir,
            extra: Vec::new(),
            leader_address: None,
            child: None,
        }
    }

    pub fn start(&mut self, members: &str) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.with_extension("log")).unwrap();
        let mut cmd = Command::new(BIN);
        match &self.leader_address {
            None => cmd.arg("leader"),
            Some(a) => cmd.args(["follower", "--leader-address", a]),
        };
        let child = cmd
            .args(["--node-id", &self.id.to_string(), "--initial-members", members])
            .args(["--api-address", &self.api, "--raft-address", &self.raft, "--rest-address", &self.http])
            .args(["--etcd-address", &self.etcd, "--replication-address", &self.replication])
            .args(&self.extra)
            .arg("--data-dir")
            .arg(&self.dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn armada");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            // Draining (up to --drain-timeout-ms, 10 s) comes first.
            let deadline = Instant::now() + Duration::from_secs(25);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = c.try_wait() {
                    assert!(status.success(), "node {} exited with {status} after SIGTERM", self.id);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            panic!("node {} did not stop within 25 s of SIGTERM", self.id);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub members: String,
    _root: PathBuf,
}

impl Cluster {
    /// A cluster of already configured nodes, not started.
    pub fn from_nodes(nodes: Vec<Node>, members: String, root: PathBuf) -> Cluster {
        Cluster { nodes, members, _root: root }
    }

    /// Starts every node that is not running.
    pub fn start_all(&mut self) {
        let m = self.members.clone();
        for n in &mut self.nodes {
            if n.child.is_none() {
                n.start(&m);
            }
        }
    }

    pub fn new(n: u64, name: &str) -> Cluster {
        Self::with_args(n, name, &[])
    }

    /// `n` nodes started with `extra` arguments each.
    pub fn with_args(n: u64, name: &str, extra: &[&str]) -> Cluster {
        let root = std::env::temp_dir().join(format!("armada-proc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let nodes: Vec<Node> = (1..=n)
            .map(|id| {
                let mut node = Node::new(id, root.join(format!("n{id}")));
                node.extra = extra.iter().map(|s| s.to_string()).collect();
                node
            })
            .collect();
        let members = nodes.iter().map(|n| format!("{}={}", n.id, n.raft)).collect::<Vec<_>>().join(",");
        let mut c = Cluster { nodes, members, _root: root };
        for i in 0..c.nodes.len() {
            let m = c.members.clone();
            c.nodes[i].start(&m);
        }
        c
    }
}

/// A one-node follower cluster, `name` under `root`, of the leader cluster
/// whose replication listener is `leader_replication`.
pub fn start_follower(root: &std::path::Path, name: &str, leader_replication: &str) -> Cluster {
    let mut node = Node::new(1, root.join(name));
    node.leader_address = Some(format!("http://{leader_replication}"));
    let members = format!("1={}", node.raft);
    let mut c = Cluster::from_nodes(vec![node], members, root.join(format!("{name}-root")));
    c.start_all();
    c
}

/// A plain HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("no status line")?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// Retries `f` until it succeeds or `within` passes.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        match f().await {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {within:?}; last error: {last}");
}

/// Waits until `GET /readyz` on `http` answers 200: the node serves its
/// APIs (listeners bound, groups led and applied, the etcd table present,
/// on followers replication streaming). Requests sent after this must not
/// need retries.
pub async fn wait_ready(http: &str, within: Duration) {
    eventually(within, &format!("{http}/readyz"), || async {
        match http_get(http, "/readyz")? {
            (200, _) => Ok(()),
            (code, body) => Err(format!("{code}: {body}")),
        }
    })
    .await
}

impl Cluster {
    /// Waits until every running node reports ready.
    pub async fn wait_ready(&self, within: Duration) {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            wait_ready(&n.http, within).await;
        }
    }
}

/// One leader node launched in this process (the binary's own launcher, on
/// loopback ports chosen by the OS, data under the temp dir), once ready.
pub async fn launch_in_process(name: &str) -> (armada_server::launch::Launched, PathBuf) {
    launch_in_process_with_tls(name, Default::default()).await
}

/// As [`launch_in_process`], with TLS on the listeners `tls` names (its
/// files are checked for changes every 100 ms).
pub async fn launch_in_process_with_tls(
    name: &str,
    tls: armada_server::config::ListenersTls,
) -> (armada_server::launch::Launched, PathBuf) {
    launch_in_process_with(name, tls, Default::default()).await
}

/// As [`launch_in_process_with_tls`], with bearer tokens.
pub async fn launch_in_process_with(
    name: &str,
    tls: armada_server::config::ListenersTls,
    tokens: armada_server::config::TokenSpecs,
) -> (armada_server::launch::Launched, PathBuf) {
    use armada_core::raft::ArmadaNode;
    use armada_server::node::{NodeConfig, RaftTuning};
    use std::collections::BTreeMap;

    let dir = std::env::temp_dir().join(format!("armada-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let raft = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = armada_server::config::ServeConfig {
        data_dir: dir.clone(),
        api_address: any,
        raft_address: raft,
        rest_address: any,
        etcd_address: any,
        api_unix_socket: None,
        etcd_unix_socket: None,
        etcd_table: "default".into(),
        replication_address: any,
        node: NodeConfig {
            id: 1,
            members: BTreeMap::from([(1, ArmadaNode { raft_addr: raft.to_string(), api_addr: String::new() })]),
            raft: RaftTuning::default(),
            request_timeout: Duration::from_secs(5),
            bootstrap: true,
            client_addrs: Default::default(),
        },
        log_format: None,
        tls,
        tls_reload_interval: Duration::from_millis(100),
        tokens,
        etcd_auth: Default::default(),
        limits: Default::default(),
        drain_timeout: Duration::from_secs(5),
        join: None,
    };
    let node = armada_server::launch::launch(&cfg, armada_server::launch::Role::Leader).await.expect("launch");
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(why) = node.readiness.check(&node.node) {
        assert!(Instant::now() < deadline, "not ready: {why:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (node, dir)
}
