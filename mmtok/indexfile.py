"""index.parquet's bytes from a stage's index rows, without pyarrow importing pandas.

pyarrow imports pandas, where it is installed, the first time it converts Python objects
(`Table.from_pylist`, `pa.array`, ...): 0.3 s of start-up on a 2-core machine, and more
while the stage's workers compete for the cores (docs/BENCHMARKS.md "Start-up"). Its C++
JSON reader converts without that check. So the rows go to it as JSON lines, with the
schema `from_pylist` would infer from them (`column_type`, the same rules for the JSON
values index rows hold), and the file is byte for byte the one `from_pylist` gives
(tests/test_indexfile.py). Rows outside those rules (mixed types, NaN, integers beyond
int64) go through `from_pylist` itself, which also raises where it always did.
"""

from __future__ import annotations

import io
import json
import math


class _Unsure(Exception):
    """The rows hold something the inference below does not mirror exactly."""


def column_type(values: list):
    """The Arrow type `pa.array(values)` infers, for None, bool, int, float, str, lists and
    dicts of these; _Unsure for anything else."""
    import pyarrow as pa

    present = [v for v in values if v is not None]
    kinds = {type(v) for v in present}
    if not kinds:
        return pa.null()
    if kinds == {bool}:
        return pa.bool_()
    if kinds <= {int, float}:
        if float in kinds and not all(math.isfinite(v) for v in present if type(v) is float):
            raise _Unsure("NaN or infinity")  # JSON cannot carry them
        if not all(-2**63 <= v < 2**63 for v in present if type(v) is int):
            raise _Unsure("an integer beyond int64")
        return pa.float64() if float in kinds else pa.int64()
    if kinds == {str}:
        return pa.string()
    if kinds == {list}:
        return pa.list_(column_type([x for v in present for x in v]))
    if kinds == {dict}:
        names = list(dict.fromkeys(k for v in present for k in v))  # first appearance, as pyarrow orders them
        if not names or not all(isinstance(k, str) for k in names):
            raise _Unsure("an empty struct or a key that is not a string")
        return pa.struct([(k, column_type([v.get(k) for v in present])) for k in names])
    raise _Unsure(f"values of types {sorted(t.__name__ for t in kinds)}")


def index_bytes(rows: list[dict]) -> bytes:
    """The Parquet file of `rows` (one dict per sample): what `pq.write_table(
    pa.Table.from_pylist(rows))` writes, built without importing pandas where it can be."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    def parquet(table) -> bytes:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        return buf.getvalue().to_pybytes()

    if rows:
        try:
            names = list(rows[0])  # from_pylist takes the columns from the first row
            if any(k not in names for r in rows for k in r):
                raise _Unsure("a row with a column the first row lacks")  # from_pylist drops it: left to it
            schema = pa.schema([(k, column_type([r.get(k) for r in rows])) for k in names])
            lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows).encode()
            options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
            return parquet(pj.read_json(io.BytesIO(lines), parse_options=options).combine_chunks())
        except (_Unsure, pa.ArrowException, ValueError, TypeError):
            pass
    return parquet(pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())}))
