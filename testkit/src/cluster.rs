//! A Redis Cluster on local ports: masters sharing the 16,384 slots evenly,
//! optionally one replica each.

use std::time::{Duration, Instant};

use crate::{RedisServer, free_port};

/// The nodes of one local cluster. Dropping it kills them all.
#[derive(Debug)]
pub struct Cluster {
    /// The masters, in slot order: master `i` serves the `i`-th share.
    pub masters: Vec<RedisServer>,
    /// The replicas, by master: those of `masters[i]` first come
    /// `per_master` at `i * per_master` (see [`replicas_of`](Self::replicas_of)).
    pub replicas: Vec<RedisServer>,
    per_master: usize,
}

/// How long a cluster may take to form.
const FORM_DEADLINE: Duration = Duration::from_secs(30);

impl Cluster {
    /// `masters` masters with no replicas (about a second).
    ///
    /// # Panics
    ///
    /// As [`start_with`](Self::start_with).
    pub fn start(masters: usize) -> Cluster {
        Self::start_with(masters, 0)
    }

    /// `masters` masters with `per_master` replicas each: the masters are
    /// made first, then each replica is attached to its master with
    /// `CLUSTER REPLICATE` (so the pairing is known), and the call returns
    /// once every node sees every slot served and every replica is in sync.
    ///
    /// # Panics
    ///
    /// When a node does not start or the cluster does not form in 30 s.
    pub fn start_with(masters: usize, per_master: usize) -> Cluster {
        Self::try_start(masters, per_master).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`start_with`](Self::start_with), returning why instead of
    /// panicking (for the command line's `--spawn-cluster`).
    ///
    /// # Errors
    ///
    /// A node that did not start (with its log), a command a node refused,
    /// or a cluster that did not form within 30 s.
    pub fn try_start(masters: usize, per_master: usize) -> Result<Cluster, String> {
        let masters = (0..masters)
            .map(|_| node())
            .collect::<Result<Vec<_>, _>>()?;
        let replicas = (0..masters.len() * per_master)
            .map(|_| node())
            .collect::<Result<Vec<_>, _>>()?;
        let cluster = Cluster {
            masters,
            replicas,
            per_master,
        };
        let count = cluster.masters.len();
        let step = 16384 / count;
        for (i, m) in cluster.masters.iter().enumerate() {
            let first = i * step;
            let last = if i + 1 == count {
                16383
            } else {
                first + step - 1
            };
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .exec(&mut try_connect(m).map_err(|e| e.to_string())?)
                .map_err(|e| format!("assign slots: {e}"))?;
        }
        for n in cluster.nodes().skip(1) {
            meet(&cluster.masters[0], n)?;
        }
        let deadline = Instant::now() + FORM_DEADLINE;
        // Every node must know every other before a replica can name its
        // master.
        for n in cluster.nodes() {
            wait(deadline, "every node to know the others", || {
                known_nodes(n) == cluster.masters.len() + cluster.replicas.len()
            })?;
        }
        for (i, m) in cluster.masters.iter().enumerate() {
            for r in cluster.replicas_of(i) {
                replicate(r, m)?;
            }
        }
        for n in cluster.nodes() {
            wait(deadline, "the cluster to be ok everywhere", || {
                try_connect(n)
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            })?;
        }
        for (i, m) in cluster.masters.iter().enumerate() {
            for r in cluster.replicas_of(i) {
                wait_in_sync(deadline, m, r)?;
            }
        }
        Ok(cluster)
    }

    /// A new node, introduced to the cluster and made a replica of
    /// `master` (any master of the cluster now), returned once in sync.
    ///
    /// # Panics
    ///
    /// When the node does not start or join within 30 s.
    pub fn add_replica(&self, master: &RedisServer) -> RedisServer {
        let joined = (|| {
            let replica = node()?;
            let deadline = Instant::now() + FORM_DEADLINE;
            meet(master, &replica)?;
            wait(deadline, "the new node to know the cluster", || {
                known_nodes(&replica) == self.masters.len() + self.replicas.len() + 1
            })?;
            replicate(&replica, master)?;
            wait_in_sync(deadline, master, &replica)?;
            Ok::<_, String>(replica)
        })();
        joined.unwrap_or_else(|e| panic!("{e}"))
    }

    /// The replicas `masters[i]` started with.
    pub fn replicas_of(&self, i: usize) -> &[RedisServer] {
        &self.replicas[i * self.per_master..(i + 1) * self.per_master]
    }

    /// Masters, then replicas.
    pub fn nodes(&self) -> impl Iterator<Item = &RedisServer> {
        self.masters.iter().chain(&self.replicas)
    }

    /// Every node's URL (seed nodes for a provider).
    pub fn urls(&self) -> Vec<String> {
        self.nodes().map(RedisServer::url).collect()
    }

    /// The hash slot of a full Redis key name.
    ///
    /// # Panics
    ///
    /// When the first master does not answer.
    pub fn slot_of(&self, key: &str) -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut connect(&self.masters[0]))
            .expect("CLUSTER KEYSLOT")
    }

    /// The index of the master that was given `key`'s slot at the start.
    pub fn master_index_of(&self, key: &str) -> usize {
        let step = 16384 / self.masters.len();
        (self.slot_of(key) as usize / step).min(self.masters.len() - 1)
    }

    /// The master that was given `key`'s slot at the start.
    pub fn master_of(&self, key: &str) -> &RedisServer {
        &self.masters[self.master_index_of(key)]
    }
}

/// A cluster-enabled server, not yet part of any cluster.
fn node() -> Result<RedisServer, String> {
    let mut last_log = String::new();
    for _ in 0..5 {
        // The cluster bus gets a free port of its own: the default (port +
        // 10000) may be taken or out of range. Either port may be taken
        // before the server binds it: then both are picked again.
        let bus = free_port().to_string();
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &bus,
            "--cluster-node-timeout",
            "1000",
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ];
        match RedisServer::try_start_at(free_port(), None, &args) {
            Ok(server) => return Ok(server),
            Err(log) => last_log = log,
        }
    }
    Err(format!(
        "a cluster node did not start; its log:\n{last_log}"
    ))
}

/// Introduces `newcomer` to `member`'s cluster.
fn meet(member: &RedisServer, newcomer: &RedisServer) -> Result<(), String> {
    let fail = |e: redis::RedisError| format!("CLUSTER MEET: {e}");
    let bus: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("cluster-port")
        .query(&mut try_connect(newcomer).map_err(fail)?)
        .map_err(fail)?;
    redis::cmd("CLUSTER")
        .arg("MEET")
        .arg("127.0.0.1")
        .arg(newcomer.port)
        .arg(&bus[1])
        .exec(&mut try_connect(member).map_err(fail)?)
        .map_err(fail)
}

fn replicate(replica: &RedisServer, master: &RedisServer) -> Result<(), String> {
    let fail = |e: redis::RedisError| format!("CLUSTER REPLICATE: {e}");
    let id: String = redis::cmd("CLUSTER")
        .arg("MYID")
        .query(&mut try_connect(master).map_err(fail)?)
        .map_err(fail)?;
    redis::cmd("CLUSTER")
        .arg("REPLICATE")
        .arg(id)
        .exec(&mut try_connect(replica).map_err(fail)?)
        .map_err(fail)
}

/// Waits until `replica` has synced with `master`, and `master` counts it
/// (for `WAIT`) as online.
fn wait_in_sync(
    deadline: Instant,
    master: &RedisServer,
    replica: &RedisServer,
) -> Result<(), String> {
    wait(deadline, "a replica in sync", || in_sync(replica))?;
    wait(deadline, "a master to see its replica online", || {
        try_connect(master)
            .and_then(|mut c| {
                redis::cmd("INFO")
                    .arg("replication")
                    .query::<String>(&mut c)
            })
            .is_ok_and(|info| info.contains(&format!("port={},state=online", replica.port)))
    })
}

/// Whether a replica's link to its master is up (synced).
pub fn in_sync(replica: &RedisServer) -> bool {
    try_connect(replica)
        .and_then(|mut c| {
            redis::cmd("INFO")
                .arg("replication")
                .query::<String>(&mut c)
        })
        .is_ok_and(|info| info.contains("master_link_status:up"))
}

/// A plain connection to one node.
///
/// # Panics
///
/// When the node does not take one.
pub fn connect(node: &RedisServer) -> redis::Connection {
    try_connect(node).expect("connect to a cluster node")
}

/// A plain connection to one node, if it takes one now (a server changing
/// roles drops its clients).
fn try_connect(node: &RedisServer) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(node.url())?.get_connection()
}

/// The node's cluster id.
///
/// # Panics
///
/// When the node does not answer.
pub fn node_id(node: &RedisServer) -> String {
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query(&mut connect(node))
        .expect("CLUSTER MYID")
}

/// Whether the node is a master now (a replica is after a failover).
pub fn is_master(node: &RedisServer) -> bool {
    try_connect(node)
        .and_then(|mut c| redis::cmd("ROLE").query::<Vec<redis::Value>>(&mut c))
        .ok()
        .and_then(|r| r.into_iter().next())
        .is_some_and(|role| matches!(role, redis::Value::BulkString(b) if b == b"master"))
}

fn known_nodes(node: &RedisServer) -> usize {
    try_connect(node)
        .and_then(|mut c| redis::cmd("CLUSTER").arg("NODES").query::<String>(&mut c))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.contains("handshake") && !l.contains("noaddr"))
        .count()
}

fn wait(deadline: Instant, what: &str, mut ready: impl FnMut() -> bool) -> Result<(), String> {
    while !ready() {
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
