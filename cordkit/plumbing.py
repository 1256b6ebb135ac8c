"""Checkpoints, resume and torchrun/FSDP for cord.py's train(), kept out of cord.py so that it reads as the paper.

Crash safety: a checkpoint is written into a temporary folder, flushed to disk and published by
one atomic rename, with a `state.json` (written last) listing every file's size; resume picks the
newest complete one and skips damaged ones with a message. Only this program's own files are ever
deleted: checkpoint folders named exactly checkpoint-NNNNNN that hold its state.json (never a user's
copy such as checkpoint-000002-best/). One writer per run folder (RunLock); a resume must be the
same experiment (resume_diff). Several processes (torchrun): every
rank runs the same loop on its slice of the global batch; gradients are averaged with all_reduce
(or reduce-scattered by FSDP2 with --fsdp); rank 0 alone logs and writes. In a plain
`python cord.py` run rank = 0 and world = 1 and every `dist` branch here does nothing.

Standalone: takes models, optimizers, paths and plain values (never cord's Args or LALM).
"""
import contextlib
import datetime
import errno
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from cordkit.runlock import FolderLock


# ----------------------------------------------------------------------------------------------
# Timing and processes


class Clock:
    """Seconds per phase, summed over its repeats: `with clock("t_rollout"): ...`; clock.times -> dict."""

    def __init__(self, device):
        self.device, self.times = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = self._now()
        yield
        self.times[name] = self.times.get(name, 0.0) + self._now() - t0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # count the GPU work launched inside the phase
        return time.perf_counter()


def seed_all(seed: int) -> None:  # Python, NumPy and torch (CPU and every GPU)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def out_of_range(values: dict, minimum: dict, positive) -> list[str]:
    """One message per flag out of its range: minimum's values >= their bound, positive's > 0 (None = unset)."""
    bad = [f"--{n}: {values[n]} is out of range (it must be >= {lo})" for n, lo in minimum.items()
           if values[n] is not None and values[n] < lo]
    return bad + [f"--{n}: {values[n]} is out of range (it must be > 0)" for n in positive if values[n] <= 0]


def init_distributed(device: torch.device) -> torch.device:
    """Under torchrun (LOCAL_RANK set): join the process group, one GPU per process. Returns the device."""
    if "LOCAL_RANK" not in os.environ or torch.distributed.is_initialized():
        return device
    import atexit

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # a long timeout: the other ranks wait while rank 0 writes a checkpoint
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=1))
    atexit.register(torch.distributed.destroy_process_group)
    return device


def rank_world() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) in one process."""
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in one process."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    objs = [None] * world
    torch.distributed.all_gather_object(objs, obj)
    return objs


def mean_over_ranks(metrics: dict) -> dict:
    """Each metric averaged over ranks (what rank 0 logs); the dict itself in one process."""
    ms = gather_objects(metrics)
    if len(ms) == 1:
        return metrics
    return {k: float(np.mean([m[k] for m in ms if k in m])) for k in dict.fromkeys(k for m in ms for k in m)}


def batch_at(n_examples: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of step `step`: epoch-wise permutations fixed by the seed, so a resumed run sees the same batches.

    Under torchrun this is the global batch (per-rank batch x world size); rank r takes slice r of it.
    >>> batch_at(4, 0, 2, seed=0) + batch_at(4, 1, 2, seed=0) == batch_at(4, 0, 4, seed=0)
    True
    """
    out, perms = [], {}
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(i, n_examples)
        if epoch not in perms:  # one permutation per epoch touched, not one per index
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_examples)
        out.append(int(perms[epoch][j]))
    return out


def all_reduce_grads(params: list) -> None:
    """Average the gradients over ranks, as DDP does: the result is the global batch's gradient.

    Not DDP(model): DDP reduces in autograd hooks that its wrapper's forward() arms, and cord.train_step
    never calls model.forward (it calls the audio encoder and the decoder directly and uses the lm_head
    weight inside chunked._FusedHead), so those hooks would never fire. Every loss is a mean over
    sequences and every rank holds B of them, so the mean of the ranks' gradients equals the gradient
    of one process on all B * world (exactly, except --grpo_reduction token, a mean over tokens).
    """
    world = torch.distributed.get_world_size()
    for p in params:  # a parameter this rank did not use still joins the sum, with zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    handles = [torch.distributed.all_reduce(p.grad, async_op=True) for p in params]  # sum; NCCL batches them
    for p, h in zip(params, handles):
        h.wait()
        p.grad.div_(world)


def sync_and_clip(params: list, max_norm: float, fsdp: bool) -> float:
    """The global batch's gradient on every rank (all_reduce; FSDP did it in backward), clipped -> its norm."""
    if rank_world()[1] > 1 and not fsdp:
        all_reduce_grads(params)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a DTensor


def shard_fsdp(model, decoder_layers) -> list:
    """--fsdp: FSDP2, one unit per decoder layer plus the root (embeddings, lm_head, norm, audio encoder).

    FSDP gathers a unit's parameters in hooks around its forward(). The decoder layers are always called
    through forward(); the root's forward() never is: cord.train_step reaches the root's modules through
    get_input_embeddings() / get_decoder() / get_output_embeddings() (and lm_head.weight inside
    chunked._FusedHead). Registering the first two getters as FSDP forward methods (the documented hook
    for entry points other than forward) gathers the root's parameters before any of them is touched
    (every step embeds its prompts before it reaches the head, and the root unit holds the head too);
    they stay gathered (FSDP never reshards its root after forward) until FSDP's end-of-backward
    callback reduce-scatters their gradients and reshards them. Decoder layers are not resharded after
    forward either (ZeRO-2 style): a rollout calls every layer once per generated token, and resharding
    would all-gather each layer T times per step; gradients and AdamW states stay sharded. Returns the
    trainable parameters, now DTensor shards.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not torch.distributed.is_initialized():
        raise SystemExit("--fsdp shards the model across processes: launch with torchrun (README: several GPUs)")
    if hasattr(model, "disable_adapter"):
        raise SystemExit("--fsdp is for full fine-tuning; with --train lora launch torchrun without --fsdp")
    for layer in decoder_layers:
        fully_shard(layer, reshard_after_forward=False)
    fully_shard(model)
    # not get_output_embeddings: in 5.x it calls get_input_embeddings, and nested hooks would reshard the root mid-call
    for name in ("get_input_embeddings", "get_decoder"):
        register_fsdp_forward_method(model, name)
    model.get_input_embeddings(), model.reshard()  # the first module FSDP sees run becomes its root
    return [p for p in model.parameters() if p.requires_grad]  # sharded: FSDP swaps gathered ones in and out


def fsdp_gather(model, opt=None) -> tuple[dict, Optional[dict]]:
    """--fsdp: full weights (and optimizer state) on rank 0's CPU, empty elsewhere; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    opt_state = get_optimizer_state_dict(model, opt, options=full) if opt else None
    return get_model_state_dict(model, options=full), opt_state


# ----------------------------------------------------------------------------------------------
# Checkpoints: checkpoint-<step>/ = a save_pretrained folder + optimizer.pt + rng.pt + state.json


def save_model_folder(model, folder: Path, parts: tuple, weights: Optional[dict] = None) -> None:
    """An ordinary save_pretrained folder: the model plus `parts` (processor or tokenizer, feature extractor).

    weights: a gathered FSDP state dict to write instead of the model's own.
    """
    model.save_pretrained(folder, safe_serialization=True, **({} if weights is None else {"state_dict": weights}))
    for part in parts:
        part.save_pretrained(folder)


def fsync_tree(folder: Path, files: bool = True) -> None:
    """Flush a folder's files (files=True) and its list of entries to disk (POSIX)."""
    for f in folder.rglob("*") if files else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Replace `final` by the complete folder `tmp` with one atomic rename (the only moment a reader sees a change)."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_tree(final.parent, files=False)


OWN_CHECKPOINT = re.compile(r"checkpoint-\d{6}")  # the exact names save_checkpoint gives; .tmp-<name> while written
RUN_FILES = ("metrics.jsonl", "eval.jsonl", "final", ".tmp-final")  # what train() writes besides its checkpoints


def own_checkpoints(output) -> list[Path]:
    """The checkpoint folders this program wrote, oldest first: named exactly checkpoint-NNNNNN and holding state.json.

    Never a user's copy (checkpoint-000002-best/) nor any other file that starts with `checkpoint-`.
    """
    found = [f for f in Path(output).glob("checkpoint-*") if OWN_CHECKPOINT.fullmatch(f.name)]
    return sorted(f for f in found if (f / "state.json").is_file())


def own_temporaries(output) -> list[Path]:
    """Half-written folders of this program (.tmp-checkpoint-NNNNNN, .tmp-final): never complete, safe to delete."""
    found = Path(output).glob(".tmp-*")
    return sorted(f for f in found if f.name == ".tmp-final" or OWN_CHECKPOINT.fullmatch(f.name[len(".tmp-"):]))


def remove(path: Path) -> None:
    (shutil.rmtree if path.is_dir() and not path.is_symlink() else os.remove)(path)


def disk_full(err) -> bool:
    """Whether an error from a writer means the disk is full (torch.save and safetensors wrap ENOSPC in their own)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return isinstance(err, Exception) and any(s in text for s in ("No space left", "os error 28", "file write failed"))


def write_failed(what: Path, err: Exception, free: int) -> str:
    """One line: what could not be written and why (`free` bytes left when it failed: near 0, the disk is full,
    whatever the writer's own message says), what stays, and how to go on."""
    prev = last_checkpoint(what.parent, quiet=True)
    full = disk_full(err) or free < 16e6
    why = f"disk full: {free / 1e6:.0f} MB free" if full else f"{type(err).__name__}: {str(err).splitlines()[0]}"
    stays = f"{prev.name} (step {int(prev.name.split('-')[1])}) stays" if prev else "no earlier checkpoint exists"
    return (f"{what}: could not be written ({why}); nothing half-written is kept and {stays}: free some space, "
            "then rerun with --resume true")


def save_checkpoint(model, opt, step: int, output: str, parts: tuple, config: dict, fsdp: bool = False,
                    keep: int = 0) -> Path:
    """Write <output>/checkpoint-<step>: a crash never leaves half a checkpoint under that name.

    Under torchrun every rank calls this (FSDP gathers its shards, each rank hands over its RNG state)
    and rank 0 alone writes. `config` (the run's arguments) is stored in state.json. keep > 0: then
    only the newest `keep` of this program's checkpoints stay (older ones go once the new one is complete).
    A write that fails (a full disk) stops the run in one line; the previous complete checkpoint stays.
    """
    from safetensors import SafetensorError

    rank, world = rank_world()
    out = Path(output)
    final, tmp = out / f"checkpoint-{step:06d}", out / f".tmp-checkpoint-{step:06d}"
    dev = next(model.parameters()).device
    rng = gather_objects({"cpu": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None})
    weights, opt_state = fsdp_gather(model, opt) if fsdp else (None, opt.state_dict())  # dist: every rank takes part
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            save_model_folder(model, tmp, parts, weights)
            torch.save(opt_state, tmp / "optimizer.pt")
            torch.save(rng, tmp / "rng.pt")  # list: rank r's state at index r
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            state = {"step": step, "world_size": world, "files": files, "args": config}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            fsync_tree(tmp)  # on disk before the rename publishes it (a node crash, not only a killed process)
        except (OSError, RuntimeError, SafetensorError) as e:
            free = shutil.disk_usage(out).free  # before the half-written folder goes
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(write_failed(final, e, free)) from None
        publish(tmp, final)
        for old in own_checkpoints(out)[:-keep] if keep else []:  # --save_total_limit: only our own
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()  # dist: no rank goes on before the checkpoint exists
    return final


def save_final(model, output: str, parts: tuple, fsdp: bool = False) -> Path:
    """<output>/final: the trained model (LoRA adapters merged) as a plain save_pretrained folder."""
    from safetensors import SafetensorError

    rank, world = rank_world()
    final, tmp = Path(output) / "final", Path(output) / ".tmp-final"
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    weights = fsdp_gather(model)[0] if fsdp else None  # dist: every rank takes part
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            save_model_folder(merged, tmp, parts, weights)
        except (OSError, RuntimeError, SafetensorError) as e:
            free = shutil.disk_usage(final.parent).free
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(write_failed(final, e, free)) from None
        publish(tmp, final)
    if world > 1:
        torch.distributed.barrier()  # dist: final/ exists when train() returns on any rank
    return final


def last_checkpoint(output, quiet: bool = False, skip: frozenset = frozenset()) -> Optional[Path]:
    """The newest complete checkpoint this program wrote; incomplete or corrupted ones are reported and skipped.

    Complete = state.json parses, names the folder's step, and every file it lists has its recorded size
    (a truncated or missing file fails); .tmp-checkpoint-* folders (a write cut short) are never candidates,
    nor the names in `skip`.
    """
    for ckpt in reversed([c for c in own_checkpoints(output) if c.name not in skip]):
        try:
            state = json.loads((ckpt / "state.json").read_text())
            assert state["step"] == int(ckpt.name.split("-")[1]) and (ckpt / "optimizer.pt").is_file()
            assert any(ckpt.glob("*.safetensors"))
            bad = [f for f, size in state.get("files", {}).items()
                   if not (ckpt / f).is_file() or (ckpt / f).stat().st_size != size]
            assert not bad, f"{bad[0]} missing or of the wrong size"
            return ckpt
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            if not quiet:
                print(f"skipping {ckpt}: incomplete or corrupted checkpoint ({type(e).__name__}: {e})", file=sys.stderr)
    return None


def check_loadable(ckpt: Path) -> None:
    """Parse every weights file's header and unpickle optimizer.pt / rng.pt (memory-mapped, tensors only).

    Raises ValueError(what is damaged); a file holding anything but tensors (a pickle with code: not written
    by this program) stops the program in one line instead of being skipped.
    """
    from safetensors import SafetensorError, safe_open

    for f in sorted(ckpt.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as st:
                st.keys()
        except (OSError, SafetensorError, ValueError) as e:
            raise ValueError(f"{f.name} is damaged ({str(e).splitlines()[0]})") from None
    for name in ("optimizer.pt", "rng.pt"):
        try:
            torch.load(ckpt / name, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" in str(e):
                raise SystemExit(f"{ckpt / name}: refused: it holds Python objects, not only tensors (this program "
                                 f"never writes those), so it is not loaded; delete {ckpt} to resume from the one "
                                 "before, or start over") from None
            raise ValueError(f"{name} is damaged ({str(e).splitlines()[0]})") from None
        except (OSError, RuntimeError, EOFError, ValueError) as e:
            raise ValueError(f"{name} is damaged ({str(e).splitlines()[0]})") from None


def resume_checkpoint(output) -> Optional[Path]:
    """The newest complete checkpoint whose files also load; damaged ones are skipped with a message (fall-back)."""
    damaged = frozenset()
    while (ckpt := last_checkpoint(output, skip=damaged)) is not None:
        try:
            check_loadable(ckpt)
            return ckpt
        except ValueError as e:
            print(f"skipping {ckpt}: {e}; falling back to the previous complete checkpoint", file=sys.stderr)
            damaged |= {ckpt.name}
    return None


def load_weights(model, ckpt: Path) -> None:
    """A checkpoint's weights into the model (before FSDP shards it; load_training_state does the rest).

    Through transformers' own loading (it maps the parameter names, which transformers 5.x changed, and
    reads sharded folders), into a copy on the CPU, then copied over; LoRA: the adapter alone.
    """
    try:
        if hasattr(model, "disable_adapter"):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
            return
        saved = type(model).from_pretrained(ckpt, dtype=model.dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise SystemExit(f"{ckpt}: its weights do not fit this model ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:200]}); resume with the checkpoint's --model and --train, "
                         "or start over") from None
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied:  # as load_lalm ties it (families.tie_if_configured)
        saved.get_output_embeddings().weight = saved.get_input_embeddings().weight
    try:
        missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
    except RuntimeError as e:  # a size mismatch: another model size
        raise SystemExit(f"{ckpt}: weights do not match the model ({str(e).strip().splitlines()[-1][:200]})") from None
    if missing or unexpected:
        raise SystemExit(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_training_state(model, opt, ckpt: Path, fsdp: bool) -> int:
    """The optimizer state and this rank's RNG state from a checkpoint -> its step."""
    rank, world = rank_world()
    state = json.loads((ckpt / "state.json").read_text())
    if state.get("world_size", 1) != world:  # the global batch and each rank's sampling stream depend on it
        raise SystemExit(f"{ckpt} was written by {state.get('world_size', 1)} processes; resume it with as many "
                         f"(this run: {world})")
    if state["args"].get("fsdp", False) != fsdp:  # the two optimizer-state layouts differ
        raise SystemExit(f"{ckpt} was written with --fsdp {state['args'].get('fsdp', False)}; resume it with the same")
    dev = next(model.parameters()).device
    try:
        if fsdp:  # dist: rank 0 reads the full optimizer state and FSDP scatters each rank its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            full = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True) if rank == 0 else {}
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_optimizer_state_dict(model, opt, full, options=options)
        else:
            opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=dev, weights_only=True))
        rng = torch.load(ckpt / "rng.pt", weights_only=True)[rank]  # dist: each rank continues its own stream
    except (ValueError, KeyError, RuntimeError, IndexError, pickle.UnpicklingError) as e:
        raise SystemExit(f"{ckpt}/optimizer.pt does not match this run's trainable parameters or is damaged "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); resume with the "
                         "checkpoint's --train and --lora_r, or delete that checkpoint") from None
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], dev)
    return state["step"]


# flags that may differ between a run and the checkpoint it resumes; every other one defines the experiment
MAY_CHANGE_ON_RESUME = {"steps", "save_every", "save_total_limit", "eval", "eval_data", "eval_every", "eval_limit",
                        "eval_batch_size", "baseline", "output", "resume", "overwrite", "threads", "device",
                        "report_to", "lr", "chunk_size", "compile_rollout", "gradient_checkpointing",
                        "trust_remote_code", "fsdp", "merge_lora"}  # fsdp: load_training_state names it


def _same(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str) and ("/" in a or "/" in b):
        return os.path.normpath(a) == os.path.normpath(b)  # data/x.jsonl == ./data/x.jsonl
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))  # (1, 2) == [1, 2], as state.json stores it


def resume_diff(saved: dict, now: dict) -> str:
    """The experiment-defining flags in which `now` differs from the checkpoint's `saved` args, '' if none.

    >>> resume_diff({"objective": "cord", "lr": 3e-5, "k": 20}, {"objective": "opd", "lr": 0.01, "k": 20})
    '--objective opd (the checkpoint: cord)'
    """
    keys = [k for k in now if k in saved and k not in MAY_CHANGE_ON_RESUME]
    return ", ".join(f"--{k} {now[k]} (the checkpoint: {saved[k]})" for k in keys if not _same(saved[k], now[k]))


def apply_lr(opt, lrs: list, where: Path) -> None:
    """--lr on resume: loading the optimizer state brought back the checkpoint's learning rate; set this run's
    (`lrs`, one per parameter group, as the optimizer was made) and say so when it differs."""
    before = [g["lr"] for g in opt.param_groups]
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    if before != list(lrs) and rank_world()[0] == 0:
        print(f"--lr {lrs[0]:g} applied on resume ({where.name} had {before[0]:g})")


def check_writable(output: str) -> Path:
    """--output exists (made if needed) and takes files; else one line, before any model loads."""
    if not str(output).strip():
        raise SystemExit("--output is empty (an unset shell variable?); give a folder")
    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):  # a unique name: every rank probes at once
            pass
    except OSError as e:
        raise SystemExit(f"--output {output}: cannot write there ({e.strerror}); choose another folder") from None
    return out


def run_files(out: Path) -> list[Path]:
    """What a run of this program left in `out` (what --overwrite deletes): never a file it did not write."""
    ours = [f for name in RUN_FILES if (f := out / name).exists() or f.is_symlink()]
    return sorted(ours + own_checkpoints(out) + own_temporaries(out))


def prepare_output(output: str, resume: bool, overwrite: bool, config: Optional[dict] = None) -> None:
    """Before the model loads: --output must be writable, and a run in it is never overwritten by accident.

    A folder holding a run (metrics, checkpoints, final/) needs --resume true (continue; it must then hold a
    complete checkpoint written with the same experiment flags as `config`, the run's arguments) or
    --overwrite true (that run's files are deleted first, nothing stale left; other files stay).
    """
    out = check_writable(output)
    found = run_files(out)
    if resume:
        ckpt = resume_checkpoint(output)
        if ckpt is None:
            raise SystemExit(f"--resume true: no complete checkpoint in {output}; check --output, or start without "
                             "--resume")
        diff = resume_diff(json.loads((ckpt / "state.json").read_text()).get("args", {}), config or {})
        if diff:
            raise SystemExit(f"--resume true: this run is not the one in {ckpt}: {diff}; resume with the "
                             "checkpoint's flags, or start over in another --output")
    if found and not resume and not overwrite:
        raise SystemExit(f"--output {output} holds a run ({', '.join(f.name for f in found[:3])}); add --resume true "
                         "to continue it or --overwrite true to start over")
    if found and overwrite and int(os.environ.get("RANK", 0)) == 0:  # dist: rank 0 alone deletes
        for f in found:
            remove(f)


def prepare_eval_output(output: str, baseline: Optional[str], overwrite: bool) -> Path:
    """--eval writes summary.json and items.jsonl into --output: never over the --baseline it reads, and over an
    earlier evaluation only with --overwrite true."""
    out = check_writable(output)
    written = [out / "summary.json", out / "items.jsonl"]
    if baseline and any(Path(baseline).resolve() == f.resolve() for f in written):
        raise SystemExit(f"--output {output} holds the --baseline {baseline} that this evaluation reads (it would be "
                         "replaced); choose another --output")
    found = [f.name for f in written if f.exists()]
    if found and not overwrite:
        raise SystemExit(f"--output {output} holds an earlier evaluation ({', '.join(found)}); choose another "
                         "--output, or add --overwrite true to replace it")
    return out


class RunLock(FolderLock):
    """`with RunLock(args.output):` one writer per run folder (runlock.FolderLock), and a run that ends by Ctrl-C or
    a full disk ends in one line: no half-written checkpoint kept (.tmp-* removed), what to rerun said."""

    def __exit__(self, kind, err, tb):
        self.release()
        if kind is not KeyboardInterrupt and not disk_full(err):
            return False
        for tmp in own_temporaries(self.folder) if int(os.environ.get("RANK", 0)) == 0 else []:
            shutil.rmtree(tmp, ignore_errors=True)
        what = "interrupted (Ctrl-C)" if kind is KeyboardInterrupt else f"disk full while writing into {self.folder}"
        ckpt = last_checkpoint(self.folder, quiet=True)
        if ckpt:
            then = f"{ckpt.name} is the last complete checkpoint: rerun the same command with --resume true"
        elif run_files(self.folder):
            then = "no checkpoint was complete yet: rerun the same command with --overwrite true to start over"
        else:
            then = "rerun the same command"
        raise SystemExit(f"{what}; nothing half-written is kept; {then}") from None


def check_weights_file(path) -> None:
    """A safetensors file that must load (e.g. the shipped demo model): header and every tensor read; else one line."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as st:
            for name in st.keys():
                st.get_tensor(name)
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise SystemExit(f"{path}: damaged or unreadable ({str(e).splitlines()[0][:200]}); restore it "
                         "(git checkout -- that file, or reinstall)") from None


class NonFiniteGuard:
    """A step whose loss or gradient is not finite is skipped (never applied, so never saved), with a warning
    naming its examples; `max_in_a_row` such steps in a row stop the run. Decides on the gradient norm after
    the all-reduce, so every rank decides alike."""

    def __init__(self, max_in_a_row: int = 3):
        self.max_in_a_row, self.in_a_row = max_in_a_row, 0

    def finite(self, loss: float, grad_norm: float, ids: list) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        print(f"warning: skipped a step with a non-finite loss ({loss}) or gradient norm ({grad_norm}); examples: "
              f"{', '.join(map(str, ids[:8]))}", file=sys.stderr)
        if self.in_a_row >= self.max_in_a_row:
            raise SystemExit(f"{self.in_a_row} steps in a row had a non-finite loss or gradient: stopping (last "
                             f"examples: {', '.join(map(str, ids[:8]))}); check those clips, or lower --lr")
        return False


def start_or_resume(model, params: list, make_optimizer: Callable, output: str, resume: bool, fsdp: bool,
                    decoder_layers=(), batch_size: int = 1) -> tuple[list, torch.optim.Optimizer, int]:
    """Weights, optimizer and RNG from the last checkpoint (--resume) or from scratch -> (params, opt, step).

    dist: every rank resumes from the checkpoint rank 0 found; --fsdp shards the model after its weights
    are loaded; without it every rank starts from rank 0's weights, as DDP does.
    """
    rank, world = rank_world()
    Path(output).mkdir(parents=True, exist_ok=True)
    ckpt = gather_objects(resume_checkpoint(output) if resume and rank == 0 else None)[0]
    if ckpt:
        load_weights(model, ckpt)
    if fsdp:
        params = shard_fsdp(model, decoder_layers)  # dist: the parameters become this rank's shards
    elif world > 1:
        for p in params:
            torch.distributed.broadcast(p.data, 0)
    opt = make_optimizer(params)
    lrs = [group["lr"] for group in opt.param_groups]  # this run's --lr, which loading the state replaces
    start = load_training_state(model, opt, ckpt, fsdp) if ckpt else 0
    if ckpt:
        apply_lr(opt, lrs, ckpt)
    if ckpt and rank == 0:
        print(f"resumed from {ckpt} at step {start}")
    if rank == 0:
        print(f"global batch: {batch_size * world} prompts per step = {batch_size} per process x {world} process(es)")
    return params, opt, start


class MetricsLog:
    """metrics.jsonl, and TensorBoard or W&B with --report_to (imported only then); does nothing off rank 0.

    A resumed run keeps the lines of steps 1..start and drops later ones (they are done again).
    """

    def __init__(self, output: str, start: int, report_to: str = "none", config: Optional[dict] = None):
        self.file = self.tensorboard = self.wandb = None
        if rank_world()[0] != 0:
            return
        path = Path(output) / "metrics.jsonl"
        kept = path.read_text().splitlines(keepends=True)[:start] if start and path.is_file() else []
        self.file = open(path, "w")
        self.file.writelines(kept)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # pip install tensorboard

            self.tensorboard = SummaryWriter(str(Path(output) / "tensorboard"), purge_step=start + 1 if start else None)
        elif report_to == "wandb":
            import wandb  # pip install wandb; WANDB_PROJECT / WANDB_MODE as usual

            id_file = Path(output) / "wandb_run_id"  # a resumed run continues the same W&B run
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "cord"), id=run_id, resume="allow",
                                    dir=output, config=config)

    def log(self, metrics: dict, step: int, prefix: str = "train") -> None:
        """Training metrics (prefix "train") also go to metrics.jsonl; numbers (and dicts of numbers) to the tracker."""
        if self.file and prefix == "train":
            self.file.write(json.dumps(metrics) + "\n"), self.file.flush()
        flat = {f"{prefix}/{k}": v for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        flat |= {f"{prefix}/{k}/{c}": v for k, d in metrics.items() if isinstance(d, dict)
                 for c, v in d.items() if v is not None}
        if self.tensorboard:
            for k, v in flat.items():
                self.tensorboard.add_scalar(k, v, step)
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
