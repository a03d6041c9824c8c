"""Hot-path statements compiled once per database dialect and sent through the DB-API cursor.

Written by hand because SQLAlchemy's per-execution work for a Core statement (cache key,
compiled-cache lookup, parameter construction, execution context, result metadata) costs about
three times what a prepared statement here does, and about eight times the bare cursor
(``bench/statement_micro.py``: 28, 9 and 3 µs for one UPDATE), and an enrollment sends a dozen.
What SQLAlchemy would do that matters is kept:

- the same SQL text (the statement compiled by SQLAlchemy for the session's dialect, once);
- the same type processing: each bind parameter through its type's bind processor, each result
  column through its result processor (a UTC datetime comes back as one on SQLite too);
- the same engine events (``before_cursor_execute``: what counts statements, what refuses a write
  in a connection opened for reads) and the same errors (DB-API errors wrapped as SQLAlchemy's,
  a dropped connection invalidated), through ``Connection._cursor_execute``;
- the session's transaction: the statement runs on the session's connection, beginning its
  transaction when none is open, exactly like ``Session.execute`` of a Core statement (which
  does not autoflush either), with the same one retry of a transaction's first statement on a
  connection the server had dropped (``ca.store.engine.once_more_when_dropped``).

Refused when the statement is prepared for a dialect, rather than run wrongly: parameters that
expand at execution (``IN`` lists) or render as literals, and Python-side column defaults
(they would be skipped): give such columns their values in the statement.
"""

from __future__ import annotations

import weakref
from collections import namedtuple
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import ArgumentError, DBAPIError, StatementError
from sqlalchemy.orm import Session, configure_mappers, make_transient_to_detached
from sqlalchemy.orm.attributes import instance_dict, instance_state, set_committed_value
from sqlalchemy.sql import ClauseElement

from ca.store.engine import once_more_when_dropped

_M = TypeVar("_M")
_REQUIRED = object()  # a parameter the caller must give


class _Bind(NamedTuple):
    key: str
    processor: Any
    default: Any  # _REQUIRED when the statement carries no value for it


class _Form(NamedTuple):
    """A statement compiled for one dialect, with everything a run needs precomputed."""

    sql: str
    positional: bool
    binds: tuple[_Bind, ...]
    names: tuple[str, ...]  # what each bind is called in the SQL text (named paramstyles)
    known: frozenset[str]
    row: Any  # the namedtuple class of a result row
    returns_rows: bool  # a SELECT or RETURNING: its rows are fetched without asking the cursor
    result_processors: tuple[Any, ...] | None  # None when no column needs one


class Outcome:
    """The rows a statement returned (all fetched, types processed) and the rows it changed."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def all(self) -> list[Any]:
        return self.rows

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None

    def scalars(self) -> list[Any]:
        return [row[0] for row in self.rows]


class Prepared:
    """One Core statement (or one per dialect name), compiled on first use for each dialect.

    ``run(session, params)`` is what ``session.execute(statement, params)`` would do, returning an
    :class:`Outcome` instead of a ``Result``.
    """

    __slots__ = ("_by_dialect", "_forms")

    def __init__(self, statement: ClauseElement | Mapping[str, ClauseElement]) -> None:
        self._by_dialect: dict[str, ClauseElement] = (
            dict(statement) if isinstance(statement, Mapping) else {"": statement}
        )
        self._forms: weakref.WeakKeyDictionary[Dialect, _Form] = weakref.WeakKeyDictionary()

    def statement(self, dialect: Dialect) -> ClauseElement:
        """The Core statement sent to ``dialect`` (for tests that have the database plan it)."""
        statement = self._by_dialect.get(dialect.name, self._by_dialect.get(""))
        if statement is None:
            raise ArgumentError(f"no form of this statement for the {dialect.name} dialect")
        return statement

    def knows(self, dialect: Dialect) -> bool:
        """Whether this statement has a form for ``dialect`` (callers fall back to another way when not)."""
        return dialect.name in self._by_dialect or "" in self._by_dialect

    def form(self, dialect: Dialect) -> _Form:
        form = self._forms.get(dialect)
        if form is None:
            form = self._forms[dialect] = self._compile(dialect)
        return form

    def _compile(self, dialect: Dialect) -> _Form:
        compiled: Any = self.statement(dialect).compile(dialect=dialect)
        if compiled.literal_execute_params or compiled.post_compile_params:
            raise ArgumentError("a prepared statement cannot hold parameters that expand at execution (IN lists)")
        if getattr(compiled, "insert_prefetch", None) or getattr(compiled, "update_prefetch", None):
            raise ArgumentError("a prepared statement cannot rely on Python-side column defaults: give their values")
        processors = compiled._bind_processors
        defaults = compiled.construct_params(_check=False, escape_names=False)
        required = {name for bind, name in compiled.bind_names.items() if bind.required}
        order = compiled.positiontup if compiled.positional else list(defaults)
        binds = tuple(_Bind(key, processors.get(key), _REQUIRED if key in required else defaults[key]) for key in order)
        escaped = compiled.escaped_bind_names
        columns = compiled._result_columns or []
        result_processors = tuple(entry.type._cached_result_processor(dialect, None) for entry in columns)
        return _Form(
            sql=compiled.string,
            positional=bool(compiled.positional),
            binds=binds,
            names=tuple(escaped.get(bind.key, bind.key) for bind in binds),
            known=frozenset(defaults),
            row=namedtuple("Row", [entry.keyname for entry in columns], rename=True) if columns else tuple,
            returns_rows=bool(columns),
            result_processors=result_processors if any(result_processors) else None,
        )

    def run(self, session: Session, params: Mapping[str, Any] | None = None) -> Outcome:
        return once_more_when_dropped(session, lambda: self.run_on(session.connection(), params))

    def run_on(self, connection: Connection, params: Mapping[str, Any] | None = None) -> Outcome:
        """``run`` on a connection rather than a session's (``reading_outside_transaction``'s)."""
        given = params or {}
        form = self.form(connection.dialect)
        unknown = given.keys() - form.known
        if unknown:
            raise ArgumentError(f"parameters not in the statement: {', '.join(sorted(unknown))}")
        values = []
        for key, processor, default in form.binds:
            value = given.get(key, default)
            if value is _REQUIRED:
                raise ArgumentError(f"the statement needs a value for parameter {key!r}")
            values.append(value if processor is None else processor(value))
        parameters: Sequence[Any] | dict[str, Any] = (
            tuple(values) if form.positional else dict(zip(form.names, values, strict=True))
        )
        cursor = connection.connection.cursor()
        try:
            try:
                connection._cursor_execute(cursor, form.sql, parameters)  # type: ignore[attr-defined]
            except StatementError as exc:
                # Without an execution context SQLAlchemy wraps what an event listener raised too;
                # ``Session.execute`` lets it through as it is (e.g. the refusal of a write in reads).
                if isinstance(exc, DBAPIError) or not isinstance(exc.orig, Exception):
                    raise
                raise exc.orig from None
            try:
                # A statement known to return rows skips ``cursor.description``: psycopg builds a column
                # object per column each time it is read (6% of an enrollment's Python calls on PostgreSQL).
                rows = cursor.fetchall() if form.returns_rows or cursor.description is not None else []
                rowcount = cursor.rowcount
            except Exception as exc:  # sqlite3 reports a RETURNING statement's constraint errors here
                connection._handle_dbapi_exception(exc, form.sql, parameters, cursor, None)  # type: ignore[attr-defined]
                raise  # not reached: the line above raises the wrapped error
        finally:
            cursor.close()
        if form.result_processors is not None:
            processors = form.result_processors
            rows = [form.row(*(v if p is None else p(v) for p, v in zip(processors, row, strict=True))) for row in rows]
        elif form.row is not tuple:
            rows = [form.row(*row) for row in rows]
        return Outcome(rows, rowcount)


def as_objects(session: Session, model: type[_M], outcome: Outcome) -> list[_M]:
    """``model`` objects in ``session`` for the rows of a prepared ``select(<model's table>)``, as the
    ORM's own query would give them, without its per-query machinery (a tenth of an enrollment's
    CPU went to loading the device and its older certificates).

    An object the session already holds (its identity map) is returned as it is, its expired
    columns refreshed from the row (as a query does, which never overwrites loaded ones); any other
    is made from the row and joins the session as loaded, as if a query had just read it.
    Relationships are left unloaded (read on first access, as with the default lazy loading).
    """
    return [as_object(session, model, row) for row in outcome.rows]


def as_object(session: Session, model: type[_M], values: Sequence[Any]) -> _M:
    """``as_objects`` for one row's values, in the order of the model's table columns (a slice of a
    wider row: a statement selecting two tables' columns gives an object of each)."""
    mapper, names, primary = _columns_of(model)
    key = mapper.identity_key_from_primary_key([values[i] for i in primary])
    held = session.identity_map.get(key)
    if held is not None:
        expired = instance_state(held).expired_attributes
        for name, value in zip(names, values, strict=True):
            if name in expired:
                set_committed_value(held, name, value)
        return held  # type: ignore[no-any-return]
    made = new_object(model, zip(names, values, strict=True))
    make_transient_to_detached(made)
    session.add(made)
    return made


def new_object(model: type[_M], values: Iterable[tuple[str, Any]]) -> _M:
    """A transient ``model`` object holding ``values`` (attribute name, value), set as a query's load
    sets them, without the constructor's per-attribute events (a certificate's cost 160 Python calls,
    a twentieth of an enrollment). For rows whose values are all known (then e.g.
    ``make_transient_to_detached``): nothing here applies column defaults."""
    made = _columns_of(model)[0].class_manager.new_instance()
    instance_dict(made).update(values)
    return made  # type: ignore[no-any-return]


_COLUMNS: dict[type, tuple[Any, list[str], list[int]]] = {}


def _columns_of(model: type) -> tuple[Any, list[str], list[int]]:
    """The model's mapper, its attribute names in its table's column order, and where its primary key
    is (cached: mappers are configured once).

    The mappers are configured first: the object made from them may be the first ORM object of the
    process, and until configuration an attribute has no loader yet (``make_transient_to_detached``
    then fails). A query or a relationship attribute touched earlier configures them too, which hid
    this until nothing did."""
    known = _COLUMNS.get(model)
    if known is None:
        configure_mappers()
        mapper: Any = inspect(model)
        names = [mapper.get_property_by_column(column).key for column in model.__table__.c]  # type: ignore[attr-defined]
        primary = [names.index(mapper.get_property_by_column(column).key) for column in mapper.primary_key]
        known = _COLUMNS[model] = (mapper, names, primary)
    return known
