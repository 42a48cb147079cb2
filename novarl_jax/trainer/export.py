"""A run's trained policy as a Hugging Face model directory.

``python -m novarl_jax.train --config=... --workdir=W --export=OUT [overrides]`` (the run's own
command plus ``--export``) restores a checkpoint of ``W`` and writes its policy to ``OUT`` with
:func:`~novarl_jax.models.save_hf_model`: ``config.json`` and safetensors that
``transformers`` loads (``MixtralForCausalLM``; for a dense policy ``LlamaForCausalLM``,
``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` for those architectures, or
``MistralForCausalLM`` when its checkpoint had a sliding window),
with the run's end ids (those its completions stopped at), padding and BOS ids in
``config.json`` and ``generation_config.json``, plus
``tokenizer.json`` and ``tokenizer_config.json`` when the run used a tokenizer.json. A shared
critic's value head is written beside the weights as ``value_head.weight`` /
``value_head.bias`` (``transformers`` ignores it); a separate critic is written to
``OUT/critic``. Nothing is trained; the checkpoints are only read.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from typing import Any

import jax

from novarl_jax.models import save_hf_model
from novarl_jax.models.hf import GENERATION_CONFIG_FILE, checkpoint_files
from novarl_jax.rollout.chat import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, read_tokenizer_config
from novarl_jax.rollout.tokenizers import HFTokenizer
from novarl_jax.trainer.build import build_run, tokenizer_path
from novarl_jax.trainer.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointUnreadableError,
)
from novarl_jax.trainer.config import RunSpec, validate_config
from novarl_jax.trainer.loop import Trainer, check_mesh, default_mesh
from novarl_jax.trainer.saved_config import (
    allowed_changes_note,
    check_resume_config,
    finished_steps,
)
from novarl_jax.trainer.workdir import url_path

TOKENIZER_FILE = "tokenizer.json"
# What the export writes beside the model's files when the run used a tokenizer.json.
_TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE)
# Settings of the source's tokenizer_config.json that the export does not carry over: the
# tokenizer class and BOS/EOS switches (a Llama tokenizer class would rebuild the exported
# post-processor), remote code, and the special tokens the run names itself.
_NOT_CARRIED = ("tokenizer_class", "add_bos_token", "add_eos_token", "auto_map")
_ROTATION_RETRIES = 3  # newer steps taken when a run in the workdir removes the one being read


class ExportError(Exception):
    """The workdir has no checkpoint to export, or not one of this config's model."""


def export_policy(
    config: Any,
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    spec: RunSpec | None = None,
    mesh: Any = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Writes the policy of ``workdir``'s checkpoint ``step`` (default: the latest) to ``out``.

    The checkpoint is restored exactly as a resumed run restores it: the config must be the
    run's (``workdir/config.json``, compared as a resume compares it, so that settings the
    checkpoint's shapes do not show, such as ``model.rope_theta`` or the special tokens, are
    the trained ones), onto ``mesh`` (default: the config's layout on the first devices).

    Args:
        config: the run's config (as given to :func:`~novarl_jax.trainer.loop.train`).
        workdir: the run's ``--workdir``.
        out: the output directory; it must not hold a model already.
        step: which checkpoint (a finished step); None = the latest.
        spec: ``validate_config(config)``, if already computed.
        mesh: where to restore; None = the config's layout.
        allow_config_change: export although the config differs from the run's.

    Returns:
        ``{'step': the exported step, 'policy': out, 'critic': out/critic or None,
        'capacity_factor': the policy's training capacity factor (None: dropless, or dense)}``.

    Raises:
        ExportError: no checkpoint (or not ``step``) in ``workdir``, a checkpoint of another
            model, or ``out`` already holding a model.
        ConfigError: an invalid config, or one that differs from the run's (naming the key).
    """
    if jax.process_count() > 1:
        raise ExportError(
            "--export runs in one process; a checkpoint restores onto any layout, so set "
            "experiment.world_size and the parallel sizes to this host's devices instead"
        )
    for flag, path in (("--workdir", workdir), ("--export", out)):
        if url := url_path(path):
            raise ExportError(f"{flag}: {url}")
    spec = spec or validate_config(config)
    if mesh is not None:
        check_mesh(spec, mesh)
    run = build_run(spec)
    # Where each model goes; refused before the restore when one already holds a model.
    targets = {"policy": (out, run.model.policy)}
    if run.model.critic is not None:
        targets["critic"] = (os.path.join(out, "critic"), run.model.critic)
    directory = os.path.join(workdir, "checkpoints")
    if os.path.abspath(out) == os.path.abspath(workdir):
        raise ExportError(
            f"{out}: is the run's own workdir (checkpoints, metrics, config.json); export into "
            "a new directory"
        )
    if _inside(out, directory):
        raise ExportError(
            f"{out}: is inside the run's checkpoints directory {directory}, whose steps the "
            "run rotates and deletes; export outside it"
        )
    for target, _ in targets.values():
        held = checkpoint_files(target)
        held += [p for p in map(pathlib.Path(target).joinpath, _TOKENIZER_FILES) if p.exists()]
        if held:
            what = "a model" if held[0].name not in _TOKENIZER_FILES else "a tokenizer"
            raise ExportError(
                f"{target}: already holds {what} ({held[0].name}), which the export would "
                "replace; export into a new directory"
            )
    if not os.path.isdir(directory):
        raise ExportError(f"{workdir}: no checkpoints directory; was the run trained there?")
    changes = check_resume_config(
        workdir,
        config,
        allow_change=allow_config_change,
        log=lambda _: None,
        advice="export with the run's own config and overrides, or pass --allow_config_change",
        model=run.model.policy,
        tokenizer=run.tokenizer,
        stops=run.sampling.stops(run.tokenizer),
    )
    # The state to restore into is built (and compiled) before the steps are listed: a run
    # still training in the workdir rotates its old steps out meanwhile.
    mesh = default_mesh(spec) if mesh is None else mesh
    abstract = Trainer(run, workdir, mesh=mesh).abstract_state()
    wanted = step
    for attempt in range(_ROTATION_RETRIES + 1):
        checkpointer = Checkpointer(directory, async_save=False)
        try:
            steps = checkpointer.all_steps()
            if not steps:
                raise ExportError(f"{directory}: no finished checkpoint to export")
            if wanted is None:
                step = max(steps)
            elif wanted not in steps:
                raise ExportError(
                    f"{directory}: no checkpoint of step {wanted}; it has {sorted(steps)}"
                )
            try:
                state, _ = checkpointer.restore(abstract, step)
            except CheckpointMismatchError as e:
                note = allowed_changes_note(changes)
                older = [s for s in steps if s < step]
                if not note and older:  # the config is the run's own: the step may not be
                    note = (
                        f"; if step {step} is not this run's (copied in?), export another "
                        f"with --export_step={older[-1]}"
                    )
                raise ExportError(f"{e}{note}; pass the run's own config and overrides") from None
            except CheckpointUnreadableError as e:
                rotated = not os.path.isdir(os.path.join(directory, str(step)))
                if rotated and wanted is None and attempt < _ROTATION_RETRIES:
                    continue  # the run saved a newer step and removed this one: take that
                if rotated:  # not damaged: gone, so the damage advice would not apply
                    raise ExportError(
                        f"{directory}: step {step} was removed while the export read it (a run "
                        f"still training in the workdir rotates its old steps); it has "
                        f"{finished_steps(directory)} now: export one of those"
                    ) from None
                older = [s for s in steps if s < step]
                hint = (
                    f"; or export step {older[-1]} with --export_step={older[-1]}" if older else ""
                )
                raise ExportError(f"{e}{hint}") from None
            break
        finally:
            checkpointer.close()

    params = jax.device_get(state.params)
    tok = run.tokenizer
    # generate() should stop where training stopped: at the run's stop tokens.
    stops = [int(t) for t in run.sampling.stops(tok)]
    eos = stops[0] if len(stops) == 1 else stops
    token_ids = {"eos_token_id": eos, "pad_token_id": tok.pad_id}
    if tok.bos_id is not None:
        token_ids["bos_token_id"] = tok.bos_id
    from safetensors import SafetensorError

    existed = os.path.isdir(out)
    before = {t: set(os.listdir(t)) if os.path.isdir(t) else set() for t, _ in targets.values()}
    for name, (target, model) in targets.items():
        try:
            save_hf_model(target, model, params[name], token_ids=token_ids)
            _write_tokenizer(target, tok, spec.config)
        except (ValueError, OSError, SafetensorError) as e:
            # No half export is left behind (a later export into it would be refused).
            _remove_export(out, existed, before)
            if isinstance(e, ValueError):
                raise ExportError(str(e)) from None
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(  # a full disk, no permission
                f"{target}: the export could not be written ({type(e).__name__}: {cause}); "
                "free the space or fix the permissions, or export into another directory"
            ) from None
    critic = targets.get("critic")
    policy = run.model.policy
    return {
        "step": step,
        "policy": out,
        "critic": critic[0] if critic else None,
        "capacity_factor": policy.capacity_factor if policy.num_local_experts else None,
    }


def _remove_export(out: str, existed: bool, before: dict[str, set[str]]) -> None:
    """Removes what a failed export wrote: ``out`` itself when the export made it, else the
    model and tokenizer files it added to each target (``before``: the names each held)."""
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    names = [GENERATION_CONFIG_FILE, *_TOKENIZER_FILES]
    for target, held in before.items():
        for path in [*checkpoint_files(target), *(pathlib.Path(target) / n for n in names)]:
            if path.name not in held:
                with contextlib.suppress(OSError):
                    path.unlink()


def _write_tokenizer(directory: str, tokenizer: Any, config: Any) -> None:
    """With a tokenizer.json, the tokenizer files transformers loads with its special tokens.

    When the run's tokenizer file is a model directory's ``tokenizer.json``, the settings of
    the ``tokenizer_config.json`` beside it (a chat template, ``model_max_length``, ...) and a
    ``chat_template.jinja`` there are carried over; the special tokens are the run's (a BOS
    token only when the run has one)."""
    if not isinstance(tokenizer, HFTokenizer):
        return
    path = os.path.abspath(tokenizer_path(config))
    settings: dict = {}
    if os.path.basename(path) == TOKENIZER_FILE:  # another name: not a model directory's
        source = os.path.dirname(path)
        settings = read_tokenizer_config(source)
        template = os.path.join(source, CHAT_TEMPLATE_FILE)
        if os.path.isfile(template) and not _inside(template, directory):
            shutil.copyfile(template, os.path.join(directory, CHAT_TEMPLATE_FILE))
    settings = {k: v for k, v in settings.items() if k not in (*_NOT_CARRIED, "bos_token")}
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    # Training bypasses the file's post-processor and prepends BOS when the run has one:
    # the exported tokenizer adds exactly that (a BOS template, or nothing).
    exported = Tokenizer.from_str(tokenizer.to_json())
    if tokenizer.add_bos:
        bos = tokenizer.bos_token
        exported.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)]
        )
    else:
        exported.post_processor = None
    with open(os.path.join(directory, TOKENIZER_FILE), "w") as f:
        f.write(exported.to_str())
    special = {"eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}
    chat = tokenizer.chat_template
    if tokenizer.bos_token:
        special["bos_token"] = tokenizer.bos_token
    elif chat is not None and chat.special_tokens.get("bos_token"):
        # The carried template writes the BOS it was rendered with in training.
        special["bos_token"] = chat.special_tokens["bos_token"]
    _write_json(
        os.path.join(directory, TOKENIZER_CONFIG_FILE),
        {**settings, "tokenizer_class": "PreTrainedTokenizerFast", **special},
    )


def _inside(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or lies under it (symbolic links resolved)."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
