"""The README's `make sweep-demo`, exactly as the Makefile gives it (read with `make -n`), sent with
`ray job submit` to a local 2-CPU head: it must run to the end. It used to hang forever on 2 cores (the first
trial's read task asked for a whole CPU while the trial and its Train workers held 1.01 of the 2)."""
import csv
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from job_head import BIN, job_status, ray_job, ray_head  # noqa: F401 (ray_head: the fixture)
from orchestration.sweep import sweep_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
# Minutes on 2 idle cores (11 with the 2 cores shared by other test runs): room before it counts as a hang.
DEADLINE_S = float(os.environ.get("VIM_SWEEP_DEMO_TIMEOUT_S", 1500))


def makefile_sweep_demo(sweep_dir: Path) -> list[str]:
    """The job's command line from the Makefile's sweep-demo recipe (what follows `bash scripts/submit.sh`)."""
    dry = subprocess.run(["make", "-n", "--no-print-directory", "sweep-demo", f"SWEEP_DIR={sweep_dir}"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    lines = dry.stdout.replace("\\\n", " ").splitlines()
    submit = [shlex.split(line) for line in lines if line.startswith("bash scripts/submit.sh ")]
    assert len(submit) == 1, dry.stdout
    return submit[0][2:]


def test_the_readme_sweep_demo_runs_to_the_end(ray_head, tmp_path):
    sweep_dir = tmp_path / "sweep-demo"
    command = makefile_sweep_demo(sweep_dir)
    assert command[:2] == ["python", "jobs/sweep.py"] and str(sweep_dir) in command
    grid = next(a for a in command if a.startswith("tokenizer.codebook_dim="))
    dims = sorted(int(v) for v in grid.split("=", 1)[1].split(","))

    started = time.time()
    submitted = ray_job(ray_head, "submit", "--no-wait", "--submission-id", "sweep-demo",
                         "--working-dir", str(ROOT), "--", *command)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    while (status := job_status(ray_head, "sweep-demo")) in ("PENDING", "RUNNING"):
        if time.time() - started > DEADLINE_S:
            cluster = subprocess.run([str(BIN / "ray"), "status", "--address", ray_head["gcs"]],
                                     env=ray_head["env"], capture_output=True, text=True, timeout=60)
            logs = ray_job(ray_head, "logs", "sweep-demo").stdout
            ray_job(ray_head, "stop", "sweep-demo")
            raise AssertionError(f"the sweep did not finish in {DEADLINE_S:.0f} s (hung?)\n{cluster.stdout}\n"
                                 f"{logs[-4000:]}")
        time.sleep(5)
    seconds = time.time() - started
    logs = ray_job(ray_head, "logs", "sweep-demo").stdout
    assert status == "SUCCEEDED", logs[-6000:]
    print(f"sweep-demo: {seconds:.0f} s")

    # Every trial ended in Tune as TERMINATED (which includes trials ASHA stops), none errored.
    final = re.findall(r"Trial status: ([^\n]*)", logs)[-1]
    assert re.fullmatch(rf"{len(dims)} TERMINATED", final.strip()), final
    # The table and plot, one completed row per lookup dim with its figure, and the MLflow sweep run.
    root = sweep_dir
    rows = list(csv.DictReader((root / "comparison.csv").open()))
    assert sorted(int(r["tokenizer.codebook_dim"]) for r in rows) == dims
    assert all(r["status"] == "completed" and 0 < float(r["tokenizer.val_usage_per_256"]) <= 1 for r in rows)
    assert all((Path(r["trial_dir"]) / "tokenizer" / "_MANIFEST.json").is_file() for r in rows)
    table = (root / "comparison.md").read_text()
    assert table.count("| completed |") == len(dims) and table.splitlines()[0] in logs
    assert (root / "plot_tokenizer_codebook_dim.png").stat().st_size > 0
    client = MlflowClient(sweep_tracking_uri(str(root)))
    sweep = client.get_run(yaml.safe_load((root / "sweep_run.json").read_text())["run_id"])
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["trials"] == len(dims)
    assert sweep.data.metrics["errored_trials"] == 0
