//! What keeping the last transfer's metadata saves: a dict of many small tensors (10,000 float32
//! `[4]` tensors and 220 values, so the metadata is most of the work) sent over the in-process group,
//! each transfer by a new `Transport` pair (nothing kept: every transfer is a pair's first) against
//! one pair sending it again and again at a new step (the sender encodes only the step, the receiver
//! does not decode the metadata again). Fresh receive and in place.
//!
//! `cargo run --release -p pgt-host --example repeat_bench` prints one JSON line per receive kind;
//! times are medians of 31 transfers, the two ways alternating.

use std::time::Instant;

use pgt_host::pg::InProcessGroup;
use pgt_host::state_dict::{Entry, StateDict, Tensor};
use pgt_host::transport::{Transport, TransportOptions};
use pgt_host::Value;

const TENSORS: usize = 10_000;
const VALUES: usize = 220;
const RUNS: usize = 31;

fn dict() -> anyhow::Result<StateDict<'static>> {
    let mut sd = StateDict::new();
    for i in 0..TENSORS {
        let t = Tensor::from_values(&[4], &[i as f32, 1.0, 2.0, 3.0])?;
        sd.insert(
            format!("layers.{}.block.{}.weight", i / 16, i % 16),
            Entry::Tensor(t),
        )?;
    }
    for i in 0..VALUES {
        sd.insert(format!("optim.param_groups.{i}.lr"), Value::Float(1e-3))?;
    }
    Ok(sd)
}

type Pair = (Transport<InProcessGroup>, Transport<InProcessGroup>);

fn pair() -> Pair {
    let mut ranks = InProcessGroup::new(2).into_iter();
    let (a, b) = (ranks.next().unwrap(), ranks.next().unwrap());
    let options = TransportOptions::default();
    (
        Transport::new(a, options.clone()),
        Transport::new(b, options),
    )
}

/// One transfer of `sd` at `step` over `pair`, into `target` in place when given: its seconds.
fn transfer(
    (sender, receiver): &Pair,
    sd: &mut StateDict<'static>,
    step: u64,
    target: Option<&mut StateDict<'static>>,
) -> anyhow::Result<f64> {
    sd.step = Some(step);
    let start = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let rx = s.spawn(|| match target {
            Some(target) => receiver.recv_checkpoint_into(0, target).map(drop),
            None => receiver.recv_checkpoint(0).map(drop),
        });
        sender.send_checkpoint(&[1], sd)?;
        rx.join().expect("the receiving thread")?;
        Ok(())
    })?;
    Ok(start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut sd = dict()?;
    for in_place in [false, true] {
        let mut target = in_place.then(|| sd.clone());
        let kept = pair();
        transfer(&kept, &mut sd, 0, target.as_mut())?;
        let (mut new, mut again) = (Vec::new(), Vec::new());
        for run in 1..=RUNS as u64 {
            new.push(transfer(&pair(), &mut sd, run, target.as_mut())?);
            again.push(transfer(&kept, &mut sd, run, target.as_mut())?);
        }
        let (new, again) = (median(new) * 1e3, median(again) * 1e3);
        println!(
            "{{\"receive\":\"{}\",\"tensors\":{TENSORS},\"values\":{VALUES},\"new_pair_ms\":{new:.2},\"kept_ms\":{again:.2},\"ratio\":{:.2}}}",
            if in_place { "in-place" } else { "fresh" },
            again / new
        );
    }
    Ok(())
}
