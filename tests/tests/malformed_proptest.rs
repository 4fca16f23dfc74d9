//! Malformed input never panics: truncated, bit-flipped and spliced copies of the real
//! model files either import (and then verify, print, export and re-import to the same
//! IR) or fail with a typed error.

use cellgraph::ir::onnx::Model;
use cellgraph::ir::{print_graph, verify};
use cellgraph_tests::{conformance_dir, onnx_models};
use proptest::prelude::*;
use std::sync::OnceLock;

fn corpus() -> &'static Vec<Vec<u8>> {
    static C: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    C.get_or_init(|| {
        onnx_models(&conformance_dir())
            .iter()
            .map(|p| std::fs::read(p).expect("read model"))
            .collect()
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    Set(usize, u8),
    Splice {
        at: usize,
        len: usize,
        donor: usize,
        from: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1u8..=255).prop_map(|(p, m)| Mutation::Flip(p, m)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        (any::<usize>(), 0usize..64, any::<usize>(), any::<usize>()).prop_map(
            |(at, len, donor, from)| Mutation::Splice {
                at,
                len,
                donor,
                from
            }
        ),
    ]
}

fn apply(mut bytes: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    let c = corpus();
    for m in muts {
        if bytes.is_empty() {
            break;
        }
        let n = bytes.len();
        match *m {
            Mutation::Truncate(p) => bytes.truncate(p % n),
            Mutation::Flip(p, mask) => bytes[p % n] ^= mask,
            Mutation::Set(p, b) => bytes[p % n] = b,
            Mutation::Splice {
                at,
                len,
                donor,
                from,
            } => {
                let d = &c[donor % c.len()];
                let from = from % d.len();
                let len = len.min(d.len() - from);
                let at = at % n;
                bytes.splice(at..at, d[from..from + len].iter().copied());
            }
        }
    }
    bytes
}

fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    // Ok or a typed error; a panic fails the property.
    if let Ok(m) = Model::from_bytes(bytes) {
        if verify(&m.graph).is_ok() {
            let text = print_graph(&m.graph);
            let again = Model::from_bytes(&m.to_bytes());
            prop_assert!(
                again.is_ok(),
                "an imported, verified model must re-import: {:?}",
                again.err()
            );
            let again = again.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(text, print_graph(&again.graph));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn mutated_models_import_or_fail_cleanly(idx in any::<usize>(), muts in prop::collection::vec(mutation(), 1..4)) {
        let c = corpus();
        let bytes = apply(c[idx % c.len()].clone(), &muts);
        check(&bytes)?;
    }

    #[test]
    fn every_prefix_of_a_model_imports_or_fails_cleanly(idx in any::<usize>(), cut in any::<usize>()) {
        let c = corpus();
        let b = &c[idx % c.len()];
        check(&b[..cut % (b.len() + 1)])?;
    }
}
