"""Data parallelism on CPU (2 processes) with sparse PEER/Engram tables, under NCCL's rules (gloo
collectives that refuse sparse tensors, `trainer=ddp_nccl_rules`), and each combination offered with it:
staggered freezing, on_non_finite=skip and bf16 tables; FSDP2 under the same rules (`trainer=fsdp2_nccl_rules`,
the tables replicated) equals one process too; FSDP1 with sparse tables is refused in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tsparse.checkpoint import load_checkpoint
from tsparse.checks import ConfigError
from tsparse.distributed import average_row_sparse_grads_, shard_
from tsparse.nccl_rules import BACKEND, SparseCollectiveError, register
from tsparse.optim import SparseAwareAdamW
from tsparse.scaleout import checkpoint_bytes, table_traffic_bytes
from tsparse.train import check

ARGS = ("sparse=hybrid", "peer.num_experts=256", "peer.key_dim=16", "engram.dim_per_order=32",
        "engram.heads_per_order=2", "trainer.max_steps=4", "trainer.val_check_interval=4", "test=false",
        "optim.grad_clip=0")


EVERY_STEP_CHECKPOINT = ("callbacks.model_checkpoint.every_n_train_steps=1", "callbacks.model_checkpoint.monitor=null",
                         "callbacks.model_checkpoint.save_top_k=-1")

# Scripts that patch tsparse.train's process (the launcher re-runs the script for rank 1, so a patch holds there).
# Each call to write a checkpoint is logged with its rank.
RECORD_SAVES = """
import os
import torch.distributed as dist
from tsparse.checkpoint import AtomicCheckpointIO
save = AtomicCheckpointIO.save_checkpoint
def recorded(self, checkpoint, path, storage_options=None):
    with open(os.environ["TSPARSE_TEST_SAVES"], "a") as log:
        log.write(f"{dist.get_rank() if dist.is_initialized() else -1}\\n")
    return save(self, checkpoint, path, storage_options)
AtomicCheckpointIO.save_checkpoint = recorded
"""
# Step 2's loss is NaN on the last rank: rank 1 of 2, or the one process, whose global batch holds rank 1's samples.
NAN_AT_STEP_2 = """
from tsparse.lit_module import CausalLMModule
loss = CausalLMModule.loss
def faulty(self, ids):
    out = loss(self, ids)
    hit = self.training and self.global_step == 2 and self.global_rank == self.trainer.world_size - 1
    return out * float("nan") if hit else out
CausalLMModule.loss = faulty
"""
MAIN = "from tsparse.train import main\nmain()\n"


@pytest.fixture
def cli_args(nano):
    def args(tmp_path, data_dir, *extra):
        return [a for a in nano(tmp_path, data_dir, *ARGS, *extra) if not a.startswith("paths.output_dir")] + [
            f"hydra.run.dir={tmp_path / 'run'}"]

    return args


def results(tmp_path, name):
    return json.loads((tmp_path / name / "run" / "results.json").read_text())


def tables(tmp_path, name, checkpoint="last.ckpt") -> dict[str, torch.Tensor]:
    """The PEER and Engram tables of a run's checkpoint (whole, also when sharded: `load_checkpoint`)."""
    state = load_checkpoint(tmp_path / name / "run" / "checkpoints" / checkpoint, tables=True)["state_dict"]
    return {k: v.float() for k, v in state.items() if k.endswith((".down.weight", ".up.weight", ".table.weight"))}


@pytest.fixture
def nccl_rules_group():
    """A 1-rank NCCL-rules default process group in this process, destroyed afterwards."""
    register()
    dist.init_process_group(BACKEND, store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_nccl_rules_refuses_sparse_tensors_and_the_old_ddp_path(nccl_rules_group):
    dense = torch.ones(3)
    dist.all_reduce(dense)
    assert dense.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(SparseCollectiveError, match="NCCL has no sparse collectives"):
        dist.all_reduce(torch.eye(3).to_sparse())
    # The old path: a sparse table inside DDP's reducer needs a sparse all-reduce.
    old = DistributedDataParallel(nn.Embedding(10, 4, sparse=True))
    with pytest.raises(SparseCollectiveError):
        old(torch.tensor([1, 2])).sum().backward()


def _average_on_two_ranks(rank: int, store_file: str, out_dir: str) -> None:
    register()
    dist.init_process_group(BACKEND, init_method=f"file://{store_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    touched = {0: ([1, 5, 5], [7]), 1: ([5, 2], None)}[rank]  # rank 1 touches nothing in table b
    params = [nn.Parameter(torch.zeros(8, 3)), nn.Parameter(torch.zeros(9, 2, dtype=torch.bfloat16))]
    for p, rows in zip(params, touched):
        if rows is not None:
            nn.functional.embedding(torch.tensor(rows), p, sparse=True).mul(torch.randn(len(rows), p.shape[1])).sum().backward()
    local = [None if p.grad is None else p.grad.to_dense() for p in params]
    average_row_sparse_grads_(params)
    torch.save({"local": local, "averaged": [p.grad for p in params]}, Path(out_dir) / f"{rank}.pt")
    dist.destroy_process_group()


def test_row_sparse_average_over_two_ranks_equals_the_dense_mean(tmp_path):
    """Different row counts per rank (padding), repeated rows, a rank with no grad, a bf16 table: every
    rank gets the mean of the dense grads, as a coalesced sparse grad, through NCCL-rules collectives."""
    mp.spawn(_average_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    for i, shape in enumerate([(8, 3), (9, 2)]):
        local = [r["local"][i] if r["local"][i] is not None else torch.zeros(shape) for r in ranks]
        mean = (local[0].float() + local[1].float()) / 2
        for r in ranks:
            got = r["averaged"][i]
            assert got.is_sparse and got.is_coalesced() and got.dtype == local[0].dtype
            torch.testing.assert_close(got.to_dense().float(), mean, rtol=1e-2 if i else 1e-6, atol=0)
    assert ranks[0]["averaged"][0]._indices().tolist() == [[1, 2, 5]]


def _table_traffic_on_two_ranks(rank: int, store_file: str, out_dir: str) -> None:
    register()
    dist.init_process_group(BACKEND, init_method=f"file://{store_file}", rank=rank, world_size=2)
    traffic = {}
    for rows in (100, 1_000_000):
        table = nn.Parameter(torch.zeros(rows, 8))
        nn.functional.embedding(torch.tensor([[3, 3, 50], [7, 99, 0]][rank]), table, sparse=True).sum().backward()
        dist.group.WORLD.tensor_bytes.clear()
        average_row_sparse_grads_([table])
        traffic[rows] = sum(dist.group.WORLD.tensor_bytes.values())
    torch.save(traffic, Path(out_dir) / f"{rank}.pt")
    dist.destroy_process_group()


def test_table_traffic_through_the_nccl_rules_group_never_grows_with_the_table(tmp_path):
    """Bytes handed to the collectives for one table's exchange, measured on the NCCL-rules group: the same for
    100 and 1,000,000 rows; per all-gather, the input plus world-size outputs of (row count, rows x (8-byte index
    + dim fp32 values)), padded to the larger row count (3: rank 1's three distinct rows)."""
    mp.spawn(_table_traffic_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        traffic = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert traffic[100] == traffic[1_000_000] == (1 + 2) * (8 + 3 * 8 + 3 * 8 * 4)


def _fsdp2_on_two_ranks(rank: int, store_file: str, out_dir: str) -> None:
    register()
    dist.init_process_group(BACKEND, init_method=f"file://{store_file}", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    torch.manual_seed(0)
    model = nn.Module()
    model.table = nn.Embedding(10, 4, sparse=True)
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    shard_(model, init_device_mesh("cpu", (2,)), [model.table.weight])
    x = model.table(torch.tensor([rank, 5]))
    for layer in model.model.layers:
        x = layer(x)
    x.square().sum().backward()
    average_row_sparse_grads_([model.table.weight])
    refused = ""
    try:
        dist.all_reduce(model.table.weight.grad)
    except SparseCollectiveError as err:
        refused = str(err)
    full = {name: p.grad.full_tensor() for name, p in model.model.named_parameters()}
    torch.save({"calls": dist.group.WORLD.calls, "refused": refused, "table": model.table.weight.grad.to_dense(),
                "full": full}, Path(out_dir) / f"{rank}.pt")
    dist.destroy_process_group()


def test_fsdp2_collectives_all_go_through_the_nccl_rules_group(tmp_path):
    """fully_shard on the NCCL-rules group (DeviceMesh finds its name): FSDP2's all-gathers and reduce-scatters,
    DTensor's full_tensor and the tables' exchange all run through its dense-only collectives, which refuse
    a sparse all-reduce; both ranks end with the same grads."""
    mp.spawn(_fsdp2_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        assert {"all_gather_single", "reduce_scatter_single", "allgather_into_tensor_coalesced", "allgather"} <= set(r["calls"])
        assert "NCCL has no sparse collectives" in r["refused"]
    torch.testing.assert_close(ranks[0]["table"], ranks[1]["table"], rtol=0, atol=0)
    assert ranks[0]["table"][[0, 1, 5]].abs().sum(1).gt(0).all()  # rank 0's row, rank 1's row, the shared row
    for name, grad in ranks[0]["full"].items():
        torch.testing.assert_close(grad, ranks[1]["full"][name], rtol=0, atol=0)


TRIPLE_STAGGERED = ("sparse=triple", "strategy=staggered", "strategy.phase_steps=2")
BF16_TABLES = ("peer.table_dtype=bfloat16", "engram.table_dtype=bfloat16")
SHARDED = ("tables=sharded",)


@pytest.mark.parametrize("trainer, extra, nan", [  # joint (about 30 s on 2 cores each) is in the fast suite
    pytest.param("ddp_nccl_rules", (), False, id="joint"),
    pytest.param("ddp_nccl_rules", TRIPLE_STAGGERED, False, id="staggered", marks=pytest.mark.slow),
    pytest.param("ddp_nccl_rules", ("optim.on_non_finite=skip",), True, id="skip", marks=pytest.mark.slow),
    pytest.param("ddp_nccl_rules", BF16_TABLES, False, id="bf16-tables", marks=pytest.mark.slow),
    pytest.param("fsdp2_nccl_rules", (), False, id="fsdp2-joint"),
    pytest.param("fsdp2_nccl_rules", TRIPLE_STAGGERED, False, id="fsdp2-staggered", marks=pytest.mark.slow),
    pytest.param("ddp_nccl_rules", SHARDED, False, id="sharded-joint"),
    pytest.param("ddp_nccl_rules", (*SHARDED, *TRIPLE_STAGGERED), False, id="sharded-staggered", marks=pytest.mark.slow),
    pytest.param("ddp_nccl_rules", (*SHARDED, *BF16_TABLES), False, id="sharded-bf16", marks=pytest.mark.slow),
    pytest.param("ddp_nccl_rules", (*SHARDED, "optim.on_non_finite=skip"), True, id="sharded-skip", marks=pytest.mark.slow),
    pytest.param("fsdp2_nccl_rules", SHARDED, False, id="sharded-fsdp2", marks=pytest.mark.slow),
    pytest.param("ddp_nccl_rules", (*SHARDED, *TRIPLE_STAGGERED, "model.activation_checkpointing=true"), False,
                 id="sharded-activation-checkpointing", marks=pytest.mark.slow)])
def test_ddp_two_processes_equal_one_process_with_the_global_batch(trainer, extra, nan, tmp_path, wikitext_small,
                                                                   cli_args, repo):
    """Rank r reads positions r, r+2, ... of the same step-indexed stream, so 2 ranks x batch 4 see the
    samples of 1 process x batch 8 and, with averaged gradients (the tables' through dense all-gathers),
    take the same step under NCCL's rules; also when phases freeze groups after DDP registered its hooks
    (staggered), when one rank's loss is NaN (both skip that step, as one process does), with bf16 tables,
    and under FSDP2 (`trainer=fsdp2_nccl_rules`), which shards the rest and keeps the tables whole. Rank 0
    alone writes the checkpoints.

    Each step is compared from the same state: the first from the same init, the last from the 2-rank
    run's step-3 checkpoint (step 2 with the NaN, whose skip one process then takes too). From scratch,
    the runs drift apart after step 1 exactly as one process does when only its summation order changes
    (2 micro-batches of 4): Adam's and row-wise AdaGrad's early updates are normalised, so rounding-level
    differences of near-zero grads decide their sign. Measured
    after 4 steps over seeds 0-2: val loss up to 2.6e-4 apart under DDP and 3.1e-4 with micro-batches
    (fp32 tables), 1.8e-3 and 2.4e-3 (bf16 tables); from the same state: at most 7e-6."""
    extra = (*extra, *EVERY_STEP_CHECKPOINT)
    script = tmp_path / "train.py"
    script.write_text(RECORD_SAVES + (NAN_AT_STEP_2 if nan else "") + MAIN)

    def train(name, *args):
        env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TSPARSE_TEST_SAVES": str(tmp_path / name / "saves")}
        return subprocess.run([sys.executable, str(script), *cli_args(tmp_path / name, wikitext_small, *extra, *args)],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=600)

    ddp = train("ddp", f"trainer={trainer}", "data.batch_size=4")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert f"distributed_backend={BACKEND}" in ddp.stdout + ddp.stderr
    saves = (tmp_path / "ddp" / "saves").read_text().split()
    assert len(saves) >= 4 and set(saves) == {"0"}  # rank 0 alone wrote the checkpoints
    first = train("first", "data.batch_size=8", "trainer.max_steps=1")  # constant LRs: max_steps changes none
    assert first.returncode == 0, first.stderr[-3000:]
    # The last step from the same state (with NaN: the skipped step too, then the last step)
    resume = tmp_path / "ddp" / "run" / "checkpoints" / ("step000002.ckpt" if nan else "step000003.ckpt")
    last = train("last", "data.batch_size=8", f"ckpt_path={resume}")
    assert last.returncode == 0, last.stderr[-3000:]
    a, b = results(tmp_path, "ddp"), results(tmp_path, "last")
    assert a["global_step"] == b["global_step"] == 4 and a["skipped_steps"] == b["skipped_steps"] == int(nan)
    if nan:  # both ranks skipped the step at global_step 2 (rank 1's NaN): rank 0's tables did not move
        before, after = tables(tmp_path, "ddp", "step000002.ckpt"), tables(tmp_path, "ddp", "step000003.ckpt")
        for name, table in before.items():
            assert torch.equal(after[name], table), name
    assert a["val/loss"] == pytest.approx(b["val/loss"], abs=1e-4)
    for one, checkpoint in (("first", "step000001.ckpt"), ("last", "step000004.ckpt")):
        got, want = tables(tmp_path, "ddp", checkpoint), tables(tmp_path, one, checkpoint)
        assert got.keys() == want.keys() and len(got) == 6  # 2 Engram + 2 x 2 PEER tables
        for name, table in want.items():  # measured: at most 5e-7, bf16 tables included
            error = (got[name] - table).norm(dim=1) / table.norm(dim=1).clamp_min(1e-12)
            assert error.max() <= 1e-5, (checkpoint, name, error.max().item())


@pytest.mark.parametrize("tables", [("sparse=peer",), ("sparse=hybrid", "peer.sparse_grad=false")])
def test_fsdp_with_sparse_tables_is_refused_in_one_line(tables, tmp_path, compose, nano):
    with pytest.raises(ConfigError, match="cannot shard sparse gradients") as err:
        check(compose(nano(tmp_path, tmp_path, *tables, "trainer=fsdp")))
    assert "\n" not in str(err.value) and "sparse_grad=false" in str(err.value) and "trainer=ddp" in str(err.value)
    check(compose(nano(tmp_path, tmp_path, "sparse=hybrid", "peer.sparse_grad=false", "engram.sparse_grad=false",
                       "trainer=fsdp")))  # dense tables: allowed


def test_bf16_table_updates_are_rounded_to_bf16():
    """Documented behaviour: a bf16 table stores the row-wise AdaGrad update in bf16, so a row moves only
    if the update is at least half the bf16 spacing at its value (2**-8 at 1.0); a float32 table moves."""
    moved = {}
    for dtype, lr in ((torch.float32, 1e-3), (torch.bfloat16, 1e-3), (torch.bfloat16, 0.1)):
        table = nn.Embedding(4, 8, sparse=True, dtype=dtype)
        nn.init.ones_(table.weight)
        optimizer = SparseAwareAdamW([{"name": "peer", "params": [table.weight]}], lr=lr)
        table(torch.tensor([1])).sum().backward()
        optimizer.step()
        moved[dtype, lr] = (1.0 - table.weight[1].float()).mean().item()
    assert moved[torch.float32, 1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert moved[torch.bfloat16, 1e-3] == 0.0  # 1 - 1e-3 rounds back to 1.0 in bf16
    assert moved[torch.bfloat16, 0.1] == pytest.approx(0.1, abs=2**-8)


def test_table_traffic_grows_with_touched_rows_dim_and_world_never_with_table_size(tmp_path, compose, nano):
    def traffic(world, *extra):
        cfg = compose(nano(tmp_path, tmp_path, "sparse=peer", "peer.key_dim=16", "data.batch_size=1",
                           "data.block_size=8", *extra))
        return cfg, table_traffic_bytes(cfg, world)

    cfg, small = traffic(2, "peer.num_experts=1024")
    rows = 8 * cfg.peer.heads * cfg.peer.top_k  # tokens x lookups, below the table's 1024 rows
    tables = 2 * len(cfg.peer.layers)
    assert small == 2 * tables * rows * (cfg.model.config.hidden_size * 4 + 8)
    assert traffic(2, "peer.num_experts=4096")[1] == small
    assert traffic(8, "peer.num_experts=1024")[1] == 4 * small
    assert traffic(2, "peer.num_experts=1024", "peer.table_dtype=bfloat16")[1] == 2 * tables * rows * (
        cfg.model.config.hidden_size * 2 + 8)
    assert traffic(2, "peer.num_experts=64")[1] == 2 * tables * 64 * (cfg.model.config.hidden_size * 4 + 8)  # capped


def test_checkpoint_bytes_match_a_written_checkpoint(tmp_path, wikitext_small, compose, nano, small_modules, tiny_run):
    tiny_run(tmp_path, wikitext_small, tmp_path / "run", "sparse=triple", "test=false")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    tensors = [*ckpt["state_dict"].values(), *(v for s in ckpt["optimizer_states"][0]["state"].values()
                                                for k, v in s.items() if k != "step")]
    written = sum(t.numel() * t.element_size() for t in tensors)
    assert checkpoint_bytes(compose(nano(tmp_path, wikitext_small, "sparse=triple", *small_modules))) == written
