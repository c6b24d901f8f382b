"""The CLI's manners: one vocabulary, true waits, nothing overwritten unasked, output for
people and --json for programs, Unix conventions. Each test reproduces a stumble a new
user met (issue 12) with the real CLI in real processes."""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from broker.argtypes import _Deprecated
from broker.cli import build_parser
from broker.client import BrokerUnavailable, Control, Subscriber
from broker.sources import check_synthetic

from conftest import PY, cli, free_port, make_endpoints, run_cli, wait_status, watch

NO_BROKER = "tcp://127.0.0.1:{port}"


def _no_broker() -> str:
    return NO_BROKER.format(port=free_port())


# --- true waits ------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["status"], ["watch"], ["worker"], ["sink"],
                                  ["pause"], ["record", "--out", "{tmp}/r.h5"],
                                  ["snapshot", "--out", "{tmp}/s.npy"]])
def test_waiting_for_an_absent_broker_says_so_and_reports_the_real_wait(argv, tmp_path):
    """Before: record waited 30.8 s in silence and blamed a 2 s timeout, watch and worker
    said 'within 1 s' after 5.6 and 31 s. Now: a line a second, and the true total."""
    broker = _no_broker()
    argv = [a.format(tmp=tmp_path) for a in argv]
    t0 = time.monotonic()
    r = run_cli(*argv, "--broker", broker, "--timeout", "2.5")
    wall = time.monotonic() - t0
    assert r.returncode == 1, r
    prog = f"framebroker {argv[0]}"
    lines = r.stderr.strip().splitlines()
    waits = [ln for ln in lines if ln.startswith(f"{prog}: waiting for broker at {broker} (")]
    assert len(waits) >= 2, r.stderr  # at ~1 s and ~2 s
    assert waits[0].endswith("(1 s)"), waits
    err = lines[-1]
    m = re.fullmatch(rf"{prog}: error: no answer from the broker at {re.escape(broker)} "
                     r"after (\d+\.\d) s \(asked 'endpoints' (once|\d+ times); if it runs "
                     r"with CURVE, give --curve-secret and --curve-server-key\)", err)
    assert m, err
    assert 2.5 <= float(m.group(1)) <= wall  # the real time waited, not one attempt's
    assert "Traceback" not in r.stderr


def test_the_api_timeout_names_api_parameters_not_cli_flags():
    ctl = Control(_no_broker(), timeout=0.2)
    with pytest.raises(BrokerUnavailable) as info:
        ctl.wait(0.5)
    ctl.close()
    text = str(info.value)
    assert "security=Security(secret=..., server_key=...)" in text and "--" not in text
    assert info.value.waited >= 0.5 and info.value.attempts >= 1


def test_checks_that_need_no_broker_run_before_connecting(tmp_path):
    """Before: an existing output or a missing directory was found only after a broker
    answered. Now they fail at once, without a single 'waiting' line."""
    existing = tmp_path / "old.h5"
    existing.write_bytes(b"precious")
    broker = _no_broker()
    cases = [(["record", "--out", str(existing)], f"{existing} exists; pass --overwrite to "
                                                  f"replace it"),
             (["sink", "--out", str(existing)], f"{existing} exists; pass --overwrite to "
                                                f"replace it"),
             (["snapshot", "--out", str(tmp_path / "no" / "x.png")], "does not exist"),
             (["record", "--out", str(tmp_path / "no" / "x.h5")], "does not exist"),
             (["watch", "--policy", "block", "--pub", broker], "--pub and --stream")]
    for argv, message in cases:
        r = run_cli(*argv, "--broker", broker, "--timeout", "30")
        assert r.returncode in (1, 2), (argv, r)
        assert message in r.stderr and "waiting" not in r.stderr, (argv, r.stderr)
    assert existing.read_bytes() == b"precious"


# --- one vocabulary ----------------------------------------------------------------------

def test_record_frames_stops_after_n(eps, broker_factory, tmp_path):
    """Before: record --frames 300 meant 'preallocate 300' and never stopped (3.4 GB in
    20 s). Now it records 300 frames and exits 0 while the broker streams on."""
    b = broker_factory("--shape", "48x64x3")
    b.wait_ready()
    out = tmp_path / "r.h5"
    r = run_cli("record", "--out", str(out), "--broker", eps.control, "--frames", "300",
                "--json", timeout=120)
    assert r.returncode == 0, r
    assert json.loads(r.stdout)["frames_written"] == 300
    assert "will take about" in r.stderr  # 300 x 9216 bytes
    assert b.proc.poll() is None  # the stream goes on without it
    with h5py.File(out, "r") as f:
        assert f["frames"].shape == (300, 48, 64, 3)
        ids = f["frame_id"][:]
        assert np.array_equal(ids, np.arange(ids[0], ids[0] + 300))
        for i in (0, 150, 299):
            assert check_synthetic(f["frames"][i], int(ids[i])) == -1


def test_old_spellings_work_with_a_warning_naming_the_new_one(capsys):
    parser = build_parser()
    cases = [(["serve", "--sndhwm", "7"], "hwm", 7, "--sndhwm is deprecated; use --hwm"),
             (["watch", "--rcvhwm", "9"], "hwm", 9, "--rcvhwm is deprecated; use --hwm"),
             (["watch", "--interval", "2"], "progress", 2.0, "use --progress"),
             (["serve", "--quiet"], "progress", 0.0, "--quiet is deprecated; use --progress 0"),
             (["run", "--quiet"], "progress", 0.0, "use --progress 0"),
             (["worker", "--output", "spectrum"], "output", "spectrum",
              "--output is deprecated; use --fft-output"),
             (["inspect", "x.h5", "--png", "s.png"], "out", Path("s.png"), "use --out"),
             (["inspect", "x.h5", "--interval", "1"], "progress", 1.0, "use --progress")]
    for argv, dest, value, warning in cases:
        args = parser.parse_args(argv)
        assert getattr(args, dest) == value, argv
        assert warning in capsys.readouterr().err, argv


def _old_spellings() -> set[str]:
    """Every old flag spelling the CLI still accepts, read from its parser (the
    ``_Deprecated`` actions), so the checks below follow the code."""
    found: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, _Deprecated):
                found.update(action.option_strings)
            elif isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    return found


#: what the project itself runs and shows: its tests, benchmarks, examples and documents
PROJECT_TEXT = ("tests", "bench", "broker/bench", "examples", "docs", "README.md")
#: the positional ``record OUT.h5`` (deprecated: ``--out OUT.h5``), in code and in prose
OLD_RECORD = re.compile(r'cli\("record", (?!"--|\*)|framebroker\s+record\s+(?!-)')


def _project_files() -> list[Path]:
    root = Path(__file__).resolve().parent.parent
    files = []
    for name in PROJECT_TEXT:
        path = root / name
        files += [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.suffix in (".py", ".md", ".sh", ".toml"))
    return files


def _deliberate_lines(path: Path) -> set[int]:
    """Lines that name old spellings on purpose: the test that they still work, and the
    README bullet that lists them."""
    text = path.read_text()
    if path.name == "test_cli.py":
        tree = ast.parse(text)
        return {n for f in tree.body if isinstance(f, ast.FunctionDef)
                and f.name == "test_old_spellings_work_with_a_warning_naming_the_new_one"
                for n in range(f.lineno, f.end_lineno + 1)}
    if path.name == "README.md":
        lines = text.splitlines()
        start = next(i for i, ln in enumerate(lines, 1) if "Old spellings keep working" in ln)
        end = next(i for i, ln in enumerate(lines[start:], start + 1) if ln.startswith("* "))
        return set(range(start, end))
    return set()


def test_the_project_itself_uses_no_old_spelling():
    """Before: tests/conftest.py started every broker and every watch with old spellings,
    and tests, docs and benchmarks used more of them (and the positional record path):
    the project printed its own deprecation warnings."""
    old = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(_old_spellings())))
                     + r")(?![\w-])")
    found = []
    for path in _project_files():
        skip, text = _deliberate_lines(path), path.read_text()
        own = set(re.findall(r'add_argument\("(--[\w-]+)"', text))  # a script's own flags
        for n, line in enumerate(text.splitlines(), 1):
            if n in skip:
                continue
            found += [f"{path}:{n}: {m.group()}" for m in old.finditer(line)
                      if m.group() not in own]
            found += [f"{path}:{n}: positional record path" for _ in OLD_RECORD.finditer(line)]
    assert not found, "\n".join(found)


def test_a_conftest_broker_and_watch_print_no_deprecation_warning(eps, broker_factory):
    """The helpers every test uses speak the current vocabulary (seen on stderr)."""
    b = broker_factory("--frames", "5", "--shape", "16x20", "--wait-subscribers", "1")
    w = watch(eps)
    out, err = w.communicate(timeout=60)
    code, _, broker_err = b.finish()
    assert w.returncode == 0 and code == 0, (out, err, broker_err)
    assert json.loads(out.strip().splitlines()[-1])["received"] == 5
    assert "deprecated" not in err + broker_err, err + broker_err


def test_the_readme_documents_the_shared_flags_once_as_the_parser_has_them():
    """README's "Shared flags" table: one row per flag, in no other table of the README,
    and each subcommand a row names (``serve``, ...) accepts that flag."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Shared flags", 1)[1].split("\n* ", 1)[0]
    rows = re.findall(r"^\| `(--[\w-]+)[^|]*\| (.*) \|$", section, re.M)
    assert len(rows) >= 10
    subs = next(a for a in build_parser()._actions
                if isinstance(a, argparse._SubParsersAction)).choices
    for flag, meaning in rows:
        assert len(re.findall(rf"^\| `{flag}\b", readme, re.M)) == 1, flag
        for name in re.findall(r"`(\w+)`", meaning):
            if name in subs and not meaning.count(f"`{name} --"):
                assert flag in subs[name]._option_string_actions, (flag, name)


def test_every_subcommand_speaks_the_shared_vocabulary():
    """--help of each subcommand shows the shared flags, and none of the old ones."""
    shared = {
        "serve": ["--frames", "--hwm", "--progress", "--json", "--fps"],
        "watch": ["--frames", "--hwm", "--progress", "--json", "--timeout", "--broker"],
        "worker": ["--fft-output", "--json", "--timeout", "--broker"],
        "sink": ["--out", "--overwrite", "--json", "--timeout", "--broker"],
        "record": ["--out", "--overwrite", "--frames", "--expect-frames", "--json",
                   "--timeout", "--no-space-check"],
        "run": ["--frames", "--hwm", "--fft-output", "--overwrite", "--progress", "--json",
                "--fps", "--no-space-check"],
        "snapshot": ["--out", "--overwrite", "--json", "--timeout"],
        "inspect": ["--out", "--overwrite", "--progress", "--json"],
        "status": ["--json", "--timeout", "--broker"],
        "pause": ["--json", "--timeout"], "resume": ["--json", "--timeout"],
        "stop": ["--json", "--timeout"],
    }
    old = _old_spellings()
    for command, flags in shared.items():
        r = run_cli(command, "--help")
        assert r.returncode == 0, r
        for flag in flags:
            assert re.search(rf"{flag}\b", r.stdout), (command, flag)
        for flag in old:
            assert not re.search(rf"{flag}\b(?!-)", r.stdout), (command, flag)
        if "--timeout" in flags:
            assert ("--timeout SECONDS how long to wait for the broker: for its first answer "
                    "and, once connected, for data (default 30.0)") in " ".join(
                r.stdout.split()), command


# --- nothing overwritten unasked -------------------------------------------------------------

def test_sink_out_refuses_an_existing_file(tmp_path):
    """Before: sink --out results.h5 replaced 300 results with 50 without a word."""
    out = tmp_path / "results.h5"
    with h5py.File(out, "w") as f:
        f["results"] = np.arange(300)
    r = run_cli("sink", "--out", str(out), "--broker", _no_broker())
    assert r.returncode == 1
    assert r.stderr.strip() == (f"framebroker sink: error: {out} exists; pass --overwrite to "
                                f"replace it")
    with h5py.File(out, "r") as f:
        assert f["results"].shape == (300,)


def test_every_writer_refuses_with_the_same_line(tmp_path):
    out = tmp_path / "taken.h5"
    out.write_bytes(b"x")
    png = tmp_path / "taken.png"
    png.write_bytes(b"x")
    recording = tmp_path / "rec.h5"
    with h5py.File(recording, "w") as f:
        f["frames"] = np.zeros((1, 2, 2), np.uint8)
    for argv, path in ((["record", "--out", str(out)], out),
                       (["run", "--record", str(out), "--frames", "10"], out),
                       (["snapshot", "--out", str(png)], png),
                       (["inspect", str(recording), "--out", str(png)], png)):
        r = run_cli(*argv, "--broker", _no_broker()) if argv[0] in ("record", "snapshot") \
            else run_cli(*argv)
        assert r.returncode == 1, (argv, r)
        assert r.stderr.strip().endswith(f"error: {path} exists; pass --overwrite to replace "
                                         f"it"), (argv, r.stderr)
    assert out.read_bytes() == b"x" and png.read_bytes() == b"x"


def test_run_record_prints_the_expected_size_and_refuses_what_the_disk_cannot_hold(tmp_path):
    """Before: run --frames 5000 --record run.h5 wrote 4.6 GB without a word."""
    out = tmp_path / "huge.h5"
    eps = make_endpoints()
    r = run_cli("run", "--frames", "1000000000", "--record", str(out), "--pub", eps.pub,
                "--work", eps.work, "--control", eps.control, "--results", eps.results)
    assert r.returncode == 1, r
    assert f"{out} will take about 921.6 TB" in r.stderr
    assert "--no-space-check" in r.stderr and not out.exists()


def test_inspect_blames_the_output_not_the_input(tmp_path):
    """Before: inspect clip.h5 with its PNG under a missing directory said the recording
    was bad."""
    rec = tmp_path / "clip.h5"
    with h5py.File(rec, "w") as f:
        f["frames"] = np.zeros((1, 2, 2), np.uint8)
    r = run_cli("inspect", str(rec), "--out", "/nonexistent/x.png")
    assert r.returncode == 1
    assert "/nonexistent/x.png: directory /nonexistent does not exist" in r.stderr
    assert "not a framebroker recording" not in r.stderr


# --- output for people, --json for programs -----------------------------------------------------

def test_people_get_sentences_programs_get_json(eps, broker_factory):
    """Before: pause/resume/stop printed raw JSON; status listed departed subscribers as
    if connected and showed a rate while paused; serve's progress never said paused."""
    b = broker_factory("--fps", "200", "--shape", "24x32")
    b.proc.terminate()
    b.proc.communicate()
    b.proc = cli("serve", *eps.serve_args(), "--fps", "200", "--shape", "24x32",
                 "--progress", "0.2")
    b.wait_ready()
    r = run_cli("watch", "--broker", eps.control, "--frames", "20", "--name", "gone",
                "--progress", "0")
    assert r.returncode == 0, r
    assert "None" not in r.stdout and "{" not in r.stdout
    wait_status(eps.control, lambda s: s["consumers"].get("gone", {}).get("age_s", 0) > 3.5)
    p = run_cli("pause", "--broker", eps.control)
    assert (p.returncode, p.stdout.strip()) == (0, "framebroker pause: paused")
    text = run_cli("status", "--broker", eps.control).stdout
    assert re.search(r"state: paused", text) and "0 fps now (paused)" in text
    assert re.search(r"subscribers: 0 connected", text)
    assert re.search(r"departed: 1 recent reports from subscribers that left:\n\s+gone "
                     r"\(drop\): received 20, dropped 0, gaps 0, rejected 0 \(last report "
                     r"\d+ s ago\)", text), text
    assert "None" not in text and "{" not in text
    status = json.loads(run_cli("status", "--broker", eps.control, "--json").stdout)
    assert status["paused"] is True and status["rate_fps"] == 0
    r = run_cli("resume", "--broker", eps.control, "--json")
    assert json.loads(r.stdout) == {"paused": False}
    r = run_cli("stop", "--broker", eps.control)
    assert re.fullmatch(r"framebroker stop: stopping: the broker sends end-of-stream and "
                        r"exits \(\d+ frames sent\)", r.stdout.strip()), r.stdout
    _, err = b.proc.communicate(timeout=60)
    assert re.search(r"framebroker serve: paused: \d+ frames sent", err), err


def test_part_summaries_are_formatted_and_printed_once(eps, broker_factory):
    """Before: workers {'9898': 419}, rejected {}, missed None; the sink's summary on
    stdout and again on stderr."""
    b = broker_factory("--frames", "40", "--wait-workers", "1", "--shape", "24x32")
    worker = cli("worker", "--broker", eps.control, "--planner", "estimate")
    sink = cli("sink", "--broker", eps.control)
    s_out, s_err = sink.communicate(timeout=120)
    w_out, _ = worker.communicate(timeout=120)
    assert b.finish()[0] == 0
    assert sink.returncode == 0 and worker.returncode == 0, (s_err,)
    for out in (s_out, w_out):
        assert "None" not in out and "{" not in out and "'" not in out, out
    assert s_out.count("framebroker sink:") == 1 and "results of 40" in s_out
    assert "results of" not in s_err
    assert re.search(r"rejected 0\b", w_out), w_out


# --- Unix manners -----------------------------------------------------------------------

def test_a_closed_stdout_ends_quietly_with_the_sigpipe_status(eps, broker_factory):
    """Before: status | head -1 ended in a BrokenPipeError traceback."""
    broker_factory("--fps", "50").wait_ready()
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first line: every write breaks the pipe
    proc = subprocess.Popen([PY, "-m", "broker.cli", "status", "--broker", eps.control],
                            stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGPIPE
    assert err == ""
    shell = subprocess.run(f"set -o pipefail; {PY} -m broker.cli status --broker "
                           f"{eps.control} | head -1", shell=True, executable="/bin/bash",
                           capture_output=True, text=True, timeout=60)
    assert "Traceback" not in shell.stderr and shell.stdout.strip().startswith("stream:")


def test_usage_errors_are_one_line_of_usage_and_the_subcommands_error():
    """Before: 20 lines of usage, and an unknown flag blamed on the top-level parser."""
    r = run_cli("status", "--bogus")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "usage: framebroker status [options]  (all of them: framebroker status --help)",
        "framebroker status: error: unrecognized arguments: --bogus"]
    r = run_cli("serve", "--fps", "fast")
    assert len(r.stderr.splitlines()) == 2 and "framebroker serve: error: argument --fps" \
        in r.stderr


@pytest.mark.parametrize("shape", ["480", "640x480x3x2", "480x640x5", "480x640x0", "4x"])
def test_shape_accepts_hxw_or_hxwxc_only(shape):
    """Before: --shape 480 (1-D) and 640x480x3x2 were accepted and streamed."""
    r = run_cli("serve", "--shape", shape, "--frames", "1", "--control",
                NO_BROKER.format(port=free_port()))
    assert r.returncode == 2
    assert "must be HxW or HxWxC with C 1-4, e.g. 480x640 or 480x640x3" in r.stderr


# --- sources behave like cameras ----------------------------------------------------------------

def test_a_video_file_plays_at_its_own_frame_rate(eps, broker_factory, tmp_path):
    """Before: a 30 fps clip was served at 1116 fps unless --fps was given."""
    import cv2

    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (64, 48))
    for i in range(40):
        writer.write(np.full((48, 64, 3), i * 5, np.uint8))
    writer.release()
    broker_factory("--source", f"video:{clip}", "--wait-subscribers", "1")
    with Subscriber(broker=eps.control, timeout=30, connect_wait=30, rcvhwm=100) as sub:
        stamps = [f.timestamp_ns for f in sub]
    assert len(stamps) == 40
    # paced from the first frame: 39 periods of 1/30 s at least (a loaded host is only
    # ever late, never early)
    assert (stamps[-1] - stamps[0]) / 1e9 >= 39 / 30 * 0.99
    status_text = run_cli("status", "--broker", eps.control, "--timeout", "1").stdout
    assert status_text == "" or "at 30 fps" in status_text


def test_keys_generate_name_hints_at_the_key_it_made(tmp_path):
    """Before: keys generate --name laptop printed hints naming client.key_secret."""
    keys = tmp_path / "keys"
    assert run_cli("keys", "generate", str(keys)).returncode == 0
    r = run_cli("keys", "generate", str(keys), "--name", "laptop")
    assert r.returncode == 0, r
    assert f"--curve-secret {keys}/private/laptop.key_secret" in r.stdout
    assert "client.key_secret" not in r.stdout and "server.key_secret" not in r.stdout
    assert (keys / "private" / "laptop.key_secret").is_file()
