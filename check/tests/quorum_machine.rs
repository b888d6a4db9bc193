//! proptest state machine: a quorum over fault-injectable children against the model of
//! `ballot_check::quorum_model` (QUORUM.md Q16–Q41, Q47–Q51, Q57) over sequences of writes,
//! write-zeroes, reads and flushes with read, write and flush errors, lost writes and silent
//! corruption injected between them, for any valid configuration (children 1–5, any
//! threshold, quorum or fifo, with and without rewrite-corrupted). Each step's result, events
//! in order and every child's bytes are checked; the out-of-sync report at the end.

use ballot::ErrorKind;
use ballot_check::child::Faults;
use ballot_check::quorum_model::{Config, QuorumModel, QuorumRig, Step, DISK_BYTES};
use proptest::prelude::*;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};

struct QuorumRef;

const SECTORS: u64 = DISK_BYTES / 512;
const KINDS: [ErrorKind; 4] = [
    ErrorKind::Io,
    ErrorKind::NoSpc,
    ErrorKind::Perm,
    ErrorKind::Inval,
];

fn kind() -> impl Strategy<Value = Option<ErrorKind>> {
    prop_oneof![3 => Just(None), 1 => prop::sample::select(&KINDS[..]).prop_map(Some)]
}

fn extent() -> impl Strategy<Value = (u64, u64)> {
    (0..SECTORS, 1..=16u64).prop_map(|(s, n)| (s.min(SECTORS - n), n))
}

impl ReferenceStateMachine for QuorumRef {
    type State = QuorumModel;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<QuorumModel> {
        (1..=5usize)
            .prop_flat_map(|n| (Just(n), 1..=n, any::<bool>(), any::<bool>()))
            .prop_map(|(children, threshold, fifo, rewrite)| {
                QuorumModel::new(Config {
                    children,
                    threshold,
                    fifo,
                    rewrite,
                })
            })
            .boxed()
    }

    fn transitions(m: &QuorumModel) -> BoxedStrategy<Step> {
        let n = m.config.children;
        prop_oneof![
            4 => (extent(), any::<u8>(), any::<bool>()).prop_map(|((sector, sectors), byte, fua)| {
                Step::Write { sector, sectors, byte, fua }
            }),
            1 => extent().prop_map(|(sector, sectors)| Step::WriteZeroes { sector, sectors }),
            5 => extent().prop_map(|(sector, sectors)| Step::Read { sector, sectors }),
            1 => Just(Step::Flush),
            2 => (0..n, kind(), kind(), kind(), prop::bool::weighted(0.15)).prop_map(
                |(child, read, write, flush, lose_writes)| Step::Fault {
                    child,
                    faults: Faults { read, read_range: None, write, flush, lose_writes },
                }
            ),
            2 => (0..n, 0..DISK_BYTES, 1..=255u8)
                .prop_map(|(child, at, mask)| Step::Corrupt { child, at, mask }),
        ]
        .boxed()
    }

    fn apply(mut m: QuorumModel, step: &Step) -> QuorumModel {
        m.apply(step);
        m
    }
}

struct QuorumSut;

impl StateMachineTest for QuorumSut {
    type SystemUnderTest = QuorumRig;
    type Reference = QuorumRef;

    fn init_test(m: &QuorumModel) -> QuorumRig {
        QuorumRig::new(m.config)
    }

    fn apply(mut rig: QuorumRig, _: &QuorumModel, step: Step) -> QuorumRig {
        rig.apply(&step);
        rig
    }

    fn check_invariants(rig: &QuorumRig, m: &QuorumModel) {
        assert_eq!(rig.model.mem, m.mem, "the two models diverged");
    }

    fn teardown(rig: QuorumRig) {
        rig.check_out_of_sync();
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]
    #[test]
    fn quorum_matches_the_model_under_faults(sequential 1..40 => QuorumSut);
}
