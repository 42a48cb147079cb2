"""Export edges: a workdir spelled with a slash, one stop id, no BOS, a damaged checkpoint, an
occupied critic folder refused before anything is written, a dense model, BOS id 0, and the
export closing its checkpointer."""

import json
import shutil

import pytest
from quiet_train import train_quietly
from test_build import _tokenizer_file
from test_export import _config

from novarl_jax.rollout.tokenizers import HFTokenizer
from novarl_jax.trainer import export as export_mod
from novarl_jax.trainer.export import ExportError, export_policy


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("a")
    c = _config()
    c.model.tokenizer = str(_tokenizer_file(tmp))
    c.model.bos_token = ""
    c.rollout.stop_token_ids = (3,)
    train_quietly(c, tmp / "run")
    return c, tmp


def test_the_workdir_with_a_trailing_slash_is_still_the_workdir(run_a):
    c, tmp = run_a
    with pytest.raises(ExportError, match="is the run's own workdir"):
        export_policy(c, str(tmp / "run"), str(tmp / "run") + "/")


def test_the_checkpoints_directory_and_a_tokenizers_folder_are_refused(run_a):
    """Steps there are rotated away (and an unknown step directory stops every resume); the
    run's own tokenizer.json would be rewritten without its post-processor."""
    c, tmp = run_a
    run = tmp / "run"
    for out in (run / "checkpoints", run / "checkpoints" / "1", run / "checkpoints" / "99"):
        with pytest.raises(ExportError, match=r"is inside the run's checkpoints directory"):
            export_policy(c, str(run), str(out))
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert not (run / "checkpoints" / "1" / "config.json").exists()
    tokenizer = (tmp / "tokenizer.json").read_text()
    with pytest.raises(ExportError, match=r"already holds a tokenizer \(tokenizer.json\)"):
        export_policy(c, str(run), str(tmp))
    assert (tmp / "tokenizer.json").read_text() == tokenizer and not (tmp / "config.json").exists()
    export_policy(c, str(run), str(run / "hf"))  # elsewhere in the workdir: fine
    assert (run / "hf" / "tokenizer.json").exists()
    export_policy(c, str(run), str(run / "checkpoints_hf"))  # a sibling, not inside
    (tmp / "link").symlink_to(run / "checkpoints")  # inside, by another name
    with pytest.raises(ExportError, match=r"is inside the run's checkpoints directory"):
        export_policy(c, str(run), str(tmp / "link" / "hf"))
    (tmp / "tok").mkdir()
    (tmp / "tok" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ExportError, match=r"already holds a tokenizer \(tokenizer_config.json\)"):
        export_policy(c, str(run), str(tmp / "tok"))
    assert (tmp / "tok" / "tokenizer_config.json").read_text() == "{}"
    (tmp / "jinja").mkdir()
    (tmp / "jinja" / "chat_template.jinja").write_text("mine")
    with pytest.raises(ExportError, match=r"already holds a tokenizer \(chat_template.jinja\)"):
        export_policy(c, str(run), str(tmp / "jinja"))
    assert (tmp / "jinja" / "chat_template.jinja").read_text() == "mine"


def test_a_single_stop_id_is_written_as_an_int(run_a):
    c, tmp = run_a
    export_policy(c, str(tmp / "run"), str(tmp / "e05"))
    gen = json.loads((tmp / "e05" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 3


def test_no_bos_token_leaves_it_out_of_tokenizer_config(run_a):
    c, tmp = run_a
    # Not even the source's: the special tokens are the run's.
    (tmp / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "x": 1}))
    try:
        export_policy(c, str(tmp / "run"), str(tmp / "e10"))
    finally:
        (tmp / "tokenizer_config.json").unlink()
    written = json.loads((tmp / "e10" / "tokenizer_config.json").read_text())
    assert "bos_token" not in written and written["x"] == 1


def test_settings_are_carried_only_from_a_model_directorys_tokenizer(run_a, tmp_path):
    # A tokenizer file of another name is not a model directory's tokenizer.json: the
    # tokenizer_config.json beside it may be another model's.
    c, tmp = run_a
    c = c.copy_and_resolve_references()
    renamed = tmp_path / "policy_tokenizer.json"
    shutil.copyfile(c.model.tokenizer, renamed)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    c.model.tokenizer = str(renamed)
    tokenizer = HFTokenizer.from_file(renamed, pad_token="<pad>", eos_token="</s>")
    out = tmp_path / "out"
    out.mkdir()
    export_mod._write_tokenizer(str(out), tokenizer, c)
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert "model_max_length" not in written and not (out / "chat_template.jinja").exists()
    shutil.copyfile(renamed, tmp_path / "tokenizer.json")  # the same, as a directory's
    c.model.tokenizer = str(tmp_path / "tokenizer.json")
    export_mod._write_tokenizer(str(out), tokenizer, c)
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["model_max_length"] == 8 and (out / "chat_template.jinja").exists()


def test_the_export_closes_its_checkpointer_also_on_failure(run_a, monkeypatch):

    closed = []

    class Counting(export_mod.Checkpointer):
        def close(self):
            closed.append(True)
            super().close()

    monkeypatch.setattr(export_mod, "Checkpointer", Counting)
    c, tmp = run_a
    export_policy(c, str(tmp / "run"), str(tmp / "e12"))
    with pytest.raises(ExportError):
        export_policy(c, str(tmp / "run"), str(tmp / "e12b"), step=7)
    assert closed == [True, True]


def test_a_damaged_checkpoint_is_an_export_error(run_a):
    c, tmp = run_a
    shutil.copytree(tmp / "run", tmp / "damaged")
    host = next((tmp / "damaged" / "checkpoints" / "2" / "host").iterdir())
    host.write_text("{not json")
    # The hint offers the newest older step.
    shutil.copytree(tmp / "damaged" / "checkpoints" / "1", tmp / "damaged" / "checkpoints" / "0")
    with pytest.raises(ExportError, match=r"checkpoint could not be read .*; or export step 1 "
                       r"with --export_step=1$"):  # fmt: skip
        export_policy(c, str(tmp / "damaged"), str(tmp / "e04"))


def test_an_occupied_critic_folder_is_refused_before_writing(tmp_path):
    c = _config(steps=1, critic="separate")
    train_quietly(c, tmp_path / "run")
    (tmp_path / "hf" / "critic").mkdir(parents=True)
    (tmp_path / "hf" / "critic" / "config.json").write_text("{}")
    with pytest.raises(ExportError, match=r"critic: already holds a model"):
        export_policy(c, str(tmp_path / "run"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "config.json").exists()


def test_a_dense_export_reports_no_capacity_factor(tmp_path):
    c = _config(steps=1)
    c.experiment.num_experts = 0
    c.experiment.capacity_factor = 1.25
    train_quietly(c, tmp_path / "run")
    assert export_policy(c, str(tmp_path / "run"), str(tmp_path / "hf"))["capacity_factor"] is None


def test_bos_id_zero_and_the_pair_template(tmp_path):
    from tokenizers import Tokenizer

    path = _tokenizer_file(tmp_path, specials=("<s>", "<pad>", "</s>"))
    vocab = json.loads(path.read_text())["model"]["vocab"]
    c = _config(steps=1)
    c.model.tokenizer = str(path)
    c.model.bos_token = "<s>"
    train_quietly(c, tmp_path / "run")
    export_policy(c, str(tmp_path / "run"), str(tmp_path / "hf"))
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen.get("bos_token_id") == 0
    exported = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    a, b = vocab["a"], vocab["b"]
    assert exported.encode("a", "b").ids == [0, a, 0, b]


def test_an_export_that_cannot_be_written_is_an_export_error(run_a, monkeypatch):
    """A full disk or a directory without write permission: one error naming the target, not
    a traceback from the safetensors library."""
    from safetensors import SafetensorError

    from novarl_jax.models import hf

    c, tmp = run_a
    for error in (SafetensorError("Error while serializing: No space left on device (os error "
                                  "28)"), PermissionError(13, "Permission denied")):  # fmt: skip

        def failing(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(hf, "save_file", failing)
        with pytest.raises(ExportError) as info:
            export_policy(c, str(tmp / "run"), str(tmp / "full"))
        assert str(info.value).startswith(
            f"{tmp / 'full'}: the export could not be written ({type(error).__name__}: "
        )
        assert str(info.value).endswith("or export into another directory")
        assert not (tmp / "full").exists()  # nothing half-written


def _live_run(run_a, monkeypatch, name, rotate):
    """A copy of run A in ``tmp/name`` whose checkpoints ``rotate(checkpoints, steps)`` changes
    before each restore the export makes, as a run still training there would. Returns the
    config, tmp, the checkpoints directory and the steps restored so far."""

    c, tmp = run_a
    shutil.copytree(tmp / "run", tmp / name)
    checkpoints = tmp / name / "checkpoints"
    restore = export_mod.Checkpointer.restore
    calls = []

    def restoring(self, abstract, step=None):
        calls.append(step)
        rotate(checkpoints, calls)
        return restore(self, abstract, step)

    monkeypatch.setattr(export_mod.Checkpointer, "restore", restoring)
    return c, tmp, checkpoints, calls


def test_an_export_during_training_takes_the_step_that_replaced_the_one_it_was_reading(
    run_a, monkeypatch
):
    """A run still training in the workdir saves a step and removes an old one between the
    export's listing and its restore: the export takes the newest step again (with
    --export_step it names what happened)."""

    def training_meanwhile(checkpoints, calls):
        if len(calls) == 1:  # the run saves step 3 and rotates step 2 out
            shutil.copytree(checkpoints / "2", checkpoints / "3")
            shutil.rmtree(checkpoints / "2")

    c, tmp, checkpoints, calls = _live_run(run_a, monkeypatch, "live", training_meanwhile)
    written = export_policy(c, str(tmp / "live"), str(tmp / "e20"))
    assert calls == [2, 3] and written["step"] == 3
    calls.clear()
    shutil.copytree(checkpoints / "3", checkpoints / "2")
    shutil.rmtree(checkpoints / "3")
    with pytest.raises(ExportError, match=r"checkpoints: step 2 was removed while the export read "
                       r"it .*; it has \[1, 3\] now: export one of those$"):  # fmt: skip
        export_policy(c, str(tmp / "live"), str(tmp / "e21"), step=2)
    assert not (tmp / "e21").exists()


def test_an_export_gives_up_after_the_retries_when_every_step_it_reads_is_rotated_away(
    run_a, monkeypatch
):
    def always_rotating(checkpoints, calls):
        newest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
        shutil.copytree(checkpoints / str(newest), checkpoints / str(newest + 1))
        shutil.rmtree(checkpoints / str(calls[-1]))

    c, tmp, _, calls = _live_run(run_a, monkeypatch, "live2", always_rotating)
    with pytest.raises(ExportError, match="was removed while the export read it"):
        export_policy(c, str(tmp / "live2"), str(tmp / "e22"))
    assert calls == [2, 3, 4, 5]  # the first try and _ROTATION_RETRIES = 3 newer steps
    assert not (tmp / "e22").exists()


def test_a_failed_tokenizer_write_leaves_no_half_export(run_a, monkeypatch):
    """The model files are moved into place before the tokenizer is written: a failure there
    left an export that a rerun into the same directory refused as already holding a
    model."""

    c, tmp = run_a

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod, "_write_tokenizer", full)
    with pytest.raises(ExportError, match="the export could not be written"):
        export_policy(c, str(tmp / "run"), str(tmp / "e30"))
    assert not (tmp / "e30").exists()  # the export made it: removed
    (tmp / "e31").mkdir()
    (tmp / "e31" / "notes.txt").write_text("mine")
    (tmp / "e31" / "generation_config.json").write_text("{}")  # the user's, before the export
    with pytest.raises(ExportError, match="the export could not be written"):
        export_policy(c, str(tmp / "run"), str(tmp / "e31"))
    assert sorted(p.name for p in (tmp / "e31").iterdir()) == ["generation_config.json",
                                                                "notes.txt"]  # fmt: skip
    (tmp / "e32").mkdir()  # an empty directory of the user's: the export's files all go again
    with pytest.raises(ExportError, match="the export could not be written"):
        export_policy(c, str(tmp / "run"), str(tmp / "e32"))
    assert list((tmp / "e32").iterdir()) == []
    monkeypatch.undo()
    export_policy(c, str(tmp / "run"), str(tmp / "e31"))  # the rerun writes it


def test_a_chat_template_run_exports_the_bos_its_template_writes(tmp_path):
    """The template is carried over and names bos_token: without it transformers would render
    the prompts with no BOS, unlike training."""
    from tokenizers import Tokenizer

    from configs import base
    from novarl_jax.trainer.build import build_run
    from novarl_jax.trainer.config import validate_config

    source = tmp_path / "model"
    source.mkdir()
    rust = Tokenizer.from_file(str(_tokenizer_file(source)))
    rust.add_special_tokens(["<s>"])
    rust.save(str(source / "tokenizer.json"))
    template = "{{ bos_token }}{{ messages[-1]['content'] }}"
    settings = {"chat_template": template, "bos_token": "<s>"}
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    config = base.get_config()
    config.model.tokenizer = str(source / "tokenizer.json")
    config.rollout.chat_template = True
    tokenizer = build_run(validate_config(config)).tokenizer
    assert tokenizer.bos_token is None  # the template writes it
    out = tmp_path / "out"
    out.mkdir()
    export_mod._write_tokenizer(str(out), tokenizer, config)
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert (written["chat_template"], written["bos_token"]) == (template, "<s>")
    assert json.loads((out / "tokenizer.json").read_text())["post_processor"] is None
