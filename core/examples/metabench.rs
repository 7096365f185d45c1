//! Metadata benchmark: encode and decode (+ validation) of the reference dict's metadata.
//!
//! `cargo run --release -p pgt-core --example metabench` prints one JSON line. Times are the median of
//! several runs, so a noisy neighbour on a 2-core machine does not decide the figure.

use std::time::Instant;

use pgt_core::codec::{decode, encode};
use pgt_core::header::{Header, Limits};
use pgt_core::manifest::Manifest;
use pgt_core::reference::reference_metadata;
use pgt_core::schema::PlanParams;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let limits = Limits::default();
    let metadata = reference_metadata(0, vec![1], PlanParams::default());
    let leaves = metadata.leaves.len();
    let manifest = Manifest::new(metadata.clone(), true, &limits).expect("reference dict is valid");
    let tensors = manifest.storages().len();
    let (mut encode_ms, mut decode_ms) = (Vec::new(), Vec::new());
    let mut meta_bytes = 0;
    for _ in 0..15 {
        // Encode includes building the validated manifest from the caller's metadata, as a sender does.
        let t = Instant::now();
        let manifest = Manifest::new(metadata.clone(), true, &limits).unwrap();
        let (header, bytes) = encode(&manifest, 1).unwrap();
        let header_bytes = header.to_bytes();
        encode_ms.push(t.elapsed().as_secs_f64() * 1e3);
        meta_bytes = bytes.len();
        let t = Instant::now();
        let header = Header::parse(&header_bytes, &limits).unwrap();
        let decoded = decode(&header, &bytes, &limits).unwrap();
        decode_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(decoded.metadata(), manifest.metadata());
    }
    println!(
        "{{\"leaves\":{leaves},\"tensors\":{tensors},\"meta_bytes\":{meta_bytes},\"encode_ms\":{:.3},\"decode_ms\":{:.3}}}",
        median(encode_ms),
        median(decode_ms)
    );
}
