//! A bounded fuzz test of checkpoint loading: real checkpoints (router state and model
//! variables) mutated at random with a fixed seed (truncated, bits flipped in the length prefix,
//! the header and the data, bytes overwritten, inserted and deleted, replaced by other file
//! types). Every load must either fail, leaving the router and the model exactly as they were,
//! or succeed with exactly the state of the unmutated file (a mutation can be harmless, e.g. a
//! byte overwritten with its own value). Never a panic.

mod checkpoint_support;

use std::fs;

use caseopt::{load_training, save_training, Checkpoint, Error};
use checkpoint_support::{
    bop_adam, model, model_values, scratch_dir, snapshot, train, ModelSpec, Rng,
};
use tch::Tensor;

/// Mutated files per run: a few hundred keeps the test well under a second of loading.
const CASES: usize = 600;
/// Change it to explore other mutations; failures print the case number to reproduce.
const SEED: u64 = 0x5eed_c0de;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    Truncate,
    FlipLengthBit,
    FlipHeaderBit,
    FlipDataBit,
    OverwriteByte,
    FlipSeveralBits,
    InsertBytes,
    DeleteBytes,
    AppendGarbage,
    OtherFile,
}

const MUTATIONS: [Mutation; 10] = [
    Mutation::Truncate,
    Mutation::FlipLengthBit,
    Mutation::FlipHeaderBit,
    Mutation::FlipDataBit,
    Mutation::OverwriteByte,
    Mutation::FlipSeveralBits,
    Mutation::InsertBytes,
    Mutation::DeleteBytes,
    Mutation::AppendGarbage,
    Mutation::OtherFile,
];

/// Files of other types, and safetensors files that are not caseopt checkpoints.
fn other_file(rng: &mut Rng, plain_safetensors: &[u8]) -> Vec<u8> {
    let mut random = |n: usize| (0..n).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>();
    match random(1)[0] % 7 {
        0 => Vec::new(),
        1 => [b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".as_slice(), &random(64)].concat(),
        2 => br#"{"format":"caseopt-checkpoint","version":1}"#.to_vec(),
        3 => [b"PK\x03\x04".as_slice(), &random(100)].concat(),
        4 => plain_safetensors.to_vec(),
        5 => {
            // A plausible length prefix followed by non-JSON.
            let mut f = 16u64.to_le_bytes().to_vec();
            f.extend(random(40));
            f
        }
        _ => random(300),
    }
}

fn mutate(rng: &mut Rng, base: &[u8], header_end: usize, plain: &[u8]) -> (Mutation, Vec<u8>) {
    let m = MUTATIONS[rng.below(MUTATIONS.len())];
    let mut f = base.to_vec();
    let flip = |f: &mut Vec<u8>, rng: &mut Rng, lo: usize, hi: usize| {
        let i = lo + rng.below(hi - lo);
        f[i] ^= 1 << rng.below(8);
    };
    match m {
        Mutation::Truncate => f.truncate(rng.below(base.len())),
        Mutation::FlipLengthBit => flip(&mut f, rng, 0, 8),
        Mutation::FlipHeaderBit => flip(&mut f, rng, 8, header_end),
        Mutation::FlipDataBit => flip(&mut f, rng, header_end, base.len()),
        Mutation::OverwriteByte => {
            let i = rng.below(f.len());
            f[i] = rng.next_u64() as u8;
        }
        Mutation::FlipSeveralBits => {
            for _ in 0..2 + rng.below(7) {
                flip(&mut f, rng, 0, base.len());
            }
        }
        Mutation::InsertBytes => {
            let at = rng.below(f.len() + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            f.splice(at..at, bytes);
        }
        Mutation::DeleteBytes => {
            let at = rng.below(f.len());
            let n = (1 + rng.below(16)).min(f.len() - at);
            f.drain(at..at + n);
        }
        Mutation::AppendGarbage => {
            let n = 1 + rng.below(64);
            f.extend((0..n).map(|_| rng.next_u64() as u8));
        }
        Mutation::OtherFile => f = other_file(rng, plain),
    }
    (m, f)
}

#[test]
fn mutated_checkpoints_fail_cleanly_or_load_exactly() {
    let dir = scratch_dir("fuzz");
    let spec = ModelSpec::default();

    // The checkpoint to mutate: 5 steps of training, router and model.
    let vs_src = model(&spec);
    let mut src = bop_adam(&vs_src);
    train(&mut src, &vs_src, 0..5, None);
    let base_path = dir.join("base.safetensors");
    save_training(&base_path, &vs_src, &src).unwrap();
    let base = fs::read(&base_path).unwrap();
    let header_end = 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let plain_path = dir.join("plain.safetensors");
    Tensor::write_safetensors(&[("w", Tensor::ones([3], tch::kind::FLOAT_CPU))], &plain_path)
        .unwrap();
    let plain = fs::read(&plain_path).unwrap();

    // What a successful load must produce: the source's state exactly.
    let (expected_router, expected_model) = (snapshot(&src), model_values(&vs_src));

    // The target trained on other gradients, so that any partial load would show.
    let vs = model(&ModelSpec { seed: 3, ..spec });
    let mut target = bop_adam(&vs);
    train(&mut target, &vs, 100..103, None);
    let own_path = dir.join("own.safetensors");
    save_training(&own_path, &vs, &target).unwrap();
    let (before_router, before_model) = (snapshot(&target), model_values(&vs));

    let mut rng = Rng::new(SEED);
    let path = dir.join("mutated.safetensors");
    let mut outcomes: Vec<(Mutation, usize, usize)> =
        MUTATIONS.iter().map(|&m| (m, 0, 0)).collect();
    for case in 0..CASES {
        let (mutation, bytes) = mutate(&mut rng, &base, header_end, &plain);
        fs::write(&path, &bytes).unwrap();
        // Alternate the two loaders: both validate the whole file.
        let result = if case % 2 == 0 {
            load_training(&path, &vs, &mut target)
        } else {
            target.load_checkpoint(&path)
        };
        let tally = outcomes.iter_mut().find(|(m, _, _)| *m == mutation).unwrap();
        match result {
            Err(err) => {
                tally.1 += 1;
                assert!(
                    matches!(err, Error::BadCheckpoint { .. }),
                    "case {case} ({mutation:?}): unexpected error kind {err}"
                );
                assert!(
                    snapshot(&target) == before_router && model_values(&vs) == before_model,
                    "case {case} ({mutation:?}): a failed load changed something ({err})"
                );
            }
            Ok(()) => {
                tally.2 += 1;
                assert_eq!(
                    snapshot(&target),
                    expected_router,
                    "case {case} ({mutation:?}) loaded a different router state"
                );
                if case % 2 == 0 {
                    assert_eq!(model_values(&vs), expected_model, "case {case} ({mutation:?})");
                }
                // Back to the target's own state for the next case.
                load_training(&own_path, &vs, &mut target).unwrap();
                assert!(snapshot(&target) == before_router && model_values(&vs) == before_model);
            }
        }
    }
    eprintln!("(mutation, refused, loaded): {outcomes:?}");
    // CRC-32 detects every single-bit error, and safetensors' length and offset checks every
    // change of size: these mutations can never load.
    for (m, _, loaded) in &outcomes {
        if matches!(
            m,
            Mutation::FlipLengthBit
                | Mutation::FlipHeaderBit
                | Mutation::FlipDataBit
                | Mutation::Truncate
                | Mutation::InsertBytes
                | Mutation::DeleteBytes
                | Mutation::AppendGarbage
                | Mutation::OtherFile
        ) {
            assert_eq!(*loaded, 0, "{m:?} loaded");
        }
    }
    // Every kind of mutation was tried.
    assert!(outcomes.iter().all(|(_, refused, loaded)| refused + loaded > 0), "{outcomes:?}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_single_bit_flip_of_a_small_checkpoint_is_refused() {
    // Exhaustive over every byte of a real checkpoint (one step, the smallest model): no
    // position in the file is unprotected.
    let dir = scratch_dir("flips");
    let vs = model(&ModelSpec { hidden: 1, ..Default::default() });
    let mut src = bop_adam(&vs);
    train(&mut src, &vs, 0..1, None);
    let path = dir.join("small.safetensors");
    src.save_checkpoint(&path).unwrap();
    let base = fs::read(&path).unwrap();
    let before = snapshot(&src);
    let mutated = dir.join("flipped.safetensors");
    // Every byte, one bit each (the bit varies with the position), bounded by the file size.
    for (i, _) in base.iter().enumerate() {
        let mut f = base.clone();
        f[i] ^= 1 << (i % 8);
        fs::write(&mutated, &f).unwrap();
        let err = src.load_checkpoint(&mutated);
        assert!(err.is_err(), "flipping bit {} of byte {i} went unnoticed", i % 8);
    }
    assert_eq!(snapshot(&src), before);
    fs::remove_dir_all(dir).unwrap();
}
