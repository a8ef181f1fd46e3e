"""Checks of committed stage outputs against their manifests: before a stage reads them, and when a
committed stage is skipped. Each problem is one error naming the file and the command that repairs it."""
from __future__ import annotations

from orchestration.errors import PipelineError
from pipeline.stage import StageSpec
from pipeline.output_records import verify_outputs
from pipeline.storage import MANIFEST, Manifest, ManifestError, RunDir
from stages import spec as spec_of


def rerun_hint(stage: str) -> str:
    return f"rerun {stage} and what follows (--from {stage} --force {stage})"


def read_manifest(run_dir: RunDir, spec: StageSpec) -> Manifest | None:
    try:
        return Manifest.read(run_dir, spec.folder)
    except ManifestError as error:
        raise PipelineError(f"stage {spec.name}: {error}; {rerun_hint(spec.name)}") from None


def check_outputs(run_dir: RunDir, spec: StageSpec, manifest: Manifest, checksums: bool, reader: str) -> None:
    """One error naming the first damaged file of a committed stage (sizes; sha256 with `checksums`)."""
    problems = verify_outputs(run_dir, spec.folder, manifest, checksums)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PipelineError(f"{reader}: committed outputs of stage {spec.name} in {run_dir.location} are damaged: "
                            f"{problems[0]}{more}; {rerun_hint(spec.name)}")


def changed_manifests(spec: StageSpec, manifest: Manifest, manifests: dict[str, Manifest],
                       ran: set[str]) -> list[str]:
    """Upstream stages of a committed stage whose `_MANIFEST.json` is not the one it read (at the same
    fingerprint). Those rerun in this pipeline run are returned (the stage is stale); any other such change is
    a hand edit or a rerun on its own, and an error."""
    rerun = []
    for upstream, recorded in manifest.input_manifests.items():
        current = manifests.get(upstream)
        if current is None or current.sha256 == recorded or current.fingerprint != manifest.inputs.get(upstream):
            continue  # unchanged, or another upstream commit altogether: stale, which fingerprints handle
        if upstream in ran:
            rerun.append(upstream)
            continue
        folder = spec_of(upstream).folder
        raise PipelineError(
            f"{folder}/{MANIFEST} changed after stage {spec.name} read it "
            f"(sha256 {str(current.sha256)[:16]}, recorded {recorded[:16]}): edited by hand, or {upstream} "
            f"rerun on its own since. If edited, {rerun_hint(upstream)}; if {upstream} was rerun on purpose, "
            f"{rerun_hint(spec.name)}")
    return rerun


def check_inputs(run_dir: RunDir, spec: StageSpec, manifests: dict[str, Manifest], ran: set[str],
                  verified: set[str], checksums: bool) -> None:
    """Before a stage runs: its upstream stages' committed files (sizes; sha256 with `checksums`) and that
    their manifests are the ones their own consumers read."""
    for upstream in spec.upstream:
        if upstream in ran:  # written in this pipeline run: nothing to check
            continue
        changed_manifests(spec_of(upstream), manifests[upstream], manifests, ran)
        if upstream not in verified:
            check_outputs(run_dir, spec_of(upstream), manifests[upstream], checksums,
                          f"stage {spec.name} reads damaged input")
            verified.add(upstream)
