import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# -- the worker tests' shared pieces: a fitted store, private broker names, a camera line, workers --


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """One store fitted for the whole run (a fit takes seconds): tests read it and change only a copy (`store`),
    which the end of the run checks."""
    from tests.workerkit import fit_store

    made = fit_store(tmp_path_factory.mktemp("fitted"))
    before = _contents(made)
    yield made
    assert _contents(made) == before, "a test changed the shared fitted store; change a copy (the store fixture)"


def _contents(root):
    import hashlib

    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


@pytest.fixture
def store(fitted, tmp_path):
    """A copy of the fitted store this test may change."""
    import shutil
    from pathlib import Path

    return Path(shutil.copytree(fitted, tmp_path / "models"))


@pytest.fixture
def prefix():
    import uuid

    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def line(prefix):
    from tests.workerkit import Line

    made = Line(prefix)
    yield made
    made.delete()


def _worker_starter(tmp_path, prefix, consumer_factory, grace_s):
    """The one way the fixtures below build, start and (at teardown) stop in-process Workers."""
    from inspector import config
    from inspector.worker.loop import Worker
    from tests.workerkit import worker_config

    started = []

    def _start(store, text="", hooks=None, parts=None, **worker):
        settings = config.load(worker_config(tmp_path, store, prefix, text, **worker))
        factory = {"consumer_factory": consumer_factory} if consumer_factory else {}
        running = Worker(settings, hooks=hooks, **factory, **(parts or {}))
        running.start()
        started.append(running)
        return running

    def stop_all():
        for running in started:
            running.stop(grace_s=grace_s)

    return _start, stop_all


@pytest.fixture
def start(tmp_path, prefix):
    """start(store, text="", hooks=None, parts=None, **worker settings) -> a running in-process Worker on the
    real broker (`hooks`: its stage hooks; `parts`: Worker keyword parts), stopped at teardown."""
    _start, stop_all = _worker_starter(tmp_path, prefix, None, 5)
    yield _start
    stop_all()


@pytest.fixture
def stub_start(tmp_path, prefix):
    """stub_start(store, text="", hooks=None, parts=None, **worker settings) -> a started Worker on a
    StubConsumer (no broker: `worker.consumer.deliver(...)`, then `.join()`), stopped at teardown."""
    from inspector.worker.stubconsumer import StubConsumer

    _start, stop_all = _worker_starter(tmp_path, prefix, StubConsumer, 2)
    yield _start
    stop_all()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) for the session; the test is skipped, saying why, when it cannot start."""
    from tests.s3kit import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - any reason it cannot run here is the skip's reason
        server.stop()
        pytest.skip(f"SeaweedFS could not start: {exc}")
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """The session's bucket on the S3 server, with the AWS environment pointing at it; its name. (One
    bucket for all: SeaweedFS gives each bucket volumes of its own.) Tests keep to prefixes of their own."""
    for key, value in s3_server.environment().items():
        monkeypatch.setenv(key, value)
    name = "inspector-tests"
    client = s3_server.client()
    try:
        client.create_bucket(Bucket=name)
    except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        pass
    return name


@pytest.fixture
def s3_prefix():
    import uuid

    return f"t{uuid.uuid4().hex[:10]}/models"
