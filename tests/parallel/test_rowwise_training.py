"""train.expert_optimizer=rowwise_adam and elementwise_adam under the DistributedPlan (2 gloo
processes, the fused update in Triton's interpreter): the column-sharded run leaves the parameters
of the one-process run; its checkpoint (the table optimizer's state in dcp/) resumes exactly on 2
processes and on one (under torchrun); a one-process checkpoint continues on 2; replicated tables
on 2 ranks are refused."""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the spawned ranks

pytest.importorskip("triton")

from tests.parallel.rowwise_workers import branch_at_step_2, config, rowwise_runs  # noqa: E402
from tests.parallel.spawn import free_port, run_workers  # noqa: E402
from tests.parallel.train_workers import write_tiny  # noqa: E402


def _final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    from torchpeer.lm.checkpoint import load_model_from_checkpoint
    from torchpeer.parallel.checkpoint import load_dcp_weights

    model, _, path = load_model_from_checkpoint(run_dir, read_dcp_weights=load_dcp_weights, say=lambda *_: None)
    assert path.endswith("step_00000003"), path
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh) if "loss" in r}


def _assert_close(got: dict, want: dict) -> None:
    """fp32 sums in another order; one Adam step moves a weight by up to lr = 3e-3. The tables (the
    row-wise update) within 1e-6 absolute (measured 6e-8); the AdamW parameters within 1e-5 (measured
    8e-7: an element whose gradient is near zero takes an Adam step that amplifies the noise)."""
    assert got.keys() == want.keys()
    for k, v in want.items():
        atol = 1e-6 if k.endswith(("ffw.down", "ffw.up")) else 1e-5
        assert (got[k] - v).abs().max() <= atol, (k, (got[k] - v).abs().max())


@pytest.mark.parametrize("optimizer", ["rowwise_adam", "elementwise_adam"])
def test_rowwise_adam_on_2_ranks_equals_one_process_and_resumes_on_2_and_1(tmp_path, monkeypatch, optimizer):
    import torch.distributed.checkpoint as dcp

    from torchpeer.lm.train import train
    from torchpeer.parallel import DistributedPlan
    from torchpeer.parallel.plan import OneProcessDCPPlan

    cfg_path = write_tiny(str(tmp_path))
    train(config(cfg_path, optimizer), str(tmp_path / "ref"), progress=False)  # one process, checkpoints at 2 and 3
    run_workers(rowwise_runs, 2, cfg_path, str(tmp_path), optimizer)
    # the 2-rank step-2 checkpoint (row-wise state: column shards + replicated rows) resumed under
    # torchrun with one process (this one: whole tables, DDP around the rest)
    branch_at_step_2(str(tmp_path / "wide"), str(tmp_path / "wide_to_one"))
    torchrun = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for k, v in torchrun.items():
        monkeypatch.setenv(k, v)
    train(
        config(cfg_path, optimizer), str(tmp_path / "wide_to_one"), resume=True, progress=False, plan=DistributedPlan()
    )

    with open(tmp_path / "wide" / "config.json") as fh:  # the sharded layer ran (its fused op on my columns)
        assert json.load(fh)["backends"]["blocks.1.ffw"]["expert_mix"].startswith("column_sharded_")
    # the table optimizer's state is in dcp/ with the full tables' shapes, not in trainer.pt (an element-wise
    # second moment sharded by columns like the first, a row-wise one replicated)
    ckpt = tmp_path / "wide" / "checkpoints" / "step_00000002"
    meta = dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    assert tuple(meta["table_optim.blocks.1.ffw.down.exp_avg"].size) == (16, 32)
    elementwise = optimizer == "elementwise_adam"
    assert tuple(meta["table_optim.blocks.1.ffw.up.exp_avg_sq"].size) == ((16, 32) if elementwise else (16,))
    assert tuple(meta["table_optim.blocks.1.ffw.up.steps"].size) == (16,)
    saved = torch.load(ckpt / "trainer.pt", weights_only=False)["table_optimizer"]
    assert set(saved) == {"hyper", "elementwise", "dcp"} and "optim.blocks.1.ffw.down.exp_avg" not in meta
    assert saved["elementwise"] == elementwise

    branch_at_step_2(str(tmp_path / "wide"), str(tmp_path / "wide_adamw"))
    adamw = config(cfg_path, "adamw")
    with pytest.raises(ValueError, match=f"trained with train.expert_optimizer={optimizer}; resume with {optimizer}"):
        train(adamw, str(tmp_path / "wide_adamw"), resume=True, progress=False, plan=OneProcessDCPPlan())
    other = config(cfg_path, "rowwise_adam" if elementwise else "elementwise_adam")  # the other second moment
    with pytest.raises(ValueError, match="set train.expert_optimizer to the checkpoint's kind"):
        train(other, str(tmp_path / "wide_adamw"), resume=True, progress=False, plan=OneProcessDCPPlan())

    ref, wide = _final_weights(tmp_path / "ref"), _final_weights(tmp_path / "wide")
    _assert_close(wide, ref)  # the one-process parameters, the tables included
    _assert_close(_final_weights(tmp_path / "one_to_wide"), ref)  # a one-process checkpoint continued on 2
    _assert_close(_final_weights(tmp_path / "wide_to_one"), ref)  # 2 ranks' checkpoint resumed on one
    resumed = _final_weights(tmp_path / "wide_resumed")
    for k, v in wide.items():  # resumed on 2 ranks: the uninterrupted run, bit for bit
        assert torch.equal(resumed[k], v), k
    ref_losses = _losses(tmp_path / "ref")
    assert sorted(ref_losses) == [1, 2, 3]
    for name in ("wide", "wide_resumed", "one_to_wide", "wide_to_one"):
        losses = _losses(tmp_path / name)
        assert losses.keys() == ref_losses.keys(), name
        for step, loss in ref_losses.items():
            assert losses[step] == pytest.approx(loss, rel=1e-5), (name, step)
