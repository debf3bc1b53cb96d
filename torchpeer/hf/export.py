"""``torchpeer export-hf RUN_DIR OUT_DIR``: a torchpeer LM checkpoint as a transformers model folder.

    OUT_DIR/
      config.json                   TorchpeerConfig: the run config under "torchpeer", auto_map
      configuration_torchpeer.py    remote code (copied from torchpeer/hf/)
      modeling_torchpeer.py         TorchpeerForCausalLM, wraps torchpeer.lm.TransformerLM
      model.safetensors             the TransformerLM weights under the prefix "model."
      generation_config.json        bos/eos/pad = the tokenizer's end-of-text id
      tokenizer.json, tokenizer_config.json, special_tokens_map.json   (PreTrainedTokenizerFast)
      torchpeer_tokenizer/          the torchpeer tokenizer (for load_exported)
      torchpeer_origin.json         the checkpoint exported, and its step, tokens and training seconds

Load it with ``AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True)`` (offline; torchpeer must be
installed; without trust_remote_code the tokenizer's AutoConfig look-up asks on a terminal). The folder is
assembled under a temporary name and renamed into place, so a failure leaves no half folder.
Works for every FFW kind, since the modelling code builds torchpeer's own TransformerLM.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from torchpeer.hf._compat import require_transformers

REMOTE_FILES = ("configuration_torchpeer.py", "modeling_torchpeer.py")
ORIGIN_FILE = "torchpeer_origin.json"
AUTO_MAP = {
    "AutoConfig": "configuration_torchpeer.TorchpeerConfig",
    "AutoModelForCausalLM": "modeling_torchpeer.TorchpeerForCausalLM",
}


def _write_model(directory: str, model, cfg, eot_id: int) -> None:
    from transformers import GenerationConfig

    from torchpeer.hf.configuration_torchpeer import TorchpeerConfig
    from torchpeer.hf.modeling_torchpeer import TorchpeerForCausalLM

    config = TorchpeerConfig(torchpeer=cfg.to_dict(), bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["TorchpeerForCausalLM"]
    hf = TorchpeerForCausalLM(config, model=model)
    hf.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards: 100%" bar among export-hf's own lines
    try:
        hf.save_pretrained(directory)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in REMOTE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(directory, name))


def export_hf(run_dir: str, out_dir: str, overwrite: bool = False) -> str:
    """Export the latest checkpoint of ``run_dir`` (or checkpoint folder ``run_dir``) to ``out_dir``.

    Returns the checkpoint folder that was exported. ``out_dir`` must not exist unless ``overwrite``.
    """
    require_transformers()
    from torchpeer.data import load_tokenizer
    from torchpeer.data.atomic import plain_file_mode, write_json_atomic
    from torchpeer.hf.tokenizer_files import write_tokenizer
    from torchpeer.lm.checkpoint import (
        is_dcp_checkpoint,
        load_checkpoint_tokenizer,
        load_model_from_checkpoint,
        resolve_checkpoint,
    )

    if not os.path.exists(run_dir):
        raise FileNotFoundError(f"run dir {run_dir!r} does not exist")
    try:
        ckpt = resolve_checkpoint(run_dir)
    except FileNotFoundError as e:
        if "is a folder of" in str(e):  # a sweep's folder: the message lists its runs
            raise
        raise FileNotFoundError(
            f"{run_dir!r} holds no checkpoint (expected RUN_DIR/checkpoints/step_*/ or a checkpoint folder); "
            "train with checkpoints on (train.checkpoint = true) first"
        ) from None
    if os.path.exists(out_dir):
        check_replaceable(out_dir)  # a run folder, a data folder, /tmp, ...: refused even with overwrite
        if not overwrite:
            raise FileExistsError(f"{out_dir!r} already exists; choose a new folder or pass --overwrite")
    read_dcp_weights = None
    if is_dcp_checkpoint(ckpt):  # a distributed run's weights: torchpeer.parallel reads them (core does not)
        from torchpeer.parallel.checkpoint import load_dcp_weights as read_dcp_weights
    model, cfg, ckpt = load_model_from_checkpoint(ckpt, read_dcp_weights=read_dcp_weights)
    tok = load_checkpoint_tokenizer(ckpt) or load_tokenizer(cfg.data, progress=False)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export-hf.", suffix=".tmp")
    os.chmod(tmp, 0o755)
    try:
        _write_model(tmp, model, cfg, tok.eot_id)
        write_tokenizer(tmp, tok, cfg.model.seq_len)
        write_json_atomic(os.path.join(tmp, ORIGIN_FILE), checkpoint_origin(ckpt, cfg))
        for folder, _, names in os.walk(tmp):  # save_pretrained's safetensors files are 0600
            for name in names:
                plain_file_mode(os.path.join(folder, name))
        previous = None
        if os.path.exists(out_dir):  # --overwrite: move the old export aside, removed once the new one is in
            previous = tempfile.mkdtemp(dir=parent, prefix=".export-hf.", suffix=".old")
            os.replace(out_dir, previous)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return ckpt


def check_replaceable(out_dir: str) -> None:
    """An existing OUT_DIR may be replaced (with ``overwrite``) only when it is an earlier export or an
    empty folder: a run folder, a data folder or /tmp given by mistake would be deleted whole.
    ValueError (one line) otherwise."""
    from torchpeer.hf.exported import is_exported_folder

    if not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir!r} is a file; export-hf writes a folder: choose a new OUT_DIR")
    entries = sorted(os.listdir(out_dir))
    if entries and not is_exported_folder(out_dir):
        named = [e for e in entries if not e.startswith(".")] or entries  # not a run's .lock before its files
        shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        raise ValueError(
            f"{out_dir!r} already exists and is not an export-hf folder (it holds {shown}); export-hf replaces "
            "only an earlier export (--overwrite), so nothing was changed: choose a new OUT_DIR"
        )
    folders = [e for e in entries if os.path.isdir(os.path.join(out_dir, e)) and e != "torchpeer_tokenizer"]
    if folders:  # an export holds files only: a folder inside (a run trained there, say) is not ours to delete
        raise ValueError(
            f"{out_dir!r} is an export-hf folder with other folders inside ({', '.join(folders[:5])}); --overwrite "
            "would delete them, so nothing was changed: move them out or choose a new OUT_DIR"
        )


def checkpoint_origin(ckpt: str, cfg) -> dict:
    """{"checkpoint", "step", "tokens", "time"}: where a checkpoint stands in its training, counted
    from the start of its first ancestor when its run itself continued an export. Tokens and
    training seconds come from the run's metrics.jsonl (step x tokens per step without one)."""
    step = int(os.path.basename(os.path.normpath(ckpt)).split("_")[-1])
    t = cfg.train
    origin = {"checkpoint": os.path.abspath(ckpt), "step": step, "tokens": step * t.batch_size * t.grad_accum}
    origin["tokens"] *= cfg.model.seq_len
    origin["time"] = None
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    try:
        from torchpeer.viz.metrics import read_metrics

        run = read_metrics(run_dir)
    except (OSError, ValueError):  # a checkpoint folder outside its run, or a run without a log
        return origin
    tokens = run.tokens_at(step)
    time = run.train.get("time")
    origin["step"] = step + run.offset["step"]
    origin["tokens"] = (tokens if tokens is not None else origin["tokens"]) + run.offset["tokens"]
    if time and time.steps and time.steps[-1] >= step:
        import numpy as np

        origin["time"] = float(np.interp(step, [0, *time.steps], [0.0, *time.values])) + run.offset["time"]
    return origin


def read_origin(folder: str) -> dict | None:
    """The origin of an exported folder ({"step", "tokens", "time", ...}), or None (an export written
    before torchpeer_origin.json existed, or an unreadable one: then plots start the child at 0)."""
    import json

    try:
        with open(os.path.join(folder, ORIGIN_FILE), encoding="utf-8") as fh:
            origin = json.load(fh)
    except (OSError, ValueError):
        return None
    return origin if isinstance(origin, dict) else None


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers):
    """Register ``export-hf`` on an argparse subparsers object; returns the parser."""
    from torchpeer.cli.common import HelpFormatter

    p = subparsers.add_parser(
        "export-hf",
        help="write a checkpoint as a transformers model folder",
        description="Write the newest intact checkpoint of RUN_DIR (or a checkpoint folder) as a transformers model "
        "folder: config.json with auto_map, modelling code, safetensors weights and tokenizer files. Load it "
        "with AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True) and "
        "AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True). Needs the [hf] extra.",
        epilog="example:\n  torchpeer export-hf runs/ptb-tiny exports/ptb-tiny",
        formatter_class=HelpFormatter,  # prose wrapped to the terminal, the example as written
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder (its newest intact checkpoint) or checkpoint folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (must not exist)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR if it is an earlier export (or an empty folder)"
    )
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    try:
        require_transformers()
    except ImportError as e:
        raise ValueError(str(e)) from None  # the CLI prints ValueErrors as one line, exit 2
    try:
        ckpt = export_hf(args.run_dir, args.out_dir, overwrite=args.overwrite)
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    print(f"exported {ckpt} -> {args.out_dir}")
    return 0
