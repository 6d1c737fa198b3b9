"""Action types and the schema of a data directory: declaration, validation, persistence, evolution.

Design note. An ``ActionType`` is a name, typed fields in declaration order (which is also the
field index order in frames), a partition field, defaults and a compaction flag. Its
``validate_columns`` / ``validate_one`` are the only gate to the log: they check everything
(unknown or missing fields, dtypes, ranges, nulls, lengths, limits) and return the values in their
stored form, so nothing invalid is ever written (invariant 8). The per-field checks live in
``engine.validate``; this module composes them per action type.

A ``Schema`` gives each type a small id (0, 1, 2, ... in order of first declaration) that frames
store. Ids never change: ``Schema.merge(stored, declared)`` keeps every stored type and id, and
accepts only changes old actions can still be read under (new types; new fields at the end, with
a default that the reader fills into older frames). ``schema_version`` counts accepted changes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import pyarrow as pa

from engine.errors import (
    IncompatibleSchemaError,
    LimitExceededError,
    SchemaError,
    UnknownActionTypeError,
    ValidationError,
)
from engine.limits import DEFAULT_LIMITS, Limits
from engine.validate import (
    FieldRef,
    FieldType,
    VarColumn,
    bool_,
    bytes_,
    check_column,
    check_identifier,
    check_value,
    column_len,
    fill_default,
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

__all__ = [
    "ActionType", "Schema", "evolve", "FieldType", "VarColumn", "parse_field_type", "key",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float32", "float64", "bool_", "timestamp", "string", "bytes_",
]  # fmt: skip

SCHEMA_FORMAT = 1  # version of the JSON layout written by Schema.to_json
_PARTITION_FAMILIES = ("int", "string", "bytes")  # ints, uints, strings, bytes, keys
Columns = Mapping[str, Any] | pa.RecordBatch | pa.Table


class ActionType:
    """A named schema of typed fields; one field is the partition key. Immutable, hashable."""

    __slots__ = (
        "_name", "_fields", "_names", "_index", "_partition", "_defaults", "_lww", "_canon",
        "_plan",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        fields: Mapping[str, FieldType | str],
        partition: str,
        defaults: Mapping[str, Any] | None = None,
        last_write_wins: bool = False,
        *,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        check_identifier("action type name", name)
        if not isinstance(fields, Mapping) or not fields:
            raise SchemaError(
                f"fields of action type '{name}' must be a non-empty mapping of field name to "
                "field type, e.g. {'user': 'key:user', 'n': 'int64'}"
            )
        if len(fields) > limits.fields_max:
            raise SchemaError(
                f"action type '{name}' has {len(fields)} fields; the limit is fields_max="
                f"{limits.fields_max}: split it into several action types"
            )
        parsed: dict[str, FieldType] = {}
        for fname, ftype in fields.items():
            check_identifier(f"field name of action type '{name}':", fname)
            try:
                parsed[fname] = parse_field_type(ftype)
            except SchemaError as exc:
                raise SchemaError(f"field '{fname}' of action type '{name}': {exc}") from None
        self._name = name
        self._fields = MappingProxyType(parsed)
        self._names = tuple(parsed)
        self._index = {f: i for i, f in enumerate(self._names)}
        self._partition = self._check_partition(partition)
        self._defaults = MappingProxyType(self._check_defaults(defaults or {}, limits))
        if not isinstance(last_write_wins, bool):
            raise SchemaError(f"last_write_wins of action type '{name}' must be True or False")
        self._lww = last_write_wins
        self._canon = json.dumps(self._to_obj(), sort_keys=True)
        # (field, its error builder, its default or None), in field order: built once
        self._plan = tuple(
            (f, FieldRef(name, f, ft), self._defaults.get(f)) for f, ft in parsed.items()
        )

    def _check_partition(self, partition: str) -> str:
        if partition not in self._fields:
            raise SchemaError(
                f"partition {partition!r} of action type '{self._name}' is not one of its fields "
                f"({', '.join(self._names)}): name the field whose value picks the shard"
            )
        ft = self._fields[partition]
        if ft.family not in _PARTITION_FAMILIES:
            raise SchemaError(
                f"partition field '{partition}' of action type '{self._name}' is {ft.name}; a "
                "partition key must be an int, uint, string, bytes or key field: pick another"
            )
        return partition

    def _check_defaults(self, defaults: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
        if not isinstance(defaults, Mapping):
            raise SchemaError(f"defaults of action type '{self._name}' must be a mapping")
        out = {}
        for fname, value in defaults.items():
            if fname not in self._fields:
                raise SchemaError(
                    f"default for unknown field {fname!r} of action type '{self._name}'; "
                    f"declared fields: {', '.join(self._names)}"
                )
            if value is None:
                raise SchemaError(
                    f"default for field '{fname}' of action type '{self._name}' is None: give "
                    "a value of the field type, or no default to make the field required"
                )
            ref = FieldRef(self._name, fname, self._fields[fname])
            try:
                out[fname] = check_value(ref, value, limits)
            except ValidationError as exc:
                raise SchemaError(f"invalid default: {exc}") from None
        return {f: out[f] for f in self._names if f in out}  # declaration order

    # --- properties ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def fields(self) -> Mapping[str, FieldType]:
        """Field name -> type, in declaration order (= the stored field index order)."""
        return self._fields

    @property
    def field_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def partition(self) -> str:
        return self._partition

    @property
    def defaults(self) -> Mapping[str, Any]:
        """Field name -> default, normalized (timestamps as int ns, str/bytes as given)."""
        return self._defaults

    @property
    def last_write_wins(self) -> bool:
        """Compaction keeps only the last action per partition key."""
        return self._lww

    @property
    def key_fields(self) -> dict[str, str]:
        """Field name -> key domain, for the key fields."""
        return {f: ft.domain for f, ft in self._fields.items() if ft.is_key}

    def field_index(self, name: str) -> int:
        if name not in self._index:
            raise self._unknown_field(name)
        return self._index[name]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ActionType):
            return NotImplemented
        return self._canon == other._canon

    def __hash__(self) -> int:
        return hash(self._canon)

    def __repr__(self) -> str:
        fields = {f: ft.name for f, ft in self._fields.items()}
        return (
            f"ActionType({self._name!r}, {fields!r}, partition={self._partition!r}, "
            f"defaults={dict(self._defaults)!r}, last_write_wins={self._lww})"
        )

    # --- validation ----------------------------------------------------------------------------

    def _unknown_field(self, name: object) -> ValidationError:
        return ValidationError(
            f"unknown field {str(name)!r} for action type '{self._name}'; declared fields: "
            f"{', '.join(self._names)}",
            action_type=self._name,
            field=str(name),
        )

    def _missing_field(self, name: str) -> ValidationError:
        return ValidationError(
            f"missing field '{name}' ({self._fields[name].name}) for action type "
            f"'{self._name}'; give a value for it or declare a default",
            action_type=self._name,
            field=name,
        )

    def validate_columns(
        self, columns: Columns, limits: Limits = DEFAULT_LIMITS
    ) -> tuple[dict[str, np.ndarray | VarColumn], int]:
        """Check a batch; return its columns in stored form, in field order, and its row count.

        Fixed-width columns come back as 1-D C-contiguous arrays of the field dtype, sharing
        memory with the input when it already is one (numpy, or Arrow without nulls); string,
        bytes and str-key columns as VarColumns (zero-copy from Arrow string/binary arrays).
        Integers are range-checked into any int field; float64 into float32 and ints into float
        fields round to nearest (only a finite value that overflows is rejected). Lists go value
        by value through ``validate_one``'s checks, so both reject a value with the same message.
        """
        given, rows_hint = self._column_mapping(columns)
        for name in given:
            if name not in self._index:
                raise self._unknown_field(name)
        n = self._row_count(given, rows_hint)
        if n > limits.batch_actions_max:
            raise LimitExceededError(
                f"batch of {n} actions of action type '{self._name}' exceeds batch_actions_max="
                f"{limits.batch_actions_max}: split it into smaller batches",
                action_type=self._name,
            )
        out: dict[str, np.ndarray | VarColumn] = {}
        for f, ref, default in self._plan:
            if f in given:
                out[f] = check_column(ref, given[f], default, limits)
            elif default is None:
                raise self._missing_field(f)
            else:
                out[f] = fill_default(ref, n, default, limits)
        return out, n

    def _column_mapping(self, columns: Columns) -> tuple[Mapping[str, Any], int | None]:
        if isinstance(columns, (pa.RecordBatch, pa.Table)):
            names = columns.schema.names
            if len(set(names)) != len(names):
                dup = next(f for f in names if names.count(f) > 1)
                raise ValidationError(
                    f"duplicate column '{dup}' for action type '{self._name}'; give each field "
                    "once",
                    action_type=self._name,
                    field=dup,
                )
            return dict(zip(names, columns.columns)), columns.num_rows
        if not isinstance(columns, Mapping):
            raise ValidationError(
                f"columns for action type '{self._name}' must be a mapping of field name to "
                f"column, a pyarrow RecordBatch or a pyarrow Table, not {type(columns).__name__}",
                action_type=self._name,
            )
        return columns, None

    def _row_count(self, given: Mapping[str, Any], rows_hint: int | None) -> int:
        n, first = rows_hint, None
        for f, ref, _ in self._plan:
            if f not in given:
                continue
            rows = column_len(ref, given[f])
            if first is None:
                n, first = rows, f
            elif rows != n:
                raise ValidationError(
                    f"column '{f}' has {rows} rows but column '{first}' has {n} for action "
                    f"type '{self._name}'; all columns of a batch must have the same length",
                    action_type=self._name,
                    field=f,
                )
        return n or 0

    def validate_one(self, values: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> tuple:
        """Check one action; return its values in field order as normalized Python scalars."""
        if not isinstance(values, Mapping):
            raise ValidationError(
                f"an action of type '{self._name}' is a mapping of field name to value, not "
                f"{type(values).__name__}",
                action_type=self._name,
            )
        for name in values:
            if name not in self._index:
                raise self._unknown_field(name)
        out = []
        for f, ref, default in self._plan:
            if default is None and f not in values:
                raise self._missing_field(f)
            out.append(check_value(ref, values.get(f), limits, None, default))
        return tuple(out)

    def validate_row(self, *values: Any, limits: Limits = DEFAULT_LIMITS) -> tuple:
        """``validate_one`` with values given in field order; trailing fields may be left out."""
        if len(values) > len(self._names):
            raise ValidationError(
                f"action type '{self._name}' has {len(self._names)} fields "
                f"({', '.join(self._names)}) but {len(values)} values were given",
                action_type=self._name,
            )
        return self.validate_one(dict(zip(self._names, values)), limits)

    # --- persistence ---------------------------------------------------------------------------

    def _to_obj(self) -> dict[str, Any]:
        return {
            "name": self._name,
            "fields": [[f, ft.name] for f, ft in self._fields.items()],
            "partition": self._partition,
            "defaults": {f: _encode(self._fields[f], v) for f, v in self._defaults.items()},
            "last_write_wins": self._lww,
        }

    @classmethod
    def _from_obj(cls, obj: Mapping[str, Any], limits: Limits) -> ActionType:
        fields = {f: parse_field_type(t) for f, t in obj["fields"]}
        if len(fields) != len(obj["fields"]):
            raise ValueError(f"duplicate field names in {obj['fields']}")
        defaults = {f: _decode(fields[f], v) for f, v in obj["defaults"].items()}
        return cls(
            obj["name"], fields, obj["partition"], defaults, obj["last_write_wins"], limits=limits
        )


# Defaults are encoded by field type, so no tags are needed: bytes as base64, floats as JSON
# numbers except the non-finite ones (as "nan", "inf", "-inf"), everything else as itself.


def _encode(ft: FieldType, value: Any) -> Any:
    if ft.family == "bytes":
        return base64.b64encode(value).decode("ascii")
    if ft.family == "float" and not math.isfinite(value):
        return repr(value)
    return value


def _decode(ft: FieldType, value: Any) -> Any:
    if ft.family == "bytes":
        return base64.b64decode(value, validate=True)
    if ft.family == "float":
        if isinstance(value, str) and value not in ("nan", "inf", "-inf"):
            raise ValueError(f"bad float default {value!r}")
        return float(value)
    return value


class Schema:
    """The action types of one data directory, each with a stable small id."""

    __slots__ = ("_types", "_by_name", "_version", "_domains", "field_slots")

    def __init__(self, types: Iterable[ActionType] = (), *, limits: Limits = DEFAULT_LIMITS):
        self._init(list(types), 1, limits)

    def _init(self, types: list[ActionType], version: int, limits: Limits) -> None:
        if len(types) > limits.types_max:
            raise SchemaError(
                f"schema has {len(types)} action types; the limit is types_max="
                f"{limits.types_max}: merge some types or raise Limits.types_max"
            )
        self._by_name: dict[str, tuple[int, ActionType]] = {}
        for i, t in enumerate(types):
            if not isinstance(t, ActionType):
                raise SchemaError(f"a schema holds ActionType objects, not {type(t).__name__}")
            if t.name in self._by_name:
                raise SchemaError(f"action type '{t.name}' is declared twice: declare it once")
            self._by_name[t.name] = (i, t)
        self._types = tuple(types)
        self._version = version
        self._domains = _domains(self._types)
        # (type name, field) -> (type id, ActionType, field index): Batch.column's lookups
        self.field_slots: dict[tuple[str, str], tuple[int, ActionType, int]] = {}

    @classmethod
    def _with_version(cls, types: list[ActionType], version: int, limits: Limits) -> Schema:
        schema = cls.__new__(cls)
        schema._init(types, version, limits)
        return schema

    def __getitem__(self, name: str) -> ActionType:
        found = self._by_name.get(name) if isinstance(name, str) else None
        if found is None:
            raise UnknownActionTypeError(
                f"unknown action type {name!r}; declared action types: "
                f"{', '.join(self.names) or '(none)'}: declare it in the schema",
                action_type=str(name),
            )
        return found[1]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[ActionType]:
        """Action types in id order."""
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schema):
            return NotImplemented
        return self._version == other._version and self._types == other._types

    def __hash__(self) -> int:
        return hash((self._version, self._types))

    def __repr__(self) -> str:
        return f"Schema({list(self._types)!r}, schema_version={self._version})"

    @property
    def names(self) -> tuple[str, ...]:
        """Action type names in id order."""
        return tuple(t.name for t in self._types)

    @property
    def schema_version(self) -> int:
        """1 for a new schema; +1 for every merge that changed it."""
        return self._version

    @property
    def domains(self) -> dict[str, str]:
        """Key domain -> key kind ("int" or "str"), across all action types."""
        return dict(self._domains)

    def type_id(self, name: str) -> int:
        self[name]  # raises UnknownActionTypeError
        return self._by_name[name][0]

    def type_by_id(self, type_id: int) -> ActionType:
        if not (isinstance(type_id, (int, np.integer)) and 0 <= type_id < len(self._types)):
            raise UnknownActionTypeError(
                f"no action type has id {type_id!r}; ids are 0..{len(self._types) - 1}",
                action_type=None,
            )
        return self._types[int(type_id)]

    # --- persistence ---------------------------------------------------------------------------

    def _to_obj(self, with_version: bool = True) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "format": SCHEMA_FORMAT,
            "types": [{"id": i, **t._to_obj()} for i, t in enumerate(self._types)],
        }
        if with_version:
            obj["schema_version"] = self._version
        return obj

    def to_json(self) -> str:
        """Stable text: sorted keys, types in id order, fields in declaration order."""
        return json.dumps(self._to_obj(), sort_keys=True, indent=2)

    def schema_hash(self) -> str:
        """Hex sha256 of the canonical JSON without ``schema_version``."""
        text = json.dumps(self._to_obj(False), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @classmethod
    def from_json(cls, text: str | bytes, *, limits: Limits = DEFAULT_LIMITS) -> Schema:
        try:
            obj = json.loads(text)
            if obj["format"] != SCHEMA_FORMAT:
                raise SchemaError(
                    f"schema format {obj['format']!r} is not supported (this engine reads "
                    f"format {SCHEMA_FORMAT}): open the data directory with a newer engine"
                )
            version, entries = obj["schema_version"], obj["types"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError(f"bad schema_version {version!r}")
            if [e["id"] for e in entries] != list(range(len(entries))):
                raise ValueError("type ids are not 0, 1, 2, ... in order")
            types = [ActionType._from_obj(e, limits) for e in entries]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SchemaError(
                f"stored schema is malformed ({exc!r}): restore the schema file from a backup"
            ) from exc
        return cls._with_version(types, version, limits)

    # --- evolution -----------------------------------------------------------------------------

    @staticmethod
    def merge(stored: Schema, declared: Schema, *, limits: Limits = DEFAULT_LIMITS) -> Schema:
        """The schema to open a data directory with, or IncompatibleSchemaError.

        Keeps every stored type and id (a type missing from ``declared`` stays readable); new
        types get the next ids in declared order; a type in both may only add fields at the end,
        each with a default, or add defaults to fields that had none.
        """
        merged = [
            t if t.name not in declared else _evolve_type(t, declared[t.name]) for t in stored
        ]
        merged += [t for t in declared if t.name not in stored]
        # Creating a schema (an empty stored one) is not a change; anything else that differs is.
        changed = len(stored) > 0 and merged != list(stored)
        try:
            return Schema._with_version(merged, stored._version + changed, limits)
        except SchemaError as exc:
            message = f"{exc} (between the stored and the declared schema)"
            raise IncompatibleSchemaError(message) from None


def evolve(stored: Schema, declared: Schema, *, limits: Limits = DEFAULT_LIMITS) -> Schema:
    """``Schema.merge``."""
    return Schema.merge(stored, declared, limits=limits)


def _domains(types: Iterable[ActionType]) -> dict[str, str]:
    seen: dict[str, tuple[str, str]] = {}  # domain -> (kind, "type.field" that set it)
    for t in types:
        for fname, domain in t.key_fields.items():
            kind, where = t.fields[fname].key_kind.__name__, f"{t.name}.{fname}"
            first = seen.setdefault(domain, (kind, where))
            if first[0] != kind:
                raise SchemaError(
                    f"key domain '{domain}' holds {first[0]} keys in {first[1]} but {kind} keys "
                    f"in {where}; a domain has one key kind: use the same kind, or another "
                    "domain name"
                )
    return {d: kind for d, (kind, _) in seen.items()}


def _evolve_type(old: ActionType, new: ActionType) -> ActionType:
    """``new`` if old actions stay readable under it, else IncompatibleSchemaError."""
    rename = (
        f"or declare it as a new action type (e.g. '{old.name}_v2') and keep '{old.name}' "
        "as stored"
    )

    def incompatible(what: str, todo: str) -> IncompatibleSchemaError:
        return IncompatibleSchemaError(f"action type '{old.name}': {what}; {todo}")

    if new.last_write_wins != old.last_write_wins:
        raise incompatible(
            f"last_write_wins changed from {old.last_write_wins} to {new.last_write_wins}",
            f"keep {old.last_write_wins} {rename}",
        )
    if new.partition != old.partition:
        raise incompatible(
            f"partition changed from field '{old.partition}' to '{new.partition}' (actions "
            "are already sharded by it)",
            f"keep partition='{old.partition}' {rename}",
        )
    for i, (fname, ft) in enumerate(old.fields.items()):
        if fname not in new.fields:
            raise incompatible(
                f"field '{fname}' ({ft.name}) was removed",
                f"keep it (old actions have it) {rename}",
            )
        at = new.field_names[i]
        if at not in old.fields:
            raise incompatible(
                f"new field '{at}' was inserted before stored field '{fname}'",
                "add new fields at the end, with a default",
            )
        if at != fname:
            raise incompatible(
                f"field '{fname}' moved from position {i} to {new.field_index(fname)}",
                f"keep the stored field order ({', '.join(old.field_names)}) {rename}",
            )
        if new.fields[fname] != ft:
            raise incompatible(
                f"field '{fname}' changed type from {ft.name} to {new.fields[fname].name}",
                f"keep {ft.name} {rename}",
            )
        _check_default(old, new, fname, incompatible, rename)
    for fname in new.field_names[len(old.field_names) :]:
        if fname not in new.defaults:
            raise incompatible(
                f"new field '{fname}' has no default (old actions lack it)",
                f"declare a default for '{fname}' {rename}",
            )
    return new


def _check_default(old: ActionType, new: ActionType, fname: str, incompatible, rename: str):
    # The reader fills a field's default into frames written before the field existed, so a
    # changed or removed default would rewrite history. Adding one to a field that had none
    # only affects new writes: such a field was never added by evolution, so every frame has it.
    if fname not in old.defaults:
        return
    ft, was = old.fields[fname], old.defaults[fname]
    if fname not in new.defaults:
        raise incompatible(
            f"the default of field '{fname}' ({was!r}) was removed (old actions may rely on it)",
            f"keep the default {rename}",
        )
    if json.dumps(_encode(ft, new.defaults[fname])) != json.dumps(_encode(ft, was)):  # -0.0, nan
        raise incompatible(
            f"the default of field '{fname}' changed from {was!r} to {new.defaults[fname]!r} "
            "(old actions may rely on it)",
            f"keep the default {was!r} {rename}",
        )
