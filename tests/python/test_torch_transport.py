"""pgt.torch.PGTransport over gloo on CPU: PyTorch's own PGTransport tests (ported, torch_cases.py)
and pgt's, each run on every rank of a pool of WORLD gloo processes (torch_pool.py)."""

from __future__ import annotations

import secrets

import pytest

pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal (torch's TestCase.assertEqual)

from test_python_receiver import free_port  # noqa: E402
from torch_pool import Pool  # noqa: E402

WORLD = 4


@pytest.fixture(scope="module")
def pool():
    holder = {"pool": Pool(WORLD)}

    def run(name, *args, timeout=120.0):
        if holder["pool"].broken:
            holder["pool"] = Pool(WORLD)
        return holder["pool"].run(name, *args, timeout=timeout)

    yield run
    holder["pool"].close()


# PyTorch's test/distributed/checkpoint/test_pg_transport.py, PgTransportCPU (gloo), on 4 ranks.
def test_pg_transport(pool):
    pool("pg_transport")


def test_pg_transport_with_mixed_content(pool):
    pool("pg_transport_with_mixed_content")


def test_pg_transport_with_sharded_tensor(pool):
    pool("pg_transport_with_sharded_tensor")


def test_torch_cases_over_pgt_tcp_group(pool):
    """The same three cases over pgt's TCP group (pgt.tcp.TcpGroup): DTensors and ShardedTensors
    cross it and are rebuilt as over gloo."""
    pool("torch_cases_over_tcp", free_port(), secrets.token_hex(16).encode())


# pgt's own.
def test_every_dtype_bit_for_bit(pool):
    dtypes = pool("every_dtype")
    assert len(dtypes[1]) == 20 and dtypes[1] == dtypes[2] == dtypes[3]


def test_strided_and_offset_views(pool):
    pool("strided_views")


def test_nested_containers_and_values(pool):
    pool("nested_containers")


def test_unsupported_leaves_are_refused_before_sending(pool):
    pool("unsupported_leaves")


@pytest.mark.parametrize("mode", ["chain", "direct"])
def test_fanout_to_every_rank(pool, mode):
    assert pool("fanout", mode)[1:] == [1, 2, 3]


def test_small_storages_land_element_aligned(pool):
    pool("small_storages_element_aligned")


def test_in_place_with_casts_and_errors_naming_the_path(pool):
    pool("in_place")


def test_in_place_all_or_nothing_over_gloo(pool):
    pool("in_place_all_or_nothing")


def test_in_place_dtensor_and_sharded_tensor(pool):
    pool("in_place_dtensor_and_sharded")


def test_stalled_sender_times_out(pool):
    took = pool("stalled_sender")[1]
    assert took < 3.0


def test_stalled_receiver_times_out(pool):
    took = pool("stalled_receiver")[0]
    assert took < 3.0


@pytest.mark.parametrize("segment", [200_000, 40], ids=["own-part", "staged-run"])
def test_corrupted_byte_is_caught(pool, segment):
    pool("corrupted_byte", segment)


def test_stale_message_is_skipped(pool):
    pool("stale_message_skipped")
