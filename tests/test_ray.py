"""Ray Data: ``map_batches(FlightQuantizer, ...)`` across two real flightquant servers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import flightquant as fq
from flightquant.ray_data import FlightDequantizer, FlightQuantizer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
N_TENSORS = 240


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    # the workers import flightquant from this checkout, installed or not
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", path)
        mp.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        # a busy 2-core CI machine once took longer than Ray's default 10 s to register the
        # raylet ("The current node timed out during startup"; ray-project/ray#47087)
        mp.setenv("RAY_raylet_start_wait_time_s", "60")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            ignore_reinit_error=True,
        )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def servers():
    with fq.Server("grpc://127.0.0.1:0") as a, fq.Server("grpc://127.0.0.1:0") as b:
        yield a, b


def tensors_table() -> pa.Table:
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 3000, N_TENSORS)
    rows = [rng.standard_normal(int(n)).astype(np.float32) for n in sizes]
    return pa.table(
        {
            "layer_name": [f"layer.{i:04d}.weight" for i in range(N_TENSORS)],
            "weights": pa.array(rows, pa.list_(pa.float32())),
            "shape": pa.array([[int(n)] for n in sizes], pa.list_(pa.int64())),
        }
    )


def _collect(ds) -> pa.Table:
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables).sort_by("layer_name").combine_chunks()


def test_map_batches_across_two_servers(ray_local, servers):
    ray = ray_local
    table = tensors_table()
    # eight blocks, without a repartition (its tasks would wait for CPUs the actors hold)
    ds = ray.data.from_arrow([table.slice(i, 30) for i in range(0, N_TENSORS, 30)])
    locations = [s.location for s in servers]
    options = {"bits": 4, "group_size": 64, "scheme": "symmetric"}
    q = ds.map_batches(
        FlightQuantizer,
        fn_constructor_kwargs={"locations": locations, **options},
        batch_format="pyarrow",
        batch_size=16,
        compute=ray.data.ActorPoolStrategy(size=2),  # `concurrency=2` on Ray >= 2.9
        num_cpus=0.5,
    )
    got = _collect(q)
    expected = fq.quantize(table, **options).combine_chunks()
    assert got.num_rows == N_TENSORS
    assert got.schema.equals(expected.schema, check_metadata=True)
    assert got.equals(expected)
    served = [s.stats()["batches"] for s in servers]
    assert all(n > 0 for n in served), served  # both servers did work
    assert sum(served) >= N_TENSORS // 16

    # and back, in-process this time (no locations)
    qds = ray.data.from_arrow([got.slice(i, 60) for i in range(0, N_TENSORS, 60)])
    back = _collect(
        qds.map_batches(
            FlightDequantizer,
            batch_format="pyarrow",
            batch_size=32,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.5,
        )
    )
    assert back.equals(fq.dequantize(expected).combine_chunks())


def test_in_process_callable_without_ray_actors():
    table = tensors_table().slice(0, 20)
    f = FlightQuantizer(bits=8, max_batch_bytes=1000)  # many small batches
    assert f(table).equals(fq.quantize(table, bits=8))
    assert f(table.slice(0, 0)).num_rows == 0
    with pytest.raises(fq.OptionsError, match="bits"):
        FlightQuantizer(bits=3)
    with pytest.raises(TypeError, match="batch_format='pyarrow'"):
        f({"layer_name": ["x"]})
    assert "token" not in repr(FlightQuantizer("grpc://127.0.0.1:1", token="secret", bits=4))


def test_callable_fails_over_to_a_live_server(servers):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"grpc://127.0.0.1:{sock.getsockname()[1]}"
    table = tensors_table().slice(0, 40)
    f = FlightQuantizer([dead, servers[0].location], bits=2, group_size=32, max_batch_bytes=20_000)
    for _ in range(3):  # the client starts at each location in turn
        assert f(table).equals(fq.quantize(table, bits=2, group_size=32))
    f.close()


def activations_table(n_rows: int = 64) -> pa.Table:
    rng = np.random.default_rng(11)
    widths = {"blk.0.attn_q.weight": 32, "blk.0.ffn_down.weight": 80}
    names, rows, shapes = [], [], []
    for i in range(n_rows):
        name = list(widths)[i % 2]
        tokens = int(rng.integers(1, 20))
        rows.append(rng.standard_normal((tokens, widths[name])).astype(np.float32).reshape(-1))
        names.append(name)
        shapes.append([tokens, widths[name]])
    return pa.table(
        {
            "layer_name": names,
            "acts": pa.array(rows, pa.list_(pa.float32())),
            "shape": pa.array(shapes, pa.list_(pa.int64())),
        }
    )


def test_two_workers_feed_one_calibration_session(ray_local, servers):
    from flightquant.calibration import Accumulator
    from flightquant.ray_data import FlightCalibrator

    ray = ray_local
    table = activations_table()
    ds = ray.data.from_arrow([table.slice(i, 8) for i in range(0, table.num_rows, 8)])
    locations = [s.location for s in servers]
    added = _collect_totals(
        ds.map_batches(
            FlightCalibrator,
            fn_constructor_kwargs={"locations": locations, "session": "ray-run"},
            batch_format="pyarrow",
            batch_size=8,
            compute=ray.data.ActorPoolStrategy(size=2),
            num_cpus=0.5,
        )
    )
    expected = Accumulator()
    expected.add_batch(table.combine_chunks().to_batches()[0])
    assert added["rows"] == table.num_rows and added["tokens"] == expected.tokens
    with fq.Client(locations) as client:
        got = client.imatrix_table("ray-run")
        held = [s for s in client.calibration_sessions() if s["session"] == "ray-run"]
    assert len(held) == 1 and held[0]["batches"] == table.num_rows // 8  # one server has it
    want = expected.table()
    assert got.column("count").equals(want.column("count"))
    np.testing.assert_allclose(
        np.concatenate(got.column("in_sum2").to_pylist()),
        np.concatenate(want.column("in_sum2").to_pylist()),
        rtol=1e-6,
    )


def _collect_totals(ds) -> dict[str, int]:
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    total = pa.concat_tables(tables)
    return {name: sum(total.column(name).to_pylist()) for name in total.column_names}
