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


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from tests.workerkit import fit_store

    return fit_store(tmp_path_factory.mktemp("fitted"))


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


@pytest.fixture
def start(tmp_path, prefix):
    """start(store, text="", **worker settings) -> a running in-process Worker, stopped at teardown."""
    from inspector import config
    from inspector.worker.loop import Worker
    from tests.workerkit import worker_config

    started = []

    def _start(store, text="", **worker):
        settings = config.load(worker_config(tmp_path, store, prefix, text, **worker))
        running = Worker(settings)
        running.start()
        started.append(running)
        return running

    yield _start
    for running in started:
        running.stop(grace_s=5)
