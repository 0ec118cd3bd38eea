"""The team-scale topology, natively: PostgreSQL, a Prefect server on loopback, the
deployments of infra/prefect.yaml, a process worker, a run triggered through the API, its
artifacts, and the Prefect UI showing the report in headless Chromium.

Skipped only where PostgreSQL or Chromium/ChromeDriver are not installed (`make test`
installs them from Debian's packages where it can). The screenshot of the flow-run page is
kept in ``test-output/`` (git-ignored) for a person to look at.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from flows.release import lineage
from stages.common.samples import write_samples

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TEST_OUTPUT = Path(os.environ.get("ANONYMOUSNET_TEST_OUTPUT", REPO / "test-output"))
POSTGRES_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _wait_for(check, what: str, seconds: float, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + seconds
    while time.time() < deadline:
        with contextlib.suppress(Exception):
            value = check()
            if value:
                return value
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


@contextlib.contextmanager
def _postgres():
    """A throw-away PostgreSQL cluster on a free loopback port; yields (its SQLAlchemy URL,
    a function running SQL in it)."""
    bin_dir = POSTGRES_BIN[-1].parent
    root = Path(tempfile.mkdtemp(prefix="anonymousnet-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "prefect",
                                 "--no-sync"]), check=True, capture_output=True)
    subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                                 "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
                                 "start"]), check=True, capture_output=True)
    try:
        subprocess.run(_as_postgres([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect",
                                     "prefect"]), check=True, capture_output=True)
        def sql(query: str) -> str:
            return subprocess.run([str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-At",
                                   "-c", query, "prefect"], check=True, capture_output=True, text=True).stdout.strip()
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect", sql
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _background(command: list[str], env: dict, log: Path, cwd: Path = REPO):
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The machine has no network beyond loopback: Chromium's own background traffic is off.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1400,1000", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.mark.slow
@pytest.mark.skipif(not POSTGRES_BIN, reason="PostgreSQL is not installed (apt-get install postgresql)")
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Chromium is not installed "
                                                            "(apt-get install chromium chromium-driver)")
def _approve(policy: Path, approved: Path, env: dict) -> None:
    done = subprocess.run([str(BIN / "anonymousnet"), "policy", "approve", str(policy), "--approved", str(approved),
                           "--yes", "--by", "test-officer"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_server_on_postgres_deployment_worker_run_artifacts_and_ui(tmp_path):
    pytest.importorskip("selenium")
    incoming = tmp_path / "incoming"
    inputs, releases, home = incoming / "hr", tmp_path / "releases" / "nightly-hr", tmp_path / "prefect"
    write_samples(inputs)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    # Basic authentication, as every team-scale recipe runs it: the server checks the string,
    # workers and CLIs send it. Generated per run, never a value from the repository.
    auth_string = f"operator:{secrets.token_urlsafe(24)}"
    credentials = tuple(auth_string.split(":", 1))
    with _postgres() as (database, sql):
        env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=database,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_API_URL=api,
                   PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5", OMP_NUM_THREADS="1",
                   PREFECT_SERVER_API_AUTH_STRING=auth_string, PREFECT_API_AUTH_STRING=auth_string,
                   ANONYMOUSNET_HOME=str(REPO), ANONYMOUSNET_INPUT=str(inputs), ANONYMOUSNET_RELEASES=str(releases),
                   ANONYMOUSNET_POLICY=str(REPO / "policy" / "default.yaml"),
                   ANONYMOUSNET_CELEBA=str(REPO.parent / "shared" / "data" / "celeba"),
                   # The worker's confinement (flows/release/admission.py): approved policies, roots.
                   ANONYMOUSNET_APPROVED_POLICIES=str(tmp_path / "approved"),
                   ANONYMOUSNET_INPUT_ROOTS=str(incoming), ANONYMOUSNET_RELEASE_ROOTS=str(tmp_path / "releases"))
        _approve(REPO / "policy" / "default.yaml", tmp_path / "approved", env)
        prefect = str(BIN / "prefect")
        with _background([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                         tmp_path / "server.log") as server:
            _wait_for(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, "the Prefect server", 180,
                      server, tmp_path / "server.log")
            # Without credentials the API refuses (only the health probe is open); with them it answers.
            assert httpx.post(f"{api}/deployments/filter", json={}, timeout=10).status_code == 401
            assert httpx.post(f"{api}/deployments/filter", json={}, timeout=10,
                              auth=("operator", "wrong")).status_code == 401
            httpx_auth = {"auth": credentials, "timeout": 10}
            assert httpx.post(f"{api}/deployments/filter", json={}, **httpx_auth).status_code == 200
            without = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}
            # (from tmp_path: Prefect would read credentials from a developer's REPO/.env)
            refused_cli = subprocess.run([prefect, "work-pool", "ls"], env=without, cwd=tmp_path, capture_output=True,
                                         text=True, timeout=120)
            assert refused_cli.returncode != 0 and "401" in refused_cli.stdout + refused_cli.stderr

            def cli(*args: str) -> str:
                done = subprocess.run([prefect, *args], env=env, cwd=REPO, capture_output=True, text=True,
                                      timeout=300)
                assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
                return done.stdout

            cli("work-pool", "create", "anonymousnet", "--type", "process")
            cli("--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml")
            deployments = httpx.post(f"{api}/deployments/filter", json={}, **httpx_auth).json()
            by_name = {f"{d['entrypoint'].split(':')[1]}/{d['name']}": d for d in deployments}
            assert {"release/nightly", "train_generator/on-demand", "train_perturbation/on-demand",
                    "train_attributes/on-demand"} <= set(by_name)
            # Registered in PostgreSQL (the server's database), not in a SQLite file.
            assert int(sql("select count(*) from deployment")) == len(deployments)
            assert not list(home.rglob("*.db"))
            nightly = by_name["release/nightly"]
            assert nightly["work_pool_name"] == "anonymousnet" and nightly["work_queue_name"] == "default"
            assert by_name["train_generator/on-demand"]["work_queue_name"] == "gpu"
            assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
            assert nightly["parameters"]["input"] == str(inputs)
            # The scheduler has put the nightly runs on the calendar.
            _wait_for(lambda: httpx.post(f"{api}/flow_runs/filter", **httpx_auth, json={
                "deployments": {"id": {"any_": [nightly["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}).json(), "scheduled nightly runs", 120)

            with _background([prefect, "worker", "start", "--pool", "anonymousnet", "--type", "process"], env,
                             tmp_path / "worker.log"):
                def start(parameters: dict | None = None) -> str:
                    """Trigger the nightly deployment through the API, as the UI's Run button does."""
                    return httpx.post(f"{api}/deployments/{nightly['id']}/create_flow_run", **httpx_auth,
                                      json={"tags": ["api-triggered"], "parameters": parameters or {}}).json()["id"]

                def finished(flow_run_id: str):
                    state = httpx.get(f"{api}/flow_runs/{flow_run_id}", **httpx_auth).json()["state"]
                    return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

                run_id = start()
                state = _wait_for(lambda: finished(run_id), "the API-triggered release run", 480,
                                  log=tmp_path / "worker.log")
                assert state["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-5000:]
                # The same deployment with a policy nobody approved, and with an output outside the
                # release roots: both end Failed with the reason, before any photo is read.
                unapproved = tmp_path / "blur-everything.yaml"
                unapproved.write_text("version: 1\nname: blur-everything\nobfuscation:\n  method: blur\n")
                outside = tmp_path / "somewhere-else"
                refusals = {start({"policy": str(unapproved)}): "is not approved",
                            start({"output": str(outside)}): "outside the release roots"}
                for refused_id, reason in refusals.items():
                    state = _wait_for(lambda: finished(refused_id), "a refused release run", 300,
                                      log=tmp_path / "worker.log")
                    assert state["type"] == "FAILED" and reason in state["message"], state
                assert not outside.exists()

            runs = lineage.read_table(releases, "runs").set_index("flow_run_id")
            assert runs.loc[run_id, "status"] == "completed" and runs.loc[run_id, "deployment_name"] == "nightly"
            assert runs.loc[run_id, "trigger"] == "deployment run (UI, API or CLI)"
            assert json.loads(runs.loc[run_id, "parameters"])["input"] == str(inputs)
            unapproved_id = next(iter(refusals))
            assert runs.loc[unapproved_id, "status"] == "refused"
            assert list(runs.loc[unapproved_id, "parameters_overridden"]) == ["policy"]
            # Nothing of the refused runs reached the photo tables: no photo was read.
            photos_by_run = lineage.read_table(releases, "photos").groupby("run_id").size()
            assert set(photos_by_run.index) == {runs.loc[run_id, "run_id"]}
            # ... and no task ran in them: no ingest, so no photo was opened.
            refused_tasks = httpx.post(f"{api}/task_runs/filter", **httpx_auth,
                                       json={"flow_runs": {"id": {"any_": list(refusals)}}}).json()
            assert refused_tasks == []
            # The output outside the roots is not written to, not even to record the refusal:
            # Prefect's Failed state and the run's report artifact hold it.
            assert list(refusals)[1] not in runs.index

            run = httpx.get(f"{api}/flow_runs/{run_id}", **httpx_auth).json()
            policy_sha = runs.loc[run_id, "policy_sha256"]
            assert {"anonymousnet", "release", "api-triggered", "policy:default",
                    f"policy-sha256:{policy_sha[:12]}"} <= set(run["tags"])
            artifacts = httpx.post(f"{api}/artifacts/filter", **httpx_auth,
                                   json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
            by_key = {a["key"]: a for a in artifacts if a["key"]}
            report, gates = by_key["release-report-nightly-hr"], by_key["release-gates-nightly-hr"]
            assert report["type"] == "markdown" and "# Release report: run" in report["data"]
            assert gates["type"] == "table"
            gate_rows = json.loads(gates["data"]) if isinstance(gates["data"], str) else gates["data"]
            assert {"gate:ingest", "gate:publish", "gate:accounting"} <= {row["gate"] for row in gate_rows}
            assert all(row["passed"] for row in gate_rows)
            assert releases.as_uri() in by_key["release-folder-nightly-hr"]["data"]
            progress = [a for a in artifacts if a["type"] == "progress"]
            assert progress and progress[0]["data"] == 100.0
            released = lineage.read_table(releases, "photos")
            assert (released.status == "released").sum() >= 4 and (releases / "_data_docs" / "index.html").exists()

            # Scale-out: the same release on a local Dask cluster of 2 workers, reporting its
            # task runs to this server (README: Operations).
            scaled = tmp_path / "releases" / "dask"
            done = subprocess.run([str(BIN / "anonymousnet"), "release", "-i", str(inputs), "-o", str(scaled),
                                   "--batch-size", "2", "--dask-workers", "2"], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert "released 5, quarantined 0, rejected 0 of 5 input(s)" in done.stdout
            dask_run = lineage.read_table(scaled, "runs").flow_run_id.iloc[0]
            task_runs = httpx.post(f"{api}/task_runs/filter", **httpx_auth,
                                   json={"flow_runs": {"id": {"any_": [dask_run]}}}).json()
            anonymized = [t for t in task_runs if t["name"].startswith("anonymize")]
            assert len(anonymized) == 3 and all(t["state"]["type"] == "COMPLETED" for t in anonymized)

            # The UI: the flow-run page, Artifacts tab, shows the report.
            from selenium.webdriver.common.by import By
            from selenium.webdriver.common.keys import Keys
            from selenium.webdriver.support import expected_conditions
            from selenium.webdriver.support.ui import WebDriverWait

            browser = _browser()
            TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
            try:
                # The UI's login page takes the same credentials as the CLI (its user:password).
                browser.get(f"http://127.0.0.1:{port}/login")
                wait = WebDriverWait(browser, 60)
                password = wait.until(expected_conditions.element_to_be_clickable(
                    (By.CSS_SELECTOR, "input[type=password]")))
                browser.save_screenshot(str(TEST_OUTPUT / "ui-login.png"))
                password.send_keys(auth_string + Keys.ENTER)
                wait.until(lambda b: "/login" not in b.current_url)
                browser.get(f"http://127.0.0.1:{port}/runs/flow-run/{run_id}")
                tab = wait.until(expected_conditions.element_to_be_clickable((By.ID, "artifacts")))
                browser.execute_script("arguments[0].scrollIntoView(); arguments[0].click();", tab)
                wait.until(lambda b: "release-report-nightly-hr" in b.find_element(By.TAG_NAME, "body").text)
                browser.save_screenshot(str(TEST_OUTPUT / "ui-flow-run-artifacts.png"))
                # Its card opens the artifact's page, which renders the Markdown report.
                card = browser.find_element(By.XPATH, "//*[normalize-space(text())='release-report-nightly-hr']")
                browser.execute_script("arguments[0].click();", card)
                wait.until(lambda b: "Release report: run" in b.find_element(By.TAG_NAME, "body").text)
                browser.save_screenshot(str(TEST_OUTPUT / "ui-release-report.png"))
            except Exception:
                browser.save_screenshot(str(TEST_OUTPUT / "ui-failure.png"))
                (TEST_OUTPUT / "ui-failure.txt").write_text(browser.current_url + "\n" + browser.page_source)
                raise
            finally:
                browser.quit()


def test_compose_file_runs_the_topology_of_prefect_yaml():
    """Docker cannot run on these machines, so the compose file is checked against what the
    native test runs: the same pool, queues, deployments file, database and packages."""
    import tomllib

    import yaml

    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    deployments = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "deploy", "worker", "worker-gpu"} <= set(services)
    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "infra/prefect.yaml" in " ".join(services["deploy"]["command"])
    queues = {d["work_pool"]["work_queue_name"] for d in deployments["deployments"]}
    pools = {d["work_pool"]["name"] for d in deployments["deployments"]}
    for name in ("worker", "worker-gpu"):
        command = services[name]["command"]
        assert command[command.index("--pool") + 1] in pools
        assert command[command.index("--work-queue") + 1] in queues
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # Every placeholder the deployments read is set for the containers that deploy them.
    text = "\n".join(line for line in (REPO / "infra" / "prefect.yaml").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    wanted = set(re.findall(r"\{\{ \$(\w+) \}\}", text))
    assert wanted >= {"ANONYMOUSNET_HOME", "ANONYMOUSNET_INPUT", "ANONYMOUSNET_RELEASES"}
    assert wanted <= set(compose["x-anonymousnet"]["environment"])
    # The image carries every package the project ships.
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in sorted({name.split(".")[0] for name in packages}):   # the top-level folders
        assert f"COPY {package} ./{package}" in dockerfile, package
    for deployment in deployments["deployments"]:
        module, function = deployment["entrypoint"].split(":")
        assert f"def {function}(" in (REPO / module).read_text()


SECRET_NAME = re.compile(r"PASSWORD|AUTH|SECRET|TOKEN")


def test_compose_has_no_default_secrets_and_runs_unprivileged():
    """Every secret the compose file uses is required (``${NAME:?what to set}``: compose
    refuses to start without it and prints the message); none has a default; the server
    checks the string the workers send; the image's user is not root."""
    import yaml

    text = (REPO / "infra" / "docker-compose.yml").read_text()
    uses = re.findall(r"\$\{(\w+)(:?[-?+]?)([^}]*)\}", text)
    secrets_used = {(name, operator, message) for name, operator, message in uses if SECRET_NAME.search(name)}
    assert {name for name, _, _ in secrets_used} == {"POSTGRES_PASSWORD", "PREFECT_API_AUTH_STRING"}
    for name, operator, message in secrets_used:
        assert operator == ":?" and "set " + name in message, (name, operator, message)
    compose = yaml.safe_load(text)
    services, common = compose["services"], compose["x-anonymousnet"]
    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    assert common["environment"]["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    # No literal credential anywhere: every value naming one is an interpolation.
    for service in [common, *services.values()]:
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key) and not key.endswith("_URL"):
                assert str(value).startswith("${"), key
    assert services["prefect-server"]["ports"] == ["${PREFECT_BIND:-127.0.0.1}:4200:4200"]
    # Confinement and least privilege for every service that runs the project's image.
    environment = common["environment"]
    assert environment["ANONYMOUSNET_INPUT_ROOTS"] == "/data/incoming"
    assert environment["ANONYMOUSNET_RELEASE_ROOTS"] == "/data/releases"
    mounts = {volume.split(":")[-2]: volume.split(":")[-1] for volume in common["volumes"]}
    assert mounts["/data/incoming"] == "ro" and mounts[environment["ANONYMOUSNET_APPROVED_POLICIES"]] == "ro"
    assert common["cap_drop"] == ["ALL"] and "no-new-privileges:true" in common["security_opt"]
    for name in ("prefect-server", "deploy", "worker", "worker-gpu"):
        assert compose["services"][name]["cap_drop"] == ["ALL"], name
    users = re.findall(r"^USER\s+(\S+)", (REPO / "infra" / "Dockerfile").read_text(), flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_ops_secrets_writes_a_private_env_file_once(tmp_path):
    from click.testing import CliRunner

    from flows.cli import main

    target = tmp_path / "infra" / ".env"
    done = CliRunner().invoke(main, ["ops", "secrets", str(target)])
    assert done.exit_code == 0, done.output
    assert target.stat().st_mode & 0o777 == 0o600
    values = dict(line.split("=", 1) for line in target.read_text().splitlines() if not line.startswith("#"))
    assert values["PREFECT_API_AUTH_STRING"] == values["PREFECT_SERVER_API_AUTH_STRING"]
    user, password = values["PREFECT_API_AUTH_STRING"].split(":")
    assert user == "operator" and len(password) >= 40 and len(values["POSTGRES_PASSWORD"]) >= 40
    again = CliRunner().invoke(main, ["ops", "secrets", str(target)])
    assert again.exit_code == 1 and "nothing was changed" in again.output
    assert dict(line.split("=", 1) for line in target.read_text().splitlines() if not line.startswith("#")) == values
