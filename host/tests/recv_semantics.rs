//! What a receive writes into and what it checks, per receive: the `state_dict` provider (torch's
//! `PGTransport(..., state_dict=fn)`), writable borrowed targets filled in place, read-only targets
//! refused by key path (never a silent fresh buffer), and `expected_step` per receive.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgt_core::dtype::DType;
use pgt_core::layout::TensorLayout;
use pgt_host::memory::Buffer;
use pgt_host::pg::InProcessGroup;
use pgt_host::state_dict::{Entry, SharedBytes, StateDict, Storage, Tensor};
use pgt_host::transport::{Transport, TransportOptions};
use pgt_host::Error;

const WEIGHTS: [f32; 4] = [1.5, -2.0, 3.25, 4.0];

fn options() -> TransportOptions {
    TransportOptions {
        timeout: Duration::from_secs(20),
        ..TransportOptions::default()
    }
}

/// `{"w": float32 [4], "b": float32 [2], "note": "x"}` at `step`.
fn checkpoint(step: Option<u64>) -> StateDict<'static> {
    let mut sd = StateDict::new();
    sd.insert(
        "w",
        Entry::Tensor(Tensor::from_values(&[4], &WEIGHTS).unwrap()),
    )
    .unwrap();
    sd.insert(
        "b",
        Entry::Tensor(Tensor::from_values(&[2], &[7.0f32, 8.0]).unwrap()),
    )
    .unwrap();
    sd.insert("note", Entry::Value(pgt_core::tree::Value::Str("x".into())))
        .unwrap();
    sd.step = step;
    sd
}

/// Two ranks: rank 0 sends, rank 1 receives.
fn pair(receiver: TransportOptions) -> (Transport<InProcessGroup>, Transport<InProcessGroup>) {
    let mut ranks = InProcessGroup::new(2).into_iter();
    let sender = Transport::new(ranks.next().unwrap(), options());
    let receiver = Transport::new(ranks.next().unwrap(), receiver);
    (sender, receiver)
}

/// Sends `sd` from `sender` to rank 1 while `receive` runs on the receiving side.
fn exchange<T: Send>(
    sender: &Transport<InProcessGroup>,
    sd: &StateDict<'_>,
    receive: impl FnOnce() -> T + Send,
) -> T {
    std::thread::scope(|s| {
        let rx = s.spawn(receive);
        sender.send_checkpoint(&[1], sd).unwrap();
        rx.join().unwrap()
    })
}

fn tensor_over<'a>(dtype: DType, shape: &[u64], storage: Storage<'a>) -> Entry<'a> {
    Entry::Tensor(Tensor::new(TensorLayout::contiguous(dtype, shape), storage).unwrap())
}

#[test]
fn borrowed_mut_targets_are_filled_in_place_and_stay_borrowed() {
    let (sender, receiver) = pair(options());
    let sent = checkpoint(Some(5));
    // A model's parameter memory: "w" as float32 (same dtype), "b" as float64 (cast on receive).
    let mut w_memory = vec![0u8; 16];
    let mut b_memory = vec![0u8; 16];
    let (w_ptr, b_ptr) = (w_memory.as_ptr(), b_memory.as_ptr());
    let received = exchange(&sender, &sent, || {
        receiver.recv_checkpoint_with(
            0,
            || {
                let mut target = StateDict::new();
                let w = tensor_over(DType::Float32, &[4], Storage::BorrowedMut(&mut w_memory));
                let b = tensor_over(DType::Float64, &[2], Storage::BorrowedMut(&mut b_memory));
                target.insert("w", w).unwrap();
                target.insert("b", b).unwrap();
                target
            },
            receiver.recv_options(),
        )
    })
    .unwrap();
    assert_eq!(received.step, Some(5));
    let w = received.tensor("w").unwrap();
    let b = received.tensor("b").unwrap();
    // The received tensors are views of the same memory, as torch's are of its state_dict's.
    assert!(matches!(w.storage, Storage::BorrowedMut(_)));
    assert_eq!(w.storage.bytes().as_ptr(), w_ptr);
    assert_eq!(
        (b.dtype(), b.storage.bytes().as_ptr()),
        (DType::Float64, b_ptr)
    );
    drop(received);
    assert_eq!(w_memory, bytemuck::cast_slice::<f32, u8>(&WEIGHTS));
    assert_eq!(b_memory, bytemuck::cast_slice::<f64, u8>(&[7.0, 8.0]));
}

#[test]
fn read_only_targets_are_refused_by_key_path_and_the_link_stays_clean() {
    let (sender, receiver) = pair(options());
    let sent = checkpoint(None);
    let shared: SharedBytes = Arc::new(vec![0u8; 16]);
    let borrowed = [0u8; 8];
    let cases: [(&str, Storage<'_>, DType, u64); 2] = [
        (
            "w",
            Storage::Shared(shared.clone(), 0..16),
            DType::Float32,
            4,
        ),
        ("b", Storage::Borrowed(&borrowed), DType::Float32, 2),
    ];
    for (key, storage, dtype, numel) in cases {
        let kind = format!("{storage:?}");
        let mut target = StateDict::new();
        target
            .insert(key, tensor_over(dtype, &[numel], storage))
            .unwrap();
        let result = exchange(&sender, &sent, || {
            receiver.recv_checkpoint_into(0, &mut target)
        });
        match result {
            Err(Error::InPlaceReadOnly { path, storage }) => {
                assert_eq!(path, format!("['{key}']"));
                assert!(kind.starts_with(&format!("Storage::{storage}(")), "{kind}");
            }
            other => panic!("{key}: expected InPlaceReadOnly, got {other:?}"),
        }
        // The target is as it was: the read-only bytes untouched, nothing fresh put in their place.
        let t = target.tensor(key).unwrap();
        assert!(t.storage.bytes().iter().all(|&b| b == 0));
        assert!(!matches!(t.storage, Storage::Owned(_)), "{key}");
    }
    // The refused transfers were drained: the next receive from rank 0 gets its own checkpoint.
    let next = checkpoint(Some(9));
    let got = exchange(&sender, &next, || receiver.recv_checkpoint(0)).unwrap();
    assert_eq!(got.step, Some(9));
    assert_eq!(got.tensor("w").unwrap().to_vec::<f32>().unwrap(), WEIGHTS);
    let message = Error::InPlaceReadOnly {
        path: "w".into(),
        storage: "Shared",
    }
    .to_string();
    assert!(message.starts_with("w: cannot receive in place into a read-only storage (Shared)"));
}

#[test]
fn a_state_dict_provider_is_called_once_per_receive_and_received_into() {
    // Torch's `state_dict=` argument: buffers handed out by the provider are the ones written.
    let handed_out = Arc::new(Mutex::new(Vec::<usize>::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = {
        let (handed_out, calls) = (Arc::clone(&handed_out), Arc::clone(&calls));
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            let buffer = Buffer::zeroed(16);
            handed_out.lock().unwrap().push(buffer.as_ptr() as usize);
            let mut sd = StateDict::new();
            sd.insert(
                "w",
                tensor_over(DType::Float32, &[4], Storage::Owned(buffer)),
            )
            .unwrap();
            sd
        }
    };
    let (sender, receiver) = pair(options());
    let receiver = receiver.with_state_dict(provider);
    for step in [1, 2] {
        let got = exchange(&sender, &checkpoint(Some(step)), || {
            receiver.recv_checkpoint(0)
        })
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), step as usize);
        let w = got.tensor("w").unwrap();
        assert_eq!(w.to_vec::<f32>().unwrap(), WEIGHTS);
        let ptr = w.storage.bytes().as_ptr() as usize;
        assert_eq!(handed_out.lock().unwrap().last(), Some(&ptr));
        // "b" was not in the provider's dict: a fresh buffer.
        assert_eq!(
            got.tensor("b").unwrap().to_vec::<f32>().unwrap(),
            [7.0, 8.0]
        );
    }
}

#[test]
fn expected_step_is_per_receive_with_the_transport_option_as_default() {
    let (sender, receiver) = pair(TransportOptions {
        expected_step: Some(1),
        ..options()
    });
    assert_eq!(receiver.recv_options().expected_step, Some(1));
    let step_2 = checkpoint(Some(2));
    let mismatch = |r: pgt_host::Result<StateDict<'_>>, expected: Option<u64>| match r {
        Err(Error::Protocol(pgt_core::Error::StepMismatch { expected: e, got })) => {
            assert_eq!((e, got), (expected, Some(2)));
        }
        other => panic!("expected StepMismatch, got {other:?}"),
    };
    // The transport's default refuses step 2 ...
    mismatch(
        exchange(&sender, &step_2, || receiver.recv_checkpoint(0)),
        Some(1),
    );
    // ... this receive's own expected step refuses it too ...
    let three = receiver.recv_options().expected_step(Some(3));
    mismatch(
        exchange(&sender, &step_2, || {
            receiver.recv_checkpoint_with(0, StateDict::new, three)
        }),
        Some(3),
    );
    // ... and a receive expecting step 2, or any step, takes it: every refused one was drained.
    for expected in [Some(2), None] {
        let options = receiver.recv_options().expected_step(expected);
        let got = exchange(&sender, &step_2, || {
            receiver.recv_checkpoint_with(0, StateDict::new, options)
        })
        .unwrap();
        assert_eq!(got.step, Some(2));
        assert_eq!(got.tensor("w").unwrap().to_vec::<f32>().unwrap(), WEIGHTS);
    }
}
