//! PyTorch's three CPU tests of `PGTransport` (`test/distributed/checkpoint/test_pg_transport.py`:
//! `test_pg_transport`, `..._with_mixed_content`, `..._with_sharded_tensor`), ported: a ring of 8
//! ranks where each sends to rank + 1 while receiving from rank - 1, over the in-process group
//! (threads) and over TCP (8 processes: this test binary started again per rank, see `tcp_rank`).

use std::process::Command;

use pgt_host::prelude::*;

const WORLD: u32 = 8;

/// Deterministic values standing in for torch's seeded `randn` / `nn.Linear` init: the same on
/// every rank, as torch's tests seed every rank alike.
fn randn(seed: u64, shape: &[u64]) -> Tensor<'static> {
    let n: u64 = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| ((seed * 7919 + i * 104_729) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    Tensor::from_values(shape, &values).unwrap()
}

/// torch's `SimpleModel().state_dict()`: two `nn.Linear(10, 10)`.
fn simple_model() -> StateDict<'static> {
    [
        ("net1.weight", randn(1, &[10, 10])),
        ("net1.bias", randn(2, &[10])),
        ("net2.weight", randn(3, &[10, 10])),
        ("net2.bias", randn(4, &[10])),
    ]
    .into_iter()
    .collect()
}

/// torch's `ring_send_recv_checkpoint`.
fn ring<P: ProcessGroup>(
    transport: &Transport<P>,
    sd: &StateDict<'_>,
    rank: u32,
) -> StateDict<'static> {
    let (next, prev) = ((rank + 1) % WORLD, (rank + WORLD - 1) % WORLD);
    if rank == 0 {
        transport.send_checkpoint(&[next], sd).unwrap();
        transport.recv_checkpoint(prev).unwrap()
    } else {
        let received = transport.recv_checkpoint(prev).unwrap();
        transport.send_checkpoint(&[next], sd).unwrap();
        received
    }
}

fn pg_transport<P: ProcessGroup>(t: &Transport<P>, rank: u32) {
    let original_state_dict = simple_model();
    let received_checkpoint = ring(t, &original_state_dict, rank);
    assert_state_dict_eq!(original_state_dict, received_checkpoint);
}

fn pg_transport_with_mixed_content<P: ProcessGroup>(t: &Transport<P>, rank: u32) {
    let device_mesh = init_device_mesh("cpu", &[WORLD as u64]).unwrap();
    let dtensor =
        Entry::dtensor_from_local(randn(5, &[10, 10]), device_mesh, vec![Placement::Replicate])
            .unwrap();
    let mut state_dict = simple_model();
    state_dict.insert("dtensor", dtensor).unwrap();
    state_dict
        .insert("non-tensor", Value::Str("some string".into()))
        .unwrap();
    state_dict
        .insert_path(&["nested", "tensor"], randn(6, &[1, 2]))
        .unwrap();
    state_dict
        .insert_path(&["nested", "value"], Value::Int(42))
        .unwrap();
    state_dict
        .insert(
            "list",
            Tree::List((1..=3).map(|i| Value::Int(i).into()).collect()),
        )
        .unwrap();
    let received_checkpoint = ring(t, &state_dict, rank);
    assert_state_dict_eq!(state_dict, received_checkpoint);
}

fn pg_transport_with_sharded_tensor<P: ProcessGroup>(t: &Transport<P>, rank: u32) {
    let shard = |r: u64| ShardMetadata {
        offsets: vec![r * 8, 0],
        sizes: vec![8, 8],
        placement: format!("rank:{r}/cpu"),
    };
    let local = |r: u64| {
        Tensor::from_values(
            &[8, 8],
            &(r * 64..(r + 1) * 64).map(|v| v as f32).collect::<Vec<_>>(),
        )
        .unwrap()
    };
    let r = rank as u64;
    let global_shards = (0..WORLD as u64).map(shard).collect();
    let sharded_tensor = Entry::sharded_from_local_shards_and_global(
        vec![(local(r), shard(r))],
        global_shards,
        &[64, 8],
    )
    .unwrap();
    let state_dict: StateDict = [
        ("sharded_tensor", sharded_tensor),
        (
            "rank_scalar",
            Tensor::from_values(&[], &[rank as f32]).unwrap().into(),
        ),
    ]
    .into_iter()
    .collect();
    let received_checkpoint = ring(t, &state_dict, rank);
    let prev = (r + WORLD as u64 - 1) % WORLD as u64;
    let expected_rank_scalar = Tensor::from_values(&[], &[prev as f32]).unwrap();
    assert!(received_checkpoint.tensor("rank_scalar") == Some(&expected_rank_scalar));
    let Some(Entry::Sharded { local_shards, .. }) = received_checkpoint.get("sharded_tensor")
    else {
        panic!(
            "not a ShardedTensor: {:?}",
            received_checkpoint.get("sharded_tensor")
        )
    };
    assert!(local_shards[0].0 == local(prev));
}

/// One rank's part of a test, given its transport and rank.
type Case = fn(&Transport<Box<dyn ProcessGroup>>, u32);

const CASES: [(&str, Case); 3] = [
    ("pg_transport", pg_transport),
    (
        "pg_transport_with_mixed_content",
        pg_transport_with_mixed_content,
    ),
    (
        "pg_transport_with_sharded_tensor",
        pg_transport_with_sharded_tensor,
    ),
];

fn case(name: &str) -> Case {
    CASES.iter().find(|(n, _)| *n == name).unwrap().1
}

/// The ring over the in-process group: one thread per rank.
fn in_process(name: &str) {
    let run = case(name);
    std::thread::scope(|s| {
        for pg in InProcessGroup::new(WORLD) {
            s.spawn(move || {
                let rank = pg.rank();
                let pg: Box<dyn ProcessGroup> = Box::new(pg);
                run(&Transport::new(pg, TransportOptions::default()), rank)
            });
        }
    });
}

/// The ring over TCP: 8 processes, each this binary running `tcp_rank`.
fn tcp(name: &str) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..WORLD)
        .map(|rank| {
            Command::new(&exe)
                .args([
                    "tcp_rank",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("PGT_TORCH_PORT", format!("{name} {rank} {port}"))
                .output_spawn()
        })
        .collect();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "rank {rank}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "rank {rank} ran no test"
        );
    }
}

trait SpawnPiped {
    fn output_spawn(&mut self) -> std::process::Child;
}

impl SpawnPiped for Command {
    fn output_spawn(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// One rank of [`tcp`]: `PGT_TORCH_PORT` = "<case> <rank> <port>".
#[test]
#[ignore = "a rank of the TCP tests, started by them"]
fn tcp_rank() {
    let spec = std::env::var("PGT_TORCH_PORT").expect("started by a TCP test");
    let [name, rank, port] = spec.split(' ').collect::<Vec<_>>()[..] else {
        panic!("bad PGT_TORCH_PORT {spec:?}")
    };
    let rank: u32 = rank.parse().unwrap();
    let pg = TcpProcessGroup::connect(pgt_host::pg::TcpOptions {
        master_addr: "127.0.0.1".into(),
        master_port: port.parse().unwrap(),
        rank,
        world_size: WORLD,
        token: b"torch-port".to_vec(),
        timeout: std::time::Duration::from_secs(30),
        listen_host: None,
    })
    .unwrap();
    let pg: Box<dyn ProcessGroup> = Box::new(pg);
    case(name)(&Transport::new(pg, TransportOptions::default()), rank);
}

#[test]
fn test_pg_transport() {
    in_process("pg_transport");
    tcp("pg_transport");
}

#[test]
fn test_pg_transport_with_mixed_content() {
    in_process("pg_transport_with_mixed_content");
    tcp("pg_transport_with_mixed_content");
}

#[test]
fn test_pg_transport_with_sharded_tensor() {
    in_process("pg_transport_with_sharded_tensor");
    tcp("pg_transport_with_sharded_tensor");
}
