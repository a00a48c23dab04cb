"""A newcomer's first hour, offline: the mistakes they make are told in one line, fast, and nothing is fitted
on defects or sent to a broker they did not name. Commands run as the operator runs them, in a subprocess."""

import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pika
import pytest
from PIL import Image

from inspector import config
from inspector.cli import NEWCOMER_ORDER, build_parser
from inspector.errors import ConfigError
from inspector.stores import ModelStore
from inspector.stores.folder import file_mode
from inspector.tools import samples
from inspector.tools.refit_options import RefitOptions, check_training_folder, will_announce

ROOT = Path(__file__).resolve().parents[1]
NULL_MODEL = json.dumps({"default": {"plugin": "null"}})


def inspector(*args, cwd, env=None, timeout=240):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    environ.update({"INSPECTOR_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}, **(env or {}))
    return subprocess.run([sys.executable, "-m", "inspector.cli", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """A small sample line in MVTec AD's layout, as `inspector samples` writes it."""
    root = tmp_path_factory.mktemp("first-hour")
    result = inspector("samples", "--out", "line", "--train", "12", "--test", "2", "--defective", "1",
                       "--size", "64", cwd=root)
    assert result.returncode == 0, result.stderr
    return root


# -- 1. refit on a data set's root -------------------------------------------------------------------------


def test_refit_refuses_a_labelled_data_set_and_names_the_folder_to_pass(line):
    for data in ("line", "line/test", "line/test/scratch"):
        result = inspector("refit", "--data", data, "--no-calibrate", cwd=line, env={"INSPECTOR_MODELS": NULL_MODEL})
        assert result.returncode == 2, (data, result.stdout, result.stderr)
        assert f"--data {Path('line/train/good')}," in result.stderr, result.stderr
        assert "--any-folder" in result.stderr and "Traceback" not in result.stderr
    assert not (line / "models").exists()


def test_the_layout_check_sees_defects_and_masks_and_passes_good_folders(tmp_path):
    for folder in ("set/train/good", "set/test/good", "set/test/crack", "set/ground_truth/crack", "plain/day1/cam1"):
        (tmp_path / folder).mkdir(parents=True)
    check_training_folder(tmp_path / "set" / "train" / "good")
    check_training_folder(tmp_path / "plain")
    with pytest.raises(ConfigError, match=r"test/crack/.*mask folders \(ground_truth/\)"):
        check_training_folder(tmp_path / "set")
    with pytest.raises(ConfigError, match="itself"):
        check_training_folder(tmp_path / "set" / "test" / "crack")
    (tmp_path / "masks-only" / "masks").mkdir(parents=True)
    with pytest.raises(ConfigError, match="mask folders"):
        check_training_folder(tmp_path / "masks-only")


# -- 2. list settings from the environment -------------------------------------------------------------------


@pytest.mark.parametrize(("variable", "value", "json_text"), [
    ("INSPECTOR_WORKER__BINDING_KEYS", "line1.#", '["line1.#"]'),
    ("INSPECTOR_EVIDENCE__KEEP", "fail,error", '["fail", "error"]'),
])
def test_a_list_setting_not_written_as_json_is_one_line_and_exit_2(tmp_path, variable, value, json_text):
    result = inspector("config", cwd=tmp_path, env={variable: value})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2, result.stderr
    assert variable in result.stderr and repr(value) in result.stderr and f"{variable}='{json_text}'" in result.stderr


def test_the_json_it_suggests_is_read_and_a_plain_url_stays_a_url(monkeypatch, tmp_path):
    for variable in [v for v in os.environ if v.upper().startswith("INSPECTOR_")]:
        monkeypatch.delenv(variable)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INSPECTOR_WORKER__BINDING_KEYS", '["line1.#"]')
    monkeypatch.setenv("INSPECTOR_EVIDENCE__KEEP", '["fail", "error"]')
    monkeypatch.setenv("INSPECTOR_BROKER__URL", "amqp://line@10.0.0.5:5672/%2F")
    settings = config.load(check_plugins=False)
    assert settings.worker.binding_keys == ["line1.#"] and settings.evidence.keep == ["fail", "error"]
    assert settings.broker.url == "amqp://line@10.0.0.5:5672/%2F"


# -- 3. no announcement to a broker nobody named -------------------------------------------------------------


def test_announcing_follows_a_configured_broker(monkeypatch, tmp_path):
    for variable in [v for v in os.environ if v.upper().startswith("INSPECTOR_")]:
        monkeypatch.delenv(variable)
    monkeypatch.chdir(tmp_path)
    default = config.load(check_plugins=False)
    options = RefitOptions(data=tmp_path, model="default", announce=None)
    assert not will_announce(default, options)
    assert will_announce(default, RefitOptions(data=tmp_path, model="default", announce=True))
    monkeypatch.setenv("INSPECTOR_BROKER__URL", "amqp://guest@127.0.0.1:5672/%2F")
    assert will_announce(config.load(check_plugins=False), options)
    (tmp_path / "inspector.toml").write_text('[broker]\nurl = "amqp://line@10.0.0.5:5672/%2F"\n')
    monkeypatch.delenv("INSPECTOR_BROKER__URL")
    assert will_announce(config.load(check_plugins=False), options)
    assert not will_announce(config.load(check_plugins=False), RefitOptions(tmp_path, "default", announce=False))


def _control_queue(exchange: str):
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)  # as refit declares it
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, routing_key="model.#")
    return connection, channel, queue


def _announcements(channel, queue, wait_s: float) -> list:
    got, deadline = [], time.monotonic() + wait_s
    while time.monotonic() < deadline:
        method, _, body = channel.basic_get(queue, auto_ack=True)
        if method:
            got.append(json.loads(body))
        else:
            time.sleep(0.1)
    return got


def test_a_try_out_refit_sends_nothing_unless_asked(line, tmp_path):
    exchange = f"first-hour-{uuid.uuid4().hex[:8]}.control"
    connection, channel, queue = _control_queue(exchange)
    env = {"INSPECTOR_MODELS": NULL_MODEL, "INSPECTOR_STORE__PATH": str(tmp_path / "models"),
           "INSPECTOR_BROKER__EXCHANGES__CONTROL": exchange}
    try:
        quiet = inspector("refit", "--data", "line/train/good", "--no-calibrate", cwd=line, env=env)
        assert quiet.returncode == 0, quiet.stderr
        assert "not announced: no broker.url is configured" in quiet.stdout and "--announce" in quiet.stdout
        assert _announcements(channel, queue, 1.0) == []
        # 1. --any-folder fits on everything, defects included, when asked (and here: announce when asked)
        asked = inspector("refit", "--data", "line", "--any-folder", "--no-calibrate", "--announce", cwd=line,
                          env=env)
        assert asked.returncode == 0, asked.stderr
        # 12 train + 2 good + 5 defective + their 5 masks: --any-folder takes the mask folder too, as it says
        assert "images: 24 found, 24 used for the fit" in asked.stdout
        assert f"announced model.default on {exchange}" in asked.stdout
        got = _announcements(channel, queue, 3.0)
        assert [m["version"] for m in got] == [ModelStore(tmp_path / "models").current("default")]
    finally:
        channel.exchange_delete(exchange)
        connection.close()
    # 8. the first-run commands end with the next one to type
    assert f"next: inspector evaluate --model default --data {Path('line') / 'test'}" in quiet.stdout


# -- 4. mistakes are told before torch is imported -----------------------------------------------------------

MISTAKES = [
    ["refit", "--data", "nowhere"],
    ["refit", "--data", ".", "--target-false-reject", "5"],
    ["refit", "--data", ".", "--model", "ghost"],
    ["evaluate", "--data", "nowhere"],
    ["evaluate", "--data", ".", "--model", "ghost"],
    ["explain", "--data", "nowhere", "--out", "x"],
    ["explain", "--data", ".", "--out", "x", "--model", "ghost"],
    ["models", "show", "default"],
]


def test_usage_errors_and_the_store_listing_need_no_torch(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from inspector.cli import main
        codes = [main(args) for args in {MISTAKES!r}]
        codes.append(main(["models", "list"]))
        print(codes, "torch" in sys.modules)
    """)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")} | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environ, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[2, 2, 2, 2, 2, 2, 2, 1, 0] False", result.stderr
    assert "Traceback" not in result.stderr
    assert "configured: default" in result.stderr and "['default']" not in result.stderr  # 9. one way to list


# -- 5. every file of a version readable by the worker's user ------------------------------------------------


def _save_like_dfkde(folder: Path) -> list[str]:
    import torch
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(4)}, str(folder / "state.safetensors"))  # safetensors writes 0600
    (folder / "settings.json").write_text("{}\n")
    return ["state.safetensors", "settings.json"]


def test_every_file_of_a_version_has_the_umask_mode(tmp_path):
    store = ModelStore(tmp_path / "models")
    info = store.write("default", _save_like_dfkde, {"plugin": "dfkde"})
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in info.path.iterdir()}
    assert set(modes) == {"state.safetensors", "settings.json", "manifest.json"}
    assert set(modes.values()) == {file_mode()}, modes
    assert file_mode() == 0o666 & ~_umask_now()


def _umask_now() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as another user needs root to switch users")
def test_a_worker_of_another_user_reads_a_version_refit_wrote():
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:  # pytest's own tmp_path is root's alone (0700)
        Path(shared).chmod(0o755)
        store_path = Path(shared) / "models"
        ModelStore(store_path).write("default", _save_like_dfkde, {"plugin": "dfkde"})
        result = _as_nobody(store_path)
    assert result.returncode == 0, result.stderr
    assert "state.safetensors" in result.stdout


def _as_nobody(store_path: Path) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import os
        from inspector.stores import ModelStore  # imported first: the interpreter's own files may be root's only
        os.setgid(65534)
        os.setuid(65534)  # nobody: not the refit's user
        info = ModelStore({str(store_path)!r}).load_path("default")
        print(sorted(p.name for p in info.path.iterdir()), open(info.path / "state.safetensors", "rb").read(8))
    """)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=60)


# -- 6. advice that works --------------------------------------------------------------------------------------


def test_too_few_images_gives_the_real_minimum_counting_only_readable_files(tmp_path):
    (tmp_path / "empty").mkdir()
    result = inspector("refit", "--data", "empty", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no image files under empty" in result.stderr and "--no-calibrate" not in result.stderr
    assert "plugins.dfkde.n_comps" in result.stderr
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, image in enumerate(samples.make_images(10, seed=3, size=64)):
        Image.fromarray(image).save(mixed / f"part{i:02d}.png")
    for i in range(15):
        (mixed / f"broken{i:02d}.png").write_bytes(b"not a png")
    result = inspector("refit", "--data", "mixed", "--held-out", "0.5", cwd=tmp_path)
    assert result.returncode == 1
    message = result.stderr
    # the default 0.5% target needs 199 calibration images: 398 at a hold-out of half
    assert "a hold-out of 50% needs at least 398 readable images" in message, message
    assert "a false-reject rate of 0.005 needs at least 199 calibration images" in message
    assert "25 image files under mixed, 10 readable" in message
    assert "--no-calibrate" in message and "the fit alone needs 8" in message  # 10 readable: --no-calibrate works
    assert "--calibration cross-fit" not in message  # cross-fitting needs 20: it would fail again
    assert "plugins.dfkde.n_comps is 24" in message
    assert ModelStore(tmp_path / "models").names() == []


# -- 7. where things are -------------------------------------------------------------------------------------


def test_store_messages_say_where_and_which_configuration(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    listing = inspector("models", "list", cwd=tmp_path / "elsewhere")
    assert listing.returncode == 0
    assert f"no models in {tmp_path / 'elsewhere' / 'models'}" in listing.stdout
    assert "no configuration file" in listing.stdout and "configured: default" in listing.stdout
    (tmp_path / "inspector.toml").write_text('[store]\npath = "store"\n')
    shown = inspector("models", "show", "default", cwd=tmp_path)
    assert shown.returncode == 1
    assert f"'default' is configured but has no versions in {tmp_path / 'store'}" in shown.stderr
    assert f"configuration {tmp_path / 'inspector.toml'}" in shown.stderr
    assert "inspector refit --model default" in shown.stderr


# -- 8. the way in -------------------------------------------------------------------------------------------


def test_help_lists_the_first_run_first_and_every_option_says_what_it_does():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    listed = [action.dest for action in commands._choices_actions]
    assert listed[:4] == ["samples", "refit", "evaluate", "explain"]
    assert listed == sorted(listed, key=lambda c: NEWCOMER_ORDER.index(c) if c in NEWCOMER_ORDER else 99)
    help_text = parser.format_help()
    assert help_text.index("samples") < help_text.index("    run ") and "first run, offline" in help_text
    silent = []

    def walk(p, path):
        for action in p._actions:
            if action.dest in ("help", "version"):
                continue
            if action.choices and isinstance(action.choices, dict):  # subcommands
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not action.help:
                silent.append(" ".join([*path, *(action.option_strings or [action.dest])]))

    walk(parser, ["inspector"])
    assert silent == []
    assert {"samples", "config"} <= {a.dest for a in commands._choices_actions if a.help}


def test_samples_ends_with_the_next_command_and_refuses_a_used_folder(line):
    result = inspector("samples", "--out", "line", "--train", "2", "--test", "1", "--defective", "0",
                       "--size", "32", cwd=line)
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert len(list((line / "line" / "train" / "good").iterdir())) == 12  # nothing mixed in
    fresh = inspector("samples", "--out", "fresh", "--train", "2", "--test", "1", "--defective", "0",
                      "--size", "32", cwd=line)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.strip().splitlines()[-1] == f"next: inspector refit --data {Path('fresh/train/good')}"


# -- 9. smaller ---------------------------------------------------------------------------------------------


def test_every_configuration_problem_is_reported_at_once(tmp_path):
    (tmp_path / "bad.toml").write_text('default_model = "ghost"\n[worker]\nprefetch = 0\n')
    result = inspector("config", "--config", "bad.toml", cwd=tmp_path,
                       env={"INSPECTOR_STORE__FOO": "1", "INSPECTOR_EVIDENCE__RETENTION_DAYS": "-1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for key in ("worker.prefetch", "store.foo", "evidence.retention_days"):
        assert key in result.stderr, result.stderr
    both = inspector("config", cwd=tmp_path, env={"INSPECTOR_FOO": "1", "INSPECTOR_WORKER__BINDING_KEYS": "a.b"})
    assert "INSPECTOR_FOO" in both.stderr and "INSPECTOR_WORKER__BINDING_KEYS" in both.stderr


def test_the_report_page_and_its_documents_agree_on_scripts():
    from inspector.tools import report

    documents = [ROOT / "docs" / "tools.md", ROOT / "docs" / "contract.md", Path(report.__file__)]
    for document in documents:
        text = document.read_text()
        assert "no script" not in text, document  # the page carries a JSON data block: never a script to run
        assert "no executable script" in text, document
