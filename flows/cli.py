"""``anonymousnet``: the command line.

    anonymousnet demo                      release sample photos into releases/demo
    anonymousnet release -i PHOTOS -o OUT  release a folder (or manifest) under a policy
    anonymousnet lineage show OUT          summarise a release's lineage
    anonymousnet policy check FILE         validate a policy (file:line errors)
    anonymousnet policy approve FILE       approve a policy for deployment runs (shows the diff)
    anonymousnet ops secrets infra/.env    random secrets for the authenticated server (compose)
    anonymousnet evaluate ...              privacy and quality protocol (EVALUATION.md)
    anonymousnet benchmark ...             faces per second per stage (--stage attributes: Stage I)
    anonymousnet train attributes          train Stage I (CNN + 40 forests) on CelebA
    anonymousnet train identity            distil dlib's descriptor (Stage III's identity loss)
    anonymousnet train generator           train Stage III's generator on CelebA
    anonymousnet train perturbation        compute Stage IV's universal perturbation on CelebA
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from pathlib import Path

import click

import flows  # noqa: F401  (sets Prefect's telemetry environment before Prefect loads)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """AnonymousNet: policy-driven face de-identification releases."""


def _run_release(input_location: str, output: str, policy: str | None, batch_size: int,
                 manifest_root: str | None, dataset: str | None = None, ledger: str | None = None,
                 incremental: bool = True, dask_workers: int = 0, dask_address: str | None = None) -> dict:
    # Under Dask the batches run in other processes, which start Prefect's own servers.
    server = None if dask_workers or dask_address else _TemporaryServer.for_this_process()
    return _release_on(server, input_location, output, policy, batch_size, manifest_root, dataset, ledger,
                       incremental, dask_workers, dask_address)


def _release_on(server: _TemporaryServer | None, input_location: str, output: str, policy: str | None,
                batch_size: int, manifest_root: str | None, dataset: str | None, ledger: str | None,
                incremental: bool, dask_workers: int, dask_address: str | None) -> dict:
    from flows.release.admission import Refused
    from flows.release.privacy_ledger import PrivacyBudgetExceeded
    from flows.release.resume import ReleaseBusy
    from models.registry import ModelFileError
    from policy.loader import PolicyError, load_policy
    from stages.common.ingest import InputError
    from stages.selection.ppas import PolicyInfeasible

    try:
        loaded = load_policy(policy)  # fail fast, before Prefect starts, with file:line errors
        _check_feasible(loaded)
        _check_perturbation(loaded)
    except (PolicyError, ModelFileError) as exc:
        raise click.ClickException(str(exc)) from None
    from flows.release.flow import dask_task_runner, release, warm_up_models
    from stages.common.parallel import resolve_workers

    photo_workers = 1 if dask_workers or dask_address else 0
    # The photo workers start and load their models while Prefect's server starts.
    warm_up_models(loaded.policy, resolve_workers(photo_workers))
    if dask_workers or dask_address:
        if not os.environ.get("PREFECT_API_URL"):
            click.echo("note: with no PREFECT_API_URL every Dask worker starts a temporary Prefect server of its "
                       "own (slow); start one with `prefect server start` and export PREFECT_API_URL "
                       "(README: Operations)", err=True)
        release = release.with_options(task_runner=dask_task_runner(dask_workers or 2, dask_address))
    api_url = server.ready() if server else None
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings({PREFECT_API_URL: api_url} if api_url else {}):
            return release(input=input_location, output=output, policy=policy, batch_size=batch_size,
                           manifest_root=manifest_root, show_progress=True, dataset=dataset, ledger=ledger,
                           incremental=incremental,
                           # Dask already runs batches in parallel processes: one per batch there.
                           photo_workers=photo_workers)
    except (InputError, PrivacyBudgetExceeded, PolicyInfeasible, ModelFileError, ReleaseBusy, Refused) as exc:
        raise click.ClickException(str(exc)) from None


class _TemporaryServer:
    """Prefect's temporary API server for this process, started in a thread at once, so it comes
    up (several seconds: a uvicorn process that imports Prefect's API and checks its
    database) while this process checks the policy, imports the stages and the workers load
    their models, instead of when the flow begins. It is the server Prefect starts for a
    flow when no PREFECT_API_URL is set (the same app, settings and ephemeral mode), started
    here because Prefect would start it only when the flow begins, and would first import
    its whole API into this process (seconds of CPU) to do so. Nothing is started where a
    server is configured or the temporary one is turned off; if it fails, the flow starts
    Prefect's own and reports what fails. One per process, stopped when the process exits
    (after Prefect's own exit handlers, which still talk to it), as Prefect's own is."""

    _current: _TemporaryServer | None = None

    @classmethod
    def for_this_process(cls) -> _TemporaryServer:
        server = cls._current
        if server is None or server._stopped or (server.process is not None and server.process.poll() is not None):
            server = cls._current = cls()
        return server

    def __init__(self) -> None:
        import atexit

        self.api_url: str | None = None
        self.process = None
        self._stopped = False
        self._lock = threading.Lock()   # a stop while the thread starts the process stops it too
        atexit.register(self.stop)
        self._thread = threading.Thread(target=self._start, name="prefect-server", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        import socket
        import subprocess
        import time
        import urllib.request

        try:
            import prefect
            from prefect.settings import (
                PREFECT_API_URL,
                PREFECT_SERVER_EPHEMERAL_ENABLED,
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                get_current_settings,
            )

            if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
                return
            with socket.socket() as probe:   # a free port, chosen by the system
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            environment = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                           "PREFECT__SERVER_FINAL": "1",
                           **get_current_settings().to_environment_variables(exclude_unset=True)}
            with self._lock:
                if self._stopped:
                    return
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
                     "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
                     "--log-level", "error", "--lifespan", "on"], env=environment)
            url = f"http://127.0.0.1:{port}/api"
            deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
            while time.monotonic() < deadline and self.process is not None and self.process.poll() is None:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                        if response.status == 200:
                            self.api_url = url
                            return
                except OSError:
                    time.sleep(0.1)
            self.stop()
        except Exception:   # noqa: BLE001 - the flow starts Prefect's own server and reports what fails
            self.stop()

    def ready(self) -> str | None:
        """Wait until the server answers; its API URL, or None (no server of ours)."""
        self._thread.join()
        if self.api_url:
            click.echo(f"temporary Prefect server on {self.api_url.removesuffix('/api')} (for this command only; "
                       "set PREFECT_API_URL to use a running server)", err=True)
        return self.api_url

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except Exception:   # noqa: BLE001 - it did not stop in time
                process.kill()


def _check_feasible(loaded) -> None:
    """Stage II's closed-form t-closeness check, reported like a policy error at privacy.t."""
    from policy.loader import PolicyError, key_position
    from policy.settings import plan_selection
    from stages.selection.ppas import PolicyInfeasible

    try:
        plan_selection(loaded.policy)
    except PolicyInfeasible as exc:
        line, column = key_position(loaded.text, ("privacy", "t")) or key_position(loaded.text, ("privacy",)) \
            or (1, 1)
        raise PolicyError([f"{loaded.path}:{line}:{column}: the policy cannot be met: {exc}"]) from None


def _check_perturbation(loaded) -> None:
    """Stage IV's installed perturbation at the policy's xi (loaded and verified), reported
    like a policy error at perturbation.xi when the policy asks for what it cannot give."""
    from policy.loader import PolicyError, key_position
    from stages.perturbation.apply import PerturbationMismatch, installed_perturbation

    settings = loaded.policy.perturbation
    if not settings.enabled:
        return
    try:
        installed_perturbation(settings.xi, settings.min_psnr_db, tuple(loaded.policy.attributes.preserve))
    except PerturbationMismatch as exc:
        line, column = key_position(loaded.text, exc.at) or (1, 1)
        raise PolicyError([f"{loaded.path}:{line}:{column}: {exc}"]) from None


def _print_summary(summary: dict) -> None:
    skipped = f" ({summary['n_skipped']} already released under this policy, skipped)" if summary.get("n_skipped") else ""
    click.echo(f"\nreleased {summary['n_released']}, quarantined {summary['n_quarantined']}, "
               f"rejected {summary['n_rejected']} of {summary['n_inputs']} input(s){skipped}; "
               f"{summary['n_faces']} face(s), identity leaks published (to dlib or SFace): {summary['n_leaks_published']}")
    click.echo(f"release folder: {summary['release_dir']}  (report: {Path(summary['release_dir']) / 'report.md'})")


def _emit(results: dict, table: str, output: str | None) -> None:
    """Print a results table and, when asked, write the full results as JSON."""
    click.echo(table)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=2) + "\n")
        click.echo(f"results written to {output}")


@main.command("release")
@click.option("-i", "--input", "input_location", required=True,
              help="Folder of photos (searched recursively) or a .csv/.parquet manifest with a 'path' column.")
@click.option("-o", "--output", required=True, help="Release folder to write (created if missing).")
@click.option("-p", "--policy", default=None, help="Policy YAML (default: policy/default.yaml).")
@click.option("--batch-size", default=16, show_default=True, help="Photos per task.")
@click.option("--manifest-root", default=None, help="Root for relative manifest paths (default: the manifest's folder).")
@click.option("--dataset", default=None,
              help="Name of the dataset whose privacy budget this release spends (default: the input's path).")
@click.option("--ledger", default=None,
              help="Folder of the privacy ledger (default: the release folder); share one across release folders.")
@click.option("--full", is_flag=True,
              help="Release every photo again, including those this folder already released under the same policy.")
@click.option("--dask-workers", default=0, type=click.IntRange(min=0),
              help="Run batches on a local Dask cluster of this many worker processes (needs PREFECT_API_URL "
                   "for speed; see README: Operations).")
@click.option("--dask-address", default=None, help="Run batches on the Dask scheduler at this address instead.")
def release_command(input_location, output, policy, batch_size, manifest_root, dataset, ledger, full,
                    dask_workers, dask_address):
    """De-identify every face in INPUT and write a release with lineage and a report.

    Incremental: photos this release folder already released under the same policy (same
    bytes, same policy sha256) are skipped, so running it again releases only new photos."""
    _print_summary(_run_release(input_location, output, policy, batch_size, manifest_root, dataset, ledger,
                                incremental=not full, dask_workers=dask_workers, dask_address=dask_address))


@main.command("demo")
@click.option("-o", "--output", default="releases/demo", show_default=True, help="Release folder.")
@click.option("--samples", default="samples/demo", show_default=True, help="Where the sample photos are written.")
def demo_command(output, samples):
    """Write public-domain sample photos and a sample video, and release them under the
    default policy."""
    from stages.common.samples import panned_clip_frames, write_clip, write_samples

    written = write_samples(samples)
    write_clip(Path(samples) / "video" / "astronaut_pan.mp4", panned_clip_frames(), 12.0)
    click.echo(f"wrote {len(written)} sample photos and a 12-frame sample video to {samples}")
    # The samples are public-domain and rewritten every time: the demo keeps no privacy ledger
    # between runs, so it can be repeated (a real release keeps its ledger; see --ledger).
    with tempfile.TemporaryDirectory(prefix="anonymousnet-demo-ledger-") as ledger:
        click.echo("demo: the privacy ledger is not kept between demo runs")
        _print_summary(_run_release(samples, output, None, 16, None, dataset="demo samples", ledger=ledger))


@main.command("clip")
@click.argument("frames", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, help="Video file to write (.mp4, .mov, .avi, .mkv).")
@click.option("--fps", default=25.0, show_default=True, help="Frame rate.")
def clip_command(frames, output, fps):
    """Make a video (lossy MPEG-4, as a camera would) from photos FRAMES, in the order given,
    e.g. to try a video release on frames you have."""
    from stages.common.imageio import ImageRejected, load_rgb
    from stages.common.samples import write_clip

    loaded = []
    for frame in frames:
        try:
            loaded.append(load_rgb(frame).rgb)
        except ImageRejected as exc:
            raise click.ClickException(f"{frame}: {exc}") from None
    if len({image.shape for image in loaded}) > 1:
        raise click.ClickException("the frames differ in size; a video has one size")
    write_clip(output, loaded, fps)
    click.echo(f"wrote {len(loaded)} frames at {fps:g} fps to {output}")


@main.group("lineage")
def lineage_group():
    """Read a release's lineage records."""


@lineage_group.command("show")
@click.argument("release_dir", type=click.Path(exists=True, file_okay=False))
def lineage_show(release_dir):
    """Summarise the runs, outcomes and faces recorded in RELEASE_DIR."""
    from flows.release.lineage import summarize

    try:
        click.echo(summarize(release_dir))
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("verify")
@click.argument("release_dir", type=click.Path(exists=True, file_okay=False))
def verify_command(release_dir):
    """Check that RELEASE_DIR holds exactly the files its lineage recorded (sha256), none
    missing and none extra, and that no run's lineage was altered since it was written.
    Exits non-zero with the list of problems."""
    from flows.release.audit import verify_release

    result = verify_release(release_dir, progress=True)
    for problem in result.problems:
        click.echo(f"PROBLEM {problem}")
    if result.anchor:
        click.echo(f"{result.runs_checked} run(s), {result.files_checked} released file(s) checked; newest run "
                   f"{result.newest_run}, runs record sha256 {result.anchor} (keep it: no later run vouches for "
                   f"the newest record yet, so compare it next time)")
    if not result.ok:
        raise click.ClickException(f"{len(result.problems)} problem(s) found in {release_dir}")
    click.echo("OK: every released file is the one lineage recorded, and lineage is unaltered")


@main.group("policy")
def policy_group():
    """Check and inspect policy files."""


def _load_policy_or_exit(file: str):
    """Load and check a policy (schema and Stage II feasibility); print file:line errors and
    exit 1 when it is invalid."""
    from policy.loader import PolicyError, load_policy

    try:
        loaded = load_policy(file)
        _check_feasible(loaded)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    return loaded


@policy_group.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def policy_check(files):
    """Validate FILES: schema, attribute names and whether t can be met with epsilon. Errors
    are printed as file:line:column; the exit code is 1 if any file is invalid."""
    from policy.tools import unrendered_notes

    failed = False
    for file in files:
        try:
            loaded = _load_policy_or_exit(file)
        except SystemExit:
            failed = True
            continue
        click.echo(f"{file}: ok (policy '{loaded.policy.name}', sha256 {loaded.sha256[:16]})")
        for note in unrendered_notes(loaded.policy):
            click.echo(f"{file}: note: {note}")
    if failed:
        sys.exit(1)


@policy_group.command("explain")
@click.argument("file", type=click.Path())
def policy_explain(file):
    """Say in plain words what FILE keeps, what it changes and what its numbers guarantee."""
    from policy.settings import plan_selection
    from policy.tools import explain

    loaded = _load_policy_or_exit(file)
    selection = plan_selection(loaded.policy)
    click.echo(explain(loaded, selection, selection.closed_form_distances().tolist()))


@policy_group.command("diff")
@click.argument("old", type=click.Path())
@click.argument("new", type=click.Path())
@click.option("--fail-on-weaker", is_flag=True, help="Exit with code 2 when any guarantee got weaker (for review bots).")
def policy_diff(old, new, fail_on_weaker):
    """Which guarantees got stronger or weaker from OLD to NEW."""
    from policy.tools import diff

    changes = diff(_load_policy_or_exit(old).policy, _load_policy_or_exit(new).policy)
    _echo_changes(changes)
    if fail_on_weaker and any(verdict == "weaker" for verdict, _ in changes):
        sys.exit(2)


def _echo_changes(changes: list[tuple[str, str]]) -> None:
    """``policy diff``'s lines: weaker first, so a weakening is read before anything else."""
    if not changes:
        click.echo("no change in any setting")
    for verdict, text in sorted(changes, key=lambda c: ("weaker", "stronger", "changed").index(c[0])):
        click.echo(f"{verdict.upper():9} {text}")


@policy_group.command("approve")
@click.argument("file", type=click.Path())
@click.option("--approved", "approved_list", default=None, envvar="ANONYMOUSNET_APPROVED_POLICIES",
              help="The approved list: a folder of approved policies, or a file of sha256 digests "
                   "(default: $ANONYMOUSNET_APPROVED_POLICIES).")
@click.option("--by", "approver", default=None, help="Who approves (default: your user name).")
@click.option("--note", default="", help="Why, for the approvals log (a ticket, a review).")
@click.option("--yes", is_flag=True, help="Approve without asking (after the diff is printed).")
def policy_approve(file, approved_list, approver, note, yes):
    """Add FILE to the approved policies that releases started from a deployment may run.
    Prints what changed from the last approved version of the same policy (by name), so a
    weakening is seen before it is approved."""
    from policy.approvals import ApprovalError, ApprovedPolicies
    from policy.tools import diff

    if not approved_list:
        raise click.UsageError("say where the approved list is: --approved FOLDER (or a digests file), or set "
                               "ANONYMOUSNET_APPROVED_POLICIES as the workers have it")
    loaded = _load_policy_or_exit(file)
    store = ApprovedPolicies(Path(approved_list).expanduser().resolve())
    try:
        if store.location.exists() and store.is_approved(loaded.sha256):
            click.echo(f"policy '{loaded.policy.name}' (sha256 {loaded.sha256[:12]}) is already approved in "
                       f"{store.location}")
            return
        previous = store.last_approved(loaded.policy.name)
    except (ApprovalError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if previous is None:
        click.echo(f"no earlier approved version of policy '{loaded.policy.name}' in {store.location}; "
                   f"read it in plain words with `anonymousnet policy explain {file}`")
    else:
        click.echo(f"changes from the last approved version ({previous.path}, sha256 {previous.sha256[:12]}):")
        _echo_changes(diff(previous.policy, loaded.policy))
    if not yes:
        click.confirm(f"approve policy '{loaded.policy.name}' (sha256 {loaded.sha256[:12]})?", abort=True)
    try:
        written = store.approve(loaded, approver, note)
    except (ApprovalError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"approved policy '{loaded.policy.name}' (sha256 {loaded.sha256}) in {written}")


@policy_group.command("new")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--name", default=None, help="Policy name (default: the file name without .yaml).")
def policy_new(file, name):
    """Write a commented starter policy to FILE (never overwrites)."""
    from policy.tools import write_new

    path = Path(file)
    try:
        write_new(path, name or path.stem)
    except FileExistsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {path}; edit it, then run `anonymousnet policy check {path}`")


@policy_group.command("schema")
@click.option("--write", "write_to", default=None, type=click.Path(dir_okay=False),
              help="Write the schema here (the repository keeps it at policy/policy.schema.json).")
def policy_schema(write_to):
    """Print the policy's JSON Schema (every key, its type, default and meaning)."""
    from policy.schema import policy_json_schema

    text = json.dumps(policy_json_schema(), indent=2) + "\n"
    if write_to:
        Path(write_to).write_text(text)
        click.echo(f"wrote {write_to}")
    else:
        click.echo(text, nl=False)


EVALUATION_METHODS = ("blur", "pixelate", "mask", "gan", "gan+perturbation", "release")


@main.group("ops")
def ops_group():
    """Set-up for team-scale operation (README: Operations)."""


@ops_group.command("secrets")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--user", default="operator", show_default=True, help="The user name in Prefect's user:password.")
def ops_secrets(file, user):
    """Write FILE (an .env file: mode 0600, never overwritten) with random secrets: Prefect's
    basic-authentication string (for the server and for workers and CLIs) and PostgreSQL's
    password. infra/docker-compose.yml refuses to start without them; Prefect also reads a
    .env file in the folder it starts in, which the native recipe uses."""
    import secrets

    path = Path(file)
    if path.exists():
        raise click.ClickException(f"{path} exists; nothing was changed (delete it first to make new secrets, "
                                   "then restart the server, the workers and every CLI with them)")
    auth = f"{user}:{secrets.token_urlsafe(32)}"   # URL-safe: the password also goes into a database URL
    lines = ["# AnonymousNet operations secrets, written by `anonymousnet ops secrets`. Never commit this file.",
             f"PREFECT_API_AUTH_STRING={auth}", f"PREFECT_SERVER_API_AUTH_STRING={auth}",
             f"POSTGRES_PASSWORD={secrets.token_urlsafe(32)}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write("\n".join(lines) + "\n")
    click.echo(f"wrote {path} (mode 0600): PREFECT_API_AUTH_STRING (user {user}), PREFECT_SERVER_API_AUTH_STRING, "
               "POSTGRES_PASSWORD")


@main.command("evaluate")
@click.option("--pairs", required=True, type=click.Path(exists=True, dir_okay=False), help="CSV with rel_a, rel_b, same.")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False), help="Folder the pair paths are relative to.")
@click.option("--methods", default="blur,pixelate,mask", show_default=True,
              help="Comma-separated methods to evaluate: blur, pixelate, mask, gan, gan+perturbation (gan with "
                   "Stage IV's perturbation at the policy's xi), release (the release's whole per-photo loop under "
                   "the policy: its method, Stage IV, the leak check and its escalation).")
@click.option("-p", "--policy", default=None, help="Policy whose detection and method settings are used.")
@click.option("--limit", default=None, type=int, help="Evaluate only the first N same-person pairs.")
@click.option("--workers", default=2, show_default=True, help="Processes (dlib is single-threaded).")
@click.option("--generator", default=None, help="For method gan: a train-generator run's model/ folder "
                                                "(default: the shipped generator).")
@click.option("--celeba", default=None, type=click.Path(exists=True, file_okay=False),
              help="Also measure attribute preservation on this CelebA folder's identity-disjoint test split.")
@click.option("--celeba-limit", default=None, type=int, help="Use only the first N CelebA images (and their "
                                                                "test-split share).")
@click.option("--grid", default=None, type=click.Path(file_okay=False),
              help="Write a sample grid (original | each method, the first --grid-pairs pairs) to DIR/grid.png. "
                   "It shows the evaluated photos: keep it out of the repository (.data/ is ignored).")
@click.option("--grid-pairs", default=24, show_default=True, help="Pairs in the sample grid.")
@click.option("-o", "--output", default=None, help="Write the results JSON here.")
def evaluate_command(pairs, images, methods, policy, limit, workers, generator, celeba, celeba_limit, grid,
                     grid_pairs, output):
    """De-identification, self de-identification, detection after, PSNR/SSIM/MS-SSIM and
    seconds per face for each method on the same-person pairs (EVALUATION.md); with
    --celeba, Stage I's accuracy on the policy's preserved attributes before and after."""
    from flows.evaluation.evaluate import (
        attribute_preservation,
        evaluate,
        markdown_table,
    )
    from models.registry import ModelFileError
    from policy.loader import PolicyError, load_policy

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in EVALUATION_METHODS]
    if unknown:
        raise click.BadParameter(f"unknown method(s) {unknown}; choose from {', '.join(EVALUATION_METHODS)}",
                                 param_hint="--methods")
    try:
        loaded = load_policy(policy)
        if "gan+perturbation" in chosen:
            _check_perturbation(loaded)
    except (PolicyError, ModelFileError) as exc:
        raise click.ClickException(str(exc)) from None
    results = evaluate(Path(pairs), Path(images), chosen, loaded.policy, limit=limit, workers=workers,
                       progress=True, generator=generator, grid=Path(grid) if grid else None, grid_pairs=grid_pairs)
    if celeba:
        results["attribute_preservation"] = attribute_preservation(Path(celeba), chosen, loaded.policy, generator,
                                                                   limit=celeba_limit, progress=True)
    _emit(results, markdown_table(results), output)


@main.command("evaluate-detection")
@click.option("--wild", default="../shared/data/wild", show_default=True,
              type=click.Path(exists=True, file_okay=False), help="Folder the annotated photos' paths start from.")
@click.option("--annotations", default=None, help="Boxes CSV (default: tests/data/face_annotations.csv).")
@click.option("-o", "--output", default=None, help="Write the results JSON here.")
def evaluate_detection_command(wild, annotations, output):
    """Recall per face size and precision of each detector against hand-checked boxes."""
    from flows.evaluation.detection import (
        ANNOTATIONS,
        detectors_table,
        evaluate_detectors,
    )

    results = evaluate_detectors(wild, annotations=annotations or ANNOTATIONS)
    _emit(results, detectors_table(results), output)


@main.command("benchmark-perturbation-visibility")
@click.option("--celeba", required=True, type=click.Path(exists=True, file_okay=False),
              help="CelebA folder (img_align_celeba_89x109/ and labels.csv): its identity-disjoint test split.")
@click.option("--limit", default=3000, show_default=True, help="Use the first N CelebA images (their test-split share).")
@click.option("--workers", default=2, show_default=True, help="Processes aligning the images.")
@click.option("-o", "--output", default=None, help="Write the results JSON here.")
def benchmark_perturbation_visibility_command(celeba, limit, workers, output):
    """Stage IV's visibility (share of face pixels changed above the JND) next to its fooling
    rate, over a few shapes and strengths of the pattern."""
    from flows.evaluation.perturbation_visibility import (
        perturbation_visibility,
        visibility_table,
    )

    results = perturbation_visibility(Path(celeba), limit, workers, progress=True)
    _emit(results, visibility_table(results), output)


@main.command("evaluate-generator-diversity")
@click.option("--celeba", required=True, type=click.Path(exists=True, file_okay=False),
              help="CelebA folder (img_align_celeba_89x109/ and labels.csv): its identity-disjoint test split.")
@click.option("--generator", "generators", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A train-generator run's model/ folder to compare (repeatable; the shipped one is always in).")
@click.option("--people", default=150, show_default=True, help="One face each of the first N test people.")
@click.option("--limit", default=3000, show_default=True, help="Use the first N CelebA images (their test-split share).")
@click.option("--workers", default=2, show_default=True, help="Processes aligning the images.")
@click.option("-o", "--output", default=None, help="Write the results JSON here.")
def evaluate_generator_diversity_command(celeba, generators, people, limit, workers, output):
    """How often dlib's verifier calls two different people's Stage III faces the same person,
    beside real, blurred and pasted references (seconds; the release-level figure is
    `evaluate --methods release`)."""
    from flows.evaluation.generator_diversity import (
        diversity_table,
        generator_diversity,
    )

    results = generator_diversity(Path(celeba), [None, *generators], people, limit, workers, progress=True)
    _emit(results, diversity_table(results), output)


@main.command("evaluate-painted-region")
@click.option("--pairs", required=True, type=click.Path(exists=True, dir_okay=False), help="pairs.csv (rel_a, rel_b, same).")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False), help="Folder the pairs' paths are under.")
@click.option("--limit", default=150, show_default=True, help="Use the first N same-person pairs.")
@click.option("-o", "--output", default=None, help="Write the results JSON here.")
def evaluate_painted_region_command(pairs, images, limit, output):
    """What the verifiers still recognise of a person once another real face is pasted over
    the landmark hull, or the hull and part of the forehead: the floor under any generator
    that paints that region."""
    from flows.evaluation.painted_region import painted_region, region_table

    results = painted_region(Path(pairs), Path(images), limit, progress=True)
    _emit(results, region_table(results), output)


@main.command("benchmark-scaleout")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False), help="Folder of photos (recursive).")
@click.option("--workers", default="1,2", show_default=True, help="Dask worker counts to compare, comma-separated.")
@click.option("--repeats", default=3, show_default=True, help="Releases per worker count (interleaved); medians reported.")
@click.option("--limit", default=40, show_default=True, help="Use only the first N photos (sorted by path).")
@click.option("--batch-size", default=4, show_default=True, help="Photos per task.")
@click.option("-p", "--policy", default=None, help="Policy YAML (default: policy/default.yaml).")
@click.option("-o", "--output", default=None, help="Write the results JSON here.")
def benchmark_scaleout_command(images, workers, repeats, limit, batch_size, policy, output):
    """Release speed with a Dask task runner of N local workers (needs PREFECT_API_URL)."""
    from flows.evaluation.scaleout import measure_scaleout, scaleout_table
    from flows.release.flow import dask_task_runner, release

    def run_release(count: int, **arguments) -> dict:
        return release.with_options(task_runner=dask_task_runner(count))(**arguments)

    try:
        counts = tuple(int(part) for part in workers.split(","))
        results = measure_scaleout(run_release, images, counts, repeats, limit, batch_size, policy)
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    _emit(results, scaleout_table(results), output)


@main.command("benchmark")
@click.option("--repeats", default=3, show_default=True, help="Timed passes; medians are reported.")
@click.option("--limit", default=None, type=int, help="Use only the first N photos.")
@click.option("-p", "--policy", default=None, help="Policy whose detection and method settings are timed.")
@click.option("--images", "images", default=None, type=click.Path(exists=True, file_okay=False),
              help="Folder of photos (recursive); not needed for --stage video.")
@click.option("--stage", type=click.Choice(["all", "attributes", "synthesis", "release", "video"]), default="all",
              show_default=True,
              help="'attributes' times Stage I alone (CNN + forests), 'synthesis' Stage III alone (the "
                   "generator), on the photos' aligned faces; 'release' the whole release command against "
                   "deface's on the same photos, and their ratio; 'video' a 640x360 two-face clip released as "
                   "a video against its frames released as photos (no --images: the clip is made here).")
@click.option("--batch-size", default=None, type=int, help="Batch size of the stage timed alone "
                                                            "[default: 256 for attributes, 64 for synthesis].")
@click.option("--generator", default=None, help="For --stage synthesis: a train-generator run's model/ folder.")
@click.option("-o", "--output", default=None, help="Write the results JSON here.")
def benchmark_command(images, repeats, limit, policy, stage, batch_size, generator, output):
    """Faces per second per stage and end to end, blur baseline as the in-run reference."""
    from flows.evaluation.benchmark import (
        benchmark,
        benchmark_attributes,
        benchmark_synthesis,
        markdown_table,
    )

    if stage == "video":
        from flows.evaluation.benchmark import benchmark_video, video_table

        results = benchmark_video(repeats=repeats, policy_path=policy)
        _emit(results, video_table(results), output)
        return
    if images is None:
        raise click.UsageError(f"--stage {stage} times the photos of a folder: give it with --images")
    if stage == "synthesis":
        batch_size = batch_size or 64
        results = benchmark_synthesis(Path(images), batch_size=batch_size, repeats=repeats, limit=limit,
                                      policy_path=policy, generator=generator)
        table = (f"Stage III (generator), {results['faces']} faces, batch {batch_size}, {results['device']}, median "
                 f"of {repeats}: **{results['faces_per_second_median']:.0f} faces/s** ({results['machine']})")
        _emit(results, table, output)
        return
    if stage == "release":
        from flows.evaluation.benchmark import benchmark_release, release_table

        results = benchmark_release(Path(images), repeats=repeats, batch_size=batch_size or 32, policy_path=policy)
        _emit(results, release_table(results), output)
        return
    if stage == "attributes":
        batch_size = batch_size or 256
        results = benchmark_attributes(Path(images), batch_size=batch_size, repeats=repeats, limit=limit)
        table = (f"Stage I (CNN + 40 forests), {results['faces']} faces, batch {batch_size}, median of {repeats}: "
                 f"**{results['faces_per_second_median']:.0f} faces/s** ({results['machine']})")
        _emit(results, table, output)
        return
    results = benchmark(Path(images), repeats=repeats, limit=limit, policy_path=policy)
    _emit(results, markdown_table(results), output)


@main.group("train")
def train_group():
    """Train the project's model files from ../shared/data."""


@train_group.command("template")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of aligned face crops (e.g. ../shared/data/celeba/img_align_celeba_89x109).")
@click.option("--limit", default=3000, show_default=True, help="Use the first N images.")
def train_template(images, limit):
    """Refit the 68-point alignment template and update its sha256 in models/manifest.json."""
    from flows.training.template import fit_alignment_template

    click.echo(json.dumps(fit_alignment_template(Path(images), limit), indent=2))


def _celeba_files(celeba: str, *names: str) -> list[Path]:
    """The named files of the CelebA folder, or a usage error listing the missing ones."""
    needed = [Path(celeba) / name for name in names]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise click.UsageError(f"CelebA files not found: {', '.join(missing)}; pass --celeba pointing at "
                               f"../shared/data/celeba")
    return needed


@train_group.command("attributes")
@click.option("--celeba", default="../shared/data/celeba", show_default=True, type=click.Path(file_okay=False),
              help="CelebA folder with img_align_celeba_89x109/, labels.csv and annotations_full.zip.")
@click.option("--run-dir", default=".data/train-attributes/default", show_default=True,
              help="Where checkpoints, metrics.json and the table go; running again resumes there.")
@click.option("--epochs", default=30, show_default=True, help="CNN training epochs.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split, the CNN and the forests.")
@click.option("--limit", type=int, default=None, help="Use only the first N labelled images (quick runs).")
@click.option("--trees", default=40, show_default=True, help="Trees per attribute forest.")
@click.option("--max-leaf-nodes", default=64, show_default=True, help="Leaves per tree (bounds the file size).")
@click.option("--install", is_flag=True, help="Copy the trained model into models/ and update the manifest.")
def train_attributes_command(celeba, run_dir, epochs, seed, limit, trees, max_leaf_nodes, install):
    """Train Stage I (CNN + 40 random forests) on CelebA aligned by our own aligner."""
    from flows.training.attributes import train_attributes

    needed = _celeba_files(celeba, "img_align_celeba_89x109", "labels.csv", "annotations_full.zip")
    summary = train_attributes(images=str(needed[0]), labels=str(needed[1]), annotations=str(needed[2]),
                               run_dir=run_dir, epochs=epochs, seed=seed, limit=limit, trees=trees,
                               max_leaf_nodes=max_leaf_nodes, install=install)
    click.echo(json.dumps({k: summary[k] for k in ("split_sizes", "test", "seconds")}, indent=2))
    click.echo(f"metrics: {Path(run_dir) / 'metrics.json'}; table: {Path(run_dir) / 'attributes_table.md'}")


@train_group.command("identity")
@click.option("--celeba", default="../shared/data/celeba", show_default=True, type=click.Path(file_okay=False),
              help="CelebA folder with img_align_celeba_89x109/ and labels.csv.")
@click.option("--run-dir", default=".data/train-identity/default", show_default=True,
              help="Checkpoints and metrics.json go here; running again resumes.")
@click.option("--epochs", default=40, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed of the split (as Stage I) and the network.")
@click.option("--limit", type=int, default=None, help="Use only the first N labelled images (quick runs).")
@click.option("--install", is_flag=True, help="Copy the model into models/ and update the manifest.")
def train_identity_command(celeba, run_dir, epochs, seed, limit, install):
    """Distil dlib's face descriptor into a small CNN (Stage III's identity loss)."""
    from flows.training.identity import train_identity

    needed = _celeba_files(celeba, "img_align_celeba_89x109", "labels.csv")
    summary = train_identity(images=str(needed[0]), labels=str(needed[1]), run_dir=run_dir, epochs=epochs,
                             seed=seed, limit=limit, install=install)
    click.echo(json.dumps({k: summary[k] for k in ("split_sizes", "test", "seconds")}, indent=2))


@train_group.command("generator")
@click.option("--celeba", default="../shared/data/celeba", show_default=True, type=click.Path(file_okay=False),
              help="CelebA folder with img_align_celeba_89x109/ and labels.csv.")
@click.option("--run-dir", default=".data/train-generator/default", show_default=True,
              help="Checkpoints, losses.jsonl and samples.png go here; running again resumes.")
@click.option("--architecture", type=click.Choice(["stargan", "inpainting"]), default="stargan", show_default=True,
              help="stargan: v1 (64 px, the shipped one); inpainting: v2 (128 px U-Net with an identity code "
                   "per face, non-saturating loss with R1, mode seeking).")
@click.option("--steps", type=int, default=None, help="Training steps in total [v1: 20000 critic steps, the generator "
                                                     "updates every --critic-steps; v2: 30000].")
@click.option("--critic-steps", default=2, show_default=True, help="v1: critic updates per generator update.")
@click.option("--learning-rate", default=2e-4, show_default=True)
@click.option("--batch-size", type=int, default=None, help="[v1: 16, v2: 8]")
@click.option("--width", type=int, default=None, help="Generator and critic base width [v1: 24, v2: 16].")
@click.option("--blocks", type=int, default=None, help="Residual blocks in the generator [v1: 3, v2: 2].")
@click.option("--lambda-ver", type=float, default=None,
              help="Verification term [v1: 1.0; v2: 0, it taught v2 bars that fool the distilled CNN].")
@click.option("--lambda-ssim", default=1.0, show_default=True, help="SSIM term (0: ablation without it).")
@click.option("--lambda-div", type=float, default=None, help="v2: two codes of a face must verify as two people "
                                                            "(contrastive term) [0: it painted strokes at the eyes].")
@click.option("--lambda-ms", type=float, default=None, help="v2: mode seeking between two codes [1.0].")
@click.option("--lambda-fm", type=float, default=None, help="v2: feature matching on the critic's features [1.0].")
@click.option("--lambda-spread", type=float, default=None,
              help="v2: two people's painted faces as far apart as the originals, on random views [0].")
@click.option("--spread-margin", type=float, default=None,
              help="v2: one target distance for every painted pair instead of their originals' [0: the originals'].")
@click.option("--lambda-away", type=float, default=None,
              help="v2: each painted face at least the margin from its original, to dlib's verifier [0].")
@click.option("--lambda-chroma", type=float, default=None,
              help="v2: painted colour no more saturated than the original's [0].")
@click.option("--forehead", type=float, default=None,
              help="v2: also paint the forehead, this fraction of the chin-to-eyebrows distance above the "
                   "eyebrows [0: the landmark hull only]. SFace recognises people by their forehead too.")
@click.option("--identity", default=None, help="A train-identity run's model/ folder (default: the shipped one).")
@click.option("--seed", default=0, show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N labelled images (quick runs).")
@click.option("--install", is_flag=True, help="Copy the generator into models/ and update the manifest.")
@click.option("--start-from", type=click.Path(dir_okay=False), default=None,
              help="v2: a snapshot.pt an earlier run wrote (e.g. on another machine) to go on from when --run-dir "
                   "has no checkpoint of its own yet.")
def train_generator_command(celeba, run_dir, architecture, steps, critic_steps, learning_rate, batch_size, width,
                            blocks, lambda_ver, lambda_ssim, lambda_div, lambda_ms, lambda_fm, lambda_spread,
                            spread_margin, lambda_away, lambda_chroma, forehead, identity, seed, limit, install,
                            start_from):
    """Train Stage III's generator (v1: StarGAN objective + verification and SSIM terms; v2: see --architecture)."""
    from flows.training.generator import train_generator
    from stages.synthesis.inpainter import InpainterSettings
    from stages.synthesis.training import GanSettings

    needed = _celeba_files(celeba, "img_align_celeba_89x109", "labels.csv")
    given = {name: value for name, value in (("steps", steps), ("batch_size", batch_size), ("width", width),
                                             ("blocks", blocks)) if value is not None}
    given |= {"learning_rate": learning_rate, "lambda_ssim": lambda_ssim}
    if lambda_ver is not None:
        given["lambda_ver"] = lambda_ver
    v2_only = {name: value for name, value in (("lambda_div", lambda_div), ("lambda_ms", lambda_ms),
                                                 ("lambda_fm", lambda_fm), ("lambda_spread", lambda_spread),
                                                 ("spread_margin", spread_margin), ("lambda_away", lambda_away),
                                                 ("lambda_chroma", lambda_chroma), ("forehead", forehead))
              if value is not None}
    if architecture == "inpainting":
        settings = InpainterSettings(**given, **v2_only)
    else:
        if v2_only or start_from:
            raise click.UsageError("--lambda-div, --lambda-ms, --lambda-fm, --lambda-spread, --spread-margin, "
                                   "--lambda-away, --lambda-chroma, --forehead and --start-from belong to --architecture "
                                   "inpainting (v1 has no codes, no feature matching and no snapshots)")
        settings = GanSettings(critic_steps=critic_steps, **given)
    summary = train_generator(images=str(needed[0]), labels=str(needed[1]), run_dir=run_dir, settings=settings,
                              seed=seed, limit=limit, identity=identity, install=install, start_from=start_from)
    click.echo(json.dumps(summary, indent=2))



def _fraction(text: str) -> float:
    """ξ as a number or a fraction of 255 levels (``8/255``)."""
    try:
        numerator, _, denominator = text.partition("/")
        value = float(numerator) / float(denominator or 1)
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(f"{text!r} is not a number such as 0.03 or 8/255") from None
    if not 0 < value < 1:
        raise click.BadParameter(f"{text} must lie between 0 and 1 (pixel values are in [0, 1])")
    return value


@train_group.command("perturbation")
@click.option("--celeba", default="../shared/data/celeba", show_default=True, type=click.Path(file_okay=False),
              help="CelebA folder with img_align_celeba_89x109/ and labels.csv.")
@click.option("--run-dir", default=".data/train-perturbation/default", show_default=True,
              help="perturbation.npz, perturbation.json and the unseen profiler go here.")
@click.option("--attributes", default="Male,Young", show_default=True,
              help="Comma-separated CelebA attributes the profiler reads (the white-box target).")
@click.option("--xi", default="8/255", show_default=True, help="Radius of the perturbation (l-inf: per pixel).")
@click.option("--norm", type=click.Choice(["inf", "2"]), default="inf", show_default=True)
@click.option("--delta", default=0.2, show_default=True, help="Stop at a training fooling rate of 1 - delta.")
@click.option("--max-passes", default=10, show_default=True)
@click.option("--train-faces", default=2000, show_default=True, help="Training faces the perturbation is computed on.")
@click.option("--unseen-epochs", default=8, show_default=True,
              help="Epochs of the independently trained profiler used to measure transfer (0: skip).")
@click.option("--synthesized", is_flag=True, help="Compute and measure on the faces as Stage III renders them "
                                                 "(the release's input to Stage IV), not the original faces.")
@click.option("--inside-mask", is_flag=True, help="Confine the perturbation to the face mask (where the release "
                                                  "replaces the face).")
@click.option("--keep", default=None, help="Comma-separated attributes the perturbation must not change (every "
                                          "step is made orthogonal to them) [default: what policy/default.yaml "
                                          "preserves; 'none': nothing].")
@click.option("--seed", default=0, show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N labelled images (quick runs).")
@click.option("--jnd-percentile", type=float, default=None,
              help="Bound each pixel by this percentile of the training faces' just-noticeable difference there "
                   "(and by --xi): a pattern below the threshold of visibility. Default: --xi everywhere.")
@click.option("--install", is_flag=True, help="Copy the perturbation into models/ and update the manifest.")
def train_perturbation_command(celeba, run_dir, attributes, xi, norm, delta, max_passes, train_faces, unseen_epochs,
                               synthesized, inside_mask, keep, seed, limit, jnd_percentile, install):
    """Compute Stage IV's universal adversarial perturbation against Stage I's CNN."""
    from flows.training.perturbation import train_perturbation

    needed = _celeba_files(celeba, "img_align_celeba_89x109", "labels.csv")
    names = tuple(name.strip() for name in attributes.split(",") if name.strip())
    kept = None if keep is None else tuple(n.strip() for n in keep.split(",") if n.strip() and n.strip() != "none")
    summary = train_perturbation(images=str(needed[0]), labels=str(needed[1]), run_dir=run_dir, attributes=names,
                                 xi=_fraction(xi), norm=norm, delta=delta, max_passes=max_passes,
                                 train_faces=train_faces, unseen_epochs=unseen_epochs, synthesized=synthesized,
                                 inside_mask=inside_mask, keep=kept, seed=seed, limit=limit, install=install,
                                 jnd_percentile=jnd_percentile)
    click.echo(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
