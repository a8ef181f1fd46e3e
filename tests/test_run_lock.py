"""The run lock: two pipelines started at once on one run directory, exactly one wins, every time.

A race harness: rounds of several processes released together at a barrier, each taking the lock on the same
folder (real files in tmp_path), on a fresh folder and on a folder whose lock names a dead process. A winner
holds the lock until every contender has tried."""
import json
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from orchestration.errors import PipelineError
from orchestration.run_lock import LOCK, RunLock
from pipeline.storage import RunDir

CONTENDERS = 3
ROUNDS = 25  # per kind of round; the code before the fix lost about one round in four


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _contender(location: str, start, tried, results) -> None:
    outcome = "not reached"
    lock = RunLock(RunDir(location))
    try:
        start.wait(timeout=30)
        try:
            lock.__enter__()
            outcome = "won"
        except PipelineError:
            outcome = "refused"
        except Exception as e:  # noqa: BLE001 - the harness counts anything else as a failure
            outcome = f"{type(e).__name__}: {e}"
        tried.wait(timeout=30)  # a winner holds the lock until every contender has tried
        if outcome == "won":
            lock.__exit__(None, None, None)
    finally:
        results.put(outcome)


def _race(location: str) -> list[str]:
    ctx = multiprocessing.get_context("fork")
    start, tried, results = ctx.Barrier(CONTENDERS), ctx.Barrier(CONTENDERS), ctx.Queue()
    processes = [ctx.Process(target=_contender, args=(location, start, tried, results)) for _ in range(CONTENDERS)]
    for p in processes:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in processes)
    for p in processes:
        p.join(timeout=30)
    return outcomes


@pytest.mark.parametrize("kind", ["fresh", "stale"])
def test_starters_released_together_exactly_one_wins(tmp_path, kind):
    dead = _dead_pid()
    bad = []
    for i in range(ROUNDS):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        if kind == "stale":
            (folder / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "since": 0}))
        outcomes = _race(str(folder))
        if outcomes != ["refused"] * (CONTENDERS - 1) + ["won"]:
            bad.append(outcomes)
        assert not (folder / LOCK).exists(), "the winner's release left the lock behind"
    assert not bad, f"{len(bad)} of {ROUNDS} rounds went wrong: {bad[:5]}"


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    run_dir = RunDir(str(tmp_path / "run"))
    (tmp_path / "run" / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                                                     "since": 0}))
    with RunLock(run_dir) as lock:
        held = json.loads((tmp_path / "run" / LOCK).read_text())
        assert held["pid"] == os.getpid() and held == json.loads(json.dumps(lock.me))
    assert not (tmp_path / "run" / LOCK).exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # no temporary or set-aside file left


def test_a_live_holder_is_refused_and_keeps_its_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir = RunDir(str(tmp_path / "run"))
        text = json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": 0})
        (tmp_path / "run" / LOCK).write_text(text)
        with pytest.raises(PipelineError, match=f"in use by pid {holder.pid}"):
            with RunLock(run_dir):
                pass
        assert (tmp_path / "run" / LOCK).read_text() == text
        assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK]
    finally:
        holder.kill()
        holder.wait()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    """A lock taken over while we held it (deleted by hand, another pipeline started) is not ours to delete."""
    run_dir = RunDir(str(tmp_path / "run"))
    other = json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "since": 0})
    with RunLock(run_dir):
        (tmp_path / "run" / LOCK).unlink()
        (tmp_path / "run" / LOCK).write_text(other)
    assert (tmp_path / "run" / LOCK).read_text() == other


def test_on_a_bucket_one_of_several_starters_within_the_settle_window_wins(tmp_path, monkeypatch):
    """The bucket path (write whole, wait, re-read), run on local files: `pyarrow.fs` gives it no exclusive
    create, so this is the best-effort guarantee the class documents, for starters within the window."""
    monkeypatch.setattr(RunDir, "is_local", property(lambda self: False))
    monkeypatch.setattr(RunLock, "BUCKET_SETTLE_S", 1.0)
    for i in range(3):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        assert _race(str(folder)) == ["refused"] * (CONTENDERS - 1) + ["won"]
        assert not (folder / LOCK).exists()
