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

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zeda
from zeda.cli import main
from zeda.io import atomic_save
from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
#: A case that runs longer than this hangs (the slowest takes a few seconds on 2 cores).
HANG_SECONDS = 300


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
                # the battery is about bad inputs: no validation forwards, no verdict warnings
                "train: {batch_size: 4, output_dir: run, log_every: 1, warmup_ratio: 0.0, eval_every: 0, verdict: false}",
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
    # The run records its inputs by absolute path: as if it had been made here.
    inputs = tmp_path / "run" / "inputs.json"
    if inputs.exists():
        inputs.write_text(inputs.read_text().replace(str(pristine), str(tmp_path)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tree(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file (directories by their listing, links by target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_dir():
            out[rel + "/"] = "dir"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:  # a FIFO or a device: never opened
            out[rel] = "special"
    return out


class Hang(Exception):  # noqa: N818 - not an OSError (TimeoutError is), which zeda may catch
    """A case ran past `HANG_SECONDS`."""


def _zeda(capfd, *argv: str) -> tuple[int, list[str]]:
    """Run the CLI as a user would see it: its own logging to stderr, every warning shown."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []  # main() configures logging only when nothing else has
    capfd.readouterr()

    def hang(signum, frame):
        raise Hang(f"zeda {' '.join(argv)} still running after {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(HANG_SECONDS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            rc = main(list(argv))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
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


def _refused_run(world: Path, capfd, *overrides: str, **kwargs) -> str:
    """`_refused` for ``zeda run recipe.yaml overrides...``."""
    return _refused(world, capfd, "run", "recipe.yaml", *overrides, **kwargs)


#: Resume the world's finished 2-step run for 2 more steps.
RESUME = ("distill", "recipe.yaml", "train.resume=true", "stage1.steps=4")


def _writers(out: str = "") -> dict[str, tuple[str, ...]]:
    """Each verb that writes a new output, as a command line writing it below ``out``."""
    return {
        "distill": ("distill", "recipe.yaml", f"train.output_dir={out}new"),
        "export": ("export", "--model", "run", "--out", f"{out}exp"),
        "eval": ("eval", "--model", "run/export", "--teacher", "model", "--out", f"{out}ev"),
        "inject": ("inject", "--model", "model", "--out", f"{out}inj"),
        "calibrate": (
            "calibrate",
            "--model",
            "run/export",
            "--target-share",
            "0.5",
            "--data",
            "data.jsonl",
            "--out",
            f"{out}cal",
        ),
    }


def _python(world: Path, *argv: str) -> subprocess.CompletedProcess:
    """``python argv`` in another process, in ``world``, with this zeda, offline, on one thread."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *argv], env=env, cwd=world, capture_output=True, text=True, timeout=HANG_SECONDS
    )


# ---- recipes ----------------------------------------------------------------------------------


def test_bad_yaml_names_line_and_column(world, capfd):
    (world / "bad.yaml").write_text("model:\n  name_or_path: model\ntrain: {batch_size: [4\n")
    msg = _refused(world, capfd, "run", "bad.yaml", expect="line")
    assert "column" in msg.lower()


def test_unknown_key_suggests(world, capfd):
    _refused_run(world, capfd, "train.batchsize=4", expect="did you mean")


def test_unknown_key_in_file_suggests(world, capfd):
    (world / "typo.yaml").write_text("stage1: {step: 2}\n")
    _refused(world, capfd, "validate", "typo.yaml", expect="did you mean")


def test_bad_value_type(world, capfd):
    _refused_run(world, capfd, "train.batch_size=four", expect="batch_size")


# ---- models and tokenizers --------------------------------------------------------------------


def test_missing_model_dir(world, capfd):
    _refused_run(world, capfd, "model.name_or_path=no_such_model", "train.output_dir=new")


def test_missing_config_json(world, capfd):
    (world / "model" / "config.json").unlink()
    _refused_run(world, capfd, "train.output_dir=new", expect="config.json")


def test_corrupt_safetensors_shard(world, capfd):
    shard = world / "model" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _refused_run(world, capfd, "train.output_dir=new", expect="corrupt")


def test_unsupported_family(world, capfd):
    cfg = json.loads((world / "model" / "config.json").read_text())
    (world / "model" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    _refused_run(world, capfd, "train.output_dir=new", expect="supported")


def test_empty_tokenizer(world, capfd):
    for p in (world / "model").iterdir():
        if "token" in p.name or p.name == "chat_template.jinja":
            p.unlink()
    _refused_run(world, capfd, "train.output_dir=new", expect="tokenizer")


def test_empty_tokenizer_is_not_saved_by_inject(world, capfd):
    for p in (world / "model").iterdir():
        if "token" in p.name:
            p.unlink()
    _refused(world, capfd, "inject", "--model", "model", "--out", "inj", expect="tokenizer")


def test_tokenizer_vocab_larger_than_model(world, capfd):
    small = tiny_model("qwen3_moe", vocab_size=32)
    atomic_save(small, world / "small", tokenizer=tiny_tokenizer())  # 128-token tokenizer
    _refused_run(world, capfd, "model.name_or_path=small", "train.output_dir=new", expect="embedding")


# ---- data -------------------------------------------------------------------------------------


def test_missing_data_file(world, capfd):
    _refused_run(world, capfd, "data.train_file=nope.jsonl", "train.output_dir=new")


def test_non_utf8_data(world, capfd):
    (world / "latin1.jsonl").write_bytes('{"text": "caf\xe9 cr\xe8me"}\n'.encode("latin-1"))
    _refused_run(world, capfd, "data.train_file=latin1.jsonl", "train.output_dir=new", expect="utf")


def test_null_text_is_not_trained_on(world, capfd):
    _write_jsonl(world / "nulls.jsonl", [*tiny_corpus(8), None])
    _refused_run(world, capfd, "data.train_file=nulls.jsonl", "train.output_dir=new", expect="null")


def test_bad_json_line(world, capfd):
    (world / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    _refused_run(world, capfd, "data.train_file=broken.jsonl", "train.output_dir=new")


# ---- output directories and overwrite ---------------------------------------------------------


def test_existing_output_without_overwrite_or_resume(world, capfd):
    _refused_run(world, capfd, expect="overwrite")


def test_output_dir_is_the_model_dir(world, capfd):
    _refused_run(world, capfd, "train.output_dir=model", "train.overwrite=true")


def test_output_dir_contains_the_data(world, capfd):
    (world / "corpus").mkdir()
    shutil.copy(world / "data.jsonl", world / "corpus" / "data.jsonl")
    _refused_run(
        world, capfd, "data.train_file=corpus/data.jsonl", "train.output_dir=.", "train.overwrite=true"
    )


def test_output_dir_contains_the_model(world, capfd):
    (world / "parent").mkdir()
    shutil.move(world / "model", world / "parent" / "model")
    _refused_run(
        world, capfd, "model.name_or_path=parent/model", "train.output_dir=parent", "train.overwrite=true"
    )


def test_overwrite_refuses_a_directory_that_is_not_a_zeda_run(world, capfd):
    # The recipe names the directory (the command line does not), so nothing marks it as meant.
    (world / "thesis").mkdir()
    (world / "thesis" / "chapter1.tex").write_text("\\section{Introduction}\n")
    recipe = (world / "recipe.yaml").read_text().replace("output_dir: run", "output_dir: thesis")
    (world / "thesis.yaml").write_text(recipe)
    _refused(world, capfd, "run", "thesis.yaml", "train.overwrite=true", expect="not a zeda run")


def test_overwrite_with_bad_data_keeps_the_previous_run(world, capfd):
    _refused_run(world, capfd, "train.overwrite=true", "data.train_file=nope.jsonl")


def test_overwrite_with_bad_model_keeps_the_previous_run(world, capfd):
    _refused_run(world, capfd, "train.overwrite=true", "model.name_or_path=no_such_model")


def test_export_dir_is_the_model_dir(world, capfd):
    _refused_run(world, capfd, "export.out_dir=model", "train.output_dir=new")


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
    msg = _refused_run(world, capfd, "train.resume=true", "stage1.steps=4", after_loading=True)
    assert not marker.exists(), "a pickle from the run directory was executed"
    # The whole message: what was found, that nothing ran, and the fix (no cut-off, no escapes).
    assert "exec" in msg and msg.endswith("start a new run") and "\x1b" not in msg


def test_crafted_optimizer_pickle_is_not_run_by_export(world, capfd):
    marker = world.parent / f"{world.name}.pwned"
    _evil_pickle(world / "run" / "checkpoint" / "optim.pt", marker)
    rc, lines = _zeda(capfd, "export", "--model", "run", "--out", "exported")
    assert not marker.exists(), "a pickle from the run directory was executed"
    assert rc == 0 or (rc == 2 and len(lines) == 1), lines


def test_resume_refuses_a_changed_recipe(world, capfd):
    _refused_run(world, capfd, "train.resume=true", "lora.r=4", expect="lora.r", after_loading=True)


def test_resume_without_a_checkpoint(world, capfd):
    (world / "empty_run").mkdir()
    (world / "empty_run" / "notes.txt").write_text("mine\n")
    _refused_run(world, capfd, "train.output_dir=empty_run", "train.resume=true")


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
    proc = _python(
        world, "-m", "zeda.cli", "run", "recipe.yaml", "train.output_dir=model", "train.overwrite=true"
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
        _refused(world, capfd, *RESUME, expect="another zeda process", after_loading=True)
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


def test_nan_after_the_first_checkpoint_of_an_overwrite_keeps_the_old_run(world, capfd):
    # Step 0 drives the weights to ~1e30 (finite, checkpointed at step 1), step 1 is not finite:
    # no checkpoint was followed by a finite step, so the old run is not replaced.
    _refused(
        world,
        capfd,
        "distill",
        "recipe.yaml",
        "train.overwrite=true",
        "train.save_every=1",
        "stage1.steps=4",
        "stage1.lr=1e30",
        expect="nothing was saved",
        after_loading=True,
    )


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
    # A resume that stops again changes nothing: recipe.yaml, metrics.jsonl and the checkpoint
    # are rewritten only with a new checkpoint.
    before = _tree(world / "new")
    rc, lines = _zeda(capfd, *argv, "stage1.lr=1e30", "train.resume=true")
    assert rc == 2 and "non-finite" in lines[-1], lines
    assert _tree(world / "new") == before
    _ok(capfd, *argv, "stage1.lr=0.01", "train.resume=true")  # the advice works
    assert json.loads((ckpt / "state.json").read_text())["step"] == 6


# ---- exports never replace an input of the run (issue 29) -------------------------------------


@pytest.mark.parametrize("out", ["model", "data.jsonl"])
def test_export_of_a_run_refuses_to_replace_any_input_of_the_run(world, capfd, out):
    # The run's base model and data are inputs of its export, not only --model.
    _refused(world, capfd, "export", "--model", "run", "--out", out, "--overwrite", expect="input")


def test_export_from_another_directory_uses_the_recorded_base_model(world, capfd, monkeypatch):
    other = world / "other"
    atomic_save(tiny_model("qwen3_moe", seed=7), other / "model", tokenizer=tiny_tokenizer())
    monkeypatch.chdir(other)  # here, "model" (the recipe's relative path) is a different model
    rc, lines = _zeda(capfd, "export", "--model", "../run", "--out", "../exp")
    assert rc == 0, lines
    got, want = (
        load_file(world / "exp" / "model.safetensors"),
        load_file(world / "run/export/model.safetensors"),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.parametrize("verb", ["export", "resume"])
def test_a_hand_edited_run_recipe_is_refused(world, capfd, verb):
    recipe = world / "run" / "recipe.yaml"
    before = recipe.read_text()
    edited = re.sub(r"(lora: \{[^}]*?\balpha: )[^,}]+", r"\g<1>1234", before, count=1)
    assert edited != before
    recipe.write_text(edited)
    argv = _writers()["export"] if verb == "export" else RESUME
    _refused(world, capfd, *argv, expect=("recipe.yaml", "edited"))


@pytest.mark.parametrize("verb", ["export", "resume"])
def test_a_changed_base_model_is_refused(world, capfd, verb):
    config = world / "model" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rope_theta": 12345.0}))
    argv = _writers()["export"] if verb == "export" else RESUME
    _refused(world, capfd, *argv, expect=("base model", "config.json"))


# ---- bounded recipes (issue 29) ---------------------------------------------------------------


def _billion_laughs(levels: int) -> str:
    lines = ["eval:", '  l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "\n".join([*lines, f"  tasks: *l{levels}", ""])


@contextlib.contextmanager
def _memory_cap(extra: int = 2 * 2**30):
    """At most ``extra`` more bytes of address space: an expansion fails with MemoryError here
    instead of taking the machine's memory (as a billion laughs did: 14 GB before it was killed)."""
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * page
    saved = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, saved[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, saved)


@pytest.mark.parametrize("verb", ["validate", "run"])
def test_a_billion_laughs_recipe_is_refused_not_expanded(world, capfd, verb):
    (world / "laughs.yaml").write_text(_billion_laughs(9))  # 9**10 values once expanded
    with _memory_cap():
        _refused(world, capfd, verb, "laughs.yaml", expect="aliases")


def test_a_billion_laughs_override_is_refused(world, capfd):
    value = "[&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]"
    value += ", &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], [*d,*d,*d,*d,*d,*d,*d,*d,*d], [*d,*d,*d,*d,*d,*d,*d,*d]]"
    with _memory_cap():
        _refused_run(world, capfd, f"eval.tasks={value}", expect="aliases")


@pytest.mark.parametrize("base", ["/dev/zero", "fifo.yaml", "big.yaml"])
def test_a_recipe_base_that_is_not_a_small_regular_file_is_refused(world, capfd, base):
    os.mkfifo(world / "fifo.yaml")  # opening it would block forever
    (world / "big.yaml").write_text("# padding\n" * 300_000)  # 3 MB
    (world / "child.yaml").write_text(f"base: {base}\n")
    _refused(world, capfd, "validate", "child.yaml", expect="recipe")
    _refused(world, capfd, "validate", base, expect="recipe")


@pytest.mark.parametrize(
    "override",
    [
        "stage1.steps=1000000000000000000000000000000",
        "data.seq_len=100000000",
        "train.batch_size=10000000000",
    ],
)
def test_integer_settings_have_upper_bounds(world, capfd, override):
    _refused_run(world, capfd, override, "train.output_dir=new", expect="too large")


def test_a_nested_list_of_tasks_is_refused(world, capfd):
    _refused_run(world, capfd, "eval.tasks=[[a]]", "train.output_dir=new", expect="eval.tasks")


# ---- damaged checkpoints (issue 29) -----------------------------------------------------------


def _damage(world: Path, what: str) -> None:
    ckpt = world / "run" / "checkpoint"
    if what == "truncated trainable.safetensors":
        f = ckpt / "trainable.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif what == "missing optim.pt":
        (ckpt / "optim.pt").unlink()
    elif what == "garbage state.json":
        (ckpt / "state.json").write_text("garbage{\n")
    else:
        (ckpt / "state.json").write_text("[1, 2]\n")


DAMAGES = ["truncated trainable.safetensors", "missing optim.pt", "garbage state.json", "list state.json"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_refused_on_resume(world, capfd, damage):
    _damage(world, damage)
    _refused(world, capfd, *RESUME, expect="checkpoint", after_loading=True)


@pytest.mark.parametrize(
    "damage", [d for d in DAMAGES if d != "missing optim.pt"]
)  # export needs no optimiser
def test_a_damaged_checkpoint_is_refused_on_export(world, capfd, damage):
    _damage(world, damage)
    _refused(
        world, capfd, "export", "--model", "run", "--out", "exp", expect="checkpoint", after_loading=True
    )


# ---- full disks and read-only places (issue 29) -----------------------------------------------


class _FileSizeLimit:
    """``ulimit -f``: writing past ``nbytes`` fails with EFBIG (Python ignores SIGXFSZ)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def __enter__(self) -> None:
        self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.nbytes, self.saved[1]))

    def __exit__(self, *exc) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)


#: Every writer into this directory, where ``ev`` holds an older evaluation (`_old_evaluation`),
#: so eval is told to overwrite it; and a resume, which writes into ``run``.
CASES_WRITING = {**_writers(), "resume": RESUME}
CASES_WRITING["eval --overwrite"] = (*CASES_WRITING.pop("eval"), "--overwrite")


def _old_evaluation(world: Path) -> None:
    (world / "ev").mkdir()
    for name in ("results.json", "report.md", "zero_share_per_layer.png"):
        (world / "ev" / name).write_bytes(os.urandom(4096))


@pytest.mark.parametrize("case", list(CASES_WRITING))
def test_a_full_disk_is_refused_before_the_work_and_keeps_the_previous_output(world, capfd, case):
    _old_evaluation(world)
    before = _tree(world)
    with _FileSizeLimit(20 * 1024):  # ulimit -f 20
        rc, lines = _zeda(capfd, *CASES_WRITING[case])
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("zeda: error: "), lines  # nothing loaded
    assert "ulimit -f" in lines[0]
    assert _tree(world) == before


@pytest.mark.parametrize("case", list(CASES_WRITING))
def test_a_full_disk_is_refused_before_the_work(world, capfd, monkeypatch, case):
    import zeda.fs

    _old_evaluation(world)
    real = shutil.disk_usage
    monkeypatch.setattr(zeda.fs.shutil, "disk_usage", lambda p: real(p)._replace(free=64 * 1024))
    _refused(world, capfd, *CASES_WRITING[case], expect="free", after_loading=True)


@contextlib.contextmanager
def _read_only(path: Path):
    """A directory nothing can be created in, even by root (immutable), else by mode."""
    path.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("no way to make a directory read-only for root here (chattr)")
        try:
            yield path
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


CASES_READ_ONLY = _writers("ro/")


@pytest.mark.parametrize("case", list(CASES_READ_ONLY))
def test_a_read_only_output_directory_is_refused_before_the_work(world, capfd, case):
    with _read_only(world / "ro"):
        before = _tree(world)
        rc, lines = _zeda(capfd, *CASES_READ_ONLY[case])
        assert rc == 2 and len(lines) == 1 and "cannot write in" in lines[0], lines  # nothing loaded
        assert _tree(world) == before


def test_a_read_only_run_directory_is_refused_on_resume(world, capfd):
    with _read_only(world / "run"):
        _refused(world, capfd, *CASES_WRITING["resume"], expect="cannot write in")


def test_a_write_that_fails_midway_keeps_the_previous_checkpoint_and_leaves_nothing(tmp_path):
    from zeda.distillation.checkpoint import prove_checkpoint, save_checkpoint

    run = tmp_path / "run"
    tensors = {"w": torch.ones(64, 64)}
    save_checkpoint(run, tensors, {"stage": "stage1", "step": 1}, {"optimizer": {}, "scheduler": {}})
    prove_checkpoint(run)
    before = _tree(tmp_path)
    big = {"w": torch.ones(256, 256)}
    with (
        _FileSizeLimit(100 * 1024),
        pytest.raises(zeda.ZedaError, match="previous checkpoint is kept") as err,
    ):
        save_checkpoint(run, big, {"stage": "stage1", "step": 2}, {"optimizer": {}, "scheduler": {}})
    assert "\n" not in str(err.value)
    assert _tree(tmp_path) == before


def test_an_evaluation_that_fails_midway_keeps_the_previous_one(tmp_path):
    from zeda.evaluation import render
    from zeda.evaluation.result import EvalResult

    result = EvalResult("m", "qwen3_moe", True, 8, 4, 2, zero_share_per_layer={0: 0.5, 1: 0.4})
    for fig in result.plot():  # the figure code warms its caches outside the limit
        render.close_figure(fig)
    _old_evaluation(tmp_path)
    before = _tree(tmp_path)
    with _FileSizeLimit(8 * 1024), pytest.raises(zeda.ZedaError, match="previous one is kept"):
        result.save(tmp_path / "ev", overwrite=True)
    assert _tree(tmp_path) == before
    result.save(tmp_path / "ev", overwrite=True)
    assert (tmp_path / "ev" / "zero_share_per_layer.png").stat().st_size > 8 * 1024


# ---- weights that are not finite (issue 29) ---------------------------------------------------


def test_weights_with_nan_are_refused_on_load(world, capfd):
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "experts" in n).view(-1)[3] = float("nan")
    atomic_save(model, world / "bad", tokenizer=tiny_tokenizer())
    _refused(world, capfd, "inject", "--model", "bad", "--out", "inj", expect="nan", after_loading=True)
    _refused_run(
        world, capfd, "model.name_or_path=bad", "train.output_dir=new", expect="nan", after_loading=True
    )


def test_an_injection_that_overflows_is_refused(world, capfd):
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):  # finite rows whose spread overflows float32
                p.copy_(torch.full_like(p, 3.3e38) * (torch.arange(p.shape[0])[:, None] % 2 * 2 - 1))
    atomic_save(model, world / "huge", tokenizer=tiny_tokenizer())
    _refused(
        world,
        capfd,
        "inject",
        "--model",
        "huge",
        "--out",
        "inj",
        expect="after injection",
        after_loading=True,
    )


# ---- leftovers and wording (issue 29) ---------------------------------------------------------


def test_export_clears_temporaries_of_a_killed_export_and_only_those(world, capfd):
    stale = world / ".exp.tmp-killed"  # what kill -9 during `zeda export --out exp` leaves
    stale.mkdir()
    (stale / ".zeda-tmp").write_text("pid 1\n")
    (stale / "model.safetensors").write_bytes(os.urandom(1024))
    foreign = world / ".exp.tmp-notzeda"  # no marker: not zeda's, left alone
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine\n")
    live = world / ".exp.tmp-live"  # a zeda export still writing: its marker is locked
    live.mkdir()
    fd = os.open(live / ".zeda-tmp", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        rc, lines = _zeda(capfd, "export", "--model", "run", "--out", "exp")
    finally:
        os.close(fd)
    assert rc == 0, lines
    assert not stale.exists() and (foreign / "keep.txt").exists() and live.exists()
    assert (world / "exp" / "config.json").exists() and not (world / "exp" / ".zeda-tmp").exists()


def test_export_onto_a_symlink_leaves_no_backup(world, capfd):
    (world / "target").mkdir()
    (world / "target" / "notes.txt").write_text("mine\n")
    (world / "link").symlink_to("target")
    rc, lines = _zeda(capfd, "export", "--model", "run", "--out", "link", "--overwrite")
    assert rc == 0, lines
    assert not list(world.glob(".link*")), "a backup or a temporary was left behind"
    assert (world / "target" / "notes.txt").read_text() == "mine\n"  # the link's target is untouched
    assert (world / "link" / "config.json").is_file() and not (world / "link").is_symlink()


@pytest.mark.parametrize("verb", ["export", "eval"])
def test_a_directory_that_is_neither_a_model_nor_a_run_is_named_as_such(world, capfd, verb):
    (world / "junk").mkdir()
    (world / "junk" / "notes.txt").write_text("mine\n")
    msg = _refused(
        world,
        capfd,
        verb,
        "--model",
        "junk",
        "--out",
        "out",
        expect="not a model directory" if verb == "eval" else "neither a model directory",
    )
    assert "tokenizer" not in msg


@pytest.mark.parametrize(
    "argv",
    [
        ("export", "--model", "no_such_dir", "--out", "exp"),
        ("eval", "--model", "no_such_dir", "--out", "ev"),
        ("inject", "--model", "./no_such_dir", "--out", "inj"),
        (
            "calibrate",
            "--model",
            "gone/away/model",
            "--target-share",
            "0.5",
            "--data",
            "data.jsonl",
            "--out",
            "cal",
        ),
        ("run", "recipe.yaml", "model.name_or_path=no_such_dir", "train.output_dir=new"),
    ],
)
def test_a_missing_local_path_is_named_without_the_model_hub(world, capfd, argv):
    msg = _refused(world, capfd, *argv, expect="no such directory")
    assert "hub" not in msg.lower() and "huggingface" not in msg.lower()


# ---- audit of issue 29: the remaining sub-cases ----------------------------------------------


def test_two_distill_processes_into_one_run_directory(world, capfd, monkeypatch):
    """Issue 29 item 3, as reported: a second `zeda distill` (another process, another lr) starts
    while the first one writes the run directory. It is refused in one line; the run is the
    first one's alone (its recipe, its metrics)."""
    import zeda.distillation.trainer as trainer_mod

    real = trainer_mod.save_checkpoint
    second = {}

    def save_then_race(*args, **kwargs):
        if not second:  # the first checkpoint: the run directory is being written right now
            argv = ("distill", "recipe.yaml", "train.overwrite=true", "stage1.lr=0.02")
            second["proc"] = _python(world, "-m", "zeda.cli", *argv)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "save_checkpoint", save_then_race)
    _ok(capfd, "distill", "recipe.yaml", "train.overwrite=true", "train.save_every=1")
    proc = second["proc"]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not _is_progress(ln)]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("zeda: error: ") and "another zeda process" in lines[0], lines
    assert "lr: 0.01" in (world / "run" / "recipe.yaml").read_text()
    steps = [json.loads(ln)["step"] for ln in (world / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "metrics.jsonl interleaves two runs"
    assert not list(world.glob(".run.*"))


def _disk_fills_midway(monkeypatch, nbytes: int) -> _FileSizeLimit:
    """A write that fails although the size check passed (the estimate was short, or another
    process filled the disk meanwhile): the check sees no limit, the writes meet ``ulimit -f``."""
    import zeda.fs

    monkeypatch.setattr(zeda.fs, "file_size_limit", lambda: None)
    return _FileSizeLimit(nbytes)


MIDWAY = {
    # what fails, the command; each writes a file larger than 40 KiB (checkpoint, export weights)
    "a new run's first checkpoint": ("distill", "recipe.yaml", "train.output_dir=new"),
    "an overwrite's first checkpoint": ("distill", "recipe.yaml", "train.overwrite=true"),
    "a resume's checkpoint": RESUME,
    "an export": ("export", "--model", "run", "--out", "run/export", "--overwrite"),
}


@pytest.mark.parametrize("case", list(MIDWAY))
def test_a_disk_that_fills_midway_leaves_nothing_and_the_advice_works(world, capfd, monkeypatch, case):
    """Issue 29 items 6 and 8: a full disk during a checkpoint, a resume or an export exits 2 in
    one line, keeps the previous output, and leaves no ``.run.new``, ``.checkpoint.tmp`` or
    ``.export.tmp-*``; ``recipe.yaml`` and ``metrics.jsonl`` are not rewritten."""
    with _disk_fills_midway(monkeypatch, 40 * 1024):
        msg = _refused(world, capfd, *MIDWAY[case], expect="ulimit -f", after_loading=True)
    assert "traceback" not in msg.lower() and ".run.new" not in msg
    # The advice works: with room to write, the suggested command succeeds.
    if case == "a resume's checkpoint":
        assert "resume with train.resume=true" in msg and "previous checkpoint is kept" in msg, msg
        _ok(capfd, *MIDWAY[case])
        assert json.loads((world / "run" / "checkpoint" / "state.json").read_text())["step"] == 4
    else:  # nothing was saved: a resume could not work, the same command does
        assert "resume" not in msg and ("run the same command again" in msg or msg.endswith("run again")), msg
        _ok(capfd, *MIDWAY[case])


def test_kill_9_during_export_leaves_no_temporary_for_long(world, capfd):
    """Issue 29 item 8, with a real kill: an export killed once the whole model copy is written
    (its temporary's marker still held) leaves ``.exp.tmp-*``; the next export removes it."""
    killed_at_rename = (
        "import os, signal, zeda.atomic\n"
        "from zeda.cli import main\n"
        "class Killed(zeda.atomic.FileLock):\n"
        "    def release(self):\n"
        "        if self.path.name == zeda.atomic._TMP_MARKER and self.held:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)  # the copy is complete, not yet renamed\n"
        "        super().release()\n"
        "zeda.atomic.FileLock = Killed\n"
        "main(['export', '--model', 'run', '--out', 'exp'])\n"
    )
    proc = _python(world, "-c", killed_at_rename)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (stale,) = world.glob(".exp.tmp-*")
    assert (stale / "model.safetensors").is_file() and not (world / "exp").exists()
    _ok(capfd, "export", "--model", "run", "--out", "exp")
    assert not list(world.glob(".exp*")) and (world / "exp" / "config.json").is_file()


def test_nan_at_the_first_step_with_save_every_1_leaves_nothing_and_the_advice_works(world, capfd):
    """Issue 29 item 7: ``stage1.lr=1e30 train.save_every=1`` checkpoints weights near 1e30 at
    step 1 whose next step is not finite; that checkpoint is not kept, nor the run directory, and
    the advice (a lower lr, the same command) works."""
    argv = ("distill", "recipe.yaml", "train.output_dir=new", "stage1.steps=4", "train.save_every=1")
    msg = _refused(world, capfd, *argv, "stage1.lr=1e30", expect="non-finite", after_loading=True)
    assert "run the same command again" in msg and "lower stage1.lr" in msg
    _ok(capfd, *argv, "stage1.lr=0.01")
    assert json.loads((world / "new" / "checkpoint" / "state.json").read_text())["step"] == 4


def test_weights_with_inf_are_refused_on_load(world, capfd):
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "self_attn" in n).view(-1)[5] = float("-inf")
    atomic_save(model, world / "bad", tokenizer=tiny_tokenizer())
    for argv in (("inject", "--model", "bad", "--out", "inj"), ("eval", "--model", "bad", "--out", "ev")):
        _refused(world, capfd, *argv, expect="nan or inf", after_loading=True)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("what", ["tokenizer.json", "model.safetensors"])
@pytest.mark.parametrize("verb", ["export", "resume"])
def test_a_changed_tokenizer_or_weights_file_of_the_base_model_is_refused(world, capfd, verb, what):
    """The fingerprint covers the tokenizer and the weights, not only config.json."""
    path = world / "model" / what
    if what == "tokenizer.json":
        path.write_text(path.read_text().replace('"<unk>"', '"<UNK>"', 1))
    else:
        _flip_a_byte(path)  # same size, other weights
    argv = _writers()["export"] if verb == "export" else RESUME
    _refused(world, capfd, *argv, expect=("base model", what))


def test_a_changed_weights_index_of_a_sharded_base_model_is_refused(world, capfd):
    tiny_model("qwen3_moe").save_pretrained(world / "sharded", max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(world / "sharded")
    index = world / "sharded" / "model.safetensors.index.json"
    assert index.is_file()
    _ok(capfd, "distill", "recipe.yaml", "model.name_or_path=sharded", "train.output_dir=run2")
    record = json.loads((world / "run2" / "inputs.json").read_text())
    assert index.name in record["model"]["files"] and record["model"]["path"] == str(world / "sharded")
    data = json.loads(index.read_text())
    data["metadata"] = {**data.get("metadata", {}), "note": "edited"}
    index.write_text(json.dumps(data))
    _refused(world, capfd, "export", "--model", "run2", "--out", "exp", expect=("base model", index.name))


@pytest.mark.parametrize(
    "argv",
    [("train.overwrite=true",), ("train.resume=true", "stage1.steps=4")],
    ids=["overwrite", "resume"],
)
def test_kill_9_during_a_checkpoint_keeps_the_run_and_the_same_command_finishes(world, capfd, argv):
    """A real kill in the middle of a checkpoint (its weights written, its optimiser state not):
    the run's checkpoint and recipe are as they were, and the same command run again finishes
    and leaves no ``.run.new`` or ``.checkpoint.tmp``."""
    killed_midway = (
        "import os, signal, sys\n"
        "import zeda.distillation.checkpoint as ckpt\n"
        "from zeda.cli import main\n"
        "real = ckpt.save_file\n"
        "def save_then_die(*args, **kwargs):\n"
        "    real(*args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "ckpt.save_file = save_then_die\n"
        "main(['distill', 'recipe.yaml', *sys.argv[1:]])\n"
    )
    run = world / "run"
    kept = {k: v for k, v in _tree(run).items() if k.startswith("checkpoint") or k == "recipe.yaml"}
    if argv[0] == "train.overwrite=true":
        kept = _tree(run)  # the old run stays whole until the new one holds a proven checkpoint
    proc = _python(world, "-c", killed_midway, *argv)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(world.glob(".run.new/.checkpoint.tmp")) or (run / ".checkpoint.tmp").is_dir()
    assert {k: v for k, v in _tree(run).items() if k in kept} == kept
    _ok(capfd, "distill", "recipe.yaml", *argv)
    assert not list(world.glob(".run.*")) and not list(run.glob(".checkpoint.*"))
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == (4 if "train.resume=true" in argv else 2)
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == state["step"], steps
