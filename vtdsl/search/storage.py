"""Where a study lives: checking a `--storage` URL, opening it, and the lock that lets
several processes share one study.

    url = storage.resolve("postgresql://me@127.0.0.1:5432/vt")   # -> postgresql+psycopg://...
    with storage.StudyLock(url, "my-study"):
        ...   # one process at a time, across hosts for PostgreSQL

Accepted: SQLite files (`sqlite:///path/study.db`) and any server optuna's RDB storage
supports through an installed SQLAlchemy driver; PostgreSQL through psycopg 3
(`postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DB`; a plain `postgresql://` means
the same). Anything else is a `SearchError` with one line, before any table is made.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import warnings
from pathlib import Path

from .objectives import SearchError

FORMS = "sqlite:///PATH or postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DB"
_SQLITE_MAGIC = b"SQLite format 3\x00"
# The lock that serialises optuna's table creation on a fresh database (any study).
SCHEMA_LOCK = "vtdsl-search-schema"


def _bad(url: str, why: str) -> SearchError:
    return SearchError(f"--storage {shown(url)}: {why} (expected {FORMS})")


def shown(url: str) -> str:
    """The URL as it may be printed or written to trials.json: no password."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        return repr(url if parsed.password is None else parsed.render_as_string(hide_password=True))
    except Exception:  # noqa: BLE001 - unparsable: it holds no password we could find either
        return repr(url)


def redacted(url: str) -> str:
    return shown(url)[1:-1]


def resolve(url: str) -> str:
    """The URL optuna should open, or a SearchError saying in one line why it cannot be."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        scheme = parsed.drivername
    except (ArgumentError, ValueError):
        raise _bad(url, "not a database URL") from None
    if scheme in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
        url = parsed.render_as_string(hide_password=False)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise _bad(url, f"unknown database kind '{scheme}'") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        name = getattr(exc, "name", None) or dialect.driver
        hint = "; install it: pip install 'psycopg[binary]'" if parsed.get_backend_name() == "postgresql" else ""
        raise SearchError(f"--storage {shown(url)}: the database driver '{name}' is not installed{hint}") from None
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite(url, parsed.database)
    return url


def _check_sqlite(url: str, database: str | None) -> None:
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        raise _bad(url, "an in-memory SQLite database dies with its process and cannot hold a study; name a file")
    path = Path(database)
    if path.is_dir():
        raise _bad(url, f"{database} is a directory, not a database file")
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
        if head != _SQLITE_MAGIC:
            raise _bad(url, f"{database} is not an SQLite database")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _bad(url, f"cannot make the folder of {database} ({exc.strerror or exc})") from None


def _first_line(exc: BaseException) -> str:
    inner = getattr(exc, "orig", None) or exc.__cause__ or exc
    text = str(inner).strip() or type(inner).__name__
    return text.splitlines()[0].strip()


@contextlib.contextmanager
def storage_errors(url: str):
    """Database failures while opening a study (server down, refused login, a file
    that is not a database) as one-line SearchErrors."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        raise SearchError(f"--storage {shown(url)}: cannot open the study database: {_first_line(exc)}") from None


def open_storage(url: str):
    """An optuna RDBStorage on a URL `resolve` accepted (heartbeats on; SQLite waits for
    locks instead of failing). Concurrent first openings of a fresh database are
    serialised, so only one of them creates the tables."""
    import optuna

    kwargs: dict = {}
    sqlite = url.startswith("sqlite")
    if sqlite:
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    with storage_errors(url), StudyLock(url, SCHEMA_LOCK), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=10, grace_period=60, **kwargs)
    if sqlite:
        _sqlite_pragmas(storage.engine)
    return storage


def _sqlite_pragmas(engine) -> None:
    """WAL journal, fsync at checkpoints only: a commit survives the process being
    killed (not a power cut), and a trial's ~20 small commits stop costing seconds."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, record):  # noqa: ARG001
        cur = dbapi_connection.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    engine.dispose()


class StudyLock:
    """A lock named `name` shared by every process that uses the same storage.

    PostgreSQL: a session advisory lock, on a connection of its own opened per
    acquisition (so none crosses a fork, and a killed holder's lock goes with its
    connection). SQLite: `flock` on `DB.lock` next to the file. Other servers: a lock of
    this process only (several processes then share a study without that guarantee).
    Not re-entrant; `release` is idempotent, so an owner may release early.
    """

    def __init__(self, url: str, name: str):
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        self.url, self.backend = url, parsed.get_backend_name()
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self.path = (parsed.database + ".lock") if self.backend == "sqlite" else None
        self._held = None
        self._engine = None
        self._local = threading.Lock()

    def acquire(self) -> None:
        if self._held is not None:
            return
        if self.backend == "postgresql":
            self._held = self._pg_acquire()
        elif self.path is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._held = fd
        else:
            self._local.acquire()
            self._held = True

    def _pg_acquire(self):
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        if self._engine is None:  # pools nothing, so it may cross a fork
            self._engine = create_engine(self.url, poolclass=NullPool)
        conn = self._engine.connect()
        try:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def release(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        if self.backend == "postgresql":
            held.close()  # ends the session, and with it the advisory lock
        elif self.path is not None:
            os.close(held)  # drops the flock
        else:
            self._local.release()

    @property
    def held(self) -> bool:
        return self._held is not None

    def __enter__(self) -> "StudyLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
