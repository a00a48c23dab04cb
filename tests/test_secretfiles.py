"""Secrets from files, as orchestrators mount them: INSPECTOR_BROKER__PASSWORD_FILE logs in to the real
RabbitMQ with the password in the file, AWS_SECRET_ACCESS_KEY_FILE signs requests a real S3 server with
credentials checks; a missing, empty or doubly given secret is a one-line error that names the variable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pika
import pytest

from inspector import config
from inspector.broker import connection_parameters
from inspector.errors import ConfigError
from inspector.secretfiles import aws_credentials

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith(("INSPECTOR_", "AWS_")):
            monkeypatch.delenv(name)
    return monkeypatch


def empty(tmp_path: Path) -> Path:
    """A configuration file with nothing in it: the defaults and the environment only."""
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


def secret(tmp_path: Path, text: str, name: str = "secret") -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def test_the_broker_password_file_logs_in_to_the_real_broker(tmp_path, clean_environment):
    clean_environment.setenv("INSPECTOR_BROKER__PASSWORD_FILE", secret(tmp_path, "guest\n"))  # as `echo` writes it
    settings = config.load(empty(tmp_path))
    assert settings.broker.password.get_secret_value() == "guest"
    connection = pika.BlockingConnection(connection_parameters(settings.broker, "amqp://guest@127.0.0.1:5672/%2F"))
    connection.close()
    clean_environment.setenv("INSPECTOR_BROKER__PASSWORD_FILE", secret(tmp_path, "not-guest", "wrong"))
    refused = config.load(empty(tmp_path))
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(connection_parameters(refused.broker, "amqp://guest@127.0.0.1:5672/%2F"))


def test_the_file_form_is_matched_without_regard_to_case_and_keeps_the_rest_of_the_file(tmp_path, clean_environment):
    path = tmp_path / "inspector.toml"
    path.write_text('[broker]\nurl = "amqp://inspector@rabbit:5672/%2F"\n')
    clean_environment.setenv("inspector_broker__password_file", secret(tmp_path, "s3cr3t\r\n"))
    settings = config.load(path)
    assert settings.broker.password.get_secret_value() == "s3cr3t"
    assert settings.broker.urls == ["amqp://inspector@rabbit:5672/%2F"]


@pytest.mark.parametrize(("setup", "expected"), [
    (lambda tmp, env: env.setenv("INSPECTOR_BROKER__PASSWORD_FILE", str(tmp / "absent")),
     "INSPECTOR_BROKER__PASSWORD_FILE={tmp}/absent: no such file"),
    (lambda tmp, env: env.setenv("INSPECTOR_BROKER__PASSWORD_FILE", secret(tmp, "\n")),
     "INSPECTOR_BROKER__PASSWORD_FILE={tmp}/secret: the file is empty"),
    (lambda tmp, env: env.setenv("INSPECTOR_BROKER__PASSWORD_FILE", str(tmp)),
     "INSPECTOR_BROKER__PASSWORD_FILE={tmp}: a folder"),
    (lambda tmp, env: (env.setenv("INSPECTOR_BROKER__PASSWORD_FILE", secret(tmp, "a")),
                       env.setenv("INSPECTOR_BROKER__PASSWORD", "b")),
     "both INSPECTOR_BROKER__PASSWORD and INSPECTOR_BROKER__PASSWORD_FILE are set"),
    (lambda tmp, env: env.setenv("INSPECTOR_BROKER__URL_FILE", secret(tmp, "amqp://x")),
     "INSPECTOR_BROKER__URL_FILE: only secrets are read from a file (INSPECTOR_BROKER__PASSWORD_FILE)"),
])
def test_a_secret_file_that_cannot_serve_is_an_error_naming_the_variable(tmp_path, clean_environment, setup,
                                                                          expected):
    setup(tmp_path, clean_environment)
    with pytest.raises(ConfigError) as caught:
        config.load(empty(tmp_path))
    assert expected.format(tmp=tmp_path) in str(caught.value)


def test_the_command_line_says_it_in_one_line_and_exits_2_without_echoing_the_secret(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("INSPECTOR_")}
    environ.update(INSPECTOR_BROKER__PASSWORD_FILE=secret(tmp_path, "hunter2-secret"),
                   INSPECTOR_BROKER__PASSWORD="hunter2-plain")
    result = subprocess.run([sys.executable, "-m", "inspector.cli", "config"], cwd=tmp_path, env=environ,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "INSPECTOR_BROKER__PASSWORD_FILE" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


# -- the AWS variables: boto3 has no file form of them ------------------------------------------------------


def test_aws_credentials_from_files_and_their_errors(tmp_path):
    key, secret_key = secret(tmp_path, "AKIDFILE\n", "id"), secret(tmp_path, "from-a-file\n", "key")
    assert aws_credentials({}) == {} and aws_credentials({"AWS_SECRET_ACCESS_KEY": "plain"}) == {}
    assert aws_credentials({"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY_FILE": secret_key}) == {
        "aws_access_key_id": "AKID", "aws_secret_access_key": "from-a-file"}
    assert aws_credentials({"AWS_ACCESS_KEY_ID_FILE": key, "AWS_SECRET_ACCESS_KEY_FILE": secret_key}) == {
        "aws_access_key_id": "AKIDFILE", "aws_secret_access_key": "from-a-file"}
    with pytest.raises(ConfigError, match="both AWS_SECRET_ACCESS_KEY and AWS_SECRET_ACCESS_KEY_FILE"):
        aws_credentials({"AWS_SECRET_ACCESS_KEY": "x", "AWS_SECRET_ACCESS_KEY_FILE": secret_key})
    with pytest.raises(ConfigError, match="go together"):
        aws_credentials({"AWS_SECRET_ACCESS_KEY_FILE": secret_key})


@pytest.fixture(scope="module")
def s3_with_credentials():
    """SeaweedFS checking signatures: the tests' own identity, and one whose secret only a file holds."""
    from tests.s3kit import SeaweedS3

    folder = Path(tempfile.mkdtemp(prefix="inspector-s3auth-"))
    identities = {"identities": [
        {"name": "tests", "credentials": [{"accessKey": "inspector", "secretKey": "inspector"}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        {"name": "filed", "credentials": [{"accessKey": "filed", "secretKey": "only-in-a-file"}],
         "actions": ["Read", "List"]},
    ]}
    (folder / "s3.json").write_text(json.dumps(identities))
    server = SeaweedS3(folder, options=(f"-s3.config={folder / 's3.json'}",))
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - the reason it cannot run here is the skip's reason
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"SeaweedFS could not start: {exc}")
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_the_store_client_signs_with_the_secret_in_the_file(tmp_path, clean_environment, s3_with_credentials):
    from botocore.exceptions import ClientError

    from inspector.stores.s3client import make_client

    clean_environment.setenv("AWS_ENDPOINT_URL_S3", s3_with_credentials.endpoint)
    clean_environment.setenv("AWS_REGION", "us-east-1")
    clean_environment.setenv("AWS_ACCESS_KEY_ID", "filed")
    clean_environment.setenv("AWS_SECRET_ACCESS_KEY_FILE", secret(tmp_path, "only-in-a-file\n"))
    make_client().list_buckets()  # signed with the file's secret: accepted
    clean_environment.setenv("AWS_SECRET_ACCESS_KEY_FILE", secret(tmp_path, "a-wrong-secret", "wrong"))
    with pytest.raises(ClientError):  # the check is real: a wrong secret is refused
        make_client().list_buckets()
