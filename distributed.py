"""Training on many processes launched by torchrun, one per GPU (README: Many GPUs).

MMHH's pair loss couples every pair of the batch, and its semi-batch memory must stay the same on every
process. So each rank encodes its share of the global batch, every rank gathers the whole batch's codes,
labels and indices, computes the pair loss of the whole batch (the loss one process computes) and applies
the same memory update. Without torchrun every function here is the identity or does nothing, so a
single-process run is unchanged.
"""
import contextlib
import datetime
import logging
import os
import re
import signal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import runtime
from runtime import CliError

# How gloo and NCCL word a dead or silent peer; any other error keeps its traceback.
LOST_PEER = re.compile(r"closed by peer|reset by peer|broken pipe|timed out|timeout|NCCL error|watchdog|aborted",
                       re.IGNORECASE)


class PeerLost(CliError):
    """Another process of the run died or stopped answering; this one stops instead of waiting forever."""


def launched():
    """Whether torchrun started this process (it sets these variables for each one)."""
    return all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    """Rank 0, the one process that writes snapshots, logs, TensorBoard events and outputs."""
    return rank() == 0


def shard():
    """(rank, world size): which share of a global batch, or of a list to encode, is this process's."""
    return rank(), world_size()


@contextlib.contextmanager
def process_group(timeout_s):
    """Under torchrun, join its process group for the block; alone, do nothing.

    Collectives give up after ``timeout_s`` seconds (--dist_timeout). Errors are reported once: an error
    every rank raises alike (class attribute ``every_rank``) is left to rank 0 and the other ranks exit
    quietly with its status; another rank's own error names the rank; a dead or silent peer becomes one
    line (PeerLost), not a traceback.
    """
    if not launched():
        yield
        return
    if torch.cuda.is_available():  # NCCL for CUDA tensors; gloo for CPU tensors and small objects
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    except CliError as error:
        if rank() > 0 and getattr(error, "every_rank", False):
            raise SystemExit(error.exit_code) from None
        if rank() > 0:  # an error of this rank alone (say an image of its share): say whose
            error.prefix = f"rank {rank()}: {error.prefix}"
        raise
    except RuntimeError as error:
        if not LOST_PEER.search(str(error)):
            raise
        # Gloo's first line, without its source location: "Read error [host]:port: Connection reset by peer".
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0]).split(". ")[0]
        raise PeerLost(f"rank {rank()}: another process of this run died or did not answer within --dist_timeout "
                       f"{timeout_s:g} s ({reason}); stopping. Resume from the run's newest snapshot") from None
    finally:
        dist.destroy_process_group()


def select_device(gpu_id):
    """This process's device: under torchrun the GPU of its local rank (--gpu_id cpu: the CPU)."""
    if not active() or gpu_id == "cpu" or not torch.cuda.is_available():
        return runtime.select_device(gpu_id)
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]))


def quiet_followers(logger):
    """Ranks other than 0 log warnings and errors only, marked with their rank."""
    if is_main():
        return
    logger.setLevel(logging.WARNING)
    for handler in logger.handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank()}] %(message)s", "%H:%M:%S"))


def describe(batch_size, device):
    """One line on the processes of the run, for rank 0's log; None alone."""
    if not active():
        return None
    nodes = world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    return (f"torchrun: {world_size()} processes on {nodes} node(s), {dist.get_backend()}; global batch "
            f"{batch_size} = {world_size()} x {batch_size // world_size()}; rank 0 on {device}")


def launcher():
    """How to start this script again the way it was started (for the resume command)."""
    if not active():
        return "python"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    if per_node == world_size():
        return f"torchrun --nproc_per_node {per_node}"
    return f"torchrun --nnodes {world_size() // per_node} --nproc_per_node {per_node} --rdzv_endpoint HOST:PORT"


def on_rank_zero(work, *args):
    """``work(*args)`` on rank 0 alone; what it returns there (None on the other ranks).

    An error there stops every rank together: rank 0 raises it (and reports it, once), the others exit
    quietly with its status. Alone, simply ``work(*args)``.
    """
    if not active():
        return work(*args)
    result, failure, verdict = None, None, [0]
    if is_main():
        try:
            result = work(*args)
        except Exception as error:  # a bug too must not leave the other ranks waiting
            failure, verdict = error, [getattr(error, "exit_code", 1)]
    dist.broadcast_object_list(verdict, src=0)
    if failure is not None:
        raise failure
    if verdict[0]:
        raise SystemExit(verdict[0])
    return result


def rank_zero_first(work, *args):
    """``work(*args)`` on rank 0, then on the others if it succeeded there: a mistake is reported once."""
    result = on_rank_zero(work, *args)
    return result if is_main() else work(*args)


def data_parallel(model, device, sync_bn=False):
    """The model as a training step calls it: itself alone, else wrapped in DistributedDataParallel.

    DDP starts every rank from rank 0's parameters and buffers and averages the gradients over the ranks
    (see ``loss_scale``). With ``sync_bn`` batch-norm normalises with the statistics of the global batch
    (CUDA only); otherwise each rank normalises with its own share's.
    """
    if not active():
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps the layers in place, same parameters
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def loss_scale():
    """The factor on the loss before backward that makes the gradient the single-process one.

    Every rank computes the loss of the whole global batch, but its backward reaches only its own codes, so
    its gradient is its share of the batch's gradient; the shares add up to the single-process gradient,
    and DDP averages them over the N ranks, which divides by N: the loss is multiplied by N.
    """
    return world_size()


def global_batch(h, labels, indices, stop):
    """This rank's codes (b, K), labels (b, C) and indices (b,) -> the whole global batch's, B = N b.

    Rows come in rank order, which is the single-process batch's order (EpochBatchSampler). Gradients flow
    through this rank's own rows only, the others are copies. One all_gather carries all three and each
    rank's stop signal, so the ranks agree on the iteration to stop at (``AgreedStop``).
    """
    if not active():
        return h, labels, indices
    k, c = h.shape[1], labels.shape[1]
    signal_column = torch.full((len(h), 1), stop.signal_here(), dtype=torch.float64, device=h.device)
    # float64 holds the codes, 0/1 labels and indices (up to 2^53) exactly.
    packed = torch.cat([h.double(), labels.double(), indices.double()[:, None], signal_column], 1)  # (b, K+C+2)
    rows = [torch.empty_like(packed) for _ in range(world_size())]
    dist.all_gather(rows, packed.detach())
    rows[rank()] = packed  # the same numbers, with this rank's autograd graph
    every = torch.cat(rows)  # (B, K+C+2)
    stop.gathered(every[:, -1].max())
    return every[:, :k].float(), every[:, k:k + c].to(labels.dtype), every[:, k + c].long()


class AgreedStop:
    """The SIGINT/SIGTERM every rank acts on at the same iteration, whichever ranks received it.

    Each training step's gather carries every rank's signal (``global_batch``); ``requested`` is true from
    the step whose gather first carried one. Only the training loop asks it: encoding has no per-batch
    collective, so each rank stops there on its own signals.
    """

    def __init__(self, signals):
        self.signals, self.number, self._gathered = signals, 0, None

    def signal_here(self):
        return self.signals.received[0] if self.signals.requested() else 0

    def gathered(self, signal_number):
        # Copied without waiting; the step's own host synchronisation (its loss check) completes it.
        self._gathered = signal_number.to("cpu", non_blocking=True)

    def requested(self):
        if not self.number and self._gathered is not None:
            self.number = int(self._gathered)
        return self.number != 0

    @property
    def name(self):
        return signal.Signals(self.number).name

    @property
    def exit_code(self):
        return 128 + self.number


def agreed_stop(signals):
    """The stop request the training loop acts on: this process's ``signals`` alone, else an AgreedStop."""
    return AgreedStop(signals) if active() else signals


def combine_shards(*tensors, device):
    """Each rank's encoded rows, zeros where another rank encoded (N, D_i) -> every row, on every rank."""
    if not active():
        return tensors
    every = torch.cat(tensors, 1).to(device)  # (N, sum D_i); adding zeros keeps each row exact
    dist.all_reduce(every)
    return torch.split(every.cpu(), [tensor.shape[1] for tensor in tensors], 1)


def rank_zero_buffers(model):
    """Give every rank rank 0's buffers: each rank updated its batch-norm running statistics with its own
    share in the last step, and sharded encoding needs one model."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def gather_to_rank_zero(value):
    """[every rank's ``value``] on rank 0 (None on the others); [value] alone."""
    if not active():
        return [value]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered
