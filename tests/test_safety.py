"""The bad-input battery: every case exits with status 2, one line on stderr, and touches nothing.

Each test builds a small world in ``tmp_path`` (a tiny saved MoE with its tokenizer, a data file,
a recipe, and where the case needs one, a finished zeda run), takes the checksum of every file
in it, runs the real CLI (`zeda.cli.main`, in-process; one test runs the console script in a
subprocess), and checks:

- the exit status is 2 and stderr is exactly one ``zeda: error:`` line;
- every input is unchanged and no output (not even a temporary sibling) was left behind: the
  whole ``tmp_path`` tree is byte-for-byte what it was.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zeda.cli import main
from zeda.io import atomic_save
from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


# ---- the world --------------------------------------------------------------------------------


def _write_jsonl(path: Path, texts: list) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A tiny qwen3_moe with its tokenizer, a corpus and a recipe; plus one finished zeda run."""
    base = tmp_path_factory.mktemp("pristine")
    atomic_save(tiny_model("qwen3_moe"), base / "model", tokenizer=tiny_tokenizer())
    _write_jsonl(base / "data.jsonl", tiny_corpus(48))
    (base / "recipe.yaml").write_text(
        "\n".join(
            [
                "model: {name_or_path: model, dtype: float32}",
                "data: {train_file: data.jsonl, eval_file: data.jsonl, seq_len: 32}",
                "stage1: {steps: 2, lr: 0.01}",
                "train: {batch_size: 4, output_dir: run, log_every: 1, warmup_ratio: 0.0}",
                "eval: {tasks: null}",
                "",
            ]
        )
    )
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert main(["distill", "recipe.yaml"]) == 0
    finally:
        os.chdir(cwd)
    assert (base / "run" / "checkpoint").is_dir() and (base / "run" / "export" / "config.json").exists()
    return base


@pytest.fixture
def world(pristine, tmp_path, monkeypatch) -> Path:
    """A private copy of the pristine world, as the working directory."""
    for name in ("model", "run"):
        shutil.copytree(pristine / name, tmp_path / name)
    for name in ("data.jsonl", "recipe.yaml"):
        shutil.copy(pristine / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tree(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file (directories by their listing)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel + "/"] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _zeda(capfd, *argv: str) -> tuple[int, list[str]]:
    """Run the CLI as a user would see it: its own logging to stderr, every warning shown."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []  # main() configures logging only when nothing else has
    capfd.readouterr()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            rc = main(list(argv))
    finally:
        for h in root.handlers:
            if h not in saved:
                root.removeHandler(h)
        root.handlers = saved
    err = capfd.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


def _is_progress(line: str) -> bool:
    """A tqdm bar (``desc: 25%|██  | 1/4 [00:01<00:03, 1.2it/s, ...]``)."""
    return re.search(r"\d+/\d+ \[[\d:?]+<", line) is not None


def _refused(
    world: Path, capfd, *argv: str, expect: str | tuple[str, ...] = (), after_loading: bool = False
) -> str:
    """Assert ``zeda argv`` exits 2 with one error line and leaves ``world`` untouched.

    ``after_loading``: the error can only be found once the model is loaded, so the loading
    progress bar may precede it.
    """
    before = _tree(world)
    rc, lines = _zeda(capfd, *argv)
    if after_loading:
        lines = [ln for ln in lines if not _is_progress(ln)]
    assert rc == 2, (rc, lines)
    assert len(lines) == 1 and lines[0].startswith("zeda: error: "), lines
    assert _tree(world) == before, "inputs changed or outputs left behind"
    msg = lines[0]
    for word in (expect,) if isinstance(expect, str) else expect:
        assert word.lower() in msg.lower(), msg
    return msg


# ---- recipes ----------------------------------------------------------------------------------


def test_bad_yaml_names_line_and_column(world, capfd):
    (world / "bad.yaml").write_text("model:\n  name_or_path: model\ntrain: {batch_size: [4\n")
    msg = _refused(world, capfd, "run", "bad.yaml", expect="line")
    assert "column" in msg.lower()


def test_unknown_key_suggests(world, capfd):
    _refused(world, capfd, "run", "recipe.yaml", "train.batchsize=4", expect="did you mean")


def test_unknown_key_in_file_suggests(world, capfd):
    (world / "typo.yaml").write_text("stage1: {step: 2}\n")
    _refused(world, capfd, "validate", "typo.yaml", expect="did you mean")


def test_bad_value_type(world, capfd):
    _refused(world, capfd, "run", "recipe.yaml", "train.batch_size=four", expect="batch_size")


# ---- models and tokenizers --------------------------------------------------------------------


def test_missing_model_dir(world, capfd):
    _refused(world, capfd, "run", "recipe.yaml", "model.name_or_path=no_such_model", "train.output_dir=new")


def test_missing_config_json(world, capfd):
    (world / "model" / "config.json").unlink()
    _refused(world, capfd, "run", "recipe.yaml", "train.output_dir=new", expect="config.json")


def test_corrupt_safetensors_shard(world, capfd):
    shard = world / "model" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _refused(world, capfd, "run", "recipe.yaml", "train.output_dir=new", expect="corrupt")


def test_unsupported_family(world, capfd):
    cfg = json.loads((world / "model" / "config.json").read_text())
    (world / "model" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    _refused(world, capfd, "run", "recipe.yaml", "train.output_dir=new", expect="supported")


def test_empty_tokenizer(world, capfd):
    for p in (world / "model").iterdir():
        if "token" in p.name or p.name == "chat_template.jinja":
            p.unlink()
    _refused(world, capfd, "run", "recipe.yaml", "train.output_dir=new", expect="tokenizer")


def test_empty_tokenizer_is_not_saved_by_inject(world, capfd):
    for p in (world / "model").iterdir():
        if "token" in p.name:
            p.unlink()
    _refused(world, capfd, "inject", "--model", "model", "--out", "inj", expect="tokenizer")


def test_tokenizer_vocab_larger_than_model(world, capfd):
    small = tiny_model("qwen3_moe", vocab_size=32)
    atomic_save(small, world / "small", tokenizer=tiny_tokenizer())  # 128-token tokenizer
    _refused(
        world,
        capfd,
        "run",
        "recipe.yaml",
        "model.name_or_path=small",
        "train.output_dir=new",
        expect="embedding",
    )


# ---- data -------------------------------------------------------------------------------------


def test_missing_data_file(world, capfd):
    _refused(world, capfd, "run", "recipe.yaml", "data.train_file=nope.jsonl", "train.output_dir=new")


def test_non_utf8_data(world, capfd):
    (world / "latin1.jsonl").write_bytes('{"text": "caf\xe9 cr\xe8me"}\n'.encode("latin-1"))
    _refused(
        world,
        capfd,
        "run",
        "recipe.yaml",
        "data.train_file=latin1.jsonl",
        "train.output_dir=new",
        expect="utf",
    )


def test_null_text_is_not_trained_on(world, capfd):
    _write_jsonl(world / "nulls.jsonl", [*tiny_corpus(8), None])
    _refused(
        world,
        capfd,
        "run",
        "recipe.yaml",
        "data.train_file=nulls.jsonl",
        "train.output_dir=new",
        expect="null",
    )


def test_bad_json_line(world, capfd):
    (world / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    _refused(world, capfd, "run", "recipe.yaml", "data.train_file=broken.jsonl", "train.output_dir=new")


# ---- output directories and overwrite ---------------------------------------------------------


def test_existing_output_without_overwrite_or_resume(world, capfd):
    _refused(world, capfd, "run", "recipe.yaml", expect="overwrite")


def test_output_dir_is_the_model_dir(world, capfd):
    _refused(world, capfd, "run", "recipe.yaml", "train.output_dir=model", "train.overwrite=true")


def test_output_dir_contains_the_data(world, capfd):
    (world / "corpus").mkdir()
    shutil.copy(world / "data.jsonl", world / "corpus" / "data.jsonl")
    _refused(
        world,
        capfd,
        "run",
        "recipe.yaml",
        "data.train_file=corpus/data.jsonl",
        "train.output_dir=.",
        "train.overwrite=true",
    )


def test_output_dir_contains_the_model(world, capfd):
    (world / "parent").mkdir()
    shutil.move(world / "model", world / "parent" / "model")
    _refused(
        world,
        capfd,
        "run",
        "recipe.yaml",
        "model.name_or_path=parent/model",
        "train.output_dir=parent",
        "train.overwrite=true",
    )


def test_overwrite_refuses_a_directory_that_is_not_a_zeda_run(world, capfd):
    # The recipe names the directory (the command line does not), so nothing marks it as meant.
    (world / "thesis").mkdir()
    (world / "thesis" / "chapter1.tex").write_text("\\section{Introduction}\n")
    recipe = (world / "recipe.yaml").read_text().replace("output_dir: run", "output_dir: thesis")
    (world / "thesis.yaml").write_text(recipe)
    _refused(world, capfd, "run", "thesis.yaml", "train.overwrite=true", expect="not a zeda run")


def test_overwrite_with_bad_data_keeps_the_previous_run(world, capfd):
    _refused(world, capfd, "run", "recipe.yaml", "train.overwrite=true", "data.train_file=nope.jsonl")


def test_overwrite_with_bad_model_keeps_the_previous_run(world, capfd):
    _refused(world, capfd, "run", "recipe.yaml", "train.overwrite=true", "model.name_or_path=no_such_model")


def test_export_dir_is_the_model_dir(world, capfd):
    _refused(
        world,
        capfd,
        "run",
        "recipe.yaml",
        "export.out_dir=model",
        "train.output_dir=new",
    )


# ---- resume -----------------------------------------------------------------------------------


def _evil_pickle(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    torch.save({"optimizer": Evil()}, path)


def test_crafted_optimizer_pickle_is_refused_on_resume(world, capfd):
    marker = world.parent / f"{world.name}.pwned"
    ckpt = world / "run" / "checkpoint"
    _evil_pickle(ckpt / "optim.pt", marker)
    _refused(world, capfd, "run", "recipe.yaml", "train.resume=true", "stage1.steps=4", after_loading=True)
    assert not marker.exists(), "a pickle from the run directory was executed"


def test_crafted_optimizer_pickle_is_not_run_by_export(world, capfd):
    marker = world.parent / f"{world.name}.pwned"
    _evil_pickle(world / "run" / "checkpoint" / "optim.pt", marker)
    rc, lines = _zeda(capfd, "export", "--model", "run", "--out", "exported")
    assert not marker.exists(), "a pickle from the run directory was executed"
    assert rc == 0 or (rc == 2 and len(lines) == 1), lines


def test_resume_refuses_a_changed_recipe(world, capfd):
    _refused(
        world,
        capfd,
        "run",
        "recipe.yaml",
        "train.resume=true",
        "lora.r=4",
        expect="lora.r",
        after_loading=True,
    )


def test_resume_without_a_checkpoint(world, capfd):
    (world / "empty_run").mkdir()
    (world / "empty_run" / "notes.txt").write_text("mine\n")
    _refused(world, capfd, "run", "recipe.yaml", "train.output_dir=empty_run", "train.resume=true")


# ---- the other verbs --------------------------------------------------------------------------


def test_inject_onto_its_own_input(world, capfd):
    _refused(world, capfd, "inject", "--model", "model", "--out", "model", "--overwrite", expect="input")


def test_inject_existing_output(world, capfd):
    _refused(world, capfd, "inject", "--model", "model", "--out", "run", expect="overwrite")


def test_inject_twice(world, capfd):
    _refused(
        world,
        capfd,
        "inject",
        "--model",
        "run/export",
        "--out",
        "inj2",
        expect="zero experts",
        after_loading=True,
    )


def test_inject_unknown_dtype(world, capfd):
    _refused(world, capfd, "inject", "--model", "model", "--out", "inj", "--dtype", "float8")


def test_eval_onto_its_own_input(world, capfd):
    _refused(
        world, capfd, "eval", "--model", "run/export", "--out", "run/export", "--overwrite", expect="input"
    )


def test_eval_unknown_task(world, capfd):
    _refused(
        world,
        capfd,
        "eval",
        "--model",
        "run/export",
        "--out",
        "ev",
        "--tasks",
        "no_such_task_xyz",
        after_loading=True,
    )


def test_export_onto_the_run_dir(world, capfd):
    _refused(world, capfd, "export", "--model", "run", "--out", "run", "--overwrite", expect="input")


def test_export_of_a_dir_without_a_model(world, capfd):
    _refused(world, capfd, "export", "--model", "nothing_here", "--out", "exp")


def test_export_of_a_run_killed_before_its_first_checkpoint(world, capfd):
    (world / "killed").mkdir()
    shutil.copy(world / "run" / "recipe.yaml", world / "killed" / "recipe.yaml")
    _refused(world, capfd, "export", "--model", "killed", "--out", "exp", expect="checkpoint")


def test_flops_unknown_config(world, capfd):
    _refused(world, capfd, "flops", "--model-config", "no-such-model", expect="built-in")


# ---- the console script itself ----------------------------------------------------------------


def test_console_script_one_line_and_status_2(world):
    """The same contract through a real process: stderr holds the error line and nothing else."""
    before = _tree(world)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zeda.cli",
            "run",
            "recipe.yaml",
            "train.output_dir=model",
            "train.overwrite=true",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=world,
        timeout=300,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("zeda: error: "), proc.stderr
    assert _tree(world) == before


# ---- one writer per run directory; a failed run leaves nothing (issue 29) ---------------------


def _ok(capfd, *argv: str) -> None:
    rc, lines = _zeda(capfd, *argv)
    assert rc == 0, lines


def test_a_second_writer_of_a_run_directory_is_refused(world, capfd):
    # What a live `zeda distill` writing run/ holds: an flock on run/'s lock file.
    fd = os.open(world / ".run.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _refused(
            world,
            capfd,
            "distill",
            "recipe.yaml",
            "train.resume=true",
            "stage1.steps=4",
            expect="another zeda process",
            after_loading=True,
        )
    finally:
        os.close(fd)


def test_a_lock_left_by_a_killed_process_does_not_block(world, capfd):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open('.run.lock', os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n",
        ],
        cwd=world,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()  # kill -9: the lock file stays behind, the lock does not
    holder.wait()
    assert (world / ".run.lock").exists()
    _ok(capfd, "distill", "recipe.yaml", "train.resume=true", "stage1.steps=3")
    assert json.loads((world / "run" / "checkpoint" / "state.json").read_text())["step"] == 3
    assert not list(world.glob(".run.*"))


@pytest.mark.parametrize("seq_len", ["100000", "100000000"])
def test_a_run_that_fails_after_it_started_leaves_no_run_directory(world, capfd, seq_len):
    _refused(
        world,
        capfd,
        "distill",
        "recipe.yaml",
        "train.output_dir=new",
        f"data.seq_len={seq_len}",
        after_loading=True,
    )


# ---- the non-finite stop: advice that works (issue 29) ----------------------------------------


def test_nan_before_the_first_checkpoint_leaves_nothing_and_the_advice_works(world, capfd):
    argv = ("distill", "recipe.yaml", "train.output_dir=new", "stage1.steps=4")
    msg = _refused(world, capfd, *argv, "stage1.lr=1e30", expect="non-finite", after_loading=True)
    assert "run the same command again" in msg and "lower stage1.lr" in msg
    _ok(capfd, *argv, "stage1.lr=0.01")  # the advice: a lower lr, the same command
    assert json.loads((world / "new" / "checkpoint" / "state.json").read_text())["step"] == 4


def test_nan_mid_run_keeps_a_checkpoint_whose_next_step_was_finite(world, capfd):
    # lr warms up from 0: step 0 changes nothing, step 1 drives the weights to ~1e29 (still
    # finite, and checkpointed), step 2's loss is not finite.
    argv = ("distill", "recipe.yaml", "train.output_dir=new", "stage1.steps=6", "train.save_every=1")
    argv += ("train.warmup_ratio=0.5",)
    rc, lines = _zeda(capfd, *argv, "stage1.lr=1e30")
    lines = [ln for ln in lines if not _is_progress(ln)]
    assert rc == 2 and len(lines) == 1 and "non-finite" in lines[0], lines
    assert "resume" in lines[0]
    ckpt = world / "new" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text()) == {"stage": "stage1", "step": 1}
    assert not (world / "new" / ".checkpoint.old").exists()
    tensors = load_file(ckpt / "trainable.safetensors")
    assert all(torch.isfinite(t).all() and t.abs().max() < 1e3 for t in tensors.values())
    _ok(capfd, *argv, "stage1.lr=0.01", "train.resume=true")  # the advice works
    assert json.loads((ckpt / "state.json").read_text())["step"] == 6
