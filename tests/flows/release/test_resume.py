"""Crash-safe, incremental releases: kill -9 in the middle, run again, run a third time.

The release runs as the operator runs it, the ``anonymousnet release`` command in its own
process (with its own temporary Prefect server), killed with SIGKILL together with that
server once two batches are published. The next run must finish the release with every
photo accounted for once and no half-written file; the run after that must release nothing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.release import lineage, resume
from stages.common.imageio import sha256_bytes

CLI = Path(sys.executable).parent / "anonymousnet"
META = {"report.md", "_reports", "_lineage", "_data_docs"}


def _photos(folder: Path, astronaut: np.ndarray, count: int) -> set[str]:
    """``count`` different photos of one public-domain face (crops, flips and scales)."""
    folder.mkdir(parents=True)
    names = set()
    for index in range(count):
        image = astronaut[index * 6:, index * 4:] if index % 2 == 0 else astronaut[:, ::-1][index * 5:]
        photo = Image.fromarray(np.ascontiguousarray(image))
        photo = photo.resize((photo.width * (10 + index) // 12, photo.height * (10 + index) // 12))
        name = f"shoot/photo_{index:02d}.jpg"
        (folder / name).parent.mkdir(exist_ok=True)
        photo.save(folder / name, quality=90)
        names.add(name)
    return names


def _release_command(inputs: Path, output: Path, prefect_home: Path) -> tuple[list[str], dict]:
    env = dict(os.environ, PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", OMP_NUM_THREADS="1")
    env.pop("PREFECT_API_URL", None)
    return [str(CLI), "release", "-i", str(inputs), "-o", str(output), "--batch-size", "1"], env


def _published_files(output: Path) -> dict[str, str]:
    return {p.relative_to(output).as_posix(): sha256_bytes(p.read_bytes()) for p in output.rglob("*")
            if p.is_file() and p.relative_to(output).parts[0] not in META}


@pytest.mark.slow
def test_kill_9_then_resume_then_nothing_new(tmp_path, astronaut):
    inputs, output = tmp_path / "in", tmp_path / "out"
    names = _photos(inputs, astronaut, 8)
    command, env = _release_command(inputs, output, tmp_path / "prefect")

    # 1. Start a release and kill it (and its temporary Prefect server) with SIGKILL once
    #    two of its eight batches are published.
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    second_batch = output / "_lineage" / "photos"
    deadline = time.time() + 420
    while not list(second_batch.glob("*-b00001.parquet")):
        if process.poll() is not None:
            pytest.fail(f"the release ended before it could be killed:\n{process.stdout.read().decode()[-3000:]}")
        assert time.time() < deadline, "no batch was published within 7 minutes"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = lineage.read_table(output, "runs")
    assert list(killed.status) == ["running"]
    done_before = set(lineage.read_table(output, "photos").image_id)
    assert 2 <= len(done_before) < len(names), "the kill came too late to test a resume"

    # 2. Run again: it recovers, closes the killed run as interrupted, releases the rest.
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    runs = lineage.read_table(output, "runs").set_index("run_id")
    assert sorted(runs.status) == ["completed", "interrupted"]
    first, second = runs[runs.status == "interrupted"].iloc[0], runs[runs.status == "completed"].iloc[0]
    photos = lineage.read_table(output, "photos")
    assert len(photos) == len(names) and set(photos.image_id) == names          # each photo once
    assert (photos.status == "released").all()
    assert first.n_released == len(photos[photos.run_id == first.name]) >= 2
    assert second.n_skipped >= first.n_released and second.n_released + first.n_released == len(names)
    faces = lineage.read_table(output, "faces")
    assert set(faces.image_id) == names and faces.groupby("image_id").run_id.nunique().eq(1).all()
    # Exactly the files lineage accounts for, each with the bytes it recorded; nothing half-written.
    published = _published_files(output)
    assert published == dict(zip(photos.output_path, photos.output_sha256))
    assert not list(output.rglob("*.partial")) and not list((output / "_lineage" / ".intents").glob("*"))
    recovered = lineage.read_table(output, "events")
    recover = recovered[recovered.stage == "recover"]
    assert len(recover) == 1 and json.loads(recover.details.iloc[0])["interrupted_runs"] == [first.name]
    # Prefect was told too: the killed flow run is Crashed, not Running forever.
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom prefect.client.orchestration import get_client\n"
                            "with get_client(sync_client=True) as client:\n"
                            "    print(client.read_flow_run(sys.argv[1]).state.type.value)", first.flow_run_id],
                           env=env, capture_output=True, text=True, timeout=180)
    assert probe.stdout.strip().splitlines()[-1:] == ["CRASHED"], probe.stdout[-2000:] + probe.stderr[-2000:]
    ledger_before = lineage.read_table(output, "privacy")

    # 3. The scheduled run after that finds nothing new: it releases nothing, spends no
    #    epsilon and touches no published file.
    mtimes = {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()
              and p.relative_to(output).parts[0] not in META}
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "released 0, quarantined 0, rejected 0 of 0 input(s) (8 already released" in again.stdout
    runs = lineage.read_table(output, "runs")
    latest = runs.sort_values("started_at").iloc[-1]
    assert latest.status == "completed" and latest.n_inputs == 0 and latest.n_skipped == len(names)
    assert len(lineage.read_table(output, "photos")) == len(names)
    assert len(lineage.read_table(output, "privacy")) == len(ledger_before)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_recovery_withdraws_files_no_lineage_accounts_for(tmp_path):
    """A run killed between publishing a batch's files and writing its lineage part: the
    files are withdrawn (the next run releases those photos again), half-written files go,
    and the run is closed as interrupted with what it did finish."""
    output = tmp_path / "out"
    run = {"run_id": "r1", "status": "running", "policy_sha256": "p" * 64, "n_inputs": 3, "models": {"m": "x"}}
    lineage.write_table(output, "runs", "r1", [run])
    lineage.write_table(output, "photos", "r1", lineage.project("photos", [
        {"image_id": "a.jpg", "status": "released", "output_path": "a.jpg"}], "r1"), "b00000")
    (output / "a.jpg").write_bytes(b"first")
    (output / "b.jpg").write_bytes(b"second")                    # published, lineage never written
    (output / "keep.jpg").write_bytes(b"an earlier release's file, since replaced")
    resume.write_intent(output, "r1", "b00000", {"a.jpg": sha256_bytes(b"first")})
    resume.write_intent(output, "r1", "b00001", {"b.jpg": sha256_bytes(b"second"),
                                                 "keep.jpg": sha256_bytes(b"bytes this run never wrote")})
    lineage.write_table(output, "faces", "r1", lineage.project("faces", [{"image_id": "b.jpg", "face_index": 0}],
                                                               "r1"), "b00001")
    (output / "sub").mkdir()
    (output / "sub" / ".c.jpg.1234.partial").write_bytes(b"half")

    recovery = resume.recover_interrupted(output, "r2")
    assert recovery.interrupted_runs == ["r1"] and recovery.withdrawn_files == ["b.jpg"]
    assert recovery.partial_files == 1 and "interrupted run" in recovery.describe()
    assert (output / "a.jpg").exists() and not (output / "b.jpg").exists() and (output / "keep.jpg").exists()
    assert not list(output.rglob("*.partial")) and not list((output / "_lineage" / ".intents").glob("*"))
    assert set(lineage.read_table(output, "faces").image_id) == set()
    closed = lineage.read_table(output, "runs").iloc[0]
    assert closed.status == "interrupted" and closed.n_released == 1 and "r2" in closed.error
    assert dict(closed.models) == {"m": "x"}
    assert resume.recover_interrupted(output, "r3").describe() is None   # nothing left to do


def test_a_second_release_into_a_held_folder_is_refused(tmp_path):
    with resume.release_lock(tmp_path):
        with pytest.raises(resume.ReleaseBusy, match="another release is writing to"):
            with resume.release_lock(tmp_path):
                pass
    with resume.release_lock(tmp_path):   # released again once the holder is done
        pass


def test_incremental_skips_by_policy_and_content(tmp_path):
    from stages.common.ingest import InputPhoto

    output, inputs = tmp_path / "out", tmp_path / "in"
    inputs.mkdir()
    for name in ("same.jpg", "changed.jpg", "new.jpg", "held.jpg"):
        (inputs / name).write_bytes(name.encode())
    lineage.write_table(output, "runs", "r1", [{"run_id": "r1", "status": "completed", "policy_sha256": "A"}])
    lineage.write_table(output, "photos", "r1", lineage.project("photos", [
        {"image_id": "same.jpg", "status": "released", "input_sha256": sha256_bytes(b"same.jpg")},
        {"image_id": "changed.jpg", "status": "released", "input_sha256": sha256_bytes(b"older bytes")},
        {"image_id": "held.jpg", "status": "quarantined", "input_sha256": sha256_bytes(b"held.jpg")}], "r1"))
    photos = [InputPhoto(name, inputs / name) for name in ("same.jpg", "changed.jpg", "new.jpg", "held.jpg")]
    todo, skipped = resume.pending_inputs(output, "A", photos)
    assert [p.image_id for p in skipped] == ["same.jpg"]
    assert [p.image_id for p in todo] == ["changed.jpg", "new.jpg", "held.jpg"]
    todo, skipped = resume.pending_inputs(output, "B", photos)      # a new policy version: all again
    assert len(todo) == 4 and not skipped
