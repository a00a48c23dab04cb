"""deploy/rabbitmq: the capture queue's policy, as a `rabbitmqctl set_policy` script and as definitions
to import, says the same in both, matches the worker's defaults, and is accepted and applied by the real
RabbitMQ, on a virtual host of the test's own, to a queue declared as the worker declares it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pika
import pytest

from inspector.config import ExchangeSettings, WorkerSettings

RABBITMQ = Path(__file__).resolve().parents[1] / "deploy" / "rabbitmq"
SCRIPT = RABBITMQ / "set-policy.sh"
DEFINITIONS = RABBITMQ / "definitions.json"
RABBITMQCTL = shutil.which("rabbitmqctl")


def policy() -> dict:
    (only,) = json.loads(DEFINITIONS.read_text())["policies"]
    return only


def script_arguments() -> list[str]:
    """The words of the script's `rabbitmqctl ... set_policy ...` command, as the shell splits them."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.strip().startswith("exec rabbitmqctl")]
    return shlex.split(line)


def test_the_script_and_the_definitions_set_the_same_policy():
    words = script_arguments()
    at = words.index("set_policy")
    options, positional = {}, []
    rest = words[at + 1:]
    while rest:
        word = rest.pop(0)
        if word.startswith("--"):
            options[word] = rest.pop(0)
        else:
            positional.append(word)
    name, pattern, definition = positional
    expected = policy()
    assert (name, pattern, json.loads(definition)) == (expected["name"], expected["pattern"], expected["definition"])
    assert int(options["--priority"]) == expected["priority"] and options["--apply-to"] == expected["apply-to"]
    assert options["--vhost"] == "${RABBITMQ_VHOST:-/}" and expected["vhost"] == "/"


def test_the_policy_is_for_the_workers_capture_queue_with_its_defaults():
    worker = WorkerSettings()
    found = policy()
    assert re.fullmatch(found["pattern"], worker.queue)
    assert not re.fullmatch(found["pattern"], worker.dead_letter_queue)
    assert not re.fullmatch(found["pattern"], worker.queue + ".old")
    assert found["definition"] == {"delivery-limit": worker.delivery_limit,
                                   "dead-letter-exchange": ExchangeSettings().dead}


def _ctl(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([RABBITMQCTL, "-q", *args], capture_output=True, text=True, timeout=120, input=stdin)
    if check:
        assert result.returncode == 0, f"rabbitmqctl {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def _broker_answers() -> bool:
    if RABBITMQCTL is None:
        return False
    try:
        return subprocess.run([RABBITMQCTL, "-q", "status"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture
def vhost():
    if not _broker_answers():
        pytest.skip("no RabbitMQ node that rabbitmqctl reaches here (.ci/run starts one)")
    name = f"inspector-policy-{uuid.uuid4().hex[:8]}"
    _ctl("add_vhost", name)
    try:
        _ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        _ctl("delete_vhost", name, check=False)


def _declare_as_the_worker_does(vhost: str) -> None:
    worker, exchanges = WorkerSettings(), ExchangeSettings()
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", virtual_host=vhost))
    try:
        connection.channel().queue_declare(worker.queue, durable=True, arguments={
            "x-queue-type": "quorum", "x-dead-letter-exchange": exchanges.dead,
            "x-delivery-limit": worker.delivery_limit})
    finally:
        connection.close()


def _applied(vhost: str) -> dict[str, str]:
    listing = json.loads(_ctl("list_queues", "-p", vhost, "name", "policy", "--formatter", "json").stdout)
    return {queue["name"]: queue["policy"] for queue in listing}


def test_rabbitmq_accepts_the_script_and_applies_the_policy_to_the_capture_queue(vhost):
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable (git update-index --chmod=+x)"
    result = subprocess.run(["sh", str(SCRIPT), "-q"], env={**os.environ, "RABBITMQ_VHOST": vhost},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    _declare_as_the_worker_does(vhost)
    assert _applied(vhost) == {WorkerSettings().queue: policy()["name"]}


def test_rabbitmq_imports_the_definitions(vhost):
    definitions = json.loads(DEFINITIONS.read_text())
    for item in definitions["policies"]:
        item["vhost"] = vhost
    # on standard input: rabbitmqctl runs as the rabbitmq user, who may not read the test's files
    _ctl("import_definitions", "--format", "json", stdin=json.dumps(definitions))
    _declare_as_the_worker_does(vhost)
    assert _applied(vhost) == {WorkerSettings().queue: policy()["name"]}
    listed = json.loads(_ctl("list_policies", "-p", vhost, "--formatter", "json").stdout)
    assert [json.loads(p["definition"]) for p in listed] == [policy()["definition"]]


def test_rabbitmq_refuses_a_policy_broken_on_purpose(vhost):
    """The checks above are not vacuous: RabbitMQ validates a policy's keys and values."""
    for definition in ('{"delivery_limit": 10}', '{"delivery-limit": "ten"}'):
        result = _ctl("set_policy", "-p", vhost, "broken", "^inspector\\.captures$", definition, check=False)
        assert result.returncode != 0 and "Validation failed" in result.stdout + result.stderr, definition
