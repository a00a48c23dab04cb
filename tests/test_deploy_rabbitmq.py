"""deploy/rabbitmq: the queue policies (the capture queue's delivery limit, dead-letter exchange and
at-least-once dead-lettering; the dead-letter queue's length bound, which keeps the newest), as a
`rabbitmqctl set_policy` script and as definitions to import, say the same in both, match the worker's
defaults, and are accepted and applied by the real RabbitMQ, on a virtual host of the test's own, to the
queues declared as the worker declares them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika
import pytest

from inspector.config import ExchangeSettings, WorkerSettings

RABBITMQ = Path(__file__).resolve().parents[1] / "deploy" / "rabbitmq"
SCRIPT = RABBITMQ / "set-policy.sh"
DEFINITIONS = RABBITMQ / "definitions.json"
RABBITMQCTL = shutil.which("rabbitmqctl")
CAPTURES, DEAD = "inspector-captures", "inspector-dead-letters"


def policies() -> dict[str, dict]:
    return {item["name"]: item for item in json.loads(DEFINITIONS.read_text())["policies"]}


def script_calls(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run the script with a `rabbitmqctl` first on PATH that records its arguments and succeeds: how the
    script ended, and each call it made with its arguments as the shell expanded them."""
    bin_dir, record = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "rabbitmqctl"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "with open(os.environ['RECORD'], 'a') as out:\n"
                    "    out.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stub.chmod(0o755)
    inherited = {key: value for key, value in os.environ.items()
                 if not key.startswith(("DEAD_LETTER_", "RABBITMQ_VHOST"))}
    result = subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env={
        **inherited, **env, "RECORD": str(record), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return result, calls


def set_policy(words: list[str]) -> tuple[list[str], dict]:
    """A `rabbitmqctl ... set_policy ...` call: the arguments before set_policy, and the policy it sets
    in the form of definitions.json."""
    at = words.index("set_policy")
    options, positional, rest = {}, [], words[at + 1:]
    while rest:
        word = rest.pop(0)
        if word.startswith("--"):
            options[word] = rest.pop(0)
        else:
            positional.append(word)
    name, pattern, definition = positional
    return words[:at], {"vhost": options["--vhost"], "name": name, "pattern": pattern,
                        "apply-to": options["--apply-to"], "priority": int(options["--priority"]),
                        "definition": json.loads(definition)}


def test_the_script_and_the_definitions_set_the_same_policies(tmp_path):
    result, calls = script_calls(tmp_path)
    assert result.returncode == 0, result.stderr
    set_ = [set_policy(call)[1] for call in calls]
    assert len(set_) == 2 and {item["name"]: item for item in set_} == policies()


def test_the_script_passes_its_vhost_and_arguments_to_each_call(tmp_path):
    result, calls = script_calls(tmp_path, "-n", "rabbit@broker-2", RABBITMQ_VHOST="plant-7")
    assert result.returncode == 0, result.stderr
    assert [set_policy(call)[0] for call in calls] == [["-n", "rabbit@broker-2"]] * 2
    assert {set_policy(call)[1]["vhost"] for call in calls} == {"plant-7"}


def test_one_run_of_the_script_changes_the_dead_letter_bounds(tmp_path):
    result, calls = script_calls(tmp_path, DEAD_LETTER_MAX_LENGTH="50000", DEAD_LETTER_MAX_BYTES=str(4 << 30))
    assert result.returncode == 0, result.stderr
    found = {item["name"]: item for item in (set_policy(call)[1] for call in calls)}
    assert found[DEAD]["definition"] == {"max-length": 50000, "max-length-bytes": 4 << 30, "overflow": "drop-head"}
    assert found[CAPTURES] == policies()[CAPTURES]


@pytest.mark.parametrize("variable", ["DEAD_LETTER_MAX_LENGTH", "DEAD_LETTER_MAX_BYTES"])
@pytest.mark.parametrize("value", ["ten", "1GB", "-1", "0", "1.5", "010", "1 000", '1, "overflow": "reject-publish"'])
def test_the_script_refuses_a_bound_that_is_not_a_positive_whole_number(tmp_path, variable, value):
    result, calls = script_calls(tmp_path, **{variable: value})
    assert result.returncode == 2 and calls == []
    assert f"{variable}={value} is not a positive whole number" in result.stderr


def test_the_policies_are_for_the_workers_queues_with_its_defaults():
    """RabbitMQ applies a policy to every queue whose name its pattern matches anywhere (an unanchored
    search), the highest priority winning: each pattern finds its own queue and nothing else."""
    worker, found = WorkerSettings(), policies()
    assert set(found) == {CAPTURES, DEAD}
    own = {CAPTURES: worker.queue, DEAD: worker.dead_letter_queue}
    others = [worker.queue + ".old", "old." + worker.queue, worker.queue.replace(".", "x"),
              worker.dead_letter_queue + ".replayed", "x" + worker.dead_letter_queue,
              worker.dead_letter_queue.replace(".", "x")]
    for name, item in found.items():
        assert item["apply-to"] == "queues" and item["vhost"] == "/"
        assert [queue for queue in (*own.values(), *others) if re.search(item["pattern"], queue)] == [own[name]]
    assert found[CAPTURES]["definition"] == {
        "delivery-limit": worker.delivery_limit, "dead-letter-exchange": ExchangeSettings().dead,
        "dead-letter-strategy": "at-least-once", "overflow": "reject-publish"}


def test_the_dead_letter_bound_keeps_the_newest_and_holds_many_of_the_largest_captures():
    """drop-head keeps the newest (and never refuses a dead letter, which at-least-once dead-lettering
    would hold in the capture queue); a byte bound under the largest capture would let one large dead
    letter push every other one out."""
    bound = policies()[DEAD]["definition"]
    assert bound["overflow"] == "drop-head" and "dead-letter-exchange" not in bound
    assert bound["max-length-bytes"] >= 16 * WorkerSettings().max_image_bytes
    assert 1000 <= bound["max-length"] <= 100_000
    assert "max-length" not in policies()[CAPTURES]["definition"]  # reject-publish must refuse no capture


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


def _connect(vhost: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", virtual_host=vhost))


def _declare_as_the_worker_does(vhost: str) -> None:
    """The dead-letter exchange, the dead-letter queue bound to it, and the capture queue, with the
    arguments inspector/worker/topology.py declares them with."""
    worker, exchanges = WorkerSettings(), ExchangeSettings()
    connection = _connect(vhost)
    try:
        channel = connection.channel()
        channel.exchange_declare(exchanges.dead, exchange_type="topic", durable=True)
        channel.queue_declare(worker.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(worker.dead_letter_queue, exchanges.dead, routing_key="#")
        channel.queue_declare(worker.queue, durable=True, arguments={
            "x-queue-type": "quorum", "x-dead-letter-exchange": exchanges.dead,
            "x-delivery-limit": worker.delivery_limit})
    finally:
        connection.close()


def _run_script(vhost: str) -> None:
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable (git update-index --chmod=+x)"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("DEAD_LETTER_")}
    result = subprocess.run(["sh", str(SCRIPT), "-q"], env={**environment, "RABBITMQ_VHOST": vhost},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _applied(vhost: str) -> dict[str, str]:
    listing = json.loads(_ctl("list_queues", "-p", vhost, "name", "policy", "--formatter", "json").stdout)
    return {queue["name"]: queue["policy"] for queue in listing}


def _listed(vhost: str) -> dict[str, dict]:
    listing = json.loads(_ctl("list_policies", "-p", vhost, "--formatter", "json").stdout)
    return {item["name"]: {"pattern": item["pattern"], "definition": json.loads(item["definition"])}
            for item in listing}


def _shipped() -> dict[str, dict]:
    return {name: {"pattern": item["pattern"], "definition": item["definition"]} for name, item in policies().items()}


def _import(vhost: str, items: list[dict]) -> None:
    # on standard input: rabbitmqctl runs as the rabbitmq user, who may not read the test's files
    _ctl("import_definitions", "--format", "json",
         stdin=json.dumps({"policies": [{**item, "vhost": vhost} for item in items]}))


def _on_its_queue() -> dict[str, str]:
    worker = WorkerSettings()
    return {worker.queue: CAPTURES, worker.dead_letter_queue: DEAD}


def test_rabbitmq_accepts_the_script_and_applies_each_policy_to_its_queue(vhost):
    _run_script(vhost)
    _declare_as_the_worker_does(vhost)
    assert _applied(vhost) == _on_its_queue()
    assert _listed(vhost) == _shipped()


def test_rabbitmq_imports_the_definitions(vhost):
    _import(vhost, list(policies().values()))
    _declare_as_the_worker_does(vhost)
    assert _applied(vhost) == _on_its_queue()
    assert _listed(vhost) == _shipped()


def _get(channel, queue: str, wait_s: float = 10.0):
    deadline = time.monotonic() + wait_s
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None or time.monotonic() > deadline:
            return method, properties, body
        time.sleep(0.05)


def test_a_capture_nacked_from_the_capture_queue_lands_in_the_dead_letter_queue(vhost):
    """Dead-lettering still works under the policies, applied in place to queues that already exist
    (as on a running deployment), with the worker's own queue arguments."""
    worker = WorkerSettings()
    _declare_as_the_worker_does(vhost)
    _run_script(vhost)
    _declare_as_the_worker_does(vhost)  # a worker reconnecting declares them again, unrefused
    assert _applied(vhost) == _on_its_queue()
    connection = _connect(vhost)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", worker.queue, b"capture-1", pika.BasicProperties(delivery_mode=2))
        method, _, body = channel.basic_get(worker.queue)
        assert body == b"capture-1"
        channel.basic_nack(method.delivery_tag, requeue=False)
        method, properties, body = _get(channel, worker.dead_letter_queue)
        assert body == b"capture-1", "the rejected capture never reached the dead-letter queue"
        (death,) = properties.headers["x-death"]
        assert (death["reason"], death["queue"]) == ("rejected", worker.queue)
    finally:
        connection.close()


def _dead_letters_held(vhost: str, queue: str) -> int:
    """The dead letters a quorum queue holds until their target queue confirms them (at-least-once
    dead-lettering): RabbitMQ's own count, which no rabbitmqctl listing shows."""
    expression = (f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"{vhost}">>, queue, <<"{queue}">>)), '
                  "rabbit_quorum_queue:info(Q, [messages_dlx]).")
    output = _ctl("eval", expression).stdout
    found = re.search(r"\{messages_dlx,(\d+)\}", output)
    assert found, f"rabbitmqctl eval gave no messages_dlx count: {output}"
    return int(found.group(1))


@pytest.mark.parametrize(("without", "held"), [((), 1), (("overflow",), 0)], ids=["shipped", "without-overflow"])
def test_the_capture_queue_dead_letters_at_least_once(vhost, without, held):
    """A dead letter that no queue takes yet stays in the capture queue, to go on once one does, instead of
    being dropped. Without `overflow: reject-publish` RabbitMQ accepts the strategy and silently drops such
    a dead letter (at most once): the policy carries both."""
    worker, exchanges = WorkerSettings(), ExchangeSettings()
    captures = policies()[CAPTURES]
    _import(vhost, [{**captures, "definition": {key: value for key, value in captures["definition"].items()
                                                if key not in without}}])
    connection = _connect(vhost)
    try:
        channel = connection.channel()
        channel.exchange_declare(exchanges.dead, exchange_type="topic", durable=True)  # no queue bound
        channel.queue_declare(worker.queue, durable=True, arguments={
            "x-queue-type": "quorum", "x-dead-letter-exchange": exchanges.dead,
            "x-delivery-limit": worker.delivery_limit})
        channel.confirm_delivery()
        channel.basic_publish("", worker.queue, b"capture-1", pika.BasicProperties(delivery_mode=2))
        method, _, _ = channel.basic_get(worker.queue)
        channel.basic_nack(method.delivery_tag, requeue=False)
        channel.queue_declare(worker.queue, passive=True)  # the nack is through the channel
        deadline = time.monotonic() + 10
        while (found := _dead_letters_held(vhost, worker.queue)) != held and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        assert found == held == _dead_letters_held(vhost, worker.queue)  # and stays so
    finally:
        connection.close()


@pytest.mark.parametrize("key", ["max-length", "max-length-bytes"])
def test_the_dead_letter_queue_keeps_the_newest_over_its_bound(vhost, key):
    """The shipped definition with one bound lowered to 3 dead letters: of 5, the last 3 are kept, in order."""
    worker, exchanges = WorkerSettings(), ExchangeSettings()
    bodies = [b"dead-letter-%d-" % number + b"x" * 986 for number in range(5)]  # 1000 bytes each
    dead = policies()[DEAD]
    bound = 3 if key == "max-length" else 3 * len(bodies[0])
    _import(vhost, [{**dead, "definition": {**dead["definition"], key: bound}}])
    _declare_as_the_worker_does(vhost)
    assert _applied(vhost)[worker.dead_letter_queue] == DEAD
    connection = _connect(vhost)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:  # as the worker publishes a dead letter
            channel.basic_publish(exchanges.dead, "line-1.camera-1", body, pika.BasicProperties(delivery_mode=2))
        kept = []
        while (body := channel.basic_get(worker.dead_letter_queue, auto_ack=True)[2]) is not None:
            kept.append(body)
        assert kept == bodies[2:]
    finally:
        connection.close()


def test_rabbitmq_refuses_a_policy_broken_on_purpose(vhost):
    """The checks above are not vacuous: RabbitMQ validates a policy's keys and values."""
    for definition in ('{"delivery_limit": 10}', '{"delivery-limit": "ten"}', '{"max-length-bytes": "1GB"}',
                       '{"overflow": "drop-tail"}', '{"dead-letter-strategy": "exactly-once"}'):
        result = _ctl("set_policy", "-p", vhost, "broken", "^inspection\\.dead$", definition, check=False)
        assert result.returncode != 0 and "Validation failed" in result.stdout + result.stderr, definition
