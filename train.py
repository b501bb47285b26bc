"""
One training driver for every model in this repository: plain torch.distributed DDP, no framework.

    torchrun train.py --model mar                       # built-in data, tiny preset: CPU minutes
    torchrun --nproc_per_node=8 train.py --model mar --preset base --data-path /imagenet/train \
        --vae pretrained/kl16.ckpt --epochs 800         # the paper's recipe (see README)
    torchrun --nnodes=4 --node_rank=$RANK --master_addr=$ADDR --master_port=29500 \
        --nproc_per_node=8 train.py ...                 # several nodes
    torchrun --nproc_per_node=8 train.py --model mar --eval --resume mar_base/checkpoint-last.pth \
        --preset base --vae kl16.ckpt --fid-stats VIRTUAL_imagenet256_labeled.npz --num-images 50000 \
        --num-iter 256 --cfg 2.9                        # generate and score (FID-50K, IS, P/R, sFID)

It also runs as a single process (`python train.py ...`). A run lives in --output-dir: log.txt,
metrics.jsonl, checkpoint-last.pth and samples-*.png. Re-running the same command resumes it
exactly, so a preempted job only needs to be requeued; SIGTERM / SIGINT save a checkpoint first.

Each model file holds its paper end to end, including how it is trained: `MODELS` maps --model
to that file's `Training` module: `.model` and `.config`, `inputs` (a data batch -> tensors),
`loss`, `no_weight_decay`, `ema_decay`, and `sample` (generators) or `reconstruct` + `report`
(tokenizers); as class attributes its flags (`add_args`), `PRESETS`, defaults (`PAPER`,
`BUILTIN`) and AdamW `betas`. CODA's adds a second player (`after_step`) and logged `metrics`.
"""
import argparse
import copy
import datetime
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import coda
import fid
import mar
import maskgit

# --model -> the model file's training module (like DiT's DiT_models)
MODELS = {"mar": mar.Training, "vae": coda.VAETraining, "coda": coda.Training, "maskgit": maskgit.Training}


#################################################################################
#                               Training helpers                                #
#################################################################################

def fail(message):
    """Stop with a one-line error and exit code 1 (no traceback: the problem is the input). Under
    torchrun the process ends at once, after any checkpoint still being written: tearing down a
    live process group at interpreter exit can abort with a C++ message after the error line."""
    if not dist.is_initialized():
        raise SystemExit(f"train.py: error: {message}")
    for thread in [t for t in threading.enumerate() if t.name == "checkpoint"]:
        thread.join()
    sys.stdout.flush()
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def setup_distributed(device_flag, timeout):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE: one process per GPU with NCCL, or CPU
    processes with gloo; the process group is set up once per process (several runs may share
    it, see --compare-quantizers). Without torchrun: a single process and no process group."""
    if device_flag == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but no CUDA device is available")
    cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:  # modulo: launchers that give each process a single visible GPU
        local_rank %= torch.cuda.device_count()
    if "RANK" in os.environ and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        # collectives give up a minute after the heartbeat has named a silent rank (see `heartbeat`)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout + 60))
        HEARTBEAT["stop"] = heartbeat(timeout)
    if not cuda and "OMP_NUM_THREADS" not in os.environ:  # share the cores between this node's processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return rank, world, torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def barrier(destroy=False):
    """Wait for every rank (and, at the end of the process, tear the process group down). The wait
    has no deadline of its own (a gloo group of `heartbeat`'s): what the others wait for may take
    longer than --dist-timeout (rank 0's final report on 50,000 held-out images), and a timeout
    there failed every run whose report did, again on each resume; a rank that stops answering
    is the heartbeat's to catch."""
    if dist.is_initialized():
        dist.barrier(group=HEARTBEAT.get("patient"))  # None (no heartbeat): the default group
        if destroy:
            HEARTBEAT.pop("stop", lambda: None)()
            HEARTBEAT.pop("patient", None)
            dist.destroy_process_group()


HEARTBEAT = {}  # "stop": ends this process's heartbeat thread; "patient": the group `barrier` waits in


def heartbeat(timeout):
    """A rank that stops answering (a stopped process, a hung node) would stall the others forever
    without a word. A thread on every rank meets the others once a second in a gloo barrier that
    names the ranks missing after `timeout` seconds; then the run fails with one line naming them.
    A thread answers even while its rank is busy (a long grid or report), so only a silent
    process is caught. -> a function that ends the thread on every rank (call it on all of them)."""
    group, stop = dist.new_group(backend="gloo"), threading.Event()
    HEARTBEAT["patient"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))

    def beat():
        flag = torch.zeros(1)
        while flag.item() == 0:
            try:
                dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True)
                flag.fill_(float(stop.is_set()))
                dist.all_reduce(flag, group=group)  # any rank stopping stops every rank's thread
            except RuntimeError as e:  # rank 0 learns who is missing; the others, that rank 0 is
                missing = re.search(r"Ranks? ([\d, ]+) failed", str(e))
                silent = "0" if dist.get_rank() else missing and missing.group(1)
                why = (f"rank {silent} of {dist.get_world_size()} stopped answering for {timeout} s (--dist-timeout)"
                       if silent else f"lost contact with the other ranks ({str(e).strip().splitlines()[0][:150]})")
                print(f"train.py: error: {why}; stopping this rank too", file=sys.stderr, flush=True)
                os._exit(1)
            time.sleep(1)

    thread = threading.Thread(target=beat, daemon=True, name="heartbeat")
    thread.start()
    return lambda: (stop.set(), thread.join())


LOCKS = {}  # output folder -> its open lock file, held until this process ends


def lock_output_dir(path):
    """One training process per --output-dir: a second one (a requeued job started before the old
    one saved its stop checkpoint) would resume from a stale checkpoint and overwrite the other's.
    An flock on <dir>/.lock, released by the OS when the process ends, however it ends."""
    path = os.path.abspath(path)
    if path in LOCKS:
        return
    f = open(os.path.join(path, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        fail(f"another process (pid {holder}) is training into {path}: wait until it exits "
             f"(it saves a checkpoint first) or use another --output-dir")
    except OSError:  # a file system without flock (some network mounts): run unlocked
        f.close()
        return
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    LOCKS[path] = f


def open_run_folder(args, rank, world, device):
    """Create and lock --output-dir (rank 0) -> log(msg): print and append to log.txt on rank 0, each
    message after the time of day (DiT's habit, so that a run's phases can be timed from its log),
    starting with the command, commit, versions, device and all flags (modded-nanogpt's habit)."""
    os.makedirs(args.output_dir, exist_ok=True)
    if rank == 0:
        lock_output_dir(args.output_dir)

    def log(msg):
        if rank == 0:
            msg = f"[{time.strftime('%H:%M:%S')}] {msg}"
            tqdm.write(msg)
            append_line(os.path.join(args.output_dir, "log.txt"), msg)

    devices = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    log(f"command: {' '.join(sys.argv)}\ngit commit: {git_commit()}\ntorch {torch.__version__}, "
        f"{world} process(es), device: {devices}\nargs: {json.dumps(vars(args))}\n{args.defaults_in_force}")
    return log


def keep_metrics_until(path, step):
    """Drop the lines of metrics.jsonl logged after the checkpoint of `step` (the file's last lines
    past `step`; earlier lines stay, also those of a run resumed with another global batch, whose
    steps were counted otherwise), so that it holds one line per step, and lines cut short (a kill
    or a full disk while one was written)."""
    def step_of(line):
        try:
            return int(json.loads(line)["step"]) if line.endswith("\n") else None
        except (ValueError, KeyError, TypeError):
            return None
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if step_of(line) is not None]
        while lines and step_of(lines[-1]) > step:
            lines.pop()
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)


def append_line(path, line):
    """Append one line and close the file again (logs survive any crash, nothing stays open)."""
    with open(path, "a") as f:
        f.write(line + "\n")


def learning_rate(step, lr, warmup_steps, total_steps, schedule):
    """Linear warmup from 0 over `warmup_steps`, then constant (the paper) or cosine down to 0."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return lr


def make_optimizer(training, lr, weight_decay):
    """AdamW over the trainable parameters, grouped by (no weight decay?, lr scale), decayed first."""
    groups = {}
    lr_scale = getattr(training, "lr_scale", lambda name, lr: 1.0)  # CODA: the quantizer's own lr
    for name, p in training.model.named_parameters():
        if p.requires_grad:  # CODA: only LoRA and the quantizer; the VAE stays frozen
            groups.setdefault((training.no_weight_decay(name, p), lr_scale(name, lr)), []).append(p)
    return torch.optim.AdamW([{"params": params, "weight_decay": 0.0 if no_wd else weight_decay, "lr_scale": scale}
                              for (no_wd, scale), params in sorted(groups.items())], lr=lr, betas=training.betas,
                             fused=True)  # one fused kernel for all parameters (CPU and GPU): 2x faster on CPU


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * param for every trained parameter (frozen ones, like
    CODA's VAE, never change), in one fused kernel list."""
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)


def rng_state(device, aug):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "aug": aug.get_state()}


def gather_to_rank0(obj):
    """-> [obj of rank 0, obj of rank 1, ...] on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, objs, dst=0)
    return objs


def from_rank0(obj):
    """-> rank 0's obj on every rank: a decision rank 0 makes for all (the ranks may see different disks)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def set_rng_state(state, device, aug):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    aug.set_state(state["aug"])


def load_checkpoint(path, flag):
    try:
        return mar.load_checkpoint(path)
    except (ValueError, FileNotFoundError) as e:
        fail(f"{flag}: {e}")


TRAINING_ONLY = {"batch_size", "grad_accum", "blr", "lr", "lr_schedule", "weight_decay", "grad_clip", "ema", "epochs", "warmup_epochs",
                 "ckpt_every", "sample_every", "log_every", "loss_fraction", "diffusion_batch_mul", "cleanup_steps",
                 "ema_start_epoch", "quantizer_lr", "bf16", "disc", "lpips_weight"}  # recipe flags --eval does not read


def continue_recipe(args, saved, log):
    """Resuming continues the run that was started: the recipe flags left unset now (args.unset)
    take the checkpoint's values, not today's defaults, so that a finished run, run again without
    its --epochs, is complete instead of training on (and overwriting it) to the default epochs.
    Flags given explicitly win, e.g. a larger --epochs to extend a run. --eval alike: a CPU-sized
    run scored against given statistics samples as its grids did, not with the paper's settings.
    -> the values kept."""
    kept = {k: saved[k] for k in args.unset if saved.get(k) is not None and saved[k] != getattr(args, k)}
    for key, value in kept.items():
        if log:
            log(f"resuming: --{key.replace('_', '-')} {value} as the checkpoint's run (the default now: {getattr(args, key)}; "
                f"give the flag to change it)")
        setattr(args, key, value)
    return kept


def load_resume(ckpt, path, training, opt):
    """Restore the model, optimizer and second player from `ckpt` (read from `path`), a checkpoint
    of the same model (checked in main) and architecture (else one line naming the difference)."""
    check_config(path, ckpt["config"], training.config)
    try:  # the config holds the sizes flags choose; a preset's inner sizes can still differ (e.g. older presets)
        mar.load_state(training.model, ckpt["model"], f"{path}['model']")
    except ValueError as e:
        fail(f"{e}: trained with another version of --preset {training.args.preset}; use a new --output-dir")
    scales = [group["lr_scale"] for group in opt.param_groups]  # from this run's flags
    again = "resume with the run's own flags, or use a new --output-dir"
    try:
        opt.load_state_dict(ckpt["optimizer"])
    except ValueError as e:  # other parameter groups, e.g. --quantizer-lr given or dropped
        fail(f"{path}: its optimizer does not fit this run's parameter groups ({e}); {again}")
    try:
        if hasattr(training, "load_checkpoint_state"):
            training.load_checkpoint_state(ckpt)  # CODA: its discriminator; MAR on pixels: its tokenizer's decoder
    except ValueError as e:
        fail(f"{path}: {e}; {again}")
    for group, scale in zip(opt.param_groups, scales):
        group["lr_scale"] = scale


def architecture(config):
    """A model's config without the names of the files it was built from (a VAE's, the tokenizer's,
    in checkpoints of earlier versions): a renamed file is the same file, and the SHA-256 of a
    tokenizer's weights tells tokenizers apart (check_tokenizer)."""
    out = {k: v for k, v in config.items() if k != "tokenizer"}
    if isinstance(out.get("vae"), dict):
        out["vae"] = {k: v for k, v in out["vae"].items() if k != "file"}
    return out


def check_config(path, saved, current):
    """Stop with one line naming every architecture fact that differs from the checkpoint's."""
    saved, current = architecture(saved), architecture(current)
    if saved != current:
        diff = {k: (saved.get(k), current.get(k)) for k in {**saved, **current} if saved.get(k) != current.get(k)}
        fail(f"{path} was trained with another config: " + ", ".join(f"{k} {a} (checkpoint) vs {b} (now)" for k, (a, b) in diff.items()))


def to_cpu(obj):
    """A copy of `obj` (nested dicts / lists of tensors) with every tensor copied to CPU memory."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    return type(obj)(to_cpu(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


class CheckpointWriter:
    """Checkpoints written in the background: `write` copies the state to CPU memory (seconds even
    for MAR-H) and a thread saves it, so the ranks train on while the file is written (minutes on a
    slow disk). Atomic: a temporary file, then a rename, so a crash never leaves a broken checkpoint.
    A failed write stops the run at the next `write` or `wait`, with one line."""

    def __init__(self):
        self.thread, self.error = None, None

    def write(self, state, path):
        self.wait()
        snapshot = to_cpu(state)

        def save():
            try:
                torch.save(snapshot, path + ".tmp")
                os.replace(path + ".tmp", path)
            except Exception as e:  # a full disk, a vanished folder: said at the next write or wait
                self.error = f"could not write the checkpoint {path}: {getattr(e, 'strerror', None) or e}"
        self.thread = threading.Thread(target=save, name="checkpoint")
        self.thread.start()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error:
            fail(self.error)


def save_grid(images, path, nrow):
    """[-1, 1] images (N, 3, H, W) -> a PNG grid with nrow images per row and 2 px white padding."""
    pix = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    n, h, w, _ = pix.shape
    grid = Image.new("RGB", (nrow * (w + 2) + 2, math.ceil(n / nrow) * (h + 2) + 2), "white")
    for k in range(n):
        grid.paste(Image.fromarray(pix[k]), (2 + (k % nrow) * (w + 2), 2 + (k // nrow) * (h + 2)))
    grid.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


@torch.no_grad()
def picture(training, ema, num_classes, held_out, seed):
    """What a run shows of its EMA model -> (images, labels, columns): a generator draws one row per
    class (up to 10 classes x 10; else 8 classes x 8: on ImageNet the official code's 8, on other
    data 8 spread over the class list); a tokenizer shows 8 held-out images, each followed by its
    reconstruction."""
    if hasattr(training, "sample"):
        if num_classes <= 10:
            rows = list(range(num_classes))
        elif num_classes == 1000:  # ImageNet
            rows = [207, 360, 388, 113, 355, 980, 323, 979]
        else:
            rows = torch.linspace(0, num_classes - 1, 8).round().long().tolist()
        cols = 10 if num_classes <= 10 else 8
        labels = torch.tensor(rows, device=training.device).repeat_interleave(cols)
        generator = torch.Generator(training.device).manual_seed(seed)  # on the device: no host copy per draw
        return training.sample(ema, labels, generator), labels, cols
    real = held_out(8).to(training.device)
    recon = training.reconstruct(ema, real)[0].float()
    return torch.stack([real, recon], 1).flatten(0, 1), None, 8


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "-uno"], capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "") or "unknown"
    except Exception:
        return "unknown"


#################################################################################
#                                     Data                                      #
#################################################################################

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PRELOAD_BYTES = 1 << 30  # a training folder whose decoded images fit in 1 GiB (87,000 at 32 px) is read once


def center_crop_arr(pil_image, image_size):
    """ADM's center crop (used by MAR): halve with BOX while the short side is >= 2x the target,
    resize the short side to the target with BICUBIC, then crop the center."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


@functools.lru_cache(maxsize=4)  # choose_defaults and ImageFolder list the same folder once
def list_images(root, suffixes=IMG_EXTENSIONS, loose=False):
    """-> (class names, [(path, label)]) of an ImageNet-style folder, sorted, or a one-line error.
    `loose`: a folder of images without class subfolders is one class (held-out images, such as
    ImageNet's val folder as it comes)."""
    if not os.path.isdir(root):
        fail(f"data folder not found: {root}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    samples = [(os.path.join(dirpath, f), label) for label, c in enumerate(classes)
               for dirpath, _, files in sorted(os.walk(os.path.join(root, c))) for f in sorted(files)
               if f.lower().endswith(suffixes)]
    if not samples and loose:
        classes, samples = [""], [(f.path, 0) for f in sorted(os.scandir(root), key=lambda f: f.name)
                                  if f.is_file() and f.name.lower().endswith(suffixes)]
    if not samples:
        flat = sum(f.is_file() and f.name.lower().endswith(suffixes) for f in os.scandir(root))
        if flat:
            fail(f"{root} holds {flat} image{'s' * (flat != 1)} but no class subfolders: move them into one "
                 f"subfolder per class ({root}/<class>/), or all into one for a single class")
        fail(f"no images in {root} (expected one subfolder per class holding {'/'.join(suffixes)} files)")
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if empty:  # it would still take a label, and the class-balanced grids and --eval would ask for it
        fail(f"class folder {os.path.join(root, empty[0])} holds no images ({len(empty)} empty class folder(s)); "
             f"remove it or add images")
    return classes, samples


BROKEN_IMAGE = (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError)  # what PIL raises on bad files


class ImageFolder(torch.utils.data.Dataset):
    """An ImageNet-style folder: one subfolder per class, sorted names -> labels 0..C-1.

    An unreadable or corrupt image is replaced by the next readable one, and its index is the third
    item of the sample (-1 for a good one), so a few bad files in a million never crash a multi-day
    run, and the run can name them and count each once."""

    def __init__(self, root, image_size, suffixes=IMG_EXTENSIONS, loose=False):
        self.classes, self.samples = list_images(root, suffixes, loose)
        self.image_size, self.items = image_size, None

    def __len__(self):
        return len(self.samples)

    def preload(self, progress):
        """Decode every image once into memory (train.py does for a folder whose images fit in
        PRELOAD_BYTES): a step then takes its batch from there instead of decoding it with PIL, a
        third of a MAR step on 1,000 small images on a CPU. The same items, bad files included."""
        self.items = [self[i] for i in tqdm(range(len(self)), desc="reading the folder into memory",
                                            disable=not progress, dynamic_ncols=True)]

    def load(self, path):
        with Image.open(path) as img:  # 16-bit images scaled to 8 bits, not clipped (fid.to_rgb)
            return fid.to_tensor(center_crop_arr(Image.fromarray(fid.to_rgb(img)), self.image_size))

    def __getitem__(self, i):
        if self.items is not None:
            return self.items[i]
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                return self.load(path), label, i if k else -1
            except BROKEN_IMAGE:
                continue
        fail("no readable image in the data folder")


class ToyDataset(torch.utils.data.Dataset):
    """The built-in training set: `fid.toy_images` drawn once into memory, kept as model inputs;
    item = (image, label, -1), as ImageFolder's (-1: no file to report as unreadable)."""

    def __init__(self, size=32, num_images=fid.BUILTIN_IMAGES, seed=0, progress=False):
        self.classes = fid.TOY_CLASSES
        self.images = fid.to_tensor(fid.toy_images(size, num_images, seed, progress)).contiguous()  # (N, 3, H, W) in [-1, 1]
        # (an image taken from here costs 3 us against 20 to convert it: 13 s of a default run)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 10, -1


class CachedLatents(ImageFolder):
    """Pre-computed VAE posterior moments (see `cache_latents`), like the official main_cache.py:
    item = (moments, moments of the flipped image, label, -1)."""

    def __init__(self, root):
        super().__init__(root, None, suffixes=(".npz",))
        self.root = root

    def load(self, path):
        with np.load(path) as data:
            try:
                return torch.from_numpy(data["moments"]), torch.from_numpy(data["moments_flip"])
            except KeyError as e:
                raise ValueError(f"{path} holds no {e}") from None

    def __getitem__(self, i):  # an unreadable file: the next readable one, as ImageFolder's images
        (moments, moments_flip), label, bad = super().__getitem__(i)
        return moments, moments_flip, label, bad

    def check(self, path, digest, side):
        """Stop with one line if the cache was encoded by another VAE (the SHA-256 of its weights that
        --cache-latents records in `path`; official caches record none) or at another image size."""
        if os.path.exists(path):
            with open(path) as f:
                if json.load(f)["vae_sha256"] != digest:
                    fail(f"{self.root} was encoded by another VAE: give the --vae that --cache-latents used")
        cached = tuple(self[0][0].shape[-2:])  # (h, w) of the first file's moments
        if cached != (side, side):
            fail(f"{self.root} holds latents of {cached}, not the {side} x {side} of --img-size "
                 f"(give the --img-size it was cached at)")


@torch.no_grad()
def cache_latents(args, rank, world, device):
    """MAR's --cache-latents: encode every image once (center crop, no flip) and save the VAE
    posterior moments of the image and of its flip as <cache-path>/<class>/<file>.npz (official
    main_cache.py layout). Files already there are kept, so an interrupted job just continues."""
    data = ImageFolder(args.data_path, args.img_size)
    vae = build(args, len(data.classes), device).vae  # checks --vae and the sizes like a training run
    mine = list(range(rank, len(data), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, mine), batch_size=args.batch_size,
                                         num_workers=args.num_workers)
    skipped = 0
    for b, (images, labels, bad) in enumerate(tqdm(loader, disable=rank != 0, desc="caching latents")):
        images = images.to(device)
        moments, moments_flip = (vae.encode(x).moments.cpu().numpy() for x in (images, images.flip(3)))
        for j in range(len(images)):
            if bad[j] >= 0:  # unreadable: ImageFolder substituted another image; write nothing
                skipped += 1
                continue
            path, _ = data.samples[mine[b * args.batch_size + j]]
            out = os.path.join(args.cache_path, os.path.relpath(path, args.data_path) + ".npz")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            np.savez(out + ".tmp.npz", moments=moments[j], moments_flip=moments_flip[j])
            os.replace(out + ".tmp.npz", out)
    if rank == 0:  # which VAE encoded them (CachedLatents.check)
        with open(os.path.join(args.cache_path, "vae.json"), "w") as f:
            json.dump(dict(vae_sha256=weights_digest(vae)), f)
    print(f"rank {rank}: cached {len(mine) - skipped} images to {args.cache_path}, skipped {skipped} unreadable")


def same_encoding(cached, now):
    """Whether two encodings of one image's VAE moments agree up to device arithmetic (TF32, kernel
    order): within 5% of their mean size."""
    return bool((cached - now).abs().mean() <= 0.05 * now.abs().mean())


def weights_digest(module):
    """SHA-256 of a module's tensors (names and values): which frozen tokenizer encoded a cache."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_digest(training):
    """-> (the flag that names a generator's frozen tokenizer, the digest of its weights), or (None,
    None) for the tokenizers' own runs and MAR on pixels. Checkpoints and token caches record it, so
    that tokens made by one VAE or CODA file are never trained on or decoded by another."""
    for flag, name in (("--tokenizer", "tokenizer"), ("--vae", "vae")):  # MaskGIT's CODA; MAR's VAE
        module = getattr(training, name, None)
        if module is not None and getattr(training.args, name, None):  # not MAR's PixelTokenizer: the run's own
            return flag, weights_digest(module)
    return None, None


def check_tokenizer(path, ckpt, flag, digest):
    """Stop with one line if the checkpoint was trained on the tokens of another tokenizer (checkpoints
    of earlier versions and official files record none)."""
    if digest is not None and ckpt.get("tokenizer_sha256") not in (None, digest):
        fail(f"{path} was trained with another {flag} (its weights differ from this one's); give the {flag} it was trained with")


def dataset_labels(dataset):
    """Every image's label: an image folder's from its samples, the built-in data's index % 10."""
    return (np.array([label for _, label in dataset.samples]) if hasattr(dataset, "samples")
            else np.arange(len(dataset)) % 10)


def data_digest(dataset, first=8):
    """SHA-256 of every label and of the first images: which data a cache was encoded from."""
    h = hashlib.sha256(dataset_labels(dataset))
    for i in range(min(first, len(dataset))):
        h.update(dataset[i][0].numpy().tobytes())
    return h.hexdigest()


class CachedTokens(torch.utils.data.Dataset):
    """Every training image encoded once by the model file's `encode` (MaskGIT: the CODA tokens of
    the image and of its flip; MAR: their VAE moments), cached in one .npy: item = (codes, label,
    bad), as the dataset's. `<path>.labels.npy` holds each row's label and unreadable-file index (an
    unreadable image was replaced by the next readable one, with its label); `<path>.json` the
    digests of the tokenizer's weights and of the data, so that a cache encoded by another tokenizer
    (retrained into the same file, say) or from other images is refused instead of trained on."""

    @torch.no_grad()
    def __init__(self, dataset, encode, digest, path, batch_size, num_workers, rank, world, device):
        self.classes, data = dataset.classes, data_digest(dataset)
        if not from_rank0(os.path.exists(path)):  # one decision: every rank then takes the same collectives
            mine = range(rank * len(dataset) // world, (rank + 1) * len(dataset) // world)
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size, num_workers=num_workers)
            shard, meta = [], []
            for images, labels, bad in tqdm(loader, desc="encoding the training set once", disable=rank != 0):
                shard.append(encode(images.to(device)).cpu())
                meta.append(torch.stack([labels, bad], 1))
            np.save(f"{path}.rank{rank}.npy", torch.cat(shard).numpy())
            np.save(f"{path}.rank{rank}.labels.npy", torch.cat(meta).numpy())
            barrier()
            if rank == 0:
                np.save(path + ".tmp.npy", np.concatenate([np.load(f"{path}.rank{r}.npy") for r in range(world)]))
                np.save(path + ".labels.npy", np.concatenate([np.load(f"{path}.rank{r}.labels.npy") for r in range(world)]))
                with open(path + ".json", "w") as f:
                    json.dump(dict(tokenizer_sha256=digest, data_sha256=data, images=len(dataset)), f)
                os.replace(path + ".tmp.npy", path)
                for r in range(world):
                    os.remove(f"{path}.rank{r}.npy")
                    os.remove(f"{path}.rank{r}.labels.npy")
            barrier()
        if os.path.exists(path + ".labels.npy"):
            self.labels, self.bad = np.load(path + ".labels.npy").T
        else:  # a cache of an earlier version: the dataset's labels
            self.labels = dataset_labels(dataset)
            self.bad = np.full(len(self.labels), -1)
        try:
            self.codes = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:  # cut short, or another file
            fail(f"{path} is not a readable cache ({str(e).splitlines()[0][:100]}); delete it to encode again")
        first = encode(dataset[0][0][None].to(device))[0].cpu()  # image 0 encoded now: is the cache still its?
        if len(self.codes) != len(dataset) or len(self.labels) != len(dataset) or self.codes.shape[1:] != first.shape:
            fail(f"{path} holds another dataset's or tokenizer's codes {self.codes.shape}; delete it to encode again")
        if os.path.exists(path + ".json"):  # an older version's cache has none
            with open(path + ".json") as f:
                recorded = json.load(f)
            if recorded["tokenizer_sha256"] != digest:
                fail(f"{path} was encoded by another tokenizer (its weights differ from this one's); "
                     f"use a new --output-dir, or delete it to encode again")
            if recorded.get("data_sha256", data) != data:  # an earlier version's cache has none
                fail(f"{path} was encoded from other images (their labels or first images differ from these); "
                     f"use a new --output-dir, or delete it to encode again")
        # moments only: CODA's tokens come from a posterior sample, so encoding an image twice changes some
        if first.is_floating_point() and not same_encoding(torch.from_numpy(np.array(self.codes[0])), first):
            fail(f"{path} was encoded from other images or by another VAE (its image 0 differs); "
                 f"use a new --output-dir, or delete it to encode again")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.codes[i])), int(self.labels[i]), int(self.bad[i])


def training_data(args, rank):
    if getattr(args, "use_cached", False):
        return CachedLatents(args.cache_path)
    if args.data_path:
        return ImageFolder(args.data_path, args.img_size)
    return ToyDataset(args.img_size, seed=args.seed, progress=rank == 0)


def holdout_images(args, n):
    """n images the model does not train on, in [-1, 1] (n, 3, H, W): toy images of another seed,
    or n of --val-path spread evenly over it; without --val-path, n of --data-path alike, which
    the model does train on (the report says so)."""
    if not (args.data_path or args.val_path):
        return fid.to_tensor(fid.toy_images(args.img_size, n, seed=args.seed + 1000))
    data = ImageFolder(args.val_path or args.data_path, args.img_size, loose=bool(args.val_path))
    n = min(n, len(data))
    return torch.stack([data[i * len(data) // n][0] for i in range(n)])  # every class, not the first ones


class ShardSampler(torch.utils.data.Sampler):
    """This rank's share of a shuffled epoch, like DistributedSampler(shuffle=True, drop_last=True),
    but able to start mid-epoch: resuming skips the batches already seen without loading them."""

    def __init__(self, n, rank, world, seed, epoch, start=0):
        self.n, self.rank, self.world, self.seed, self.epoch, self.start = n, rank, world, seed, epoch, start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 10007 + self.epoch))
        per_rank = self.n // self.world
        return iter(perm[self.rank: per_rank * self.world: self.world][self.start:].tolist())

    def __len__(self):
        return self.n // self.world - self.start


#################################################################################
#                           Generate and score (--eval)                         #
#################################################################################

@torch.no_grad()
def evaluate(args, rank, world, device):
    """Generate `num_images` class-balanced samples (num_images / classes per class, as the official
    MAR evaluation) with the EMA weights, score them in memory against reference statistics with the
    TF-exact Inception (torch-fidelity's numbers), and print FID, IS and seconds per image. Rank r
    draws the r-th contiguous block of the image list, so the gathered order (which IS's fixed split
    depends on) is the same for any number of processes."""
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = args.resume or os.path.join(args.output_dir, "checkpoint-last.pth")
    ckpt = load_checkpoint(ckpt_path, "--eval")
    if ckpt.get("model_name", args.model) != args.model:  # official MAR files carry no model_name
        fail(f"{ckpt_path} is a checkpoint of --model {ckpt['model_name']}, not {args.model}")
    if isinstance(ckpt.get("args"), dict):  # ours: the flags left out take the run's recipe, as a resume does
        kept = continue_recipe(args, ckpt["args"], None)
        shown = {k: v for k, v in kept.items() if k not in TRAINING_ONLY}
        if shown and rank == 0:
            print("--eval: as the checkpoint's run (give a flag to change it): " + ", ".join(
                f"--{k.replace('_', '-')} {format(v, 'g') if type(v) is float else v}" for k, v in shown.items()), flush=True)
    # ours record the class count in `config`; the official ones in their argparse Namespace `args`
    num_classes = ckpt["config"]["class_num"] if "config" in ckpt else getattr(ckpt.get("args"), "class_num", 1000)
    trained_on = ckpt["args"].get("data_path") if isinstance(ckpt.get("args"), dict) else None
    if trained_on and not args.fid_stats and rank == 0:  # said, not silent: the built-in data may not be its data
        print(f"note: {ckpt_path} was trained on {trained_on}, and is scored against the built-in data's held-out "
              f"images (--fid-stats gives another reference)", flush=True)
    if num_classes != 10 and not args.fid_stats:  # e.g. an official ImageNet checkpoint: toy images are no reference
        fail(f"--eval of a {num_classes}-class checkpoint needs --fid-stats (the built-in data's reference has 10 classes)")
    if args.num_images % num_classes:
        fail(f"--num-images {args.num_images} must be a multiple of the {num_classes} classes (class-balanced samples)")
    training = build(args, num_classes, device)
    if "config" in ckpt:  # official MAR files carry none
        check_config(ckpt_path, ckpt["config"], training.config)
    check_tokenizer(ckpt_path, ckpt, *tokenizer_digest(training))
    if hasattr(training, "load_checkpoint_state") and "config" in ckpt:
        training.load_checkpoint_state(ckpt)  # MAR on pixels: its tokenizer's decoder
    try:  # the EMA weights, as the paper evaluates; of the file as read above (a run may be replacing it)
        mar.load_weights(training.model, ckpt_path, "model_ema", ckpt)
    except ValueError as e:
        fail(f"--eval: {e} (check --preset / --img-size / --vae)")
    step = ckpt.get("step")
    del ckpt
    try:
        net = fid.load_inception(args.inception_weights, device=device, flag="--inception-weights")
        t = time.time()
        reference = fid.load_set(args.fid_stats, net, args.eval_batch_size)[0] if args.fid_stats else fid.builtin_reference(
            args.output_dir, args.img_size, args.num_images, args.seed + 1000, net, args.eval_batch_size)
        reference_seconds = time.time() - t
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(str(e))
    model = training.model.to(device).eval()
    cuda = device.type == "cuda"
    amp = mar.autocast(device, training.bf16)  # sampling in the precision of training, as the official evaluation
    per_class = args.num_images // num_classes
    ids = torch.arange(rank * args.num_images // world, (rank + 1) * args.num_images // world)
    generator = torch.Generator(device).manual_seed(args.seed * 1000 + rank)
    scorer, seconds, timed = fid.Scorer(net), 0.0, 0
    if args.save_images:
        os.makedirs(args.save_images, exist_ok=True)
    batches = ids.split(args.eval_batch_size)
    for i, batch in enumerate(tqdm(batches, desc=f"generating {args.num_images} images", disable=rank != 0, dynamic_ncols=True)):
        labels = (batch // per_class).to(device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.time()
        with amp:
            images = training.sample(model, labels, generator)   # (B, 3, H, W) in [-1, 1]
        if cuda:
            torch.cuda.synchronize()
        if i > 0 or len(batches) == 1:  # as the official code: the first batch (warm-up) is not timed
            seconds, timed = seconds + time.time() - t0, timed + len(batch)
        images = fid.to_uint8(images)
        scorer.update(images)
        if args.save_images:
            for j, im in zip(batch.tolist(), images.permute(0, 2, 3, 1).cpu().numpy()):
                Image.fromarray(im).save(os.path.join(args.save_images, f"{j:05d}.png"))
    features = scorer.features()  # every rank takes part in the gather; rank 0 computes the metrics
    if rank == 0:
        result = fid.compare(fid.summarize(*features), reference, device)
        out = dict(checkpoint=ckpt_path, step=step, num_images=result["num_images"],
                   **{k: result.get(k) for k in ("fid", "is_mean", "is_std", "is_adm", "precision", "recall", "sfid")},
                   seconds_per_image=seconds / max(timed, 1), num_iter=args.num_iter,
                   cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                   num_sampling_steps=getattr(args, "num_sampling_steps", None), processes=world,
                   seconds={"reference": reference_seconds, **result["seconds"]})
        # the numbers first: hours of generation are never lost to a file error
        print(f"seconds per image: {out['seconds_per_image']:.4f} ({world} process(es), excluding the first batch)")
        print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in out["seconds"].items()))
        print(f"{result['num_images']} images, cfg {args.cfg}, {args.num_iter} steps:")
        print("\n".join(fid.report(result, os.path.basename(args.fid_stats) if args.fid_stats else "held-out built-in images")),
              flush=True)
        append_line(os.path.join(args.output_dir, "eval.jsonl"), json.dumps(out))


#################################################################################
#                                 Training loop                                 #
#################################################################################

STOP = {"signal": None, "code": 0}  # code: the exit status once a run has stopped early


def request_stop(signum, frame):
    """SIGTERM / SIGINT: finish the current step, save a checkpoint at the next log step, exit with
    128 + the signal's number (143 for SIGTERM, 130 for SIGINT): stopped, resumable."""
    STOP["signal"], STOP["code"] = signal.Signals(signum).name, 128 + signum


def stop_at_once(when):
    """-> a SIGTERM / SIGINT handler for the phases with nothing left to save: one line saying
    `when`, then exit with 128 + the signal's number."""
    def stop(signum, frame):
        print(f"train.py: stopped by {signal.Signals(signum).name} {when}", file=sys.stderr)
        raise SystemExit(128 + signum)
    return stop


# while data, token caches or MAR's pixel decoder are prepared (caches are written atomically); after the final checkpoint
stop_before_training = stop_at_once("before the first training step; nothing to save: the same command starts again")
stop_now = stop_at_once("after the final checkpoint was written; the final grid and report were skipped")


def build(args, num_classes, device):
    """The model file's training module for --model (a one-line error for a bad input file)."""
    try:
        return MODELS[args.model](args, num_classes, device)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))


def main(args):
    """Train --model as the flags say (or --cache-latents / --eval); returns the trained model, or
    None if the run stopped early (a signal: resumable) or did not train."""
    rank, world, device = setup_distributed(args.device, args.dist_timeout)
    mar.keep_freed_memory()  # CPU steps reuse freed memory instead of page-faulting it in again
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32  # no effect on CPU
    torch.manual_seed(args.seed + rank)  # per-rank seeds, as the official code
    np.random.seed(args.seed + rank)
    if getattr(args, "cache_latents", False):
        return cache_latents(args, rank, world, device)
    if args.eval:
        return evaluate(args, rank, world, device)

    log = open_run_folder(args, rank, world, device)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_before_training)  # until the loop, where a signal saves a checkpoint first
    step, ckpt_path = 0, os.path.join(args.output_dir, "checkpoint-last.pth")
    resume = resume_from(args.resume, ckpt_path, rank, world)
    ckpt = load_checkpoint(resume, "--resume") if resume else None
    if ckpt and ckpt.get("model_name") != args.model:
        fail(f"{resume} is a checkpoint of --model {ckpt.get('model_name', '(not written by train.py)')}, not {args.model}")
    if args.resume and os.path.realpath(resume) != os.path.realpath(args.resume):  # the folder's own checkpoint
        started = ckpt.get("args", {}).get("resume")
        if not started or os.path.realpath(started) != os.path.realpath(args.resume):
            fail(f"{args.output_dir} holds a run of its own (step {ckpt['step']}) that did not start from --resume "
                 f"{args.resume}: use another --output-dir, or drop --resume to continue that run")
        log(f"resuming this run's own {ckpt_path} (step {ckpt['step']}), which started from --resume {args.resume}")
    if ckpt:
        continue_recipe(args, ckpt["args"], log)
    # ---- data, model, EMA, optimizer ----
    dataset = training_data(args, rank)
    num_classes = len(dataset.classes)
    training = build(args, num_classes, device)
    tokenizer_flag, digest = tokenizer_digest(training)
    if type(dataset) is CachedLatents:  # MAR's --use-cached
        dataset.check(os.path.join(args.cache_path, "vae.json"), digest, args.img_size // training.vae.stride)
    if hasattr(training, "encode") and len(dataset) <= getattr(training, "cache_limit", len(dataset)):
        # MaskGIT's tokens, MAR's VAE moments: of every image and its flip, computed once
        dataset = CachedTokens(dataset, training.encode, digest, args.cache_path or os.path.join(args.output_dir, "tokens.npy"),
                               args.batch_size, args.num_workers, rank, world, device)
    elif type(dataset) is ImageFolder and len(dataset) * 3 * args.img_size**2 * 4 <= PRELOAD_BYTES:  # not cached latents
        dataset.preload(progress=rank == 0)
        log(f"read the {len(dataset):,} images of {args.data_path} into memory once")
    held_out = functools.lru_cache()(lambda n: holdout_images(args, n))
    steps_per_epoch = len(dataset) // world // args.batch_size
    if steps_per_epoch == 0:
        fail(f"{len(dataset)} images are fewer than one global batch ({args.batch_size} x {world} processes)")
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    model = training.model.to(device)
    log(f"{args.model} ({args.preset}): {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(dataset)} images of {num_classes} classes, {steps_per_epoch} steps per epoch" +
        (f", each in {args.grad_accum} micro-batches of {args.batch_size // args.grad_accum} a process (--grad-accum)"
         if args.grad_accum > 1 else ""))
    lr = args.lr or args.blr * args.batch_size * world / 256  # the paper's linear scaling rule
    opt = make_optimizer(training, lr, args.weight_decay)
    trainable = [p for group in opt.param_groups for p in group["params"]]
    aug = torch.Generator().manual_seed(args.seed * 1000 + rank)  # data augmentation draws
    if resume:
        load_resume(ckpt, resume, training, opt)
        check_tokenizer(resume, ckpt, tokenizer_flag, digest)
        step = ckpt["step"]
        if rank == 0:  # a run killed after its last checkpoint logged steps that will now run again
            keep_metrics_until(os.path.join(args.output_dir, "metrics.jsonl"), step)
        before = (ckpt.get("world_size"), ckpt["args"].get("batch_size"))
        if before != (world, args.batch_size):  # another global batch: the epochs done, counted in this run's steps
            step = round(ckpt["epoch"] * steps_per_epoch)
            log(f"resuming with {world} x {args.batch_size} images a step instead of {before[0]} x {before[1]}: "
                f"its step {ckpt['step']} (epoch {ckpt['epoch']:.2f}) is step {step} here")
    train_model = distribute(training, args.compile, device, world)  # checkpoints are written from the plain `model`
    ema = copy.deepcopy(model).requires_grad_(False)  # after the DDP wrap, so every rank starts equal
    if resume:
        ema.load_state_dict(ckpt["model_ema"])
        if ckpt.get("world_size") == world:
            set_rng_state(ckpt["rng"][rank], device, aug)
        else:
            log(f"note: resuming on {world} processes instead of {ckpt.get('world_size')}: random streams re-seeded")
        log(f"resumed from {resume} at step {step} / {total_steps}")
        del ckpt
    elif hasattr(training, "prepare"):  # MAR on pixels: its tokenizer's decoder, fitted first
        fitted = training.prepare(dataset, log)
        if fitted is not None and world > 1:  # rank 0's weights everywhere (a GPU's convs are not bitwise reproducible)
            for t in fitted.state_dict().values():
                dist.broadcast(t, 0)
    # each model's official precision (MAR, MaskGIT: mixed; CODA, VAE: fp32 unless --bf16, set by their CPU-sized
    # recipes) as bf16 (no GradScaler), for steps and grids alike, on CUDA and on CPUs with bf16 instructions
    bf16 = training.bf16 and mar.bf16_autocast(device)
    amp = mar.autocast(device, training.bf16)
    log(f"precision: {'bf16 autocast' if bf16 else 'fp32'}{', TF32 matmuls' if cuda and args.tf32 and not bf16 else ''}")

    writer = CheckpointWriter()

    last_saved = step if os.path.exists(ckpt_path) else None  # the step checkpoint-last.pth holds

    def diverged(what):
        last = f"the last checkpoint is {ckpt_path} (step {last_saved})" if last_saved is not None else "no checkpoint was written yet"
        log(f"{what} at step {step}: stopping; {last}")
        fail(f"{what} at step {step} (try a lower --blr); {last}")

    def save(final=False):
        """In the background (see CheckpointWriter); `final`: wait until the file is written. Never
        with non-finite weights or gradients (equal on all ranks): the last checkpoint stays."""
        nonlocal last_saved
        weights = torch.stack([p.detach().abs().amax() for p in trainable])
        if not (torch.isfinite(grad_norm) & torch.isfinite(weights).all()):  # a host sync, once per checkpoint
            diverged("the gradient or the weights are not finite")
        last_saved = step
        states = gather_to_rank0(rng_state(device, aug))
        if rank == 0:
            extra = training.checkpoint_state(ema, held_out) if hasattr(training, "checkpoint_state") else {}
            writer.write({"model": model.state_dict(), "model_ema": ema.state_dict(), "optimizer": opt.state_dict(),
                          "step": step, "epoch": step / steps_per_epoch, "args": vars(args), "model_name": args.model,
                          "config": training.config, "tokenizer_sha256": digest, "rng": states, "world_size": world, **extra},
                         ckpt_path)
        if final:
            writer.wait()
            barrier()

    def grid(name, seed=args.seed):  # on rank 0: the picture of the EMA model (see `picture`), saved if named
        if rank == 0:
            ema.eval()
            with amp, torch.random.fork_rng(devices=[device] if cuda else []):  # the training's random streams untouched
                images, labels, cols = picture(training, ema, num_classes, held_out, seed)
            if name:
                save_grid(images, os.path.join(args.output_dir, f"samples-{name}.png"), cols)
                log(f"step {step}: wrote {os.path.join(args.output_dir, f'samples-{name}.png')}")
            return images.float().cpu(), labels

    if args.compile and hasattr(training, "warm_up") and step < total_steps:  # MAR: every mask size's graph, now
        t0, state = time.time(), rng_state(device, aug)
        micro = args.batch_size // args.grad_accum  # the size the steps compute at
        batch = torch.utils.data.default_collate([dataset[i] for i in range(micro)])
        training.warm_up(train_model, *training.inputs(batch, torch.zeros(micro, dtype=torch.bool)), amp)
        opt.zero_grad(set_to_none=True)
        set_rng_state(state, device, aug)  # the run draws what it would have drawn without the warm-up
        log(f"--compile: compiled the training step for every mask size in {time.time() - t0:.0f} s")

    # ---- the loop ----
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if step >= total_steps:
        log(f"the run in {args.output_dir} is already complete ({step} steps); use another --output-dir for a new run")
        drawn = from_rank0(os.path.exists(os.path.join(args.output_dir, "samples-final.png")) and
                           (not hasattr(training, "report") or os.path.exists(os.path.join(args.output_dir, "report.json"))))
        if drawn:  # else a signal stopped its final grid or report: they are made now
            barrier()
            return model
    train_model.train()
    pbar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc="training")
    loss_sum, bad_files, t_window, n_window = torch.zeros((), device=device), set(), time.time(), 0
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        loader = torch.utils.data.DataLoader(
            dataset, args.batch_size, sampler=ShardSampler(len(dataset), rank, world, args.seed, epoch, offset * args.batch_size),
            num_workers=args.num_workers, pin_memory=cuda, drop_last=True,
            generator=torch.Generator().manual_seed(epoch))  # its own seed draw, not the global RNG's: exact resume
        for batch in loader:
            flip = torch.rand(args.batch_size, generator=aug) < (0.0 if args.no_flip else 0.5)  # the same draws either way
            x, y = training.inputs(batch, flip.pin_memory() if cuda else flip)  # pinned: async copy, no sync
            bad_files.update(batch[-1][batch[-1] >= 0].tolist())  # a CPU tensor: no device sync
            cur_lr = learning_rate(step, lr, warmup_steps, total_steps, args.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = cur_lr * group["lr_scale"]
            loss = backward(training, train_model, x, y, step / total_steps, args.grad_accum, amp)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, model, training.ema_decay(step, epoch))
            if hasattr(training, "after_step"):
                with amp:
                    training.after_step(cur_lr)  # a second player (the GAN discriminator)
            loss_sum += loss
            step, n_window = step + 1, n_window + 1
            pbar.update()
            last = step == total_steps
            if step % args.log_every == 0 or last:  # the only host-device sync point of the loop
                stats = torch.stack([loss_sum, torch.tensor(float(STOP["signal"] is not None), device=device)])
                if world > 1:
                    dist.all_reduce(stats)
                    every = [None] * world
                    dist.all_gather_object(every, bad_files)  # each rank skips the unreadable files of its shard
                    bad_files = set().union(*every)
                avg_loss, stop = stats[0].item() / (n_window * world), stats[1].item() > 0
                extra = training.metrics() if hasattr(training, "metrics") else {}
                if not math.isfinite(avg_loss):
                    diverged(f"loss is {avg_loss}")
                ips = n_window * args.batch_size * world / (time.time() - t_window)
                pbar.set_postfix(loss=f"{avg_loss:.4f}", lr=f"{cur_lr:.2e}", img_s=f"{ips:.0f}",
                                 **{k: f"{v:.3g}" for k, v in extra.items() if k in ("codebook_usage", "l1", "d_loss")})
                if rank == 0:
                    append_line(os.path.join(args.output_dir, "metrics.jsonl"), json.dumps(dict(
                        step=step, epoch=round(step / steps_per_epoch, 4), loss=avg_loss, lr=cur_lr, grad_norm=grad_norm.item(),
                        images_per_s=ips, skipped_images=len(bad_files), time=time.time(), **extra)))
                loss_sum.zero_()
                t_window, n_window = time.time(), 0
                if stop:
                    STOP["code"] = STOP["code"] or 128 + signal.SIGTERM  # the signal came to another rank
                    save(final=True)
                    log(f"stopped by {STOP['signal'] or 'a signal on another rank'} at step {step}: checkpoint saved "
                        f"to {ckpt_path}; run the same command to resume")
                    pbar.close()
                    return None
            if step % args.ckpt_every == 0 or last:
                save(final=last)
            if step % args.sample_every == 0 and not last:
                t_grid = time.time()
                grid(f"{step:07d}")
                t_window += time.time() - t_grid  # images/s and the bar's time left count training only
                pbar.unpause()
            if last:
                break
    pbar.close()
    finish(args, training, model, ema, dataset, bad_files, grid, held_out, log, rank, world, device)
    log(f"done: {step} steps, checkpoint {ckpt_path}")
    barrier()  # the files above exist before any rank goes on (the next --compare-quantizers row)
    return model


def backward(training, model, x, y, progress, parts, amp):
    """The step's loss and gradients, computed in `parts` micro-batches (--grad-accum, as official
    CODA's 16 images x 4 a GPU): each one's loss divided by `parts`, DDP's all-reduce once, after
    the last -> the loss of the whole batch, detached."""
    total = 0
    for i, (xi, yi) in enumerate(zip(x.chunk(parts), [None] * parts if y is None else y.chunk(parts))):
        last = i == parts - 1
        with (nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()), amp:
            loss = training.loss(model, xi, yi, progress)
            loss = loss / parts if parts > 1 else loss
        loss.backward()
        total = total + loss.detach()
    return total


def distribute(training, compile, device, world):
    """DDP, then compile (optional) the wrapped model: dynamo splits the graph at DDP's buckets, so
    the all-reduce still overlaps the backward pass. The models' buffers are constants (schedules,
    layouts): not broadcast at every forward. A second player (CODA's discriminator) gets its own DDP."""
    ddp = lambda m, buffers=False: (DDP(m, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True, broadcast_buffers=buffers) if world > 1 else m)
    model = ddp(training.model)
    if hasattr(training, "wrap"):
        training.wrap(ddp)
    return torch.compile(model, dynamic=False) if compile else model  # static shapes (see MAR.draw_num_masked)


def resume_from(flag, ckpt_path, rank, world):
    """The checkpoint to resume from (the run folder's own if there is one, else --resume), or
    None: a requeued command that started from --resume goes on from its own progress. Rank 0
    decides and tells the others: with node-local disks the ranks may see different folders, and a
    rank that cannot see rank 0's choice stops with one line instead of hanging."""
    resume = from_rank0(ckpt_path if os.path.exists(ckpt_path) else flag)
    if world > 1 and resume and not os.path.exists(resume):
        fail(f"rank {rank} cannot see {resume}, which rank 0 resumes from: the output folder must be shared")
    return resume


def finish(args, training, model, ema, dataset, bad_files, grid, held_out, log, rank, world, device):
    """After the final checkpoint: check that the ranks hold identical weights, name the skipped
    images, draw the final grid and write the report (a signal now stops at once)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_now)
    # DDP keeps replicas equal; check it once, bit for bit (silent divergence is costly)
    digests = gather_to_rank0(hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest())
    if rank == 0 and world > 1:
        log(f"parameters identical on all {world} ranks: {'yes' if len(set(digests)) == 1 else 'NO'}")
    if bad_files:
        names = ", ".join(dataset.samples[i][0] for i in sorted(bad_files)[:3]) + (", ..." if len(bad_files) > 3 else "")
        log(f"skipped {len(bad_files)} unreadable images (each replaced by the next readable one): {names}")
        unseen = sorted(set(range(len(dataset.classes))) - {c for i, (_, c) in enumerate(dataset.samples) if i not in bad_files})
        if unseen:  # every image of a class was read at least once in the run, and none could be
            them = "it" if len(unseen) == 1 else "them"
            log(f"warning: no image of class {', '.join(dataset.classes[c] for c in unseen)} could be read: the model "
                f"never saw {them}, and its samples of {them} mean nothing")
    if rank == 0:
        images, labels = grid("final")
        for line in final_report(args, training, ema, images, labels, grid, held_out, device):
            log(line)


def final_report(args, training, ema, images, labels, grid, held_out, device):
    """A tokenizer's reconstruction report on held-out images (also written to report.json); on the
    built-in data, a generator's class accuracy by the judge on the final grid (images, labels) and
    400 more samples drawn as `grid` draws it, with other seeds -> lines for the log."""
    if hasattr(training, "report"):
        net = None  # rFID only with weights: given, or already downloaded (then checked against their SHA-256)
        if args.inception_weights or os.path.exists(fid.cached_weights()):
            try:
                net = fid.load_inception(args.inception_weights, pytorch_fid=True, device=device, flag="--inception-weights")
            except (ValueError, FileNotFoundError) as e:
                fail(str(e))
        lines, numbers = training.report(ema, held_out(args.num_images), fid.ReconstructionMetrics(net, distributed=False),
                                         args.batch_size)
        with open(os.path.join(args.output_dir, "report.json"), "w") as f:
            json.dump(numbers, f)
        if args.data_path and not args.val_path:
            lines.append(f"note: without --val-path, these {numbers['images']} images are training images")
        return lines
    if not (args.data_path or getattr(args, "use_cached", False)) and args.img_size == 32:
        more = [grid(None, args.seed + k) for k in range(1, 5)]  # 50 samples a class: one grid's 10 are a noisy verdict
        return fid.judge_samples(torch.cat([images] + [m[0] for m in more]), torch.cat([labels.cpu()] + [m[1].cpu() for m in more]),
                                 args.img_size, args.seed, grid=len(images))
    return []


def compare_quantizers(argv, base):
    """CODA's --compare-quantizers: the paper's Table 1 progression (coda.TABLE1), one run per row in
    <output-dir>/table1-<row> with the given flags plus the row's, each resumable; prints the table."""
    try:
        table = coda.table1_rows(base)  # reads --vae
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    rows = []
    for i, (name, flags) in enumerate(table):
        args = parse_args([a for a in argv if a != "--compare-quantizers"] + flags +
                          ["--output-dir", os.path.join(base.output_dir, f"table1-{i}")])
        if main(args) is None:
            return  # stopped by a signal: the same command resumes the row
        if not dist.is_initialized() or dist.get_rank() == 0:
            with open(os.path.join(args.output_dir, "report.json")) as f:
                rows.append((name, json.load(f)))
    if rows:
        lines = coda.format_table1(rows, base.data_path or "the built-in data", base.epochs)
        print("\n".join(lines))
        with open(os.path.join(base.output_dir, "table1.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


#################################################################################
#                                     Flags                                     #
#################################################################################

def choose_defaults(args, model):
    """Which values the unset flags take -> (the model's defaults, one line saying which and why).
    The paper's recipe for ImageNet-sized data (100,000+ images) on a GPU, cached latents or
    ImageNet reference statistics; otherwise the CPU-sized recipe of the built-in run, with as
    many training steps as the built-in run: a small folder of your own trains as that run does."""
    if args.defaults == "paper" or args.defaults == "auto" and (getattr(args, "use_cached", False) or args.eval and args.fid_stats):
        return model.PAPER, "defaults: the paper's recipe (--defaults paper, cached latents or reference statistics)"
    builtin = model.builtin_defaults(args) if hasattr(model, "builtin_defaults") else model.BUILTIN  # MAR: by token kind
    latent = "" if builtin is model.BUILTIN else " on VAE latents"
    if not args.data_path:
        return builtin, f"defaults: CPU-sized, for the built-in data{latent} (--defaults paper for the paper's recipe)"
    samples = list_images(args.data_path)[1]
    n = len(samples)
    if args.defaults == "auto" and n >= 100_000 and torch.cuda.is_available():
        return model.PAPER, f"defaults: the paper's recipe ({n:,} images and a GPU; --defaults cpu for the CPU-sized one)"
    steps = fid.BUILTIN_IMAGES / n  # epochs scale so that the run takes as many steps as the built-in one
    defaults = dict(builtin, epochs=max(1, round(builtin["epochs"] * steps)),
                    warmup_epochs=builtin["warmup_epochs"] * steps)
    why = "--defaults cpu" if args.defaults == "cpu" else "fewer than 100,000 images" if n < 100_000 else "no GPU"
    px = defaults["img_size"] if args.img_size is None else args.img_size
    size = first_image_size(samples)
    seen = "" if size is None or min(size) == px else f" (its first image, {size[0]}x{size[1]}, is scaled and center-cropped to it)"
    return defaults, (f"defaults: CPU-sized ({why}): the built-in run's recipe{latent} at {px} px{seen}, "
                      f"{defaults['epochs']} epochs of {n:,} images (--defaults paper for the paper's recipe)")


def first_image_size(samples):
    """(width, height) of the first readable image of [(path, label)] (its header only), or None."""
    for path, _ in samples[:10]:
        try:
            with Image.open(path) as img:
                return img.size
        except BROKEN_IMAGE:
            continue
    return None


def parse_args(argv=None):
    """The shared flags, plus the --model's own (its file's `add_args`). Flags left unset take the
    model's paper value (PAPER) or its CPU-sized value (BUILTIN), see `choose_defaults`;
    `--model X --help` lists X's flags with both."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="mar", choices=list(MODELS))
    name = pre.parse_known_args(argv)[0].model
    model = MODELS[name]
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mar", choices=list(MODELS))
    p.add_argument("--preset", choices=list(model.PRESETS))
    # data
    p.add_argument("--data-path", help="ImageNet-style folder (one subfolder per class); default: built-in data")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips (the papers flip half the "
                                                          "images): for data whose mirror image is another thing, e.g. digits or text")
    p.add_argument("--val-path", help="a tokenizer's held-out images for grids and reports, in class subfolders or "
                                        "not (default: --data-path)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--num-workers", type=int, default=8 if torch.cuda.is_available() else 0)
    p.add_argument("--defaults", default="auto", choices=["auto", "paper", "cpu"], help="the values unset flags "
                   "take: the paper's recipe, or the CPU-sized recipe of the built-in run (with as many steps); "
                   "auto: the paper's for 100,000+ images on a GPU")
    # optimization
    p.add_argument("--epochs", type=int)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--grad-accum", type=int, help="split each process's batch into this many micro-batches, their "
                   "gradients summed before the step (the memory of one; the same global batch); 1 unless the recipe says")
    p.add_argument("--blr", type=float, help="base lr; lr = blr x global batch / 256")
    p.add_argument("--lr", type=float, help="absolute lr (overrides --blr)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--ema", type=float, help="EMA decay")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-tf32", dest="tf32", action="store_false")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--seed", type=int, default=1)  # official
    p.add_argument("--dist-timeout", type=int, default=600, help="seconds without an answer from a rank before the run "
                                                                  "fails naming it (torchrun)")
    # run folder, logging, samples
    p.add_argument("--output-dir", help="default: runs/<model>-<preset>")
    p.add_argument("--resume", help="checkpoint to start training from (a requeued command goes on from its "
                                    "<output-dir>/checkpoint-last.pth instead), or to evaluate with --eval")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--sample-every", type=int)
    p.add_argument("--num-images", type=int, help="images to generate (--eval) or held-out images to reconstruct")
    model.add_args(p.add_argument_group(f"--model {name}"))
    p.set_defaults(eval=False)
    if hasattr(model, "sample"):  # generators: generate and score
        g = p.add_argument_group("generate and score (--eval)")
        g.add_argument("--eval", action="store_true", help="generate --num-images samples from --resume and print "
                                                            "FID, IS, precision, recall and sFID")
        g.add_argument("--eval-batch-size", type=int, default=256, help="generation batch per process (official eval_bsz "
                                                                        "for MAR-B/L; 128 for MAR-H)")
        g.add_argument("--fid-stats", help="the reference: ADM's VIRTUAL_imagenet256_labeled.npz (statistics and images: all "
                                           "five numbers), a statistics .npz (MAR's adm_in256_stats.npz: FID and IS only) or an "
                                           "image folder; default on the built-in data: held-out toy images")
        g.add_argument("--inception-weights", help="FID Inception weights (torch-fidelity's .pth); default: download once")
        g.add_argument("--save-images", metavar="DIR", help="also write the samples as PNGs (00000.png, ...)")
    for action in p._actions:  # say every default in --help: the model's paper / built-in values
        paper, builtin = model.PAPER.get(action.dest), model.BUILTIN.get(action.dest)
        if action.default is None and paper is not None:
            action.help = (action.help + "; " if action.help else "") + (
                f"default: {paper}" if paper == builtin else f"default: {paper} (paper), {builtin} (CPU-sized)")
        elif type(action) is argparse._StoreAction and action.default is not None:
            action.help = (action.help + "; " if action.help else "") + f"default: {action.default}"
    args = p.parse_args(argv)

    error = model.check_args(args) if hasattr(model, "check_args") else None  # on the flags as given
    if error:
        fail(error)
    defaults, args.defaults_in_force = choose_defaults(args, model)
    args.unset = sorted(key for key in defaults if key in vars(args) and getattr(args, key) is None)  # see continue_recipe
    for key in args.unset:
        setattr(args, key, defaults[key])
    if args.grad_accum is None:  # a recipe without it (MAR, MaskGIT): whole batches
        args.grad_accum = 1
    if "lr" in args.unset and args.blr is not None and "blr" not in args.unset:  # a given --blr wins over a recipe's --lr
        args.lr = None
        args.unset.remove("lr")
    if "warmup_epochs" in args.unset and args.epochs < defaults["epochs"]:  # a shorter --epochs: the recipe's share
        args.warmup_epochs = defaults["warmup_epochs"] * args.epochs / defaults["epochs"]  # the recipe's at its length
        args.defaults_in_force += f"; {args.warmup_epochs:.3g} warm-up epochs, the recipe's share of --epochs {args.epochs}"
    args.output_dir = args.output_dir or os.path.join("runs", f"{args.model}-{args.preset}")
    if args.eval and (args.data_path or getattr(args, "use_cached", False)) and not args.fid_stats:
        fail("--eval on ImageNet needs --fid-stats (ADM's VIRTUAL_imagenet256_labeled.npz, MAR's fid_stats/adm_in256_stats.npz, "
             "or `python fid.py DIR --save-stats`)")
    if args.resume and not os.path.exists(args.resume):
        fail(f"--resume: checkpoint not found: {args.resume}")
    for flag in ("fid_stats", "save_images"):
        if getattr(args, flag, None) and not args.eval:
            fail(f"--{flag.replace('_', '-')} is for --eval (generate and score); a training run does not read it")
    if args.eval and args.save_images and os.path.isdir(args.save_images) and any(
            f.endswith(".png") for f in os.listdir(args.save_images)):
        fail(f"--save-images {args.save_images} holds PNGs already (an earlier --eval?), which `fid.py` would score with "
             f"the new ones: give an empty or new folder")
    for flag in ("inception_weights", "dino_weights", "fid_stats"):  # read at the end of a run: checked before it
        if getattr(args, flag, None) and not os.path.exists(getattr(args, flag)):
            fail(f"--{flag.replace('_', '-')}: not found: {getattr(args, flag)}")
    if args.val_path and not hasattr(model, "report"):
        fail(f"--val-path: --model {name} does not use held-out images (the tokenizers, vae and coda, do)")
    if args.val_path and not os.path.isdir(args.val_path):
        fail(f"--val-path: no folder {args.val_path}")
    if args.val_path and len(list_images(args.val_path, IMG_EXTENSIONS, True)[1]) < 2:  # checked now, not at the report
        fail(f"--val-path {args.val_path}: the report's rFID needs at least 2 held-out images")
    if hasattr(model, "report") and args.img_size < 11:
        fail(f"--img-size {args.img_size}: the tokenizers' report computes SSIM in 11 x 11 windows; give at least 11")
    check_numbers(args)
    if args.batch_size % args.grad_accum:
        fail(f"--batch-size {args.batch_size} is not a multiple of --grad-accum {args.grad_accum}")
    for flag in ("output_dir", "save_images", "cache_path"):
        if getattr(args, flag, None) and (flag != "cache_path" or getattr(args, "cache_latents", False)):
            check_writable(getattr(args, flag), "--" + flag.replace("_", "-"))
    return args


LEAST = dict(warmup_epochs=0, num_workers=0, ema_start_epoch=0, seed=0, cleanup_steps=0, num_images=2)  # else 1


def check_numbers(args):
    """Every number a flag gave is usable, before anything is built: counts at least 1 (0 where
    allowed; images for statistics 2, a covariance's least), rates finite and positive, the EMA decay in [0, 1]."""
    for key, value in vars(args).items():
        flag, low = "--" + key.replace("_", "-"), LEAST.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, int) and value < low:
            fail(f"{flag} {value}: must be at least {low}")
        if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
            fail(f"{flag} {value}: must be a finite number >= 0")
        if key in ("lr", "blr", "quantizer_lr", "grad_clip") and value <= 0 or key == "ema" and value > 1:
            fail(f"{flag} {value}: must be " + ("at most 1" if key == "ema" else "positive"))


def check_writable(path, flag):
    """Fail now, not after hours of work, if `path` cannot be (made into) a folder we can write to."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail(f"{flag} {path}: {parent} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        fail(f"{flag} {path}: cannot write in {parent} ({e.strerror})")


if __name__ == "__main__":
    args = parse_args()
    if getattr(args, "compare_quantizers", False):
        compare_quantizers(sys.argv[1:], args)
    else:
        main(args)
    barrier(destroy=True)
    sys.exit(STOP["code"])  # 0: done; 143 / 130: stopped by SIGTERM / SIGINT, checkpoint saved, resumable
