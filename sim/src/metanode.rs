//! The quorum's metadata node under simulation (HEALING.md H19–H24): attaching the node,
//! checking what a recovery found, and what a power cut does to it. The disk itself is
//! `metadisk`; this module is where it meets the world.

use crate::ids::{Fault, Path, Rule};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ballot::drivers::quorum::durable::{MetadataOptions, OpenState};
use ballot::drivers::quorum::Quorum;

use crate::oracle::Finding;
use crate::sector::SECTOR_U64;
use crate::world::World;

use crate::metadisk::NODE;

/// Opens the metadata node for `q` as a restarted service would: until it succeeds (F29 can
/// fail it), once a second. Then I19 and P19.
pub(crate) async fn attach(w: &Arc<World>, q: &Arc<Quorum>) {
    let Some(md) = w.meta.clone() else {
        return;
    };
    let opts = MetadataOptions {
        intent_cold: Duration::from_secs(w.p.heal.intent_cold_s),
        ..MetadataOptions::default()
    };
    let mut opts = opts;
    let state = loop {
        match q.attach_metadata(NODE, md.clone(), &opts).await {
            Ok(s) => break s,
            Err(e) if e.message().contains("does not match") && w.lock().heal.swapped => {
                // F30 cut short by the power cut: the node records the quorum without the
                // swapped child, the restarted service names it again. The operator's way out
                // (H23): metadata-reset=on, a full compare.
                w.disks
                    .trace_full("qhost", "open-metadata", 0, 0, 0, 5, 0, e.to_string());
                opts.reset = true;
            }
            Err(e) => {
                w.disks
                    .trace_full("qhost", "open-metadata", 0, 0, 0, 5, 0, e.to_string());
                if !e.message().contains("F29") && !e.message().contains("could not be updated") {
                    return w.fail(Rule::Harness, format!("metadata node refused: {e}"));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    w.disks.trace_full(
        "qhost",
        "open-metadata",
        0,
        0,
        0,
        0,
        0,
        format!("{state:?}"),
    );
    if let OpenState::Recovered { extents } = state {
        if extents > 0 {
            w.log.path(Path::P19);
        }
    }
    check_recovered(w, q);
}

/// I19: wherever the power cuts since the last check could have left the children different
/// (a write in flight or unflushed on some child), the children the reopened record calls in
/// sync hold one value. Silent faults, latent sectors and faults beyond the budget are I12's.
fn check_recovered(w: &Arc<World>, q: &Arc<Quorum>) {
    let candidates = std::mem::take(&mut w.lock().crash_suspects);
    if candidates.is_empty() {
        return;
    }
    let Some(view) = q.sync_view() else {
        return w.fail(Rule::Harness, "I19: the child list was busy at open".into());
    };
    w.log.check(Rule::I19);
    let excused = w.disks.excused_set();
    let silent = w.disks.silently_damaged();
    for s in w.disks.divergent_among(&candidates) {
        if excused.contains(&s) || silent.contains(&s) {
            continue;
        }
        let at = s * SECTOR_U64;
        let in_sync: Vec<usize> = (0..view.len())
            .filter(|&i| {
                !view[i]
                    .out_of_sync
                    .iter()
                    .any(|&(o, l)| o <= at && at < o + l)
            })
            .collect();
        let copies: Vec<_> = in_sync.iter().map(|&i| w.disks.stored(i, s)).collect();
        if copies.windows(2).any(|c| c[0] != c[1]) {
            w.violate(Finding {
                rule: Rule::I19,
                op: 0,
                sector: Some(s),
                message: format!(
                    "after a power cut and recovery the children the record calls in sync ({}) differ on sector {s}:{}",
                    in_sync
                        .iter()
                        .map(|i| view[*i].node_name.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    w.disks.describe_sector(s)
                ),
            });
            return;
        }
    }
}

/// F28 at a power cut of the quorum host: the metadata disk's cache is resolved like the
/// children's, and the sectors the cut touched (`touched`, less those silent faults had
/// already damaged) become I19's suspects for the next open.
pub(crate) fn power_cut(w: &World, touched: &[u64], silent_before: &BTreeSet<u64>) {
    let Some(md) = &w.meta else {
        return;
    };
    let rates = w.p.rates.clone();
    let (intact, lost, torn) = md.crash(rates.f8, rates.f9);
    w.disks.count_injected(Fault::F28);
    w.disks.trace_full(
        "md",
        "crash",
        0,
        intact,
        lost,
        torn as i64,
        0,
        format!("F28 intact={intact} lost={lost} torn={torn}"),
    );
    let mut st = w.lock();
    st.crash_suspects.extend(
        touched
            .iter()
            .copied()
            .filter(|s| !silent_before.contains(s)),
    );
}
