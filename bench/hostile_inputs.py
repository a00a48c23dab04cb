"""What each hostile input costs now, beside the path without the bound: every `Case` of every module of the
`bench/hostile/` package (see bench/hostile/__init__.py), as one markdown table.

Each run is a fresh process of its own (this script, re-run on one case), so that its memory is its own:

- time: the case's callable alone, timed inside that process (not the interpreter's start or the imports);
- peak MiB: the peak resident set size of that whole process, as the kernel reports it when it is reaped
  (ru_maxrss from wait4, which also covers any process it waited for): the interpreter, what the case's
  module imports, and the case. Nothing is
  subtracted; the "(import only)" row of each module is the same process running nothing, to read it by.

The unbounded run is stopped after the case's `unbounded_limit_s` and shown as "> N s"; any run is stopped
past `--max-rss-mib`, so a baseline cannot take the machine down. A bounded run that raises, crashes or
does not finish within `--bounded-limit-s` makes the exit status 1.

    .venv/bin/python bench/hostile_inputs.py
    .venv/bin/python bench/hostile_inputs.py --only decode --skip-unbounded
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPT = "bench/hostile_inputs.py"
POLL_S = 0.05
START_LIMIT_S = 180.0  # from the spawn to the case's first instruction: the interpreter and the imports
IMPORT_ONLY = "(import only)"


@dataclass(frozen=True)
class Run:
    """What one fresh process measured; `seconds` None: it did not finish (`result` says why)."""

    seconds: float | None
    peak_mib: float
    result: str
    ok: bool
    limit_s: float | None = None


def _import_package(folder: Path):
    for path in (str(folder.parent), str(BENCH), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    return importlib.import_module(folder.name)


def discover(folder: Path) -> tuple[dict[str, list], list[str]]:
    """{module name: its CASES} of the package in `folder`, and a line for each module that would not load."""
    package = _import_package(folder)
    found: dict[str, list] = {}
    broken: list[str] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            cases = list(module.CASES)
        except Exception as exc:  # noqa: BLE001 - one broken module is reported, the others still run
            broken.append(f"{info.name}: {type(exc).__name__}: {exc}")
            continue
        names = [case.name for case in cases]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            broken.append(f"{info.name}: case names given twice: {', '.join(twice)}")
            continue
        found[info.name] = cases
    return found, broken


def case_id(module: str, name: str) -> str:
    return f"{module}: {name}"


# -- the child: one case, one kind, in a process of its own ---------------------------------------------


def child(folder: Path, module: str, index: int, kind: str, out: Path) -> None:
    """Run CASES[index].<kind> (or nothing, index -1) and write {seconds, result} or {error} to `out`; the
    `.started` file beside it tells the parent when the case itself begins."""
    package = _import_package(folder)
    cases = importlib.import_module(f"{package.__name__}.{module}").CASES
    run = (lambda: None) if index < 0 else getattr(cases[index], kind)
    Path(f"{out}.started").touch()
    began = time.perf_counter()
    try:
        answer = run()
    except BaseException as exc:  # noqa: BLE001 - what the case raised is its result, told in one line
        traceback.print_exc()
        out.write_text(json.dumps({"seconds": time.perf_counter() - began,
                                   "error": f"{type(exc).__name__}: {exc}"[:200]}))
        return
    out.write_text(json.dumps({"seconds": time.perf_counter() - began,
                               "result": "-" if answer is None else str(answer)}))


# -- the parent ---------------------------------------------------------------------------------------------


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(folder: Path, module: str, index: int, kind: str, limit_s: float, max_rss_mib: float) -> Run:
    """Spawn the child and reap it with wait4, which gives that one process's peak RSS; stop it after
    `limit_s` of the case's own time, or past `max_rss_mib`."""
    with tempfile.TemporaryDirectory(prefix="hostile-") as scratch:
        out, log = Path(scratch) / "answer.json", Path(scratch) / "stderr.txt"
        command = [sys.executable, str(ROOT / SCRIPT), "--package", str(folder),
                   "--child", module, str(index), kind, str(out)]
        with open(log, "wb") as stderr:
            process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=stderr)
        spawned, began, stopped = time.monotonic(), None, None
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            now = time.monotonic()
            if began is None and Path(f"{out}.started").exists():
                began = now
            if stopped is None:
                if began is not None and now - began > limit_s:
                    stopped = f"> {limit_s:g} s"
                elif began is None and now - spawned > START_LIMIT_S:
                    stopped = f"did not start within {START_LIMIT_S:g} s"
                elif _rss_mib(process.pid) > max_rss_mib:
                    stopped = f"stopped past {max_rss_mib:g} MiB"
                if stopped is not None:
                    process.send_signal(signal.SIGKILL)
            time.sleep(POLL_S)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        peak = usage.ru_maxrss / 1024  # KiB on Linux
        if stopped is not None and stopped.startswith(">"):
            return Run(None, peak, "stopped", ok=False, limit_s=limit_s)
        if stopped is not None:
            return Run(None, peak, stopped, ok=False)
        if out.exists():
            answer = json.loads(out.read_text())
            if "error" in answer:
                return Run(answer["seconds"], peak, f"raised {answer['error']}", ok=False)
            return Run(answer["seconds"], peak, answer["result"], ok=True)
        code = process.returncode
        died = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
        last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        return Run(None, peak, f"{died}{': ' + last[0] if last else ''}", ok=False)


def _seconds(run: Run) -> str:
    if run.seconds is None:
        return f"> {run.limit_s:g} s" if run.limit_s is not None else "-"
    return f"{run.seconds * 1000:.0f} ms" if run.seconds < 1 else f"{run.seconds:.1f} s"


def _cell(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= width else text[: width - 3] + "..."
    return text.replace("|", "\\|")


def row(name: str, now: Run, unbounded: Run | str, only: str | None = None, package: str = "") -> str:
    command = f"`.venv/bin/python {SCRIPT}{package} --only {shlex.quote(only or name)}`"
    cells = [_cell(name), _seconds(now), f"{now.peak_mib:.0f}", _cell(now.result)]
    if isinstance(unbounded, str):
        cells += ["", "", unbounded]
    else:
        cells += [_seconds(unbounded), f"{unbounded.peak_mib:.0f}", _cell(unbounded.result)]
    return "| " + " | ".join(cells + [command.replace("|", "\\|")]) + " |"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="SUBSTRING", help="only the cases whose 'module: name' contains it")
    parser.add_argument("--skip-unbounded", action="store_true", help="run only the product's own path")
    parser.add_argument("--bounded-limit-s", type=float, default=120.0, metavar="S",
                        help="a bounded run still going after this long fails the run (default 120)")
    parser.add_argument("--max-rss-mib", type=float, default=8192.0, metavar="MIB",
                        help="any run is stopped past this resident size (default 8192)")
    parser.add_argument("--package", type=Path, default=BENCH / "hostile", metavar="DIR",
                        help="the package of case modules (default bench/hostile)")
    parser.add_argument("--child", nargs=4, metavar=("MODULE", "INDEX", "KIND", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folder = args.package.resolve()
    if not (folder / "__init__.py").is_file():
        parser.error(f"--package {args.package}: not a folder with an __init__.py")
    if args.child:
        module, index, kind, out = args.child
        child(folder, module, int(index), kind, Path(out))
        return 0
    if args.bounded_limit_s <= 0 or args.max_rss_mib <= 0:
        parser.error("--bounded-limit-s and --max-rss-mib must be positive")

    found, broken = discover(folder)
    package = "" if folder == (BENCH / "hostile").resolve() else f" --package {shlex.quote(str(folder))}"
    chosen = {module: [(i, case) for i, case in enumerate(cases)
                       if not args.only or args.only in case_id(module, case.name)]
              for module, cases in found.items()}
    chosen = {module: picked for module, picked in chosen.items() if picked}
    if not chosen and not broken:
        print(f"no case matches --only {args.only!r}" if args.only else f"no cases in {folder}", file=sys.stderr)
        return 1

    lines = ["| case | now: time | now: peak MiB | now: result | unbounded: time | unbounded: peak MiB "
             "| unbounded: result | command |", "|---|---|---|---|---|---|---|---|"]
    failed = [f"{line} (module not loaded)" for line in broken]
    for module, picked in chosen.items():
        print(f"{module}: {IMPORT_ONLY}", file=sys.stderr)
        idle = measure(folder, module, -1, "bounded", args.bounded_limit_s, args.max_rss_mib)
        lines.append(row(case_id(module, IMPORT_ONLY), idle, "-", f"{module}: ", package))
        for index, case in picked:
            name = case_id(module, case.name)
            print(f"{name}: now", file=sys.stderr)
            now = measure(folder, module, index, "bounded", args.bounded_limit_s, args.max_rss_mib)
            if not now.ok:
                failed.append(f"{name}: {now.result}")
            if case.unbounded is None:
                unbounded: Run | str = "no unbounded path"
            elif args.skip_unbounded:
                unbounded = "skipped (--skip-unbounded)"
            else:
                print(f"{name}: unbounded (at most {case.unbounded_limit_s:g} s)", file=sys.stderr)
                unbounded = measure(folder, module, index, "unbounded", case.unbounded_limit_s, args.max_rss_mib)
            lines.append(row(name, now, unbounded, package=package))
    print(f"Hostile inputs on {machine()}; each run a fresh process, its peak RSS whole (see the "
          f"'{IMPORT_ONLY}' rows).\n")
    print("\n".join(lines))
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
