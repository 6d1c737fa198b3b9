"""engine.schema: field types, VarColumn, action types, validation, persistence, evolution."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import validate
from engine.errors import (
    IncompatibleSchemaError,
    LimitExceededError,
    SchemaError,
    UnknownActionTypeError,
    ValidationError,
)
from engine.limits import DEFAULT_LIMITS, Limits
from engine.schema import (
    ActionType,
    FieldType,
    Schema,
    VarColumn,
    bool_,
    bytes_,
    evolve,
    float32,
    float64,
    int8,
    int16,
    int32,
    int64,
    key,
    parse_field_type,
    string,
    timestamp,
    uint8,
    uint16,
    uint32,
    uint64,
)

INTS = [int8, int16, int32, int64, uint8, uint16, uint32, uint64]
FIXED = INTS + [float32, float64, bool_, timestamp, key("user")]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def fails(cls, field=..., *parts):
    """Exactly ``cls``, with ``.field == field`` (unless ...), and every part in the message."""
    with pytest.raises(cls) as info:
        yield info
    assert type(info.value) is cls, repr(info.value)
    if field is not ...:
        assert info.value.field == field, (info.value.field, str(info.value))
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


def one(ft, default=None, **kw) -> ActionType:
    """An action type "t" whose field under test is "x"; the partition "p" has a default."""
    defaults = {"p": 0} if default is None else {"p": 0, "x": default}
    return ActionType("t", {"x": ft, "p": "int64"}, partition="p", defaults=defaults, **kw)


def column(ft, values, default=None, limits=DEFAULT_LIMITS):
    cols, n = one(ft, default).validate_columns({"x": values}, limits)
    assert list(cols) == ["x", "p"] and len(cols["p"]) == n
    return cols["x"]


def int_range(ft):
    info = np.iinfo(ft.dtype)
    return int(info.min), int(info.max)


# --- field types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ft",
    [(t.name, t) for t in INTS + [float32, float64, timestamp]]
    + [("bool", bool_), ("string", string), ("str", string), ("bytes", bytes_)]
    + [("key:user", key("user")), ("key:user:int", key("user", int))]
    + [("key:user:str", key("user", str)), ("key:tag:str", key("tag", "str"))],
)
def test_parse_field_type(text, ft):
    assert parse_field_type(text) == ft
    assert parse_field_type(ft) is ft
    assert parse_field_type(ft.name) == ft  # the canonical name parses back


def test_field_type_properties():
    assert bool_.dtype == np.dtype(np.bool_) and timestamp.dtype == np.dtype(np.int64)
    assert string.is_var and bytes_.is_var and key("u", str).is_var
    assert not key("u").is_var and not int8.is_var and not timestamp.is_var
    assert key("u").is_key and key("u", str).is_key and not int64.is_key
    assert key("u").dtype == np.dtype(np.int64) and key("u", str).dtype is None
    assert key("u").domain == "u" and key("u").key_kind is int and key("u", str).key_kind is str
    assert key("u", str).storage_dtype == np.dtype(np.int64) and string.storage_dtype is None
    assert int8.kind == "int8" and key("u", str).kind == "key" and string.kind == "string"
    assert [ft.family for ft in (uint8, key("u"), key("u", str), timestamp, bool_, float32)] == [
        "int", "int", "string", "timestamp", "bool", "float",
    ]  # fmt: skip
    assert key("u") != key("u", str) and hash(key("u")) == hash(key("u"))
    assert str(key("u", str)) == "key:u:str"


@pytest.mark.parametrize(
    "bad",
    ["int128", "float", "Int64", "key", "key:user:float", "key:a:b:c"]
    + [5, None, int, FieldType("int64", "int64", np.dtype("f8")), FieldType("x", "x", None)],
)
def test_parse_field_type_rejects(bad):
    with fails(SchemaError, ..., "key:<domain>"):
        parse_field_type(bad)
    for bad_domain in ("key:", "key:bad-domain", "key:9"):
        with fails(SchemaError, ..., "key domain", "not a valid name"):
            parse_field_type(bad_domain)


def test_key_rejects_bad_kind_and_domain():
    with fails(SchemaError, ..., "int or str"):
        key("user", float)
    with fails(SchemaError, ..., "not a valid name"):
        key("9user")


# --- VarColumn ---------------------------------------------------------------------------------


def test_varcolumn_from_values_round_trip():
    col = VarColumn.from_values(["a", b"bc", "", "é"])
    assert len(col) == 4 and col.offsets.dtype == np.int32 and col.data.dtype == np.uint8
    assert col.offsets.tolist() == [0, 1, 3, 3, 5]
    assert col.to_pylist() == ["a", "bc", "", "é"]
    assert col.to_pylist(as_str=False) == [b"a", b"bc", b"", "é".encode()]
    assert col[1] == b"bc" and col == VarColumn.from_values([b"a", "bc", b"", "é"])
    assert col != VarColumn.from_values(["a", "bc", "", "e"])
    assert len(VarColumn.from_values([])) == 0
    assert col.to_arrow().to_pylist() == ["a", "bc", "", "é"]
    with pytest.raises(TypeError):
        VarColumn.from_values([1])
    with pytest.raises(TypeError):
        hash(col)


def test_varcolumn_structure_is_checked():
    with pytest.raises(TypeError, match="int32"):
        VarColumn(np.array([0, 1], np.int64), np.zeros(1, np.uint8))
    with pytest.raises(TypeError, match="int32"):
        VarColumn(np.zeros(0, np.int32), np.zeros(0, np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        VarColumn(np.array([0, 1], np.int32), np.zeros(1, np.int8))


@pytest.mark.parametrize("typ", [pa.string(), pa.binary()])
def test_varcolumn_from_arrow_zero_copy(typ):
    arr = pa.array(["ab", "", "cde"] if typ == pa.string() else [b"ab", b"", b"cde"], typ)
    col = VarColumn.from_arrow(arr)
    assert col.to_pylist(as_str=False) == [b"ab", b"", b"cde"]
    assert np.shares_memory(col.offsets, np.frombuffer(arr.buffers()[1], np.int32))
    assert np.shares_memory(col.data, np.frombuffer(arr.buffers()[2], np.uint8))


def test_varcolumn_from_arrow_slice_is_rebased():
    arr = pa.array(["ab", "c", "def", "gh"]).slice(1, 2)
    col = VarColumn.from_arrow(arr)
    assert col.offsets.tolist() == [0, 1, 4] and col.to_pylist() == ["c", "def"]
    assert np.shares_memory(col.data, np.frombuffer(arr.buffers()[2], np.uint8))  # data: a view


@pytest.mark.parametrize("typ", [pa.large_string(), pa.large_binary(), pa.string_view()])
def test_varcolumn_from_arrow_large_and_view(typ):
    values = ["x", "yz", ""] if typ != pa.large_binary() else [b"x", b"yz", b""]
    col = VarColumn.from_arrow(pa.array(values, typ).slice(1))
    assert col.offsets.dtype == np.int32 and col.to_pylist(as_str=False) == [b"yz", b""]


def test_varcolumn_from_arrow_rejects(monkeypatch):
    with pytest.raises(ValueError, match="nulls"):
        VarColumn.from_arrow(pa.array(["a", None]))
    with pytest.raises(TypeError, match="string or binary"):
        VarColumn.from_arrow(pa.array([1, 2]))
    with pytest.raises(ValueError, match="2 GiB"):  # with the 2 GiB limit scaled down to 4 bytes
        monkeypatch.setattr(validate, "_INT32_MAX", 4)
        VarColumn.from_arrow(pa.array(["abc", "de"], pa.large_string()))
    fits = pa.array(["abc", "d"], pa.large_string())
    assert VarColumn.from_arrow(fits).to_pylist() == ["abc", "d"]
    monkeypatch.undo()
    chunked = pa.chunked_array([["a"], ["bc"]])
    assert VarColumn.from_arrow(chunked).to_pylist() == ["a", "bc"]


# --- ActionType declaration --------------------------------------------------------------------


def test_action_type_properties():
    t = ActionType(
        "like",
        {"user": "key:user", "photo": key("photo", str), "n": uint8, "at": "timestamp"},
        partition="user",
        defaults={"n": np.uint8(3), "at": datetime(1970, 1, 1, 0, 0, 1)},
        last_write_wins=True,
    )
    assert t.name == "like" and t.partition == "user" and t.last_write_wins
    assert t.field_names == ("user", "photo", "n", "at")
    assert [t.field_index(f) for f in t.field_names] == [0, 1, 2, 3]
    assert t.fields["photo"] == key("photo", str) and t.fields["user"] == key("user")
    assert t.key_fields == {"user": "user", "photo": "photo"}
    assert dict(t.defaults) == {"n": 3, "at": 10**9} and type(t.defaults["n"]) is int
    same = ActionType("like", dict(t.fields), "user", {"at": 10**9, "n": 3}, True)
    assert t == same and hash(t) == hash(same) and "like" in repr(t)
    assert t != ActionType("like", dict(t.fields), "user", {"at": 10**9, "n": 4}, True)
    with fails(ValidationError, "nope", "unknown field 'nope' for action type 'like'"):
        t.field_index("nope")


@pytest.mark.parametrize("ft", INTS + [string, bytes_, key("u"), key("u", str)])
def test_partition_may_be(ft):
    assert ActionType("t", {"x": ft}, partition="x").partition == "x"


_DECLARATION_ERRORS = [
    (dict(name="1like"), "not a valid name"),
    (dict(name="a" * 65), "at most 64"),
    (dict(name="has space"), "not a valid name"),
    (dict(name=""), "not a valid name"),
    (dict(name=5), "not a valid name"),
    (dict(fields={"bad-name": "int64"}, partition="bad-name"), "not a valid name"),
    (dict(fields={"x" * 65: "int64"}, partition="x" * 65), "at most 64"),
    (dict(fields={}), "non-empty mapping"),
    (dict(fields=[("u", "int64")]), "non-empty mapping"),
    (dict(fields={"u": "int128"}), "field 'u' of action type 'like'"),
    (dict(partition="nope"), "not one of its fields"),
    (dict(fields={"u": "float64"}), "partition key must be"),
    (dict(fields={"u": "bool"}), "partition key must be"),
    (dict(fields={"u": "timestamp"}), "partition key must be"),
    (dict(defaults={"nope": 1}), "default for unknown field 'nope'"),
    (dict(defaults={"n": None}), "is None"),
    (dict(defaults={"n": 300}), "value 300 out of range for uint8 field 'n'"),
    (dict(defaults={"n": "1"}), "wrong type str"),
    (dict(defaults={"n": 1.0}), "wrong type float"),
    (dict(fields={"u": "int64", "b": "bytes"}, defaults={"b": "text"}), "str value"),
    (dict(defaults=[("n", 1)]), "must be a mapping"),
    (dict(last_write_wins="yes"), "True or False"),
]


@pytest.mark.parametrize("change, message", _DECLARATION_ERRORS)
def test_declaration_errors(change, message):
    args = dict(name="like", fields={"u": "int64", "n": "uint8"}, partition="u") | change
    with fails(SchemaError, ..., message):
        ActionType(**args)


def test_fields_max():
    fields = {f"f{i}": "int64" for i in range(3)}
    ActionType("t", fields, "f0", limits=Limits(fields_max=3))
    with fails(SchemaError, ..., "fields_max=2"):
        ActionType("t", fields, "f0", limits=Limits(fields_max=2))
    assert len(ActionType("a" * 64, {"b" * 64: "int64"}, "b" * 64).name) == 64


# --- validate_columns: zero copy and dtypes ----------------------------------------------------


@pytest.mark.parametrize("ft", FIXED, ids=lambda ft: ft.name)
def test_zero_copy_numpy(ft):
    a = (np.arange(6) % 2).astype(ft.dtype)
    out = column(ft, a)
    assert out.dtype == ft.dtype and out.flags.c_contiguous and np.shares_memory(out, a)
    a.flags.writeable = False  # read-only input (e.g. a memmap) is fine too
    assert np.shares_memory(column(ft, a), a)


@pytest.mark.parametrize("ft", [ft for ft in FIXED if ft is not bool_], ids=lambda ft: ft.name)
def test_zero_copy_arrow(ft):
    typ = pa.from_numpy_dtype(ft.dtype)
    arr = pa.array([1, 0, 2, 3], typ).slice(1)
    out = column(ft, arr)
    assert out.tolist() == [0, 2, 3] and out.dtype == ft.dtype
    assert np.shares_memory(out, np.frombuffer(arr.buffers()[1], ft.dtype))


def test_zero_copy_datetime64_ns_and_arrow_timestamps():
    a = np.array([0, 5, -7], "datetime64[ns]")
    out = column(timestamp, a)
    assert out.dtype == np.int64 and out.tolist() == [0, 5, -7] and np.shares_memory(out, a)
    arr = pa.array([1, 2], pa.timestamp("ns", tz="Asia/Tokyo"))  # values are UTC already
    out = column(timestamp, arr)
    assert out.tolist() == [1, 2] and np.shares_memory(out, np.frombuffer(arr.buffers()[1], "i8"))


def test_copies_when_needed_and_result_is_contiguous():
    a = np.arange(10, dtype=np.int64)[::2]
    out = column(int64, a)
    assert out.flags.c_contiguous and out.tolist() == [0, 2, 4, 6, 8]
    assert not np.shares_memory(out, a)
    be = np.arange(3, dtype=">i8")
    out = column(int64, be)
    assert out.dtype == np.dtype(np.int64) and out.tolist() == [0, 1, 2]
    out = column(bool_, pa.array([True, False, True]))  # Arrow bools are bit-packed: a copy
    assert out.dtype == np.bool_ and out.tolist() == [True, False, True]


def test_every_int_dtype_into_every_int_field():
    for src in INTS:
        for dst in INTS + [key("user"), float32, float64]:
            out = column(dst, np.array([0, 1, 100], src.dtype))
            assert out.dtype == dst.dtype and out.tolist() == [0, 1, 100]


@pytest.mark.parametrize("ft", INTS + [key("user")], ids=lambda ft: ft.name)
def test_int_range_boundaries(ft):
    lo, hi = int_range(ft)
    assert column(ft, [lo, hi]).tolist() == [lo, hi]
    assert one(ft).validate_one({"x": hi}) == (hi, 0)
    for bad in (lo - 1, hi + 1):
        message = f"value {bad} out of range for {ft.name} field 'x' at row 1 of action type 't'"
        with fails(ValidationError, "x", message):
            column(ft, [lo, bad, hi])
        scalar = f"value {bad} out of range for {ft.name} field 'x' of action type 't'"
        with fails(ValidationError, "x", scalar):
            one(ft).validate_one({"x": bad})
        wide = np.int64 if INT64_MIN <= bad <= INT64_MAX else np.uint64
        if np.iinfo(wide).min <= bad <= np.iinfo(wide).max:  # also through a vectorized cast
            with fails(ValidationError, "x", message):
                column(ft, np.array([0, bad], wide))
    if ft.is_key:
        with fails(ValidationError, "x", "int keys are int64"):
            column(ft, np.array([2**63], np.uint64))


def test_uint8_message_from_the_brief():
    values = np.zeros(20, np.int64)
    values[17] = 300
    with fails(ValidationError, "x", "value 300 out of range for uint8 field 'x' at row 17"):
        column(uint8, values)


def test_bool_only_from_bool():
    assert column(bool_, [True, np.bool_(False)]).tolist() == [True, False]
    with fails(ValidationError, "x", "wrong type dtype int64", "give booleans"):
        column(bool_, np.array([0, 1]))
    with fails(ValidationError, "x", "wrong type int (1) for bool field 'x' at row 1"):
        column(bool_, [True, 1])
    with fails(ValidationError, "x", "wrong type dtype bool"):
        column(int64, np.array([True]))
    with fails(ValidationError, "x", "wrong type bool (True) for int64 field 'x' at row 0"):
        column(int64, [True])


def test_floats():
    out = column(float32, np.array([0.1, 1e38, -np.inf, np.nan]))
    assert out.dtype == np.float32 and out[0] == np.float32(0.1)  # rounded to nearest
    assert np.isinf(out[2]) and np.isnan(out[3])
    assert column(float32, [0.1]).tolist() == [float(np.float32(0.1))]
    assert one(float32).validate_one({"x": 0.1})[0] == float(np.float32(0.1))
    assert column(float64, np.array([1, 2**53 + 1], np.int64)).tolist() == [1.0, 2.0**53]
    assert column(float64, [3, 0.5]).tolist() == [3.0, 0.5]
    with fails(ValidationError, "x", "value 1e+300 out of range for float32 field 'x' at row 1"):
        column(float32, np.array([0.0, 1e300]))
    with fails(ValidationError, "x", "value 1e+300 out of range for float32 field 'x' of"):
        one(float32).validate_one({"x": 1e300})
    with fails(ValidationError, "x", "out of range for float64"):
        column(float64, [10**400])
    with fails(ValidationError, "x", "wrong type dtype float64 for int64 field 'x'"):
        column(int64, np.array([1.0]))
    with fails(ValidationError, "x", "wrong type float (1.0) for int64 field 'x' at row 0"):
        column(int64, [1.0])
    with fails(ValidationError, "x", "wrong type dtype complex128"):
        column(float64, np.array([1j]))


def test_nan_and_inf_never_reach_key_or_partition_fields():
    t = ActionType("t", {"user": key("user"), "p": "int32"}, partition="p")
    for bad in ([1.0, math.nan], np.array([math.inf, 1.0])):
        with fails(ValidationError, "user", "wrong type"):
            t.validate_columns({"user": bad, "p": [1, 2]})
        with fails(ValidationError, "p", "wrong type"):
            t.validate_columns({"user": [1, 2], "p": bad})
    with fails(ValidationError, "p", "wrong type float (nan)"):
        t.validate_one({"user": 1, "p": math.nan})


def test_strings_into_numeric_fields_rejected():
    with fails(ValidationError, "x", "wrong type str ('1') for int64 field 'x' at row 0"):
        column(int64, np.array(["1"]))
    with fails(ValidationError, "x", "wrong type Arrow string for int64 field 'x'"):
        column(int64, pa.array(["1"]))
    with fails(ValidationError, "x", "wrong type bytes"):
        column(float64, [b"1"])
    with fails(ValidationError, "x", "wrong type VarColumn"):
        column(int64, VarColumn.from_values(["1"]))
    with fails(ValidationError, "x", "wrong type dtype int64 for string field", "give str"):
        column(string, np.array([1]))
    with fails(ValidationError, "x", "wrong type Arrow int64 for bytes field"):
        column(bytes_, pa.array([1]))


# --- validate_columns: batch shape ------------------------------------------------------------


LIKE = ActionType("like", {"user": key("user"), "n": int32, "s": string}, "user", {"n": 7})


def test_missing_unknown_and_mismatched_columns():
    with fails(ValidationError, "s", "missing field 's' (string) for action type 'like'"):
        LIKE.validate_columns({"user": [1]})
    unknown = "unknown field 'zz' for action type 'like'; declared fields: user, n, s"
    with fails(ValidationError, "zz", unknown):
        LIKE.validate_columns({"user": [1], "s": ["a"], "zz": [1]})
    with fails(ValidationError, "s", "column 's' has 2 rows but column 'user' has 1"):
        LIKE.validate_columns({"user": [1], "s": ["a", "b"]})
    with fails(ValidationError, None, "must be a mapping"):
        LIKE.validate_columns([[1], ["a"]])
    cols, n = LIKE.validate_columns({"s": ["a", "b"], "user": np.array([1, 2])})
    assert n == 2 and list(cols) == ["user", "n", "s"]  # field order, whatever the input order
    assert cols["n"].dtype == np.int32 and cols["n"].tolist() == [7, 7]


def test_not_a_column():
    for bad, what in [(5, "not a column (int)"), ("ab", "not a column (str)"), (b"ab", "(bytes)")]:
        with fails(ValidationError, "user", what, "give a 1-D numpy array"):
            LIKE.validate_columns({"user": bad, "s": ["a", "b"]})
    with fails(ValidationError, "user", "not a column"):
        LIKE.validate_columns({"user": np.int64(3), "s": ["a"]})
    with fails(ValidationError, "user", "2-D array"):
        LIKE.validate_columns({"user": np.zeros((1, 1), np.int64), "s": ["a"]})


def test_zero_rows():
    cols, n = LIKE.validate_columns({"user": np.zeros(0, np.int64), "s": []})
    assert n == 0 and cols["n"].dtype == np.int32 and len(cols["s"]) == 0
    cols, n = one(int8, default=1).validate_columns({})
    assert n == 0 and cols["x"].dtype == np.int8 and len(cols["x"]) == 0
    empty = {"user": pa.array([], pa.int64()), "s": pa.array([], pa.string())}
    cols, n = LIKE.validate_columns(pa.record_batch(empty))
    assert n == 0 and len(cols["s"]) == 0


def test_batch_actions_max():
    limits = Limits(batch_actions_max=3)
    assert LIKE.validate_columns({"user": [1, 2, 3], "s": ["a"] * 3}, limits)[1] == 3
    with fails(LimitExceededError, None, "batch of 4 actions", "batch_actions_max=3"):
        LIKE.validate_columns({"user": [1, 2, 3, 4], "s": ["a"] * 4}, limits)


@pytest.mark.parametrize("ft", [string, bytes_, key("k", str)], ids=str)
def test_string_bytes_max(ft):
    limits = Limits(string_bytes_max=4)
    ok = ["abcd", "éé"] if ft is not bytes_ else [b"abcd", b"\xff" * 4]
    bad = "ééé" if ft is not bytes_ else b"\x00" * 5
    assert len(column(ft, ok, limits=limits)) == 2
    forms = [[*ok, bad], VarColumn.from_values([*ok, bad])]
    forms.append(pa.array([*ok, bad], pa.binary() if ft is bytes_ else pa.string()))
    for form in forms:
        with fails(LimitExceededError, "x", "bytes too long", "at row 2", "string_bytes_max=4"):
            column(ft, form, limits=limits)
    with fails(LimitExceededError, "x", "bytes too long for"):
        one(ft).validate_one({"x": bad}, limits)
    with fails(LimitExceededError, "x", "string_bytes_max=4"):  # a default is checked too
        one(ft, default=ok[0] * 2).validate_columns({}, limits)


def test_str_and_bytes_fields():
    with fails(ValidationError, "x", "str value for bytes field 'x' at row 1", "encode it"):
        column(bytes_, [b"a", "b"])
    with fails(ValidationError, "x", "str value for bytes field 'x' of action type"):
        column(bytes_, pa.array(["a"]))
    with fails(ValidationError, "x", "str value"):
        column(bytes_, np.array(["a"]))
    assert column(bytes_, np.array([b"a", b"bc"])).to_pylist(as_str=False) == [b"a", b"bc"]
    assert column(string, [b"caf\xc3\xa9", "x"]).to_pylist() == ["café", "x"]
    assert column(string, pa.array([b"caf\xc3\xa9"])).to_pylist() == ["café"]
    bad = [b"ok", b"\xff"]
    for form in (bad, pa.array(bad), VarColumn.from_values(bad)):
        with fails(ValidationError, "x", "invalid UTF-8 for string field 'x' at row 1"):
            column(string, form)
    with fails(ValidationError, "x", "invalid UTF-8"):
        column(string, ["\ud800"])  # a lone surrogate cannot be encoded
    with fails(ValidationError, "x", "give str keys"):
        column(key("k", str), [1])


def test_varcolumn_splitting_a_character_is_invalid_utf8():
    data = np.frombuffer("aé".encode() + b"b", np.uint8)  # 'a', 0xC3 0xA9, 'b'
    col = VarColumn(np.array([0, 1, 2, 4], np.int32), data)  # 'a' | 0xC3 | 0xA9 'b'
    with fails(ValidationError, "x", "invalid UTF-8 for string field 'x' at row 1"):
        column(string, col)
    assert column(bytes_, col) is not None  # bytes don't care
    good = VarColumn(np.array([0, 1, 3, 4], np.int32), data)
    out = column(string, good)
    assert out.to_pylist() == ["a", "é", "b"] and np.shares_memory(out.data, data)


def test_malformed_varcolumn():
    data = np.frombuffer(b"abcd", np.uint8)
    for offsets in ([1, 2], [0, 3, 2], [0, 5], [0, 2**31 - 1, -(2**31)]):
        col = VarColumn(np.array(offsets, np.int32), data)
        with fails(ValidationError, "x", "malformed VarColumn"):
            column(bytes_, col)
    col = VarColumn(np.array([0, 2], np.int32), data)  # trailing bytes are ignored
    assert column(string, col).to_pylist() == ["ab"]


# --- timestamps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, ns",
    [
        (np.datetime64(1, "s"), 10**9),
        (np.datetime64(-1, "ms"), -(10**6)),
        (np.datetime64(3, "us"), 3000),
        (np.datetime64(7, "ns"), 7),
        (np.datetime64(1, "D"), 86_400 * 10**9),
        (np.datetime64("1971", "Y"), 365 * 86_400 * 10**9),
        (np.datetime64(5000, "ps"), 5),
        (datetime(1970, 1, 1, 0, 0, 1, 5), 10**9 + 5000),  # naive = UTC
        (datetime(1970, 1, 1, 2, tzinfo=timezone(timedelta(hours=2))), 0),
        (datetime(2262, 4, 11, tzinfo=timezone.utc), 9_223_286_400 * 10**9),
        (1234, 1234),
        (np.int32(-5), -5),
        (INT64_MAX, INT64_MAX),
    ],
)
def test_timestamp_conversions(value, ns):
    assert one(timestamp).validate_one({"x": value}) == (ns, 0)
    assert column(timestamp, [value]).tolist() == [ns]
    if isinstance(value, np.datetime64):
        assert column(timestamp, np.array([value])).tolist() == [ns]


@pytest.mark.parametrize(
    "value",
    [
        np.datetime64("2500-01-01", "s"),
        np.datetime64("1000", "Y"),
        np.datetime64(1, "ps"),  # not a whole nanosecond
        datetime(2263, 1, 1),
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
        INT64_MIN,  # NaT
        2**63,
    ],
)
def test_timestamp_out_of_range(value):
    with fails(ValidationError, "x", "out of range for timestamp field 'x' at row 1", "1677..2262"):
        column(timestamp, [0, value])
    with fails(ValidationError, "x", "out of range for timestamp field 'x' of"):
        one(timestamp).validate_one({"x": value})
    if isinstance(value, np.datetime64):
        with fails(ValidationError, "x", f"value {value} out of range", "at row 0"):
            column(timestamp, np.array([value, value]))


def test_timestamp_rejects_other_types():
    for bad in ("2020-01-01", 1.5, True, datetime(2020, 1, 1).date()):
        with fails(ValidationError, "x", "wrong type", "give datetimes"):
            column(timestamp, [bad])
    for bad in (np.array([1.5]), np.array([1], "timedelta64[s]"), pa.array([1], pa.date32())):
        with fails(ValidationError, "x", "wrong type"):
            column(timestamp, bad)
    with fails(ValidationError, "x", "out of range", "at row 0"):
        column(timestamp, np.array([2**63], np.uint64))
    with fails(ValidationError, "x", f"value {INT64_MIN} out of range"):
        column(timestamp, np.array([INT64_MIN]))


def test_nat_is_null():
    a = np.array(["NaT", "1970-01-01T00:00:01"], "datetime64[s]")
    with fails(ValidationError, "x", "null value for timestamp field 'x' at row 0"):
        column(timestamp, a)
    assert column(timestamp, a, default=5).tolist() == [5, 10**9]
    assert one(timestamp, default=5).validate_one({"x": np.datetime64("NaT")}) == (5, 0)
    ts = pa.array([None, 2], pa.timestamp("s"))
    out = column(timestamp, ts, default=datetime(1970, 1, 2))
    assert out.tolist() == [86_400 * 10**9, 2 * 10**9]


# --- nulls and Arrow inputs --------------------------------------------------------------------


def test_nulls_rejected_unless_default():
    sources = [
        [1, None, 3],
        pa.array([1, None, 3], pa.int16()),
        np.ma.array([1, 99, 3], mask=[False, True, False]),
        np.array([1, None, 3], object),
    ]
    for src in sources:
        with fails(ValidationError, "x", "null value for int8 field 'x' at row 1", "a default"):
            column(int8, src)
        out = column(int8, src, default=-4)
        assert out.dtype == np.int8 and out.tolist() == [1, -4, 3]
    with fails(ValidationError, "x", "null value for int8 field 'x' of action type 't'"):
        one(int8).validate_one({"x": None})
    assert one(int8, default=2).validate_one({"x": None}) == (2, 0)
    with fails(ValidationError, "x", "null value", "at row 0"):
        column(int8, pa.nulls(2))
    assert column(int8, pa.nulls(2), default=1).tolist() == [1, 1]
    assert column(string, pa.nulls(2, pa.string()), default="d").to_pylist() == ["d", "d"]


@pytest.mark.parametrize("typ", [pa.string(), pa.large_string(), pa.binary()])
def test_arrow_var_nulls(typ):
    arr = pa.array(["a", None, "c"], typ)
    with fails(ValidationError, "x", "null value for string field 'x' at row 1"):
        column(string, arr)
    assert column(string, arr, default="dé").to_pylist() == ["a", "dé", "c"]
    masked = np.ma.array(np.array(["a", "b", "c"], object), mask=[0, 1, 0])
    assert column(string, masked, default="z").to_pylist() == ["a", "z", "c"]


def test_record_batch_and_table():
    user = pa.array([1, 2, 3, 4], pa.int64())
    s = pa.array(["w", "x", "y", "z"])
    batch = pa.record_batch({"user": user, "s": s})
    cols, n = LIKE.validate_columns(batch)
    assert n == 4 and cols["s"].to_pylist() == ["w", "x", "y", "z"]
    assert cols["n"].tolist() == [7] * 4
    assert np.shares_memory(cols["user"], np.frombuffer(user.buffers()[1], np.int64))
    assert np.shares_memory(cols["s"].data, np.frombuffer(s.buffers()[2], np.uint8))
    assert np.shares_memory(cols["s"].offsets, np.frombuffer(s.buffers()[1], np.int32))
    cols, n = LIKE.validate_columns(batch.slice(1, 2))
    assert n == 2 and cols["user"].tolist() == [2, 3] and cols["s"].to_pylist() == ["x", "y"]
    nulls = pa.record_batch({"user": user, "s": s, "n": pa.array([None, 1, None, 2], pa.int8())})
    assert LIKE.validate_columns(nulls)[0]["n"].tolist() == [7, 1, 7, 2]
    bad = pa.record_batch({"user": pa.array([1, None, 3, 4]), "s": s})
    with fails(ValidationError, "user", "null value for key:user field 'user' at row 1"):
        LIKE.validate_columns(bad)
    table = pa.concat_tables([pa.Table.from_batches([batch])] * 2)
    cols, n = LIKE.validate_columns(table)
    assert n == 8 and cols["s"].to_pylist() == ["w", "x", "y", "z"] * 2
    cols, n = LIKE.validate_columns(pa.Table.from_batches([batch]))
    assert np.shares_memory(cols["user"], np.frombuffer(user.buffers()[1], np.int64))
    dup = pa.RecordBatch.from_arrays([user, user, s], names=["user", "user", "s"])
    with fails(ValidationError, "user", "duplicate column 'user'"):
        LIKE.validate_columns(dup)
    extra = pa.record_batch({"user": user, "s": s, "zz": user})
    with fails(ValidationError, "zz", "unknown field 'zz'"):
        LIKE.validate_columns(extra)


def test_arrow_dictionary_and_chunked_columns():
    words = pa.array(["a", "b", "a"]).dictionary_encode()
    assert column(string, words).to_pylist() == ["a", "b", "a"]
    assert column(int64, pa.chunked_array([[1], [2, 3]])).tolist() == [1, 2, 3]
    assert column(float32, pa.array([1.5], pa.float16())).tolist() == [1.5]
    with fails(ValidationError, "x", "wrong type Arrow decimal"):
        column(float64, pa.array([1], pa.decimal128(5, 2)))


# --- validate_one / validate_row ---------------------------------------------------------------


def test_validate_one_and_row():
    t = ActionType(
        "t",
        {"u": key("u"), "f": float32, "b": bool_, "s": string, "raw": bytes_, "ts": timestamp},
        "u",
        {"ts": 0, "raw": b""},
    )
    values = {"u": np.int16(3), "f": np.float64(0.5), "b": np.bool_(True), "s": b"x"}
    row = t.validate_one(values | {"raw": bytearray(b"y")})
    assert row == (3, 0.5, True, "x", b"y", 0)
    assert [type(v) for v in row] == [int, float, bool, str, bytes, int]
    assert t.validate_row(3, 0.5, True, "x") == (3, 0.5, True, "x", b"", 0)
    with fails(ValidationError, None, "has 6 fields", "7 values"):
        t.validate_row(1, 2.0, True, "x", b"", 0, 9)
    with fails(ValidationError, "s", "missing field 's' (string)"):
        t.validate_row(1, 2.0, True)
    with fails(ValidationError, "zz", "unknown field 'zz' for action type 't'"):
        t.validate_one({"u": 1, "f": 1.0, "b": True, "s": "", "zz": 1})
    with fails(ValidationError, None, "mapping of field name to value"):
        t.validate_one([1, 2])


# --- Schema ------------------------------------------------------------------------------------


def _types():
    like = ActionType("like", {"user": key("user"), "photo": key("photo")}, "user")
    tag = ActionType("tag", {"photo": key("photo"), "word": key("word", str)}, "photo")
    return like, tag


def test_schema_lookup_and_ids():
    like, tag = _types()
    s = Schema([like, tag])
    assert s["like"] is like and s.type_id("like") == 0 and s.type_id("tag") == 1
    assert s.type_by_id(1) is tag and list(s) == [like, tag] and len(s) == 2
    assert s.names == ("like", "tag") and "tag" in s and "nope" not in s
    assert s.domains == {"user": "int", "photo": "int", "word": "str"}
    assert s.schema_version == 1
    with fails(UnknownActionTypeError, ..., "unknown action type 'nope'", "like, tag"):
        s["nope"]
    with pytest.raises(KeyError):
        s.type_id("nope")
    with fails(UnknownActionTypeError, ..., "no action type has id 2"):
        s.type_by_id(2)


def test_schema_declaration_errors():
    like, tag = _types()
    with fails(SchemaError, ..., "declared twice"):
        Schema([like, like])
    clash = ActionType("c", {"photo": key("photo", str)}, "photo")
    message = "key domain 'photo' holds int keys in like.photo but str keys in c.photo"
    with fails(SchemaError, ..., message):
        Schema([like, clash])
    with fails(SchemaError, ..., "types_max=1"):
        Schema([like, tag], limits=Limits(types_max=1))
    with fails(SchemaError, ..., "ActionType objects"):
        Schema(["like"])


def test_json_is_stable_and_lossless():
    fields = {"p": "bytes", "f": "float64", "g": "float32", "ts": "timestamp", "b": "bool"}
    defaults = {"p": b"\x00\xff", "f": math.nan, "g": -0.0, "ts": datetime(2000, 1, 1), "b": False}
    t = ActionType("t", fields | {"k": "key:w:str"}, "p", defaults | {"k": "é"})
    s = Schema([t])
    text = s.to_json()
    obj = json.loads(text)
    assert json.dumps(obj, sort_keys=True, indent=2) == text  # sorted and canonical
    assert obj["schema_version"] == 1 and obj["types"][0]["id"] == 0
    stored_defaults = obj["types"][0]["defaults"]
    assert stored_defaults["p"] == "AP8=" and stored_defaults["ts"] == 946_684_800 * 10**9
    back = Schema.from_json(text)
    assert back == s and back.to_json() == text and back.schema_hash() == s.schema_hash()
    assert math.isnan(back["t"].defaults["f"]) and math.copysign(1, back["t"].defaults["g"]) == -1


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        "{}",
        '{"format": 2, "schema_version": 1, "types": []}',
        '{"format": 1, "schema_version": 0, "types": []}',
        '{"format": 1, "schema_version": 1, "types": [{"id": 1}]}',
        '{"format": 1, "schema_version": 1, "types": [{"id": 0, "name": "t", '
        '"fields": [["a", "int9"]], "partition": "a", "defaults": {}, "last_write_wins": false}]}',
        '{"format": 1, "schema_version": 1, "types": [{"id": 0, "name": "t", '
        '"fields": [["a", "bytes"]], "partition": "a", "defaults": {"a": "!!"}, '
        '"last_write_wins": false}]}',
    ],
)
def test_from_json_rejects_malformed(text):
    with fails(SchemaError, ...):
        Schema.from_json(text)


def test_schema_hash_ignores_version_only():
    like, tag = _types()
    stored = Schema([like])
    v2 = Schema.merge(stored, Schema([like, tag]))
    assert v2.schema_version == 2 and v2.schema_hash() != stored.schema_hash()
    same = Schema.from_json(v2.to_json().replace('"schema_version": 2', '"schema_version": 9'))
    assert same.schema_hash() == v2.schema_hash() and same != v2


# --- evolution ---------------------------------------------------------------------------------

STORED = ActionType("like", {"user": "key:user", "photo": "int64", "n": "int32"}, "user", {"n": 1})


_BASE = {"user": "key:user", "photo": "int64", "n": "int32"}


def _declared(fields=_BASE, defaults=None, partition="user", lww=False):
    """STORED with changes; defaults are STORED's plus ``defaults`` (``{}`` drops them all)."""
    defaults = {"n": 1} if defaults is None else ({"n": 1} | defaults if defaults else {})
    return ActionType("like", fields, partition, defaults, lww)


_EVOLUTION = [
    # (declared type, error message parts or None, schema_version after)
    (_declared(), None, 1),
    (_declared(_BASE | {"x": "string"}, defaults={"n": 1, "x": ""}), None, 2),
    (_declared(_BASE | {"x": "string", "y": "bytes"}, {"n": 1, "x": "", "y": b""}), None, 2),
    (_declared(defaults={"n": 1, "photo": 0}), None, 2),  # a default for a field that had none
    (_declared(_BASE | {"x": "string"}), ["new field 'x' has no default", "declare a default"], 0),
    (_declared({"user": "key:user", "n": "int32"}), ["'photo' (int64) was removed", "like_v2"], 0),
    (_declared(_BASE | {"photo": "int32"}), ["changed type from int64 to int32", "like_v2"], 0),
    (_declared(partition="photo"), ["partition changed from field 'user' to 'photo'"], 0),
    (_declared({"user": "key:user", "n": "int32", "photo": "int64"}), ["field 'photo' moved"], 0),
    (
        _declared({"user": "key:user", "x": "int8", "photo": "int64", "n": "int32"}, {"x": 0}),
        ["new field 'x' was inserted before stored field 'photo'", "add new fields at the end"],
        0,
    ),
    (_declared(lww=True), ["last_write_wins changed from False to True"], 0),
    (_declared(defaults={"n": 2}), ["default of field 'n' changed from 1 to 2"], 0),
    (_declared(defaults={}), ["default of field 'n' (1) was removed"], 0),
    (_declared(_BASE | {"user": "key:user:str"}), ["from key:user to key:user:str"], 0),
]


@pytest.mark.parametrize("declared, error, version", _EVOLUTION)
def test_evolution_rules(declared, error, version):
    stored = Schema([STORED])
    if error is None:
        merged = Schema.merge(stored, Schema([declared]))
        assert merged["like"] == declared and merged.schema_version == version
        assert merged.type_id("like") == 0
        assert Schema.from_json(merged.to_json()) == merged
        assert Schema.merge(merged, Schema([declared])) == merged  # idempotent
    else:
        with fails(IncompatibleSchemaError, ..., "action type 'like'", *error):
            Schema.merge(stored, Schema([declared]))


def test_evolution_keeps_ids_and_absent_types():
    like, tag = _types()
    view = ActionType("view", {"user": key("user")}, "user")
    stored = Schema([like, tag])
    merged = evolve(stored, Schema([view, tag]))  # 'like' is absent: kept, readable
    assert merged.names == ("like", "tag", "view") and merged.type_id("view") == 2
    assert merged.schema_version == 2 and merged["like"] == like
    assert evolve(stored, Schema([tag])) == stored  # nothing new: identical, version unchanged
    assert Schema.merge(Schema([]), stored) == stored  # creating is not a change
    clash = ActionType("c", {"user": key("user", str)}, "user")
    with fails(IncompatibleSchemaError, ..., "key domain 'user'", "c.user"):
        evolve(stored, Schema([clash]))


# --- properties: random schemas and rows -------------------------------------------------------

_PARTITIONABLE = ("int", "string", "bytes")
_FIELD_TYPES = FIXED + [string, bytes_, key("item"), key("tag", str), key("word", str)]
_TIMEZONES = st.sampled_from([None, timezone.utc, timezone(timedelta(hours=-3, minutes=-30))])


def _values(ft):
    family = ft.family
    if family == "int":
        return st.integers(*int_range(ft))
    if family == "float":
        return st.floats(width=32 if ft is float32 else 64)
    if family == "bool":
        return st.booleans()
    if family == "timestamp":
        dts = st.datetimes(datetime(1678, 1, 1), datetime(2261, 12, 31), timezones=_TIMEZONES)
        return st.integers(INT64_MIN + 1, INT64_MAX) | dts
    return st.text(max_size=6) if family == "string" else st.binary(max_size=6)


_names = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)


@st.composite
def action_types(draw, name=_names):
    names = draw(st.lists(_names, min_size=1, max_size=6, unique=True))
    fts = [draw(st.sampled_from(_FIELD_TYPES)) for _ in names]
    if not any(ft.family in _PARTITIONABLE for ft in fts):
        fts[0] = int64
    eligible = [n for n, ft in zip(names, fts) if ft.family in _PARTITIONABLE]
    partition = draw(st.sampled_from(eligible))
    defaults = {n: draw(_values(ft)) for n, ft in zip(names, fts) if draw(st.booleans())}
    return ActionType(draw(name), dict(zip(names, fts)), partition, defaults, draw(st.booleans()))


@st.composite
def schemas(draw):
    names = draw(st.lists(_names, max_size=4, unique=True))
    return Schema([draw(action_types(st.just(n))) for n in names])


@FAST
@given(schemas())
def test_json_round_trip(s):
    text = s.to_json()
    back = Schema.from_json(text)
    assert back == s and back.to_json() == text and back.schema_hash() == s.schema_hash()
    assert [back.type_id(n) for n in s.names] == list(range(len(s)))
    assert Schema.merge(back, s) == s  # stored == declared: identical


def _canon(values):
    return [repr(v) for v in values]  # repr: tells 1 from True, -0.0 from 0.0, and nan == nan


def _py(col, ft):
    if isinstance(col, VarColumn):
        return col.to_pylist(as_str=ft.family == "string")
    return col.tolist()


def _as_form(ft, raw, normalized, form):
    """The column in one of several input forms (None = null, to be filled with the default)."""
    nulls = [v is None for v in raw]
    if form == "list" or (form == "numpy" and ft.is_var):
        return raw if form == "list" else np.ma.array(np.array(raw, object), mask=nulls)
    if form == "numpy":
        data = np.array([0 if v is None else v for v in normalized], ft.dtype)
        if ft is timestamp:
            data = data.view("datetime64[ns]")
        return np.ma.array(data, mask=nulls) if any(nulls) else data
    if ft.is_var:
        typ = pa.string() if ft.family == "string" else pa.binary()
    else:
        typ = pa.timestamp("ns", tz="UTC") if ft is timestamp else pa.from_numpy_dtype(ft.dtype)
    return pa.array([None if r is None else v for r, v in zip(raw, normalized)], typ)


@st.composite
def batches(draw):
    t = draw(action_types())
    n = draw(st.integers(0, 5))
    raw = {}
    for f, ft in t.fields.items():
        cells = _values(ft) | st.none() if f in t.defaults else _values(ft)
        raw[f] = draw(st.lists(cells, min_size=n, max_size=n))
    forms = {f: draw(st.sampled_from(["list", "numpy", "arrow"])) for f in t.field_names}
    omit = {f for f in t.defaults if draw(st.booleans()) and all(v is None for v in raw[f])}
    omit.discard(t.partition)  # one column stays, or the batch has no length (0 rows)
    return t, n, raw, forms, omit


@FAST
@given(batches())
def test_validate_one_agrees_with_validate_columns(batch):
    t, n, raw, forms, omit = batch
    given_fields = [f for f in t.field_names if f not in omit]
    rows = [t.validate_one({f: raw[f][i] for f in given_fields}) for i in range(n)]
    per_field = dict(zip(t.field_names, zip(*rows))) if n else {f: () for f in t.field_names}
    columns = {f: _as_form(t.fields[f], raw[f], per_field[f], forms[f]) for f in given_fields}
    cols, count = t.validate_columns(columns)
    assert count == n and list(cols) == list(t.field_names)
    for f, ft in t.fields.items():
        if not ft.is_var:
            assert cols[f].dtype == ft.dtype and cols[f].flags.c_contiguous
        assert _canon(_py(cols[f], ft)) == _canon(per_field[f]), (f, forms[f])


_SMALL = Limits(string_bytes_max=24)  # _values() strings are <= 6 chars, so <= 24 bytes


def _invalid(ft):
    family, bad = ft.family, [object(), None]
    if family == "int":
        lo, hi = int_range(ft)
        bad += [lo - 1, hi + 1, "1", 1.0, True]
    elif family == "float":
        bad += ["1", True, 10**400] + ([1e300] if ft is float32 else [])
    elif family == "bool":
        bad += [1, "True"]
    elif family == "timestamp":
        bad += ["2020", 1.5, 2**63, INT64_MIN, datetime(2300, 1, 1), np.datetime64(1, "ps")]
    elif family == "string":
        bad += [5, b"\xff", "\ud800", "x" * 25, "é" * 13]
    else:
        bad += ["s", 5, b"x" * 25]
    return st.sampled_from(bad)


@FAST
@given(batches(), st.data())
def test_one_bad_value_same_error_both_ways(batch, data):
    t, n, raw, _, _ = batch
    if n == 0:
        return
    row = data.draw(st.integers(0, n - 1))
    field = data.draw(st.sampled_from(t.field_names))
    ft = t.fields[field]
    value = data.draw(_invalid(ft).filter(lambda v: v is not None or field not in t.defaults))
    raw = {f: list(v) for f, v in raw.items()}
    raw[field][row] = value
    with pytest.raises(ValidationError) as one_way:
        t.validate_one({f: raw[f][row] for f in t.field_names}, _SMALL)
    with pytest.raises(ValidationError) as column_way:
        t.validate_columns(raw, _SMALL)
    a, b = one_way.value, column_way.value
    assert type(a) is type(b) and a.field == b.field == field and a.action_type == b.action_type
    assert str(b) == str(a).replace(" of action type", f" at row {row} of action type", 1)
