//! proptest state machine: the COLO overlay chain A → H → S against the model of
//! `ballot_check::overlay` (REPLICATION.md R42–R52) over sequences of guest writes, write-zeroes,
//! discards, reads, block status, forwarded writes, checkpoints, and commits of the chain and of
//! H alone, in memory and file mode. proptest shrinks a failure to its shortest sequence.

use ballot_check::overlay::{check_view, step, Chain, ChainModel, Op, Range};
use proptest::prelude::*;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};

/// The reference: the mode and the model.
#[derive(Debug, Clone)]
struct RefChain {
    file: bool,
    model: ChainModel,
}

struct OverlayRef;

fn range() -> impl Strategy<Value = Range> {
    (any::<u32>(), any::<u32>(), prop::bool::weighted(0.2)).prop_map(|(start, len, fine)| Range {
        start,
        len,
        fine,
    })
}

impl ReferenceStateMachine for OverlayRef {
    type State = RefChain;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<RefChain> {
        any::<bool>()
            .prop_map(|file| RefChain {
                file,
                model: ChainModel::new(),
            })
            .boxed()
    }

    fn transitions(_: &RefChain) -> BoxedStrategy<Op> {
        prop_oneof![
            4 => (range(), 1..=255u8).prop_map(|(r, b)| Op::Write(r, b)),
            2 => (range(), any::<bool>()).prop_map(|(r, u)| Op::WriteZeroes(r, u)),
            1 => range().prop_map(Op::Discard),
            3 => range().prop_map(Op::Read),
            2 => range().prop_map(Op::Status),
            3 => (range(), any::<u8>()).prop_map(|(r, b)| Op::Forward(r, b)),
            1 => Just(Op::Checkpoint),
            1 => Just(Op::EmptyActive),
            1 => Just(Op::CommitAll),
            1 => Just(Op::CommitHidden),
        ]
        .boxed()
    }

    fn apply(mut state: RefChain, op: &Op) -> RefChain {
        state.model.apply(*op);
        state
    }
}

struct OverlaySut {
    chain: Chain,
    model: ChainModel,
    rt: tokio::runtime::Runtime,
    steps: usize,
}

impl StateMachineTest for OverlaySut {
    type SystemUnderTest = OverlaySut;
    type Reference = OverlayRef;

    fn init_test(r: &RefChain) -> OverlaySut {
        OverlaySut {
            chain: Chain::open(r.file),
            model: r.model.clone(),
            rt: ballot_check::rt::runtime(),
            steps: 0,
        }
    }

    fn apply(mut sut: OverlaySut, _: &RefChain, op: Op) -> OverlaySut {
        let ctx = format!("step {} {op:?}", sut.steps);
        sut.rt.block_on(step(&sut.chain, &mut sut.model, op, &ctx));
        sut.steps += 1;
        sut
    }

    fn check_invariants(sut: &OverlaySut, r: &RefChain) {
        assert_eq!(
            sut.model.allocated(),
            r.model.allocated(),
            "the two models diverged"
        );
        assert_eq!(
            sut.model.view(0, ballot_check::overlay::DISK_BYTES),
            r.model.view(0, ballot_check::overlay::DISK_BYTES)
        );
    }

    fn teardown(sut: OverlaySut) {
        sut.rt
            .block_on(check_view(&sut.chain, &sut.model, "teardown"));
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]
    #[test]
    fn overlay_chain_matches_the_model(sequential 1..48 => OverlaySut);
}
