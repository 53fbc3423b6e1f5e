"""The output policy, the per-run work directory and the numeric checks (issue 11; docs/reliability.md).

Every writer is pointed at every input of its command and must refuse in one line with exit 2,
leaving every input byte-for-byte unchanged; special files are refused; a replaced file keeps its
mode; a symlinked output is written through. SIGTERM and SIGHUP during calibration must leave no file
in the work directory and no output. NaN weights are refused naming the tensor; zero blocks stay finite.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import bitalloc
from bitalloc.cli import app
from bitalloc.plan import Plan

from .conftest import expect_user_error

runner = CliRunner()
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or directories)."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def edit_tensor(model: Path, name: str, change) -> None:
    """Apply ``change`` to tensor ``name`` in whichever shard holds it, in place."""
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    shard = model / index[name]
    tensors = load_file(shard)
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, str(shard))


@pytest.fixture(scope="module")
def env(tiny_llama, calib_file, heldout_file, tmp_path_factory) -> dict[str, Path]:
    """A private copy of the model (a broken policy must not destroy the session's), a score file, a plan,
    an exported config to import, and the texts."""
    root = tmp_path_factory.mktemp("outputs")
    model = root / "model"
    shutil.copytree(tiny_llama, model)
    shutil.copy(calib_file, root / "calib.txt")
    scores, plan = root / "scores.safetensors", root / "plan.json"
    r = run("allocate", model, "--budget", "3", "--calib", root / "calib.txt", "--calib-tokens", 256, "--seqlen", 128,
            "--score", "fisher", "--save-scores", scores, "-o", plan, "-q")
    assert r.exit_code == 0, r.output
    config = root / "gptq.json"
    assert run("export", plan, "--to", "gptqmodel", "-o", config).exit_code == 0
    return {"model": model, "calib": root / "calib.txt", "scores": scores, "plan": plan, "config": config,
            "heldout": heldout_file, "root": root}


def _shard(env) -> Path:
    return next(env["model"].glob("model-*.safetensors"))


# (label, the input to aim at, the command with OUT where the output goes)
INPUTS = {
    "config.json": lambda e: e["model"] / "config.json",
    "a shard": _shard,
    "the tokenizer": lambda e: e["model"] / "tokenizer.json",
    "the scores file": lambda e: e["scores"],
    "the calibration text": lambda e: e["calib"],
    "the plan": lambda e: e["plan"],
    "the imported config": lambda e: e["config"],
}
WRITERS = {
    "allocate -o": ("allocate {model} --budget 3 --scores {scores} --calib {calib} --seqlen 128 -o OUT -q",
                    ["config.json", "a shard", "the tokenizer", "the scores file", "the calibration text"]),
    "allocate --save-scores": ("allocate {model} --budget 3 --calib {calib} --seqlen 128 -o {root}/new.json "
                               "--save-scores OUT -q",
                               ["config.json", "a shard", "the tokenizer", "the calibration text"]),
    "scores -o": ("scores {model} --calib {calib} --seqlen 128 -o OUT -q",
                  ["config.json", "a shard", "the tokenizer", "the calibration text"]),
    "frontier -o": ("frontier {model} --scores {scores} --calib {calib} --seqlen 128 -o OUT -q",
                    ["config.json", "the scores file", "the calibration text"]),
    "quantize -o": ("quantize {model} --plan {plan} --calib {calib} --seqlen 128 --method rtn -o OUT --overwrite -q",
                    ["config.json", "a shard", "the plan", "the calibration text"]),
    "export -o": ("export {plan} --to gptqmodel -o OUT", ["the plan"]),
    "import -o": ("import {config} --model {model} --scores {scores} -o OUT",
                  ["config.json", "a shard", "the tokenizer", "the scores file", "the imported config"]),
    "report --png": ("report {plan} --png OUT", ["the plan"]),
}
CASES = [(w, i) for w, (_, inputs) in WRITERS.items() for i in inputs]


def command(writer: str, env, out: Path) -> list[str]:
    template = WRITERS[writer][0]
    return [out if a == "OUT" else a.format(**{k: str(v) for k, v in env.items()}) for a in template.split()]


@pytest.mark.parametrize("writer, target", CASES, ids=[f"{w}={i}" for w, i in CASES])
def test_every_writer_refuses_every_input_as_output(writer, target, env):
    before = digest(env["model"], env["calib"], env["scores"], env["plan"], env["config"])
    out = INPUTS[target](env)
    expect_user_error(run(*command(writer, env, out)), "refusing to write")
    assert digest(env["model"], env["calib"], env["scores"], env["plan"], env["config"]) == before
    assert not list(env["root"].glob(".*.tmp")) and not (env["root"] / "new.json").exists()


def test_an_input_reached_through_a_symlink_or_a_hard_link_is_refused(env, tmp_path):
    before = digest(env["scores"], env["calib"])
    link = tmp_path / "innocent.safetensors"
    link.symlink_to(env["scores"])
    expect_user_error(run(*command("allocate -o", env, link)), "the --scores file")
    hard = tmp_path / "hard.txt"
    os.link(env["calib"], hard)
    expect_user_error(run(*command("allocate -o", env, hard)), "the --calib text")
    dotted = env["model"] / ".." / env["model"].name / "new-file.json"  # inside the model dir, by another name
    expect_user_error(run(*command("allocate -o", env, dotted)), "inside the model directory")
    assert not dotted.exists() and digest(env["scores"], env["calib"]) == before


def test_directory_outputs_protect_what_they_would_replace(env, tmp_path):
    expect_user_error(run(*command("frontier -o", env, env["model"])), "inside the model directory")
    holder = tmp_path / "fr"
    holder.mkdir()
    shutil.copy(env["scores"], holder / "frontier.csv")  # an input named like a file the frontier writes
    args = command("frontier -o", env, holder)
    args[args.index(str(env["scores"]))] = str(holder / "frontier.csv")
    expect_user_error(run(*args), "would replace the --scores file")
    plans = tmp_path / "plans"
    plans.mkdir()
    shutil.copy(env["plan"], plans / "plan.json")
    args = command("quantize -o", env, plans)  # --overwrite would delete OUT and the plan inside it
    args[args.index(str(env["plan"]))] = str(plans / "plan.json")
    expect_user_error(run(*args), "would replace the --plan file")
    assert (plans / "plan.json").read_bytes() == env["plan"].read_bytes()


def test_two_outputs_of_one_command_must_differ(env, tmp_path):
    out = tmp_path / "same"
    expect_user_error(run("allocate", env["model"], "--budget", "3", "--calib", env["calib"], "-o", out, "--save-scores", out),
            "same file")
    assert not out.exists()


@pytest.mark.parametrize("writer", ["allocate -o", "export -o", "report --png", "import -o"])
def test_dev_null_is_refused_and_stays_a_device(writer, env):
    devnull = Path(os.devnull)
    expect_user_error(run(*command(writer, env, devnull)), "character device")
    assert stat.S_ISCHR(os.stat(devnull).st_mode)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("writer", ["allocate -o", "scores -o", "export -o"])
def test_a_fifo_is_refused_and_stays_a_fifo(writer, env, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    expect_user_error(run(*command(writer, env, fifo)), "FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_directory_is_refused_as_a_file_output(env, tmp_path):
    expect_user_error(run(*command("export -o", env, tmp_path)), "a directory")
    expect_user_error(run(*command("quantize -o", env, env["calib"])), "refusing to write")


@pytest.mark.parametrize("writer", ["allocate -o", "export -o", "report --png"])
def test_a_replaced_file_keeps_its_mode_and_a_new_one_gets_the_umask(writer, env, tmp_path):
    out = tmp_path / "out"
    out.write_text("old")
    out.chmod(0o640)
    r = run(*command(writer, env, out))
    assert r.exit_code == 0, r.output
    assert out.read_bytes() != b"old"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640
    umask = os.umask(0o022)
    os.umask(umask)
    new = tmp_path / "new"
    assert run(*command(writer, env, new)).exit_code == 0
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_symlinked_output_is_written_through(env, tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert run(*command("allocate -o", env, link)).exit_code == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert Plan.load(target).budget.target == "3"


# ---- signals: the per-run work directory ---------------------------------------------------------------------

# The pass on the tiny model can end within a fraction of a second of its first activation store, so a signal
# sent "during" it races the command's end. Each layer load waits 0.3 s in the child, which keeps the pass
# running for seconds without changing what it computes. SIGHUP starts at its default disposition, as from a
# terminal, whatever the test runner inherited (under `nohup` it is ignored, and bitalloc rightly keeps it so).
CHILD_SETUP = ("import signal, time, bitalloc.model.layerwise as _L; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
               "_load = _L.LayerwiseModel.load_layer; "
               "_L.LayerwiseModel.load_layer = lambda self, i: (time.sleep(0.3), _load(self, i))[1]; ")


def interrupt_calibration(env, work: Path, out: Path, *signals: signal.Signals, prelude: str = ""):
    """Run ``bitalloc scores`` in a subprocess set up by ``CHILD_SETUP`` then ``prelude``, send ``signals`` (0.05 s
    apart) once an activation store exists in ``work``; return (exit code, stderr)."""
    code = f"{CHILD_SETUP}{prelude}from bitalloc.cli import main; main()"
    cmd = [sys.executable, "-c", code, "scores", str(env["model"]), "--calib", str(env["calib"]), "--calib-tokens",
           "8192", "--seqlen", "128", "-o", str(out), "--workdir", str(work), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(work.glob("bitalloc-run-*/bitalloc-act-*.bin")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no activation store appeared"
            time.sleep(0.02)
        for i, sig in enumerate(signals):
            time.sleep(0.05 if i else 0)
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_during_calibration_leaves_no_file(sig, env, tmp_path):
    work, out = tmp_path / "work", tmp_path / "scores.safetensors"
    work.mkdir()
    code, err = interrupt_calibration(env, work, out, sig)
    assert code == 128 + sig, err
    assert err.strip().splitlines() == [f"error: stopped by {sig.name}; nothing written, temporary files removed"]
    assert list(work.iterdir()) == [] and not out.exists()


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_an_ignored_hangup_stays_ignored(env, tmp_path):
    """``nohup bitalloc ...``: SIGHUP is ignored before bitalloc starts, and must stay so; SIGTERM still cleans up."""
    work, out = tmp_path / "work", tmp_path / "scores.safetensors"
    work.mkdir()
    code, err = interrupt_calibration(env, work, out, signal.SIGHUP, signal.SIGTERM,
                                      prelude="import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN); ")
    assert code == 128 + signal.SIGTERM, err
    assert list(work.iterdir()) == [] and not out.exists()


def test_an_unusable_workdir_is_refused_before_calibrating(env, tmp_path):
    out = tmp_path / "s.safetensors"
    expect_user_error(run("scores", env["model"], "--calib", env["calib"], "--seqlen", 128, "-o", out,
                "--workdir", tmp_path / "missing"), "work directory")
    assert not out.exists()


def test_the_work_directory_is_removed_after_a_run(env, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    r = run("allocate", env["model"], "--budget", 3, "--calib", env["calib"], "--calib-tokens", 256, "--seqlen", 128,
            "-o", tmp_path / "p.json", "--workdir", work, "-q")
    assert r.exit_code == 0, r.output
    assert list(work.iterdir()) == [] and (tmp_path / "p.json").is_file()


# ---- numerics --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_weight_is_refused_naming_the_tensor(bad, env, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(env["model"], model)

    def poison(t):
        t[3, 5] = bad
        return t

    edit_tensor(model, Q_PROJ, poison)
    expect_user_error(run("eval", model, "--text", env["heldout"], "--tokens", 256, "--seqlen", 128, "--bits", 4, "-q"),
            Q_PROJ, "NaN or Inf")
    expect_user_error(run("scores", model, "--calib", env["calib"], "--calib-tokens", 256, "--seqlen", 128, "-o",
                tmp_path / "s.safetensors", "-q"), Q_PROJ)
    assert not (tmp_path / "s.safetensors").exists()


def test_zero_blocks_evaluate_finite_and_get_a_finite_predicted_error(env, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(env["model"], model)
    zero_block = "model.layers.0.mlp.down_proj.weight"  # [64, 128]: its first 64 columns zeroed
    zero_tensor = "model.layers.0.self_attn.o_proj.weight"

    def zero_columns(t):
        t[:, :64] = 0
        return t

    edit_tensor(model, zero_block, zero_columns)
    edit_tensor(model, zero_tensor, torch.zeros_like)
    for group in (64, 1):  # group 1: every group has one value, so no range at all
        r = run("eval", model, "--text", env["heldout"], "--tokens", 256, "--seqlen", 128, "--bits", 2, "--group",
                group, "--json", "-q")
        assert r.exit_code == 0, r.output
        assert math.isfinite(json.loads(r.output)["perplexity"])
    plan = bitalloc.allocate(model, "3bpp", env["calib"], calibration=bitalloc.CalibrationConfig(tokens=256, seqlen=128),
                             solve=bitalloc.SolveConfig(score="fisher"))  # fisher: no warning about 2 sequences
    for name in (zero_tensor, zero_block):
        predicted = plan.entry_map()[name].predicted_error
        assert predicted and all(math.isfinite(v) and v >= 0 for v in predicted.values()), (name, predicted)
