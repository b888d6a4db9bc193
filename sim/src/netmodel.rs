//! The network model of quorum over NBD (SIMULATION.md §3 Network): where replicas listen,
//! the partitions in force (F13, F15) and each replica's process and connection state (F14,
//! F16, F17). Plain state: the fault actions that change it live in `net`, which owns the
//! world; this module imports nothing of the simulator but the fault ids.

use crate::ids::Fault;

/// The port every replica's NBD server listens on.
pub const NBD_PORT: u16 = 10809;

/// The IP address of replica `i`.
pub fn replica_ip(i: usize) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 1, 1 + i as u8))
}

/// How a partition cuts a replica off (F13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Both directions between qhost and the replica.
    Both,
    /// qhost to replica only (requests stall, replies flow).
    In,
    /// Replica to qhost only (requests land, replies stall).
    Out,
    /// The replica's node clogged both ways.
    Isolate,
}

impl Cut {
    /// The scenario spelling.
    pub fn parse(s: &str) -> Cut {
        match s {
            "in" => Cut::In,
            "out" => Cut::Out,
            "isolate" => Cut::Isolate,
            _ => Cut::Both,
        }
    }
}

/// A partition in force on one replica.
#[derive(Debug, Clone, Copy)]
pub struct LiveCut {
    /// Which directions are cut.
    pub kind: Cut,
    /// The fault family (F13, or one step of F15).
    pub family: Fault,
    /// The report's mark of the fault, ended at the heal.
    pub mark: usize,
}

/// Per-replica state of the network and the replica's process.
#[derive(Debug, Clone, Default)]
pub struct Replica {
    /// The madsim node.
    pub node: Option<madsim::task::NodeId>,
    /// Process incarnation (bumped by every restart).
    pub incarnation: u64,
    /// Server connections accepted so far in this incarnation.
    pub accepted: u64,
    /// The connection of the live qhost's client: the newest one accepted, until qhost
    /// crashes (its connections may still deliver writes, but no client waits for them).
    pub current: Option<u64>,
    /// Connections of this incarnation still open, by sequence number.
    pub open: std::collections::BTreeSet<u64>,
    /// The live partition, if any.
    pub cut: Option<LiveCut>,
    /// Paused (F17).
    pub paused: bool,
    /// Crashed and not yet restarted (F16).
    pub crashed: bool,
}

impl Replica {
    /// Whether connection `conn` of incarnation `inc` is stale: a newer one was accepted, so
    /// its client gave it up.
    pub fn stale(&self, inc: u64, conn: u64) -> bool {
        inc != self.incarnation || self.current != Some(conn)
    }

    /// Open connections other than the live client's.
    pub fn stale_open(&self) -> usize {
        self.open
            .iter()
            .filter(|&&c| self.current != Some(c))
            .count()
    }

    pub(crate) fn down(&self) -> bool {
        self.down_family().is_some()
    }

    /// The fault family that has the replica down now (the report charges it too).
    pub(crate) fn down_family(&self) -> Option<Fault> {
        if self.crashed {
            Some(Fault::F16)
        } else if self.paused {
            Some(Fault::F17)
        } else if let Some(c) = &self.cut {
            Some(c.family)
        } else if self.stale_open() > 0 {
            // A connection its client gave up is still open (N43): F14's state.
            Some(Fault::F14)
        } else {
            None
        }
    }
}
