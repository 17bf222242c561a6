"""Where a tune study lives: ``tuning/study.journal`` (one machine), or an optuna RDB URL (several machines).

With an RDB URL (PostgreSQL, MySQL, SQLite: anything `optuna.storages.RDBStorage` takes) the study also holds what a
worker on another machine needs (`publish` / `published`): the run's settings, budget, space and seed, the trial
budget and deadline, the hfsqueeze version, and the calibration text and sensitivities as files (verified by sha256).
Trials send optuna heartbeats there; a trial whose process stopped beating (kill -9, a lost machine) is failed by the
next process that starts a trial after the grace period and queued again (`requeue_stale`), while trials still
running elsewhere are left alone.

Creating optuna's schema is not safe when several processes do it at once (their ``CREATE TABLE`` race, measured:
``UniqueViolation ... pg_type_typname_nsp_index`` on PostgreSQL 15 with 6 processes); `rdb_storage` serialises it
under a database lock (`database_lock`: a PostgreSQL advisory lock, MySQL's ``GET_LOCK``) and retries the known
errors where the database has no such lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import ArtifactError, BackendMissingError, RecipeError

logger = logging.getLogger("hfsqueeze")

STUDY_NAME = "hfsqueeze-tune"
JOURNAL = "study.journal"
# Seconds between a running trial's heartbeats; a trial silent for GRACE_FACTOR heartbeats is dead.
HEARTBEAT_SECONDS = 60
GRACE_FACTOR = 2
# A trial whose process died this many times in a row is not queued again (the point itself may kill processes).
MAX_RETRIES = 2
META = "hfsqueeze"  # the study user attribute holding the run (`publish`)
# A file is stored as chunks of this many characters: MySQL's TEXT column (optuna's attribute column) holds 64 KiB,
# and JSON may write one character as 6 bytes (a backslash-u escape with four hex digits).
CHUNK_CHARS = 10_000
_LOCK_ATTEMPTS = 6


@dataclasses.dataclass(frozen=True)
class StudyStorage:
    """Where the study is: ``url`` (an optuna RDB URL) or, when ``None``, ``tuning/study.journal``; its ``name``;
    the ``heartbeat`` interval in seconds of trials in an RDB study."""

    url: str | None = None
    name: str = STUDY_NAME
    heartbeat: int = HEARTBEAT_SECONDS

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise RecipeError(f"study name: got {self.name!r}; give a non-empty name")
        if not isinstance(self.heartbeat, int) or isinstance(self.heartbeat, bool) or self.heartbeat < 1:
            raise RecipeError(f"heartbeat: got {self.heartbeat!r}; must be a whole number of seconds >= 1")
        if self.url is not None and not (isinstance(self.url, str) and "://" in self.url):
            raise RecipeError(f"storage: got {self.url!r}; give an optuna RDB URL such as "
                              "postgresql://user:password@host:5432/db (or leave it out for tuning/study.journal)")

    @property
    def is_rdb(self) -> bool:
        return self.url is not None

    def describe(self) -> str:
        """The URL without its password (what logs and errors show)."""
        return masked(self.url) if self.url else JOURNAL

    def open(self, tuning_dir: Path | None = None):
        """The optuna storage: the RDB (schema created safely, heartbeats on) or the journal in ``tuning_dir``."""
        if self.url is None:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            return JournalStorage(JournalFileBackend(str(Path(tuning_dir) / JOURNAL)))
        return rdb_storage(self.url, heartbeat=self.heartbeat)


def hfsqueeze_version() -> str:
    """This hfsqueeze's version, as installed (what the study records; a worker must match it)."""
    try:
        return importlib.metadata.version("hfsqueeze")
    except importlib.metadata.PackageNotFoundError:  # a source tree run without installing
        return "unknown"


def masked(url: str) -> str:
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy reads: show the scheme only
        return url.split("://", 1)[0] + "://..."


def rdb_storage(url: str, heartbeat: int | None = None):
    """`optuna.storages.RDBStorage` at ``url``, its schema created once even when several processes start together;
    with ``heartbeat``, trials beat every that many seconds and a stale one is failed and queued again."""
    import optuna
    import sqlalchemy.exc

    kwargs: dict[str, Any] = {}
    if heartbeat is not None:
        kwargs = {"heartbeat_interval": heartbeat, "grace_period": GRACE_FACTOR * heartbeat,
                  "heartbeat_stale_trial_callback": requeue_stale}
    # Every process checks that the schema exists; the first creates it while the others wait at the lock.
    for attempt in range(_LOCK_ATTEMPTS):
        try:
            with _engine_errors(url), database_lock(url, "schema"):
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # A database without a lock (SQLite, ...) loses the schema race: the winner's tables now exist.
            if attempt == _LOCK_ATTEMPTS - 1:
                raise ArtifactError(f"storage {masked(url)}: optuna's tables could not be created "
                                    f"({type(exc.orig).__name__ if exc.orig else type(exc).__name__})") from None
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _engine_errors(url: str) -> Iterator[None]:
    """Missing driver, unreadable URL, unreachable server: one line each."""
    import sqlalchemy.exc

    try:
        yield
    except ImportError as exc:
        driver = url.split("://", 1)[0]
        extra = "postgres" if driver.startswith("postgresql") else None
        how = (f"pip install 'hfsqueeze[{extra}]'" if extra else "install the database driver SQLAlchemy names")
        raise BackendMissingError(f"storage {masked(url)}: no Python driver for {driver} ({exc.__cause__ or exc}); "
                                  f"{how}") from None
    except sqlalchemy.exc.ArgumentError as exc:
        raise RecipeError(f"storage: {masked(url)} is not a database URL SQLAlchemy reads ({exc}); e.g. "
                          "postgresql://user:password@host:5432/db") from None
    except sqlalchemy.exc.OperationalError as exc:
        first = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else type(exc).__name__
        raise ArtifactError(f"storage {masked(url)}: cannot connect ({first})") from None


def _lock_key(name: str) -> int:
    """A signed 64-bit key for PostgreSQL's advisory locks, the same in every process."""
    return int.from_bytes(hashlib.sha256(f"hfsqueeze:{name}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def database_lock(url: str, name: str) -> Iterator[None]:
    """Hold a lock named ``name`` in the database at ``url`` (PostgreSQL advisory lock, MySQL ``GET_LOCK``; other
    databases have none and callers retry instead). Needs no table, so it also guards creating the schema."""
    import sqlalchemy

    dialect = sqlalchemy.engine.make_url(url).get_backend_name()
    if dialect not in ("postgresql", "mysql", "mariadb"):
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            if dialect == "postgresql":
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _lock_key(name)})
                unlock = sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(name)}
            else:
                conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 600)"), {"k": f"hfsqueeze:{name}"[:64]})
                unlock = sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"hfsqueeze:{name}"[:64]}
            conn.commit()
            try:
                yield
            finally:
                conn.execute(*unlock)
                conn.commit()
    finally:
        engine.dispose()


@contextlib.contextmanager
def study_lock(storage: StudyStorage, tuning_dir: Path | None) -> Iterator[None]:
    """Exclusive access to the study for check-then-queue steps (the baselines, the points to redo): two starters
    must not both find a baseline missing and both queue it (optuna's `enqueue_trial` does not check)."""
    if storage.url is None:
        with open(Path(tuning_dir) / f".{JOURNAL}.lock", "w") as fh:  # hidden: not part of the artifact
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield
        return
    with _engine_errors(storage.url), database_lock(storage.url, f"study:{storage.name}"):
        yield


def requeue_stale(study, trial) -> None:
    """optuna's heartbeat callback: queue again the point of a trial whose process died (its ``kind`` kept, so a
    baseline is not queued twice; ``redo_of`` names it), at most `MAX_RETRIES` times in a row."""
    import optuna
    from optuna.trial import TrialState

    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRIES:
        logger.warning("tune: trial %d's process stopped responding; its point was already retried %d times and is "
                       "not queued again", trial.number, MAX_RETRIES)
        return
    logger.warning("tune: trial %d stopped sending heartbeats (its process died); its point is queued again",
                   trial.number)
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"kind": trial.user_attrs.get("kind", "search"), "redo_of": trial.number},
        system_attrs={**trial.system_attrs, "failed_trial": history[0], "retry_history": history}))


def retried(trials) -> set[int]:
    """Numbers of trials failed for a lost heartbeat and queued again (they count as interrupted, not as done)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


# ---- what a worker on another machine reads from the study ------------------------------------------------------
def publish(study, run: dict[str, Any], files: dict[str, str]) -> None:
    """Store the run (``spec``, ``trials``, ``deadline``...) and ``files`` (name -> text) in the study's user
    attributes, with this hfsqueeze's version; ``stop`` is cleared (a resumed search runs again)."""
    index = {}
    for name, text in files.items():
        chunks = [text[i:i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]
        for i, chunk in enumerate(chunks):
            study.set_user_attr(f"{META}.file.{name}.{i}", chunk)
        index[name] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "chunks": len(chunks)}
    # Written last: a worker that sees the run finds its files complete.
    study.set_user_attr(META, {**run, "version": hfsqueeze_version(), "files": index, "stop": None})


def published(study, where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The run and files `publish` stored; one-line errors for a study that has none, or damaged files."""
    attrs = study.user_attrs
    run = attrs.get(META)
    if not isinstance(run, dict) or "spec" not in run:
        raise RecipeError(f"study {where} was not started by hfsqueeze tune (it holds no run); start it with "
                          "hfsqueeze tune --storage URL --study NAME")
    files = {}
    for name, entry in run.get("files", {}).items():
        text = "".join(attrs.get(f"{META}.file.{name}.{i}", "") for i in range(entry["chunks"]))
        if hashlib.sha256(text.encode()).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"study {where}: its copy of {name} is damaged (sha256 differs); restart the run "
                                "with hfsqueeze tune --resume")
        files[name] = text
    return run, files


def announce_stop(study, reason: str) -> None:
    """Tell every worker of the study to stop after its running trial (the coordinator was interrupted)."""
    run = study.user_attrs.get(META)
    if isinstance(run, dict):
        study.set_user_attr(META, {**run, "stop": reason})


def stop_reason(study) -> str | None:
    run = study.user_attrs.get(META)
    return run.get("stop") if isinstance(run, dict) else None




def prepare_study(storage: StudyStorage, resume: bool, overwrite: bool) -> None:
    """Before any work, one-line errors: an RDB study that already exists needs ``resume`` (continue it) or
    ``overwrite`` (it is deleted here); ``resume`` needs it to exist. The journal is judged with its output."""
    if storage.url is None:
        return
    opened = storage.open()
    try:
        _judge_existing(opened, storage, resume, overwrite)
    finally:
        opened.engine.dispose()  # this process opens the study again later: no idle connections kept meanwhile


def _judge_existing(opened, storage: StudyStorage, resume: bool, overwrite: bool) -> None:
    import optuna

    try:
        opened.get_study_id_from_name(storage.name)
    except KeyError:
        if resume:
            raise ArtifactError(f"--resume: there is no study {storage.name!r} in {storage.describe()}; start "
                                "without --resume") from None
        return
    if resume:
        return
    if overwrite:
        logger.info("tune: deleting the study %r in %s (--overwrite)", storage.name, storage.describe())
        optuna.delete_study(study_name=storage.name, storage=opened)
        return
    raise ArtifactError(f"study {storage.name!r} already exists in {storage.describe()}; pass --resume to continue "
                        "it, --overwrite to delete it and start over, or another --study name")


__all__ = ["HEARTBEAT_SECONDS", "JOURNAL", "STUDY_NAME", "StudyStorage", "announce_stop", "database_lock",
           "hfsqueeze_version", "prepare_study", "publish", "published", "rdb_storage", "requeue_stale", "retried",
           "stop_reason", "study_lock"]
