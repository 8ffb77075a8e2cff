"""Run-directory safety (`prepare_run_dir`) and data validation before any model loads."""

from __future__ import annotations

import json

import pytest
from test_distill import cfg_for

import zeda
import zeda.distillation.trainer as trainer_mod
from zeda.config import RunConfig, apply_overrides
from zeda.distillation.data import read_jsonl, validate_data
from zeda.distillation.loop import distill
from zeda.distillation.run_dir import MARKER, prepare_run_dir, run_inputs
from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer


def _cfg(out, *extra):
    return apply_overrides(RunConfig(), [f"train.output_dir={out}", *extra])


def test_output_dir_that_is_or_contains_an_input_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for out in (model, tmp_path):
        cfg = _cfg(out, f"model.name_or_path={model}", "train.overwrite=true")
        with pytest.raises(zeda.ZedaError, match="is or contains the input"):
            prepare_run_dir(cfg, run_inputs(cfg), explicit=True)
    assert (model / "config.json").exists()


def test_existing_dir_needs_resume_or_overwrite_and_overwrite_needs_a_zeda_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(zeda.ZedaError, match="train.resume=true.*train.overwrite=true"):
        prepare_run_dir(_cfg(out), [])
    with pytest.raises(zeda.ZedaError, match="not a zeda run"):
        prepare_run_dir(_cfg(out, "train.overwrite=true"), [])
    with pytest.raises(zeda.ZedaError, match="holds no checkpoint"):
        prepare_run_dir(_cfg(out, "train.resume=true"), [])
    assert (out / "notes.txt").read_text() == "keep me"
    run = prepare_run_dir(_cfg(out, "train.overwrite=true"), [], explicit=True)
    assert run.staged and run.final == out.resolve() and (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    (out / MARKER).write_text("{}")
    assert prepare_run_dir(_cfg(out, "train.overwrite=true"), []).staged
    fresh = prepare_run_dir(_cfg(tmp_path / "new"), [])
    assert not fresh.staged and not fresh.resuming


def test_overwrite_replaces_the_old_run_only_after_the_first_checkpoint(tmp_path, monkeypatch):
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(96)))
    out = tmp_path / "run"
    tok = tiny_tokenizer()
    distill(tiny_model("olmoe"), cfg_for(corpus, out, "stage1.steps=2"), tok)
    old = (out / "checkpoint" / "trainable.safetensors").read_bytes()

    # A new run that dies before its first checkpoint leaves the old run untouched.
    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod.Trainer, "step", die)
    with pytest.raises(KeyboardInterrupt):
        distill(tiny_model("olmoe"), cfg_for(corpus, out, "train.overwrite=true", "stage1.steps=2"), tok)
    monkeypatch.undo()
    assert (out / "checkpoint" / "trainable.safetensors").read_bytes() == old
    distill(
        tiny_model("olmoe"),
        cfg_for(corpus, out, "train.overwrite=true", "stage1.steps=2", "train.seed=5"),
        tok,
    )
    assert (out / "checkpoint" / "trainable.safetensors").read_bytes() != old
    assert (out / MARKER).is_file() and (out / "recipe.yaml").is_file()
    assert not list(tmp_path.glob(".run.*"))


def test_data_errors_are_one_line_and_come_before_the_model(tmp_path):
    bad_bytes = tmp_path / "latin1.jsonl"
    bad_bytes.write_bytes(json.dumps({"text": "caf"}).encode()[:-2] + b'\xe9"}\n')
    null = tmp_path / "null.jsonl"
    null.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": None}) + "\n")
    for path, pattern in ((bad_bytes, "not UTF-8"), (null, r"null.jsonl:2 field 'text' is null")):
        with pytest.raises(zeda.ZedaError, match=pattern) as err:
            read_jsonl(path)
        assert "\n" not in str(err.value)
        with pytest.raises(zeda.ZedaError, match=pattern):
            validate_data(_cfg(tmp_path / "out", f"data.train_file={path}"))
    assert not (tmp_path / "out").exists()
