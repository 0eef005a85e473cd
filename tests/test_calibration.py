"""Calibration over Flight: activations in (DoExchange ``op: calibrate``), per-layer sums of
squares out (DoGet ``{"imatrix": NAME}``), sessions under the memory budget and limits, the
client, the torch hooks and ``flightquant imatrix``."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from common import wait_for

import flightquant as fq
from flightquant import calibration, protocol
from flightquant.calibration import (
    IMATRIX_SCHEMA,
    Accumulator,
    CalibrationError,
    activation_batch,
    batch_sums,
    imatrix_ticket,
    layer_bytes,
)
from flightquant.sessions import SESSION_OVERHEAD

WIDTHS = {"blk.0.attn_q.weight": 48, "blk.0.ffn_down.weight": 96, "blk.1.attn_k.weight": 5}


def activations(seed: int, n_batches: int = 6) -> list[pa.RecordBatch]:
    """Calibration batches: several layers per batch, ragged token counts, one row without
    a shape (one token), values of three float types."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        names, rows, shapes = [], [], []
        for name, width in WIDTHS.items():
            for _ in range(int(rng.integers(1, 3))):
                tokens = int(rng.integers(0, 40))
                x = rng.standard_normal((tokens, width)) * rng.uniform(0.1, 20)
                names.append(name)
                rows.append(x.reshape(-1))
                shapes.append([tokens, width])
        one = rng.standard_normal(WIDTHS["blk.1.attn_k.weight"])  # a one-token row
        names.append("blk.1.attn_k.weight")
        rows.append(one)
        shapes.append([1, one.size])
        dtype = (np.float32, np.float16, np.float64)[b % 3]
        values = pa.array([r.astype(dtype) for r in rows], pa.list_(pa.from_numpy_dtype(dtype)))
        out.append(
            pa.RecordBatch.from_arrays(
                [pa.array(names), values, pa.array(shapes, pa.list_(pa.int64()))],
                names=["layer", "acts", "shape"],
            )
        )
    # a batch with no shape column: every row one token
    vals = [rng.standard_normal(w).astype(np.float32) for w in WIDTHS.values()]
    out.append(
        pa.RecordBatch.from_arrays(
            [pa.array(list(WIDTHS)), pa.array(vals, pa.list_(pa.float32()))],
            names=["layer", "acts"],
        )
    )
    return out


def numpy_statistic(batches) -> dict[str, tuple[np.ndarray, int]]:
    """The float64 statistic computed directly from the batches' Python values."""
    out: dict[str, list] = {}
    for b in batches:
        d = b.to_pydict()
        shapes = d.get("shape") or [[1, len(v)] for v in d["acts"]]
        for name, vals, shape in zip(d["layer"], d["acts"], shapes):
            x = np.asarray(vals, np.float64).reshape(shape)
            acc = out.setdefault(name, [np.zeros(shape[-1]), 0])
            acc[0] += (x * x).sum(axis=0)
            acc[1] += shape[0]
    return {k: (v[0], v[1]) for k, v in out.items()}


def command(session: str) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(
        json.dumps({"op": "calibrate", "session": session}).encode()
    )


def send(location: str, session: str, batches) -> list[dict]:
    """A plain pyarrow client: one stream, each batch answered by its totals."""
    replies = []
    with flight.connect(location) as c:
        for b in batches:  # one stream per schema
            writer, reader = c.do_exchange(command(session))
            try:
                writer.begin(b.schema)
                writer.write_batch(b)
                chunk = reader.read_chunk()
                assert chunk.data is None
                replies.append(json.loads(chunk.app_metadata.to_pybytes()))
                writer.done_writing()
            finally:
                try:
                    writer.close()
                except pa.ArrowException:
                    pass  # the status was raised by read_chunk
    return replies


def read_session(location: str, session: str) -> pa.Table:
    with flight.connect(location) as c:
        return c.do_get(flight.Ticket(imatrix_ticket(session))).read_all()


def as_dict(table: pa.Table) -> dict[str, tuple[np.ndarray, int]]:
    return calibration.sums_from_table(table)


def assert_statistic(table: pa.Table, expected) -> None:
    assert table.schema.equals(IMATRIX_SCHEMA)
    got = as_dict(table)
    assert table.column("layer_name").to_pylist() == sorted(expected)
    for name, (s, count) in expected.items():
        np.testing.assert_allclose(got[name][0], s, rtol=1e-6)
        assert got[name][1] == count, name


# --------------------------------------------------------------------------- the statistic


def test_two_plain_clients_feed_one_session(server):
    s = server()
    batches = activations(1)
    halves = [batches[0::2], batches[1::2]]
    replies: list[list[dict]] = [[], []]
    errors = []

    def worker(i):
        try:
            replies[i] = send(s.location, "run", halves[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    expected = numpy_statistic(batches)
    assert_statistic(read_session(s.location, "run"), expected)
    # each reply carries its batch's totals
    for half, answers in zip(halves, replies):
        for b, meta in zip(half, answers):
            assert meta["rows"] == b.num_rows and meta["session"] == "run"
            want = numpy_statistic([b])
            assert meta["tokens"] == sum(c for _, c in want.values())
            assert meta["elements"] == sum(len(v) for v in b.column("acts").to_pylist())


def test_split_does_not_matter():
    batches = activations(2)
    whole = Accumulator()
    for b in batches:
        whole.add_batch(b)
    rows = Accumulator()
    for b in batches:  # row by row
        for i in range(b.num_rows):
            rows.add_batch(b.slice(i, 1))
    a, b = whole.snapshot(), rows.snapshot()
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_allclose(a[name][0], b[name][0], rtol=1e-12)
        assert a[name][1] == b[name][1]


BAD = {
    "width change": (
        lambda: activation_batch({"blk.0.attn_q.weight": np.ones((2, 47))}),
        "47 wide",
    ),
    "width differs within the batch": (
        lambda: activation_batch([("new.weight", np.ones((2, 3))), ("new.weight", np.ones(4))]),
        "earlier row",
    ),
    "NaN": (
        lambda: activation_batch(
            [("blk.0.attn_q.weight", np.ones((2, 48))), ("x.weight", np.array([[1.0, np.nan]]))]
        ),
        "non-finite value nan",
    ),
    "infinity": (lambda: activation_batch({"x.weight": np.array([np.inf])}), "non-finite"),
    "missing shape": (
        lambda: pa.RecordBatch.from_arrays(
            [
                pa.array(["x.weight", "y.weight"]),
                pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32())),
                pa.array([[1, 2], None], pa.list_(pa.int64())),
            ],
            names=["n", "v", "shape"],
        ),
        "row 1 (layer 'y.weight') has no shape",
    ),
    "missing name": (
        lambda: pa.RecordBatch.from_arrays(
            [pa.array(["x.weight", None]), pa.array([[1.0], [2.0]], pa.list_(pa.float32()))],
            names=["n", "v"],
        ),
        "row 1 has no layer name",
    ),
    "no name column": (
        lambda: pa.RecordBatch.from_arrays(
            [pa.array([[1.0]], pa.list_(pa.float32()))], names=["v"]
        ),
        "string column",
    ),
    "shape does not match": (
        lambda: pa.RecordBatch.from_arrays(
            [
                pa.array(["x.weight"]),
                pa.array([[1.0, 2.0, 3.0]], pa.list_(pa.float32())),
                pa.array([[2, 2]], pa.list_(pa.int64())),
            ],
            names=["n", "v", "shape"],
        ),
        "holds 4 values but the row has 3",
    ),
    "null activations": (
        lambda: pa.RecordBatch.from_arrays(
            [pa.array(["x.weight"]), pa.array([None], pa.list_(pa.float32()))], names=["n", "v"]
        ),
        "has no activations",
    ),
}


def test_bad_batches_leave_the_session_intact(server):
    s = server()
    good = activations(3, n_batches=2)
    send(s.location, "keep", good)
    before = read_session(s.location, "keep")
    for case, (make, needle) in BAD.items():
        with pytest.raises(pa.ArrowInvalid, match=re.escape(needle)) as info:
            send(s.location, "keep", [make()])
        assert "Traceback" not in str(info.value), case
        assert read_session(s.location, "keep").equals(before), case
    assert s.stats()["calibration"]["sessions"] == 1
    # and it still takes good batches
    send(s.location, "keep", good)
    assert_statistic(read_session(s.location, "keep"), numpy_statistic(good + good))


def test_bad_commands_and_tickets(server):
    s = server()
    with flight.connect(s.location) as c:
        for cmd, needle in (
            ({"op": "calibrate"}, "needs a session"),
            ({"op": "calibrate", "session": ""}, "non-empty"),
            ({"op": "calibrate", "session": "a", "bits": 4}, "unknown option"),
        ):
            writer, reader = c.do_exchange(flight.FlightDescriptor.for_command(json.dumps(cmd)))
            with pytest.raises(pa.ArrowInvalid, match=needle):
                writer.begin(pa.schema([("n", pa.string())]))
                reader.read_chunk()
            with pytest.raises(pa.ArrowInvalid):
                writer.close()
        for ticket, needle in ((b"nope", "DoGet ticket"), (imatrix_ticket("absent"), "absent")):
            with pytest.raises(pa.ArrowInvalid, match=needle):
                c.do_get(flight.Ticket(ticket)).read_all()
        with pytest.raises(pa.ArrowInvalid, match="body"):
            list(c.do_action(flight.Action(protocol.CALIBRATION_DROP, b"[1]")))
        names = [a.type for a in c.list_actions()]
        assert protocol.CALIBRATION_LIST in names and protocol.CALIBRATION_DROP in names


# --------------------------------------------------------------------------- sessions


def test_sessions_list_drop_and_memory_accounting(server):
    s = server()
    batches = activations(4, n_batches=2)
    send(s.location, "a", batches)
    send(s.location, "b", batches[:1])
    with flight.connect(s.location) as c:
        listed = json.loads(
            next(iter(c.do_action(flight.Action(protocol.CALIBRATION_LIST, b"")))).body.to_pybytes()
        )
    assert [x["session"] for x in listed] == ["a", "b"]
    want = SESSION_OVERHEAD + sum(layer_bytes(w) for w in WIDTHS.values())
    assert [x["bytes"] for x in listed] == [want, want]
    stats = s.stats()
    assert stats["calibration"]["bytes"] == 2 * want
    assert stats["memory"]["reserved"] == 2 * want  # no stream holds anything now
    assert s.config()["calibration"]["max_sessions"] == 16
    with fq.Client(s.location) as client:
        assert client.drop_session("a") is True
        assert client.drop_session("a") is False
        assert [x["session"] for x in client.calibration_sessions()] == ["b"]
    assert s.stats()["memory"]["reserved"] == want
    with pytest.raises(pa.ArrowInvalid, match="no calibration session 'a'"):
        read_session(s.location, "a")


def test_session_limits(server):
    s = server(max_sessions=2, max_session_layers=2, max_session_width=50)
    send(s.location, "one", [activation_batch({"a": np.ones((2, 50)), "b": np.ones(3)})])
    send(s.location, "two", [activation_batch({"a": np.ones(3)})])
    with pytest.raises(flight.FlightUnavailableError, match="RESOURCE_EXHAUSTED.*--max-sessions"):
        send(s.location, "three", [activation_batch({"a": np.ones(3)})])
    with pytest.raises(pa.ArrowInvalid, match="limit of 2 layers"):
        send(s.location, "one", [activation_batch({"c": np.ones(3)})])
    with pytest.raises(pa.ArrowInvalid, match="limit of 50"):
        send(s.location, "two", [activation_batch({"wide": np.ones(51)})])
    assert read_session(s.location, "one").column("count").to_pylist() == [2, 1]
    assert s.stats()["calibration"]["sessions"] == 2


def test_session_memory_is_under_the_budget(server):
    # the budget holds the read reservation of one stream and a little more
    s = server(memory_limit=3 * 4096, max_batch_bytes=4096, memory_wait=0.2)
    send(s.location, "small", [activation_batch({"a": np.ones(8)})])
    before = read_session(s.location, "small")
    wide = activation_batch({f"w{i}": np.ones(64) for i in range(4)})
    with pytest.raises(flight.FlightUnavailableError, match="RESOURCE_EXHAUSTED"):
        send(s.location, "small", [wide])
    assert read_session(s.location, "small").equals(before)
    assert s.stats()["memory"]["reserved"] == SESSION_OVERHEAD + layer_bytes(8)


def test_idle_sessions_expire(server):
    s = server(session_idle_timeout=0.3)
    send(s.location, "idle", [activation_batch({"a": np.ones(4)})])
    wait_for(lambda: s.stats()["calibration"]["sessions"] == 0, what="the session to expire")
    assert s.stats()["calibration"]["expired"] == 1
    assert s.stats()["memory"]["reserved"] == 0


# --------------------------------------------------------------------------- the client


def test_client_calibrate_and_imatrix(server, tmp_path):
    from flightquant.modelfiles.imatrix import read_imatrix, write_imatrix

    s1, s2 = server(), server()
    batches = activations(5)
    with fq.Client([s1.location, s2.location]) as client:
        where = client.session_location("job")
        totals = client.calibrate("job", iter(batches[:3]))
        totals2 = client.calibrate("job", pa.Table.from_batches(batches[3:4]))
        client.calibrate("job", batches[4:])
        assert totals["batches"] == 3 and totals2["batches"] == 1
        assert totals["rows"] == sum(b.num_rows for b in batches[:3])
        expected = numpy_statistic(batches)
        assert_statistic(client.imatrix_table("job"), expected)
        imx = client.imatrix("job", datasets=["d.txt"], chunk_size=8)
        with pytest.raises(pa.ArrowInvalid, match="47 wide"):
            client.calibrate("job", {"blk.0.attn_q.weight": np.ones((1, 47))})
    other = s2 if where == s1.location else s1
    assert other.stats()["calibration"]["sessions"] == 0  # every batch went to one server
    for name, (ssum, count) in expected.items():
        np.testing.assert_allclose(imx.importance(name), ssum / count, rtol=1e-6)
    assert imx.datasets == ["d.txt"] and imx.chunk_size == 8
    assert imx.chunk_count == max(c for _, c in expected.values()) // 8
    write_imatrix(tmp_path / "s.gguf", imx)
    back = read_imatrix(tmp_path / "s.gguf")
    for name in expected:
        np.testing.assert_array_equal(back.importance(name), imx.importance(name))


def test_batch_sums_messages_name_row_and_layer():
    with pytest.raises(CalibrationError, match=r"row 1 \(layer 'x.weight'\), element 1"):
        batch_sums(activation_batch([("ok", np.ones(2)), ("x.weight", np.array([1.0, np.nan]))]))


# --------------------------------------------------------------------------- torch


def test_linear_hooks_in_process_and_over_flight(server):
    torch = pytest.importorskip("torch")
    from flightquant.torch_hooks import LinearInputs

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3), torch.nn.Tanh()
    )
    xs = [torch.randn(4, 7, 6), torch.randn(5, 6)]
    # the statistic by hand: the inputs of each Linear
    with torch.no_grad():
        h = model[1](model[0](torch.cat([x.reshape(-1, 6) for x in xs]))).double().numpy()
    x0 = torch.cat([x.reshape(-1, 6) for x in xs]).double().numpy()
    expected = {"0.weight": ((x0 * x0).sum(0), 33), "2.weight": ((h * h).sum(0), 33)}
    with LinearInputs(model) as hooks, torch.no_grad():
        for x in xs:
            model(x)
    got = hooks.accumulator.snapshot()
    for name, (ssum, count) in expected.items():
        np.testing.assert_allclose(got[name][0], ssum, rtol=1e-6)
        assert got[name][1] == count
    assert hooks.totals["tokens"] == 66
    s = server()
    with fq.Client(s.location) as client:
        with LinearInputs(model, client=client, session="torch", batch_bytes=200) as hooks:
            with torch.no_grad():
                for x in xs:
                    model(x)
        assert hooks.totals["batches"] >= 2 and hooks.totals["tokens"] == 66
        assert_statistic(client.imatrix_table("torch"), expected)
    # the hooks are gone
    with torch.no_grad():
        model(xs[0])
    assert hooks.totals["tokens"] == 66


def test_ray_callable_without_ray(server):
    from flightquant.ray_data import FlightCalibrator

    s = server()
    batches = activations(6, n_batches=2)
    table = pa.Table.from_batches(batches[:1])
    f = FlightCalibrator(s.location, "blocks", max_batch_bytes=2000)  # several batches
    out = f(table)
    assert out.column_names == ["batches", "rows", "tokens", "elements"]
    assert out.column("rows").to_pylist() == [table.num_rows]
    assert out.column("batches").to_pylist()[0] > 1
    f(batches[1])
    f.close()
    assert_statistic(read_session(s.location, "blocks"), numpy_statistic(batches[:2]))
    with pytest.raises(fq.OptionsError, match="session"):
        FlightCalibrator(s.location, "")


def test_sessions_on_metrics(server):
    from prometheus_client import generate_latest, parser

    s = server()
    batches = activations(7, n_batches=2)
    send(s.location, "m", batches)
    text = generate_latest(s.metrics.registry).decode()
    samples = {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for family in parser.text_string_to_metric_families(text)
        for x in family.samples
    }
    want = SESSION_OVERHEAD + sum(layer_bytes(w) for w in WIDTHS.values())
    assert samples[("flightquant_calibration_sessions", ())] == 1
    assert samples[("flightquant_calibration_bytes", ())] == want
    assert samples[("flightquant_calibration_sessions_expired_total", ())] == 0
    assert s.stats()["batches"] == len(batches)  # calibration batches are counted too
    ok = [k for k in samples if k[0] == "flightquant_streams_total" and ("op", "calibrate") in k[1]]
    assert ok and sum(samples[k] for k in ok) == len(batches)  # send() opens one per batch
