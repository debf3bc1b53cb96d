"""Helpers shared by the subcommands: config loading, checkpoint loading, named eval sets."""

from __future__ import annotations

import argparse
import os
import re


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The subcommands' help: the description and epilog keep their line breaks and indented lines
    (examples) as written, but a paragraph with a line wider than the terminal is wrapped to it,
    which RawDescriptionHelpFormatter leaves to the terminal (breaking words on an 80-column one)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        out: list[str] = []
        para: list[str] = []  # consecutive lines of prose (not blank, not indented)

        def flush() -> None:
            if any(len(indent + line) > width for line in para):
                wrap = dict(initial_indent=indent, subsequent_indent=indent, break_long_words=False)
                out.extend(textwrap.wrap(" ".join(para), width, break_on_hyphens=False, **wrap))
            else:
                out.extend(indent + line for line in para)
            para.clear()

        for line in text.splitlines():
            if line.strip() and not line[0].isspace():
                para.append(line)
                continue
            flush()
            out.append(indent + line)
        flush()
        return "\n".join(out) + "\n"


def config_with_overrides(name: str, overrides):
    """The run config ``name`` with ``--a.b V`` overrides applied. ``name``: a shipped config name, a
    TOML path, or a saved config: a run folder (the config it was last trained under), a checkpoint
    folder, an export-hf folder, or one of their config.json files."""
    from torchpeer.lm.config_io import apply_overrides, list_configs, load_config

    note_shadowed_config(name)
    saved = saved_config(name)
    if saved is not None:
        apply_overrides(saved, overrides)
        saved.validate()
        return saved
    if os.path.isdir(name):  # a folder without config.json: a sweep's folder of runs, say
        from torchpeer.lm.checkpoint import runs_below

        runs = runs_below(name)
        if runs:
            shown = ", ".join(runs[:8]) + (f" (and {len(runs) - 8} more)" if len(runs) > 8 else "")
            raise ValueError(f"{name} is a folder of {len(runs)} runs, not one run: give one of {shown}")
    try:
        return load_config(name, overrides)
    except FileNotFoundError:
        if os.path.isdir(name):  # 'neither a file nor a shipped config' would hide that it is a folder
            raise FileNotFoundError(
                f"{name} is a folder without config.json: not a run, checkpoint or export-hf folder (nor a "
                f"folder of runs); give one of those, a TOML file or a shipped config: {', '.join(list_configs())}"
            ) from None
        raise


def note_shadowed_config(name: str) -> None:
    """The rule when a bare name is both a path here and a shipped config (``ptb-tiny`` with a run
    folder ./ptb-tiny, e.g. after ``--run-dir ptb-tiny``): the path is used, as for any command
    argument. That is easy to miss (info prints the run's model under the config's name), so one
    note on stderr says which was used and how to give the other. ``./ptb-tiny`` or
    ``configs/ptb-tiny.toml`` is unambiguous and prints nothing; a folder that holds no config (an
    empty one) is no candidate: the shipped config is used, as before. Under torchrun only rank 0 says it."""
    import sys

    from torchpeer.lm.config_io import CONFIG_DIR

    if os.sep in name or (os.altsep and os.altsep in name) or not os.path.exists(name):
        return
    shipped = os.path.join(CONFIG_DIR, f"{name}.toml")
    if not os.path.isfile(shipped):
        return
    if os.path.isdir(name):
        from torchpeer.lm.checkpoint import runs_below

        if os.path.isfile(os.path.join(name, "config.json")):
            kind = "run folder" if os.path.isdir(os.path.join(name, "checkpoints")) else "folder with a saved config"
        elif runs_below(name):  # (refused next: 'a folder of N runs, not one run')
            kind = "folder of runs"
        else:
            return
    else:
        kind = "file"
    # configs/NAME.toml is read as the shipped config unless such a file exists here too
    other = f"configs/{name}.toml" if not os.path.exists(os.path.join("configs", f"{name}.toml")) else shipped
    if os.environ.get("RANK", "0") == "0":
        print(
            f"note: {name!r} is both a {kind} here and a shipped config; using the {kind} ./{name}; "
            f"for the shipped config give {other}",
            file=sys.stderr,
        )


def saved_config(path: str):
    """The RunConfig that a run folder, checkpoint folder or export-hf folder was saved with (or a
    config.json of one), or None when ``path`` is none of these (a config name or TOML file)."""
    import json

    from torchpeer.lm.config import RunConfig

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    run_folder = os.path.isdir(path) and os.path.isdir(os.path.join(path, "checkpoints"))
    if not file.endswith(".json") or not (os.path.isfile(file) or run_folder):
        return None
    try:
        if not os.path.isfile(file):
            raise ValueError(f"{file} is missing")
        with open(file, encoding="utf-8") as fh:
            try:
                raw = json.load(fh)
            except ValueError as e:
                raise ValueError(f"{file}: not a readable JSON config ({e})") from None
        if isinstance(raw, dict) and isinstance(raw.get("torchpeer"), dict):  # an export-hf folder's config.json
            raw = raw["torchpeer"]
        if not isinstance(raw, dict) or not {"model", "train", "data"} <= set(raw):
            raise ValueError(f"{file} is not a torchpeer run config (no model, train and data sections)")
    except (OSError, ValueError) as e:
        if run_folder:  # a hand edit gone wrong: the run's checkpoints hold the config it trained under
            return checkpoint_config_instead(path, e)
        raise ValueError(str(e)) if isinstance(e, ValueError) else ValueError(f"{file}: {e}") from None
    # a run folder's config.json also records what the run resolved (its op backends): not config fields
    return RunConfig.from_dict({k: v for k, v in raw.items() if k in ("name", "model", "train", "data")})


def checkpoint_config_instead(run_dir: str, why: Exception):
    """The config of the newest intact checkpoint of ``run_dir``, whose config.json is damaged or
    missing (``why``), with one note on stderr saying so; ``why`` itself when no checkpoint is intact.
    The file is left as it is: the run's next resume writes it anew (its history stays in configs/)."""
    import sys

    from torchpeer.lm.resume import saved_run_config

    try:
        cfg, ckpt = saved_run_config(run_dir)
    except (OSError, ValueError):
        raise ValueError(f"{why}; and {run_dir} has no intact checkpoint to read its config from") from None
    if os.environ.get("RANK", "0") == "0":
        print(
            f"note: {str(why).splitlines()[0]}; using the config of the run's newest intact checkpoint, "
            f"{os.path.basename(ckpt)} (a resume of the run writes config.json anew)",
            file=sys.stderr,
        )
    return cfg


def named_sources(items: list[str] | None, flag: str = "--data") -> dict[str, str]:
    """["a=ptb:test", "ptb:test", ...] -> {"a": "ptb:test", "ptb_test": "ptb:test"}: a bare source is
    named as ``torchpeer data --valid`` names it."""
    return parse_valid_args(items or [], flag)


def parse_valid_args(items: list[str], flag: str = "--valid") -> dict[str, str]:
    """["name=spec", "spec", ...] -> {name: spec}; a bare spec is named after its source (ptb:test ->
    ptb_test, corpus/*/valid.jsonl.xz -> valid; a second of the same name gets 2, 3, ...). A NAME=
    with an empty side ('=ptb:test', 'mine=') is a ValueError that says which side. ``flag``: the
    option the errors name (``torchpeer eval --data`` parses its sets here too)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if sep and not (name.strip() and spec.strip()) and not any(c in name for c in "/*?,:"):
            # '=ptb:test' or 'mine=': a NAME=SOURCE with a part left out (not a source of that name)
            empty = {(True, False): "the name before '=' is", (False, True): "the source after '=' is"}.get(
                (not name.strip(), not spec.strip()), "the name and the source around '=' are"
            )
            raise ValueError(
                f"{flag} {item!r}: {empty} empty; give NAME=SOURCE with both, e.g. test=ptb:test, "
                "or the source alone (ptb:test, named ptb_test)"
            )
        if not sep or any(c in name for c in "/*?,:"):  # a bare source (a path may hold '=')
            name, spec = _unique(source_name(item), out), item
        name = name.strip()
        if name in out:
            raise ValueError(f"{flag} name {name!r} is given twice; name them NAME=SPEC")
        out[name] = spec.strip()
    return out


def source_name(spec: str) -> str:
    """A short name for an eval set from its source spec: ptb:valid -> ptb (the configs' name for
    it), ptb:test -> ptb_test, a file, folder or glob -> its last part without extensions."""
    spec = spec.strip().split(",")[0]
    if spec.startswith("ptb:"):
        return "ptb" if spec == "ptb:valid" else "ptb_" + spec[4:]
    base = os.path.basename(os.path.normpath(spec)).split(".")[0]
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", base).strip("_")
    return name or "valid"


def _unique(name: str, taken) -> str:
    n, candidate = 1, name
    while candidate in taken:
        n += 1
        candidate = f"{name}{n}"
    return candidate


def _is_exported(path: str) -> bool:
    """An export-hf folder (config.json with a "torchpeer" section), not a checkpoint or run folder."""
    if not os.path.isfile(os.path.join(path, "config.json")) or os.path.isfile(os.path.join(path, "trainer.pt")):
        return False
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return False
    from torchpeer.hf import is_exported_folder  # optional interop package, imported only for such folders

    return is_exported_folder(path)


def load_for_inference(path: str, device):
    """(model in eval mode, RunConfig, checkpoint folder, tokenizer) from a checkpoint folder, a run
    folder (its newest intact checkpoint; damaged newer ones are named on stderr) or an ``export-hf``
    folder."""
    from torchpeer.lm.checkpoint import load_checkpoint_tokenizer, load_model_from_checkpoint

    path = os.path.normpath(path)  # 'runs/x/' (shell completion) names the same checkpoint as 'runs/x'
    if _is_exported(path):
        from torchpeer.hf import load_exported

        model, tok, cfg = load_exported(path, device)
        ckpt = path
    else:
        model, cfg, ckpt = load_model_from_checkpoint(path, device, read_dcp_weights=read_dcp_weights)
        tok = load_checkpoint_tokenizer(ckpt)
    if tok is None:
        from torchpeer.data import load_tokenizer

        tok = load_tokenizer(cfg.data)
    return model, cfg, ckpt, tok


def read_dcp_weights(model, path: str) -> None:
    """Weights of a distributed run's checkpoint (``dcp/``) through torchpeer.parallel, imported only
    here: the core does not import it, and its DCP module costs ~0.6 s to import."""
    from torchpeer.parallel.checkpoint import load_dcp_weights

    load_dcp_weights(model, path)
