"""A user in a real browser: headless Debian Chromium (Selenium + chromium-driver) drives `airflow standalone`.

Logs in (SimpleAuthManager), opens the trigger form of taosr1_relevance, checks every Param is a form field with
its help text, triggers a tiny run limited to the prepare stage through the "Run until" field, and waits for the
UI to show it succeeded. The stage's job log must be in the task's log (read back through the REST API), and the
REST API must refuse a trigger with an invalid Param, naming the field. Screenshots go to
$SEARCHREL_TEST_ARTIFACTS (default: artifacts/test-screenshots under the repo).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from airflow_support import DAGS, REPO_ROOT, VENV_BIN, free_ports, wait_http

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
DAG_ID = "taosr1_relevance"
FIELD_LABELS = ["Dataset", "Judgments path", "Profile", "Stages to skip", "Run until", "Config overrides", "Run key"]


def _shots() -> Path:
    folder = Path(os.environ.get("SEARCHREL_TEST_ARTIFACTS") or REPO_ROOT / "artifacts" / "test-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Api:
    """The Airflow REST API with a JWT from /auth/token, as a script of the user would call it."""

    def __init__(self, base: str, password: str) -> None:
        self.base = base
        body = self._call("POST", "/auth/token", {"username": "admin", "password": password}, token=None)
        self.token = body["access_token"]

    def _call(self, method: str, path: str, payload=None, token: str | None = "self"):
        request = urllib.request.Request(self.base + path, method=method,
                                         data=json.dumps(payload).encode() if payload is not None else None,
                                         headers={"Content-Type": "application/json"})
        if token == "self":
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        return json.loads(text) if text.strip().startswith(("{", "[")) else text

    def get(self, path: str):
        return self._call("GET", path)

    def post(self, path: str, payload):
        return self._call("POST", path, payload)


@pytest.fixture()
def standalone(tmp_path):
    port, = free_ports(1)
    home = tmp_path / "airflow_home"
    home.mkdir()
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
           "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
           "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}", "AIRFLOW__CORE__PARALLELISM": "2",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
           "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5", "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
           # Only the run the test triggers: unpausing a catchup=False DAG creates a run for its latest weekly
           # slot, a whole tiny training that holds max_active_runs=1 longer than the test waits.
           "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
           "SEARCHREL_ROOT": str(tmp_path / "artifacts"),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("AIRFLOW_CONN_RAY_DEFAULT", None)
    subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True,
                   timeout=300)
    log = tmp_path / "standalone.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(VENV_BIN / "airflow"), "standalone"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/api/v2/monitor/health", 300, proc, log)
        password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        yield base, password, home
    finally:
        from conftest import kill_session

        from operators.hooks import local_job

        jobs = home / "ray_jobs"
        for job in jobs.iterdir() if jobs.is_dir() else []:
            local_job.stop(job)  # jobs run detached from Airflow; stop any a failed test left behind
        kill_session(proc.pid)
        proc.wait(timeout=60)


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1700"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(10)
    return driver


def _wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def drive_trigger_form(driver, base: str, password: str, shots: Path, path: str) -> None:
    """Log in, open the trigger form, check the Params, restrict the run to prepare and trigger it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(f"{base}/dags/{DAG_ID}")
    _wait_for(lambda: "/auth/login" in driver.current_url, 30, "the UI to ask for a login (login is required)")
    driver.find_element(By.NAME, "username").send_keys("admin")
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait_for(lambda: "/auth/login" not in driver.current_url, 30, "the login to finish")
    driver.get(f"{base}/dags/{DAG_ID}")
    driver.find_element(By.CSS_SELECTOR, "button[aria-label='Trigger Dag']").click()
    _wait_for(lambda: "Run Parameters" in driver.find_element(By.TAG_NAME, "body").text, 30, "the trigger form")
    body = driver.find_element(By.TAG_NAME, "body").text
    for label in FIELD_LABELS:
        assert label in body, f"Param field {label!r} is not on the trigger form"
    for help_text in ("Which loader reads the judgments", "Configuration profile of every stage",
                      "Run only this stage and the stages it depends on", "stage.field=value settings",
                      "the Airflow run id (made path-safe)"):
        assert help_text in body, f"help text {help_text!r} is not shown"
    driver.save_screenshot(str(shots / "airflow_trigger_form.png"))

    def field(name: str, tag: str):
        """The form control of Param `name` (the UI gives each field the id element_<name>)."""
        element = driver.find_element(By.ID, f"element_{name}")
        return element if element.tag_name == tag else element.find_element(By.TAG_NAME, tag)

    path_input = field("path", "input")
    path_input.send_keys(Keys.CONTROL, "a")
    path_input.send_keys(path)
    if path_input.get_attribute("value") != path:
        # Seen on an AMD EPYC CI machine: the form swallowed one keystroke of the long path on every try
        # ("...search_reevance"). Set the value as the browser would, through React's input event, and check it.
        driver.execute_script(
            "const el = arguments[0];"
            "Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(el, arguments[1]);"
            "el.dispatchEvent(new Event('input', {bubbles: true}));", path_input, path)
    assert path_input.get_attribute("value") == path, "the path field does not hold the typed path"
    until = field("until", "input")
    until.click()
    until.send_keys("prepare")
    until.send_keys(Keys.ENTER)
    overrides = field("overrides", "textarea")
    overrides.send_keys("prepare.max_queries=20")
    driver.save_screenshot(str(shots / "airflow_trigger_filled.png"))
    buttons = [b for b in driver.find_elements(By.CSS_SELECTOR, "[role=dialog] button") if b.text.strip() == "Trigger"]
    assert buttons, "no Trigger button in the form"
    buttons[-1].click()


@pytest.fixture()
def chromium():
    if not (CHROMIUM and CHROMEDRIVER):
        message = "needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message + " (.ci/run installs them)")
        pytest.skip(message)


def test_trigger_a_tiny_run_from_the_browser(chromium, standalone, shared_data):
    from selenium.webdriver.common.by import By

    base, password, home = standalone
    api = Api(base, password)
    _wait_for(lambda: api.get(f"/api/v2/dags/{DAG_ID}").get("dag_id") == DAG_ID, 120, "the DAG to be parsed", 2)

    # The API validates Params like the form does: an unknown profile is refused, naming the field.
    with pytest.raises(urllib.error.HTTPError) as refused:
        api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {"profile": "huge"}})
    assert refused.value.code == 400 and "profile" in refused.value.read().decode()

    shots = _shots()
    driver = _browser()
    try:
        drive_trigger_form(driver, base, password, shots, str(shared_data / "crowdflower_search_relevance"))
        runs = _wait_for(lambda: api.get(f"/api/v2/dags/{DAG_ID}/dagRuns")["dag_runs"], 60, "the triggered run")
        assert len(runs) == 1
        run = runs[0]
        assert run["conf"]["until"] == "prepare" and run["conf"]["overrides"] == ["prepare.max_queries=20"]
        run_id = run["dag_run_id"]
        state = _wait_for(lambda: api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"] in
                          ("success", "failed") and api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"],
                          420, "the run to finish", 3)
        driver.get(f"{base}/dags/{DAG_ID}/runs/{run_id}")
        _wait_for(lambda: "success" in driver.find_element(By.TAG_NAME, "body").text.lower(), 60, "the UI to show success")
        driver.save_screenshot(str(shots / "airflow_run_succeeded.png"))
        tasks = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]
        states = {t["task_id"]: t["state"] for t in tasks}
        assert state == "success", states
        assert states["prepare"] == "success"
        assert {s for t, s in states.items() if t != "prepare"} == {"skipped"}
        # The trigger's part of the task log reaches the log API when the triggerer's handler flushes it, which
        # on a loaded machine can come after the run is marked done: wait for the job's last line (60 s at most).
        def task_log() -> str:
            return json.dumps(api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/prepare/logs/1"))

        _wait_for(lambda: "[local job] exited with status" in task_log(), 60, "the job's last log line", 3)
        text = task_log()
        assert "submitted: python -m ray_jobs taosr1 prepare" in text
        assert "[local job] exited with status 0" in text  # the job's own output, streamed by the trigger
    finally:
        driver.quit()

