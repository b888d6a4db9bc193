//! ballot-sim: the deterministic simulator of SIMULATION.md.
//!
//! The pure parts — sector codec ([`sector`]), seeded streams ([`rng`]), parameters
//! ([`params`]), the scenario parser ([`scenario`]), the oracle ([`oracle`]) and the virtual
//! disk ([`vdisk`]) — compile in both builds and are unit-tested by plain `cargo test`. The
//! runtime ([`world`]), the command line ([`cli`]) and sweeps ([`sweep`]) need madsim: build
//! them with `cargo sim ...` (`--cfg madsim`, own target directory, W1).

pub mod childimage;
pub mod crash;
pub mod diskstate;
pub mod ids;
pub mod imagedisk;
pub mod junit;
pub mod ledger;
pub mod measure;
pub mod oplog;
pub mod oracle;
pub mod outcome;
pub mod params;
pub mod progress;
pub mod report;
pub mod rng;
pub mod runlog;
pub mod scenario;
pub mod sector;
pub mod trace;
pub mod units;
pub mod vdisk;
pub mod verdict;
pub mod vfaults;
pub mod votemodel;

#[cfg(madsim)]
pub mod cli;
#[cfg(madsim)]
pub mod colo;
#[cfg(madsim)]
pub mod console;
#[cfg(madsim)]
pub mod heal;
#[cfg(madsim)]
pub mod healcheck;
#[cfg(madsim)]
pub mod healstate;
#[cfg(madsim)]
pub mod image;
#[cfg(madsim)]
pub mod metadisk;
#[cfg(madsim)]
pub mod metanode;
#[cfg(madsim)]
pub mod net;
#[cfg(madsim)]
pub mod netmodel;
#[cfg(madsim)]
pub mod nodes;
#[cfg(madsim)]
pub mod quorum;
#[cfg(madsim)]
pub mod runner;
#[cfg(madsim)]
pub mod sweep;
#[cfg(madsim)]
pub mod topology;
#[cfg(madsim)]
pub mod world;
