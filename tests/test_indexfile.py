"""index.parquet built through pyarrow's JSON reader is the file `Table.from_pylist` writes,
byte for byte, for any rows; and a shard run no longer imports pandas to write it."""

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmtok.indexfile import column_type, index_bytes


def _from_pylist(rows):
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())}), buf)
    return buf.getvalue().to_pybytes()


def _outcome(fn, rows):
    try:
        return fn(rows)
    except Exception as e:  # the same refusal counts as the same outcome
        return type(e)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["ext", "offset", "size", "x"]), inner, max_size=3)), max_leaves=6)
# index rows as stages write them: key, shard and members always, then columns of one type each
# (the common case), or of any values (mixed types, missing columns: the fallback)
member = st.fixed_dictionaries({"ext": st.sampled_from(["jpg", "txt", "json"]), "offset": st.integers(0, 2**40),
                                "size": st.integers(0, 2**31)})
typed_columns = st.sampled_from([st.integers(0, 2**40), st.floats(0, 1e6), st.text(max_size=6), st.booleans(),
                                 st.none(), st.lists(st.integers(0, 9), max_size=3)])


@st.composite
def index_rows(draw):
    n = draw(st.integers(1, 6))
    extra = draw(st.dictionaries(st.sampled_from(["n_tokens", "width", "source", "lang"]), typed_columns, max_size=3))
    rows = []
    for i in range(n):
        row = {"key": f"{i:06d}", "members": draw(st.lists(member, min_size=1, max_size=3)),
               "shard": draw(st.sampled_from(["text-000000.tar", "pair-jpg-000001.tar"]))}
        row |= {k: draw(s) for k, s in extra.items()}
        rows.append(row)
    return rows


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index_rows())
def test_index_rows_give_the_bytes_from_pylist_gives(rows):
    assert index_bytes(rows) == _from_pylist(rows)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(st.sampled_from(["a", "b", "c"]), values, max_size=3), max_size=5))
def test_any_rows_give_what_from_pylist_gives_or_the_same_refusal(rows):
    assert _outcome(index_bytes, rows) == _outcome(_from_pylist, rows)


def test_the_inference_mirrors_pyarrow_on_the_shapes_index_rows_hold():
    for values in ([1, None, 2], [1, 2.5], ["a", None], [True, False], [None], [[1], [], None],
                   [{"ext": "jpg", "offset": 1}, {"size": 3, "ext": "txt"}], [[{"a": [1.5]}]]):
        assert column_type(values) == pa.array(values).type, values


def test_a_shard_run_writes_its_index_without_importing_pandas(tmp_path):
    """pyarrow imports pandas, when installed, the first time it converts Python objects
    (0.3 s of start-up); the index now goes through its JSON reader and the reads through
    ParquetFile, so neither `shard` nor `inspect` pays it."""
    pytest.importorskip("pandas")  # installed with the test extras; without it there is nothing to avoid
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        (src / f"t{i}.txt").write_text(f"caption {i}")
    code = ("import runpy, sys\n"
            "for argv in (['mmtok', 'shard', sys.argv[1], '--out', sys.argv[2], '--quiet', '--json'],\n"
            "             ['mmtok', 'inspect', sys.argv[2], '--json']):\n"
            "    sys.argv = argv\n"
            "    try:\n"
            "        runpy.run_module('mmtok.cli.app', run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert not e.code, e.code\n"
            "print('PANDAS', 'pandas' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PANDAS False" in r.stdout, r.stdout[-500:]
    assert pq.read_table(tmp_path / "out" / "index.parquet").num_rows == 5
