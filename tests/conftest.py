"""Shared fixtures: a real local Ray (2 CPUs), generated image sources, the shared CIFAR-10 copy."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Every process of the test cluster must agree on auth, or Ray Data tasks hang without an error.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use the SQLite store beside their run directory
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "jobs"))  # job scripts import their _bootstrap helper

SHARED = ROOT.parent / "shared"
CIFAR_TAR = SHARED / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    temp = tempfile.mkdtemp(prefix="vimray-", dir="/tmp")  # short: Ray keeps unix sockets there
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"],
                                       "PYTHONPATH": str(ROOT)}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """CIFAR-10 JPEG class folders from ../shared, extracted once; skipped where ../shared is absent."""
    if not CIFAR_TAR.exists():
        pytest.skip(f"{CIFAR_TAR} is absent (it lives in the shared folder beside the checkout)")
    import tarfile

    target = tmp_path_factory.mktemp("cifar")
    with tarfile.open(CIFAR_TAR) as archive:
        archive.extractall(target, filter="data")
    return target / "cifar10"


# A tiny ingest -> tokenizer -> pretokenize run, shared by the pretokenize and transformer tests.
@pytest.fixture(scope="session")
def coded_run(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretok") / "run"
    from helpers import PRETOKENIZE_TINY
    from pipeline.config import load_config
    from orchestration.runner import run_pipeline

    cfg = load_config(ROOT / "configs" / "demo.yaml", PRETOKENIZE_TINY)
    outcomes = run_pipeline(cfg, str(run_dir), to_stage="pretokenize")
    assert [o.name for o in outcomes] == ["ingest", "tokenizer", "pretokenize"]
    return run_dir




@pytest.fixture(autouse=True)
def no_placement_group_left_over(request):
    """Before each test on the shared cluster: a placement group a failed test left reserved (a trial or a
    Train run interrupted by a timeout) would starve every later test of CPUs until its own timeout; it is
    removed, and named, so one failure stays one failure."""
    if "ray_cluster" in request.fixturenames or "coded_run" in request.fixturenames:
        import ray
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
        from ray._raylet import PlacementGroupID

        if ray.is_initialized():
            for group_id, group in placement_group_table().items():
                if group["state"] != "REMOVED":
                    print(f"removing placement group {group_id} ({group.get('name')!r}, {group['state']}) left "
                          f"by an earlier test", file=sys.stderr)
                    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group_id))))
    yield


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config._vim_session = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """After the summary, end the process with the session's status. A thread a failed test left running
    (a Ray Train or Tune loop interrupted by a timeout) or Ray's core worker still reaching for a cluster that
    died would otherwise keep the interpreter from exiting, and CI would wait until its own limit with the
    summary unprinted. Threads still running are named with their stacks first."""
    import threading
    import traceback

    session = getattr(config, "_vim_session", None)
    if session is None:  # collection only, or pytest stopped before the session
        return
    left = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if left:
        frames = sys._current_frames()
        sys.stderr.write(f"\n{len(left)} non-daemon thread(s) still running after the tests:\n")
        for thread in left:
            sys.stderr.write(f"--- {thread.name}\n{''.join(traceback.format_stack(frames.get(thread.ident)))}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))
