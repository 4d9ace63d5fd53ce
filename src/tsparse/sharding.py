"""Row-sharded tables (`tables=sharded`): each PEER and Engram table split by rows over the data-parallel ranks.

Rank r of W holds rows [r*B, (r+1)*B) with B = ceil(N / W) (torch.chunk's split, which DTensor's Shard(0)
describes) and the row-wise AdaGrad state of those rows (the optimizer steps the shard it is given). A
lookup sends each index to the rank that owns its row (`all_to_all_single`) and gets the row back; backward
sends each looked-up row's gradient to its owner, which sums them in fp32, divides by W (as DDP averages)
and keeps them as the sparse gradient of its shard. Only dense collectives run, on a process group of their
own. Per step and rank they carry the rank's lookups (tokens x rows per token) as indices, rows and row
gradients, plus W counts per exchange: nothing grows with the table's size, nor with W at a fixed per-rank
batch. PEER's expert mix runs in token chunks (`CHUNK_BYTES` of rows each), so no buffer holds all rows.

Checkpoints (`save_tables` / `restore_tables`) write the shards through torch.distributed.checkpoint, each
rank its own, into a folder beside the Lightning checkpoint, which records its name; any number of ranks,
sharded or not, reads them back (DCP reshards).
"""
from __future__ import annotations

import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from tsparse.modules.protocol import SparseModule

CHUNK_BYTES = 64 << 20   # fp32 rows one chunk of PEER's sharded expert mix fetches, per table
KEY = "sharded_tables"   # the Lightning checkpoint's record of its tables folder
STATE = "row_sq_sum"     # row-wise AdaGrad's per-row state (optim.SparseAwareAdamW)


class RowShards:
    """Which rank of `group` owns which rows of an N-row table: contiguous blocks of ceil(N / W) rows."""

    def __init__(self, num_rows: int, group):
        self.num_rows, self.group = num_rows, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.block = -(-num_rows // self.world)
        self.start = min(self.rank * self.block, num_rows)
        self.stop = min(self.start + self.block, num_rows)


def all_to_all(x: Tensor, out_counts: list[int], in_counts: list[int], group) -> Tensor:
    """Rows x[sum(in_counts[:r]) ...] go to rank r; returns the rows received, in rank order."""
    out = x.new_empty(sum(out_counts), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_counts, in_counts, group=group)
    return out


class Route:
    """Where this rank's lookups `idx` (flat global row indices) go: sorted by owner, the counts exchanged,
    and each owner told which of its rows were asked for (`asked`: local row indices, in arrival order)."""

    def __init__(self, shards: RowShards, idx: Tensor):
        self.group = shards.group
        owner, self.order = torch.div(idx, shards.block, rounding_mode="floor").sort(stable=True)
        sent = torch.bincount(owner, minlength=shards.world)
        ones = [1] * shards.world
        self.sent, self.received = sent.tolist(), all_to_all(sent, ones, ones, self.group).tolist()
        self.asked = all_to_all(idx[self.order] - owner * shards.block, self.received, self.sent, self.group)

    def fetch(self, table: Tensor) -> Tensor:
        """The rows of the lookups, in their order, from this rank's shard `table` and the others'."""
        got = all_to_all(table.index_select(0, self.asked), self.sent, self.received, self.group)
        return torch.empty_like(got).index_copy_(0, self.order, got)

    def push(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        """Send each lookup's row gradient (`grads`, in lookup order) to the row's owner; returns the
        (local rows, gradients) this rank received."""
        return self.asked, all_to_all(grads[self.order], self.received, self.sent, self.group)


class ShardGrad:
    """The row gradients a shard received, summed in fp32 (merged whenever they outnumber the shard's rows, so
    they never take more than twice the touched rows); `grad()` is the shard's sparse gradient."""

    def __init__(self, shards: RowShards, table: Tensor):
        self.shape, self.dtype, self.world = table.shape, table.dtype, shards.world
        self.rows, self.values, self.count = [], [], 0

    def add(self, rows: Tensor, values: Tensor) -> None:
        self.rows.append(rows)
        self.values.append(values.float())
        self.count += len(rows)
        if self.count > self.shape[0]:
            self._merge()

    def _merge(self) -> None:
        summed = torch.sparse_coo_tensor(torch.cat(self.rows)[None], torch.cat(self.values), self.shape,
                                         check_invariants=False).coalesce()
        self.rows, self.values, self.count = [summed.indices()[0]], [summed.values()], summed._nnz()

    def grad(self) -> Tensor | None:
        if not self.count:
            return None
        self._merge()
        values = self.values[0].div_(self.world).to(self.dtype)
        return torch.sparse_coo_tensor(self.rows[0][None], values, self.shape, is_coalesced=True,
                                       check_invariants=False)


class ShardedLookup(torch.autograd.Function):
    """table[idx] for a row-sharded table (Engram's): idx [...] global rows -> rows [..., dim] in the table dtype."""

    @staticmethod
    def forward(ctx, idx: Tensor, table: Tensor, shards: RowShards):
        ctx.route, ctx.shards, ctx.table = Route(shards, idx.reshape(-1)), shards, table.detach()
        return ctx.route.fetch(table).view(*idx.shape, table.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.needs_input_grad[1]:
            return None, None, None
        acc = ShardGrad(ctx.shards, ctx.table)
        acc.add(*ctx.route.push(grad.reshape(-1, grad.shape[-1]).float()))
        return None, acc.grad(), None


def agreed_chunks(tokens: int, bytes_per_token: int, group) -> list[slice]:
    """Token chunks of at most CHUNK_BYTES, as many on every rank of `group` (the exchanges are collective)."""
    count = torch.tensor([-(-tokens * bytes_per_token // CHUNK_BYTES)])
    dist.all_reduce(count, dist.ReduceOp.MAX, group=group)
    step = -(-tokens // max(1, int(count)))
    return [slice(min(i * step, tokens), min((i + 1) * step, tokens)) for i in range(int(count))]


class ShardedExpertMix(torch.autograd.Function):
    """PEER's `ExpertMix` over row-sharded `down`/`up` tables: the same sums, the rows fetched per token chunk
    in forward and again in backward (nothing the size of all looked-up rows is kept)."""

    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor, gate: Tensor, down: Tensor, up: Tensor, shards: RowShards):
        (m, n), d = idx.shape, x.shape[1]
        chunks = agreed_chunks(m, 2 * n * d * 4, shards.group)
        pre, out = x.new_empty(m, n), x.new_empty(m, d)
        for c in chunks:
            route = Route(shards, idx[c].reshape(-1))
            pre[c] = torch.bmm(route.fetch(down).float().view(-1, n, d), x[c, :, None])[..., 0]
            out[c] = torch.bmm((F.gelu(pre[c]) * gate[c])[:, None], route.fetch(up).float().view(-1, n, d))[:, 0]
        ctx.save_for_backward(x, idx, gate, pre)
        ctx.chunks, ctx.shards, ctx.down, ctx.up = chunks, shards, down.detach(), up.detach()
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, idx, gate, pre = ctx.saved_tensors
        (m, n), d = idx.shape, x.shape[1]
        grad_out, gelu = grad_out.contiguous(), F.gelu(pre)
        grad_x, grad_act = torch.zeros_like(x), torch.empty_like(pre)
        down_grad = ShardGrad(ctx.shards, ctx.down) if ctx.needs_input_grad[3] else None
        up_grad = ShardGrad(ctx.shards, ctx.up) if ctx.needs_input_grad[4] else None
        for c in ctx.chunks:
            route = Route(ctx.shards, idx[c].reshape(-1))
            grad_act[c] = torch.bmm(route.fetch(ctx.up).float().view(-1, n, d), grad_out[c, :, None])[..., 0]
            grad_pre = torch.ops.aten.gelu_backward(grad_act[c] * gate[c], pre[c])
            grad_x[c] = torch.bmm(grad_pre[:, None], route.fetch(ctx.down).float().view(-1, n, d))[:, 0]
            if down_grad is not None:
                down_grad.add(*route.push((grad_pre[..., None] * x[c, None]).view(-1, d)))
            if up_grad is not None:
                up_grad.add(*route.push(((gelu[c] * gate[c])[..., None] * grad_out[c, None]).view(-1, d)))
        table_grads = [None if acc is None else acc.grad() for acc in (down_grad, up_grad)]
        return grad_x, None, grad_act * gelu, *table_grads, None


@torch.compiler.disable  # eager regions under torch.compile: collectives and sparse grads
def sharded_lookup(idx: Tensor, table: Tensor, shards: RowShards) -> Tensor:
    """`ShardedLookup`."""
    return ShardedLookup.apply(idx, table, shards)


@torch.compiler.disable
def sharded_mix_experts(x: Tensor, idx: Tensor, gate: Tensor, down: Tensor, up: Tensor, shards: RowShards) -> Tensor:
    """`ShardedExpertMix`."""
    return ShardedExpertMix.apply(x, idx, gate, down, up, shards)


def sharded_modules(model: nn.Module) -> list[SparseModule]:
    """The modules whose row-sparse tables are sharded (`shard_tables_`)."""
    return [m for m in model.modules() if isinstance(m, SparseModule) and m.shards is not None]


def new_group():
    """A process group over every rank for the tables' exchanges (its own, so that they never interleave with
    DDP's or FSDP's collectives), of the default group's backend."""
    return dist.new_group(backend=dist.get_backend())


@torch.no_grad()
def shard_tables_(model: nn.Module, group) -> list[nn.Parameter]:
    """Keep on each rank only its rows of every row-sparse table (rank 0's values, scattered), and route the
    modules' lookups (`SparseModule.shards`). Returns the shards: the parameters the optimizer now steps."""
    from tsparse.distributed import row_sparse_tables  # tsparse.distributed -> registry -> the modules -> here

    row_sparse = {id(p) for p in row_sparse_tables(model).values()}
    shards = []
    for module in model.modules():
        tables = module.table_parameters() if isinstance(module, SparseModule) else []
        if not tables or not all(id(t) in row_sparse for t in tables):
            continue
        module.shards = RowShards(tables[0].shape[0], group)
        for owner, name in table_owners(module, tables):
            full = getattr(owner, name)
            local = scatter_rows(full.data, module.shards)
            setattr(owner, name, nn.Parameter(local, requires_grad=full.requires_grad))
            shards.append(getattr(owner, name))
    return shards


def table_owners(module: nn.Module, tables: list[Tensor]) -> list[tuple[nn.Module, str]]:
    """(submodule, attribute) holding each of `tables` inside `module`."""
    return [(module.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n, p in module.named_parameters()
            if any(p is t for t in tables)]


def scatter_rows(full: Tensor, shards: RowShards) -> Tensor:
    """Rank 0's rows [start, stop) of `full`, on each rank (one dense scatter of equal, padded blocks)."""
    block = full.new_zeros(shards.block, *full.shape[1:])
    blocks = None
    if shards.rank == 0:  # views of `full`; only a short last block is copied, padded
        blocks = [b if len(b) == shards.block else F.pad(b, (0, 0, 0, shards.block - len(b)))
                  for b in full.split(shards.block)]
        blocks += [torch.zeros_like(block)] * (shards.world - len(blocks))  # ranks that own no row
    dist.scatter(block, blocks, src=0, group=shards.group)
    return block[: shards.stop - shards.start].clone()


@torch.no_grad()
def gather_tables_(model: nn.Module, dst: int = 0) -> None:
    """Collective: give rank `dst` the whole tables again (the others keep their shards), e.g. to export."""
    for module in sharded_modules(model):
        shards = module.shards
        for owner, name in table_owners(module, module.table_parameters()):
            local = getattr(owner, name).data
            block = F.pad(local, (0, 0, 0, shards.block - len(local)))
            blocks = [torch.empty_like(block) for _ in range(shards.world)] if shards.rank == dst else None
            dist.gather(block, blocks, dst=dst, group=shards.group)
            if shards.rank == dst:
                setattr(owner, name, nn.Parameter(torch.cat(blocks)[: shards.num_rows], requires_grad=False))
        if shards.rank == dst:
            module.shards = None


def as_dtensor(local: Tensor, shards: RowShards) -> DTensor:
    """This rank's rows as a DTensor over the group (Shard(0) of the whole table): what DCP saves and reshards."""
    shape = (shards.num_rows, *local.shape[1:])
    return DTensor.from_local(local, DeviceMesh.from_group(shards.group, device_type=local.device.type), [Shard(0)], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def table_entries(root: nn.Module) -> list[tuple[str, nn.Parameter, RowShards | None]]:
    """(state-dict key in `root`, parameter, its shards or None) of every row-sparse table of `root`."""
    from tsparse.distributed import row_sparse_tables

    names = {id(p): name for name, p in root.named_parameters()}
    owners = {id(t): m.shards for m in root.modules() if isinstance(m, SparseModule) for t in m.table_parameters()}
    return [(names[id(p)], p, owners.get(id(p))) for p in row_sparse_tables(root).values()]


def optimizer_state(checkpoint: dict, groups: list[list[nn.Parameter]]) -> tuple[dict, dict[int, int]]:
    """(the checkpoint's optimizer state, id(param) -> its key there) for the optimizer's param `groups`,
    matched group by group (FSDP2 numbers the params its own way)."""
    saved = (checkpoint.get("optimizer_states") or [{}])[0]
    index = {id(p): i for params, group in zip(groups, saved.get("param_groups", [])) for p, i in zip(params, group["params"])}
    return saved.get("state", {}), index


def save_tables(checkpoint: dict, root: nn.Module, optimizer, folder: Path, group) -> None:
    """Collective: write this rank's table rows and their row-wise AdaGrad state (zeros where a shard has
    none yet, so that every rank writes the same keys) into a new DCP folder in `folder` (a temp name;
    `checkpoint.AtomicCheckpointIO` moves it beside the file), and take them out of `checkpoint`, which
    records the folder and the tables' keys, shapes and dtypes (under KEY)."""
    from tsparse.rundir import TEMP_SUFFIX

    token = [uuid.uuid4().hex[:12] if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(token, group_src=0, group=group)
    staging = folder.resolve() / f".tables-{token[0]}{TEMP_SUFFIX}"
    saved, index = optimizer_state(checkpoint, [g["params"] for g in optimizer.param_groups])
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    state, record = {}, {"dir": str(staging), "tables": {}, "states": []}
    for key, p, shards in table_entries(root):
        checkpoint["state_dict"].pop(key, None)  # FSDP2 gives the state dict to rank 0 only: read the shard itself
        state[key] = as_dtensor(p.detach(), shards)
        record["tables"][key] = [list(state[key].shape), str(p.dtype).removeprefix("torch.")]
        if id(p) in stepped:
            rows = optimizer.state.get(p, {}).get(STATE, torch.zeros(len(p), dtype=torch.float32, device=p.device))
            state[f"{key}.{STATE}"] = as_dtensor(rows, shards)
            record["states"].append(key)
            if STATE in saved.get(index.get(id(p)), {}):  # a new dict: state_dict() shares them with the optimizer
                saved[index[id(p)]] = {k: v for k, v in saved[index[id(p)]].items() if k != STATE}
    dcp.save(state, checkpoint_id=staging, process_group=group)
    checkpoint[KEY] = record


def load_dcp(state: dict, folder: Path, group=None) -> None:
    """DCP-load `state` in place from `folder` (one process without a group reads the whole tensors)."""
    with warnings.catch_warnings():  # DCP warns that one process reads it, as meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=folder, process_group=group, no_dist=group is None)


def read_tables(checkpoint: dict) -> None:
    """Put the whole tables a sharded checkpoint refers to back into its state dict (one process: export, eval)."""
    record = checkpoint.pop(KEY, None)
    if record is None:
        return
    state = {key: torch.empty(shape, dtype=getattr(torch, dtype)) for key, (shape, dtype) in record["tables"].items()}
    load_dcp(state, Path(record["dir"]))
    checkpoint["state_dict"].update(state)


def restore_tables(checkpoint: dict, root: nn.Module, groups: list[list[nn.Parameter]],
                   folder: Path) -> list[tuple[nn.Parameter, Tensor, Tensor | None]]:
    """Fill `checkpoint` (in place, before Lightning loads it) with the table rows and AdaGrad state in the
    layout of `root` on this rank: read from the checkpoint's DCP folder (any number of ranks wrote it; a
    relative name is in `folder`, the file's), or sliced from whole tables it holds itself. `groups`: the
    optimizer's param groups. Returns (table, rows, AdaGrad state or None) of what was read from the folder."""
    record = checkpoint.pop(KEY, None)
    saved, index = optimizer_state(checkpoint, groups)
    weights = checkpoint.setdefault("state_dict", {})
    entries = table_entries(root)
    if record is None:
        for key, p, shards in entries:
            if shards is not None:
                weights[key] = weights[key][shards.start:shards.stop]
                if STATE in saved.get(index.get(id(p)), {}):
                    saved[index[id(p)]][STATE] = saved[index[id(p)]][STATE][shards.start:shards.stop]
        return []
    state = {}
    for key, p, shards in entries:
        state[key] = torch.empty_like(p.data) if shards is None else as_dtensor(torch.empty_like(p.data), shards)
        if key in record["states"]:
            rows = torch.zeros(len(p), dtype=torch.float32, device=p.device)
            state[f"{key}.{STATE}"] = rows if shards is None else as_dtensor(rows, shards)
    group = next((s.group for *_, s in entries if s is not None), dist.group.WORLD if dist.is_initialized() else None)
    load_dcp(state, folder / record["dir"], group)
    local = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}
    for key, p, _ in entries:
        weights[key] = local[key]
        if key in record["states"] and id(p) in index:
            saved.setdefault(index[id(p)], {})[STATE] = local[f"{key}.{STATE}"]
    return [(p, local[key], local.get(f"{key}.{STATE}")) for key, p, _ in entries]
