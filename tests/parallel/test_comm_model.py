"""The per-rank time model of one PEER layer (torchpeer/parallel/comm.py: peer_time_model), as
docs/parallel.md quotes it: consistent with the byte model and with one GPU."""

import pytest

from torchpeer.parallel import comm


def test_one_rank_is_the_one_gpu_layer():
    m = comm.peer_time_model(T=32768, d=1024, hk=128, W=1)
    rows = 32768 * 128 * 1024 * 16  # fp32 u, v rows forward; bf16 x, dy rows and an fp32 u row backward
    mix = (rows + 32768 * 128 * comm.SCALAR_BYTES) / (comm.HBM_TBS * 1e9)
    for split in comm.SPLITS:
        assert m[split]["sent_mb"] == 0 and m[split]["comm_ms"] == 0
        assert m[split]["router_ms"] == pytest.approx(32768 * comm.ROUTER_US_PER_TOKEN * 1e-3)
        assert m[split]["mix_ms"] == pytest.approx(mix)


@pytest.mark.parametrize("W", [2, 8, 64])
def test_splits_against_the_byte_model(W):
    T, d, hk = 32768, 512, 128
    m = comm.peer_time_model(T, d, hk, W)
    # columns sends what communication_per_step counts for a PEER layer
    assert m["columns"]["sent_mb"] * 1e6 == pytest.approx(sum(comm._peer_columns(T, d, hk, W, 2).values()))
    # the replicated router is what columns does not divide; splitting retrieval divides it by W
    one = comm.peer_time_model(T, d, hk, 1)["columns"]["router_ms"]
    assert m["columns"]["router_ms"] == one
    assert m["columns_split_retrieval"]["router_ms"] == pytest.approx(one / W)
    assert m["columns"]["mix_ms"] == m["columns_split_retrieval"]["mix_ms"] > m["rows_by_expert"]["mix_ms"]
    link = comm.LINK_GBS["nvlink" if W <= 8 else "network"]
    for split in comm.SPLITS:
        c = m[split]
        assert c["comm_ms"] == pytest.approx(c["sent_mb"] * 1e6 / (link * 1e9) * 1e3)
        assert c["total_ms"] == pytest.approx(c["router_ms"] + c["mix_ms"] + c["comm_ms"])


def test_time_table_cli(capsys):
    comm.main(["--time-model", "--world", "2", "8", "--d-model", "1024"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 1024 | 2 | 350 |")
