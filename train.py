"""
One training driver for every model in this repository: plain torch.distributed DDP, no framework.

    torchrun train.py --model mar                       # built-in data, tiny preset: CPU minutes
    torchrun --nproc_per_node=8 train.py --model mar --preset base --data-path /imagenet/train \
        --vae pretrained/kl16.ckpt --epochs 800         # the paper's recipe (see README)
    torchrun --nnodes=4 --node_rank=$RANK --master_addr=$ADDR --master_port=29500 \
        --nproc_per_node=8 train.py ...                 # several nodes
    torchrun --nproc_per_node=8 train.py --model mar --eval --resume mar_base/checkpoint-last.pth \
        --preset base --vae kl16.ckpt --fid-stats adm_in256_stats.npz --num-images 50000 \
        --num-iter 256 --cfg 2.9                        # generate and score (FID-50K, IS)

It also runs as a single process (`python train.py ...`). A run lives in --output-dir: log.txt,
metrics.jsonl, checkpoint-last.pth and samples-*.png. Re-running the same command resumes it
exactly, so a preempted job only needs to be requeued; SIGTERM / SIGINT save a checkpoint first.

A model plugs in through a small "recipe" class (see MarRecipe): it builds the model, turns a
data batch into the model's inputs, says which parameters get weight decay, and draws samples.
The loop itself never changes.
"""
import argparse
import colorsys
import copy
import fcntl
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import coda
import fid
import mar
import maskgit


def fail(message):
    """Stop with a one-line error and exit code 1 (no traceback: the problem is the input)."""
    raise SystemExit(f"train.py: error: {message}")


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
        fail(f"another process (pid {f.read().strip() or '?'}) is training into {path}: wait until it exits "
             f"(it saves a checkpoint first) or use another --output-dir")
    except OSError:  # a file system without flock (some network mounts): run unlocked
        f.close()
        return
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    LOCKS[path] = f


#################################################################################
#                                     Data                                      #
#################################################################################

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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


def to_tensor(arr):
    """uint8 (..., H, W, C) array or tensor -> float (..., C, H, W) in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    return torch.as_tensor(arr).movedim(-1, -3).float() / 127.5 - 1


class ImageFolder(torch.utils.data.Dataset):
    """An ImageNet-style folder: one subfolder per class, sorted names -> labels 0..C-1.

    An unreadable or corrupt image is replaced by the next readable one and counted (the third
    item of each sample), so a few bad files in a million never crash a multi-day run."""

    def __init__(self, root, image_size, suffixes=IMG_EXTENSIONS):
        if not os.path.isdir(root):
            fail(f"data folder not found: {root}")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        self.samples = [(os.path.join(dirpath, f), label) for label, c in enumerate(self.classes)
                        for dirpath, _, files in sorted(os.walk(os.path.join(root, c)))
                        for f in sorted(files) if f.lower().endswith(suffixes)]
        if not self.samples:
            fail(f"no images in {root} (expected one subfolder per class holding {'/'.join(suffixes)} files)")
        self.image_size = image_size

    def __len__(self):
        return len(self.samples)

    def load(self, path):
        with Image.open(path) as img:
            return to_tensor(center_crop_arr(img.convert("RGB"), self.image_size))

    def __getitem__(self, i):
        for bad in range(len(self.samples)):
            path, label = self.samples[(i + bad) % len(self.samples)]
            try:
                return self.load(path), label, bad
            except Exception:  # PIL raises OSError, SyntaxError, ValueError... on broken files
                continue
        fail("no readable image in the data folder")


class CachedLatents(ImageFolder):
    """Pre-computed VAE posterior moments (see `cache_latents`), like the official main_cache.py:
    item = (moments, moments of the flipped image, label, 0)."""

    def __init__(self, root):
        super().__init__(root, None, suffixes=(".npz",))

    def load(self, path):
        with np.load(path) as data:
            return torch.from_numpy(data["moments"]), torch.from_numpy(data["moments_flip"])

    def __getitem__(self, i):
        path, label = self.samples[i]
        return (*self.load(path), label, 0)


# ---- the built-in data: procedurally drawn, class-conditional toy images ---------------------
# Ten classes, each a shape in its own hue family (disc, square, triangle, ring, plus, horizontal
# stripes, vertical stripes, checkerboard, gradient, dots), with random position, size, rotation,
# colours and background. Drawn from signed distance fields, so they are anti-aliased at any size.
# No download, deterministic from (seed, label, index), and generated once into memory.

TOY_CLASSES = ["disc", "square", "triangle", "ring", "plus", "h-stripes", "v-stripes", "checkerboard",
               "gradient", "dots"]
TOY_HUES = [0, 30, 58, 100, 150, 185, 220, 265, 300, 335]  # degrees


def toy_image(label, index, seed=0, size=32):
    """uint8 array (size, size, 3) of class `label`; deterministic in (seed, label, index)."""
    rng = np.random.default_rng([seed, label, index])
    coords = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    x, y = coords[None, :], coords[:, None]
    hsv = lambda h, s, v: np.array(colorsys.hsv_to_rgb((h % 360) / 360.0, s, v))

    def ramp(c1, c2):  # linear blend between two colours along a random direction
        a = rng.uniform(0, 2 * np.pi)
        return c1 + (c2 - c1) * np.clip((np.cos(a) * x + np.sin(a) * y) / 2 + 0.5, 0, 1)[..., None]

    def rotate(u, v, angle):
        return np.cos(angle) * u + np.sin(angle) * v, -np.sin(angle) * u + np.cos(angle) * v

    def stripes(u, freq, phase):  # signed distance to a square wave, > 0 on the stripes
        return (0.25 - np.abs(np.mod(u * freq + phase, 1.0) - 0.5)) / freq

    hue = TOY_HUES[label] + rng.uniform(-12, 12)
    if label == 8:  # gradient: the whole image ramps from dark to bright within the hue family
        img = ramp(hsv(hue + rng.uniform(-20, 20), rng.uniform(0.7, 1), rng.uniform(0.05, 0.25)),
                   hsv(hue, rng.uniform(0.3, 0.8), rng.uniform(0.85, 1)))
        return np.round(img * 255).astype(np.uint8)
    cx, cy = rng.uniform(-0.3, 0.3, size=2)
    u0, v0 = x - cx, y - cy
    r = np.hypot(u0, v0)
    if label == 0:  # disc
        d = rng.uniform(0.3, 0.6) - r
    elif label == 1:  # square, any rotation
        u, v = rotate(u0, v0, rng.uniform(0, np.pi / 2))
        d = rng.uniform(0.28, 0.5) - np.maximum(np.abs(u), np.abs(v))
    elif label == 2:  # equilateral triangle: intersection of three half-planes
        inradius, a = rng.uniform(0.2, 0.32), rng.uniform(0, 2 * np.pi)
        d = np.min([inradius - (np.cos(a + k * 2 * np.pi / 3) * u0 + np.sin(a + k * 2 * np.pi / 3) * v0)
                    for k in range(3)], axis=0)
    elif label == 3:  # ring
        d = rng.uniform(0.1, 0.18) - np.abs(r - rng.uniform(0.38, 0.6))
    elif label == 4:  # plus (or x, rotated)
        u, v = rotate(u0, v0, rng.uniform(0, np.pi / 2))
        w, arm = rng.uniform(0.1, 0.17), rng.uniform(0.45, 0.65)
        d = np.maximum(np.minimum(w - np.abs(u), arm - np.abs(v)), np.minimum(w - np.abs(v), arm - np.abs(u)))
    elif label in (5, 6):  # horizontal / vertical stripes, up to 12 degrees off axis
        u, v = rotate(x, y, rng.uniform(-0.2, 0.2))
        d = stripes(v if label == 5 else u, rng.uniform(1.5, 2.8), rng.uniform())
    elif label == 7:  # checkerboard: inside where the two square waves agree
        u, v = rotate(x, y, rng.uniform(-0.2, 0.2))
        freq = rng.uniform(1.2, 2.0)
        a, b = stripes(u, freq, rng.uniform()), stripes(v, freq, rng.uniform())
        d = np.sign(a * b) * np.minimum(np.abs(a), np.abs(b))
    else:  # dots: 5-12 small discs anywhere
        n = rng.integers(5, 13)
        centres, radii = rng.uniform(-0.8, 0.8, size=(n, 2)), rng.uniform(0.08, 0.15, size=n)
        d = np.max(radii - np.hypot(x[..., None] - centres[:, 0], y[..., None] - centres[:, 1]), axis=-1)
    background = ramp(*(hsv(rng.uniform(0, 360), rng.uniform(0, 0.5), rng.uniform(0.05, 0.4)) for _ in range(2)))
    foreground = hsv(hue, rng.uniform(0.55, 1), rng.uniform(0.7, 1))
    coverage = np.clip(0.5 + d * size / 2, 0, 1)[..., None]  # anti-aliased: distance in pixels
    return np.round((background + (foreground - background) * coverage) * 255).astype(np.uint8)


class ToyDataset(torch.utils.data.Dataset):
    """`num_images` toy images (label = i % 10), drawn once into memory (about 3 s for 10,000)."""

    def __init__(self, size=32, num_images=10000, seed=0, progress=False):
        self.classes = TOY_CLASSES
        self.images = torch.from_numpy(np.stack([toy_image(i % 10, i // 10, seed, size) for i in
                                                 tqdm(range(num_images), desc="drawing built-in data", disable=not progress)]))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return to_tensor(self.images[i]), i % 10, 0


def toy_classifier(size=32, steps=600, seed=0):
    """A small CNN trained on fresh toy images (with blur, noise and channel-swap augmentation so
    that it judges shape, and tolerates blurry samples). Used to score whether generated samples
    show the requested class. About 40 s on 2 CPU cores; 99% held-out accuracy."""
    g = torch.Generator().manual_seed(seed)
    block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    net = nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    data = ToyDataset(size, steps * 64, seed=seed + 1000)  # not the images MAR trains on (seed 1)
    for i in range(steps):
        x = to_tensor(data.images[i * 64: (i + 1) * 64])  # (64, 3, H, W)
        y = torch.arange(i * 64, (i + 1) * 64) % 10
        if torch.rand((), generator=g) < 0.2:
            x = x[:, torch.randperm(3, generator=g)]
        sigma = float(torch.empty(()).uniform_(0.3, 1.5, generator=g))
        x = gaussian_blur(x, sigma) if torch.rand((), generator=g) < 0.7 else x
        x = x + torch.rand(64, 1, 1, 1, generator=g) * 0.15 * torch.randn(x.shape, generator=g)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def gaussian_blur(x, sigma):
    taps = torch.arange(-3, 4, dtype=x.dtype)
    k = torch.exp(-taps**2 / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(3, 1, 1, 7), groups=3)
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(3, 1, 7, 1), groups=3)


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


def save_grid(images, path, nrow):
    """[-1, 1] images (N, 3, H, W) -> a PNG grid with nrow images per row and 2 px white padding."""
    pix = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    n, h, w, _ = pix.shape
    grid = Image.new("RGB", (nrow * (w + 2) + 2, math.ceil(n / nrow) * (h + 2) + 2), "white")
    for k in range(n):
        grid.paste(Image.fromarray(pix[k]), (2 + (k % nrow) * (w + 2), 2 + (k // nrow) * (h + 2)))
    tmp = path + ".tmp.png"
    grid.save(tmp)
    os.replace(tmp, path)


#################################################################################
#                                 Model recipes                                 #
#################################################################################
# What the loop needs from a model, as a small class: `model` (the nn.Module the main optimizer
# trains: its parameters with requires_grad), `config` (architecture facts a resume must match),
# `inputs(batch, flip)` (a data batch -> the model's inputs on the device), `loss(model, x, y,
# progress)`, `no_weight_decay(name, param)`, `betas`, and hooks for what only some models have:
# a second player (`after_step`, the GAN discriminator), EMA warm-up, extra state, metrics, the
# image grid and the end-of-run report. `Recipe` holds the defaults.

class Recipe:
    betas = (0.9, 0.95)

    def loss(self, model, x, y, progress):  # progress = step / total steps, in [0, 1)
        return model(x, y)

    @staticmethod
    def no_weight_decay(name, param):
        return False

    def lr_scale(self, name):  # a parameter's lr relative to --lr (CODA: the quantizer's own lr)
        return 1.0

    def ema_decay(self, step, epoch):
        return self.args.ema

    def wrap(self, world, device):  # DDP-wrap trainable modules the recipe owns (a discriminator)
        pass

    def after_step(self, lr):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def metrics(self):  # called at log steps only (it may synchronise with the device)
        return {}

    def report(self, ema, images, labels):
        return []

    def training_data(self, dataset, rank, world):  # what the loop iterates over (MaskGIT: cached tokens)
        return dataset

    def checkpoint_extras(self, ema):  # extra entries for the checkpoint file
        return {}


def holdout_images(args, n):
    """n images the model does not train on, uint8 (n, 3, H, W): toy images of another seed, or the
    first n of --val-path (default: of --data-path)."""
    if not (args.data_path or args.val_path):
        return ToyDataset(args.img_size, n, seed=args.seed + 1000).images.permute(0, 3, 1, 2)
    data = ImageFolder(args.val_path or args.data_path, args.img_size)
    return torch.stack([((data[i][0] + 1) * 127.5).round().byte() for i in range(min(n, len(data)))])


class MarRecipe(Recipe):
    """MAR (mar.py): images or cached VAE moments -> scaled latents (or pixel patches, without a
    VAE) -> Diffusion Loss."""

    def __init__(self, args, num_classes, device):
        self.args, self.device, self.vae, self.scale = args, device, None, mar.VAE_SCALE
        if args.vae:
            self.vae, self.scale, _ = load_vae(args.vae, device)
        stride = self.vae.stride if self.vae else 1
        patch = args.patch_size or (1 if self.vae else 4)  # pixels: 4x4 patches (48 values) per token
        if args.img_size % (stride * patch):
            fail(f"--img-size {args.img_size} is not a multiple of VAE stride x patch size = {stride * patch}")
        self.config = dict(preset=args.preset, img_size=args.img_size, vae_stride=stride, patch_size=patch,
                           vae_embed_dim=self.vae.embed_dim if self.vae else 3, class_num=num_classes)
        arch = {k: v for k, v in self.config.items() if k != "preset"}
        self.model = mar.PRESETS[args.preset](**arch, diffusion_batch_mul=args.diffusion_batch_mul,
                                              num_sampling_steps=args.num_sampling_steps,
                                              grad_checkpointing=args.grad_checkpointing,
                                              clip_denoised=self.vae is None)  # pixels are bounded: clip x0

    def inputs(self, batch, flip):
        flip = flip.to(self.device, non_blocking=True)[:, None, None, None]  # the random horizontal flip
        labels = batch[-2].to(self.device, non_blocking=True)
        if self.args.use_cached:  # official main_cache.py: moments of the image and of its flip
            moments = torch.where(flip, batch[1].to(self.device, non_blocking=True), batch[0].to(self.device, non_blocking=True))
            return mar.DiagonalGaussian(moments).sample() * self.scale, labels
        images = batch[0].to(self.device, non_blocking=True)
        return mar.images_to_latents(self.vae, torch.where(flip, images.flip(3), images), scale=self.scale), labels

    @staticmethod
    def no_weight_decay(name, param):
        """As the official code: no decay on 1-D parameters (norms), biases, and the whole MLP."""
        return param.ndim < 2 or name.endswith(".bias") or "diffloss" in name

    @torch.no_grad()
    def samples(self, model, labels, generator):
        a = self.args
        tokens = model.sample_tokens(len(labels), a.num_iter, a.cfg, a.cfg_schedule, labels, a.temperature,
                                     generator=generator)
        return mar.latents_to_images(self.vae, tokens, self.scale)

    def grid(self, ema, num_classes, generator):
        """EMA samples, one row per class (8 classes x 8 for ImageNet, all 10 toy classes x 10)."""
        rows = list(range(num_classes)) if num_classes <= 10 else [207, 360, 388, 113, 355, 980, 323, 979]
        cols = 10 if num_classes <= 10 else 8
        labels = torch.tensor(rows, device=self.device).repeat_interleave(cols)
        return self.samples(ema, labels, generator), labels, cols

    def report(self, ema, images, labels):
        a = self.args
        if a.data_path or a.use_cached or a.img_size != 32:
            return []
        pred = toy_classifier()(images.float().cpu()).argmax(1)
        return [f"class accuracy of the final samples, judged by a small classifier trained on the built-in data: "
                f"{(pred == labels.cpu()).float().mean().item():.0%}"]


def load_vae(path, device):
    """A frozen KL-VAE and its latent scale from the official kl16.ckpt (scale 0.2325) or from a
    `train.py --model vae` run (its EMA weights; scale = 1 / std of its latents, measured and saved
    by that run) -> (vae, scale, config)."""
    try:
        ckpt = mar.load_checkpoint(path)
    except (ValueError, FileNotFoundError) as e:
        fail(f"--vae: {e}")
    if ckpt.get("model_name") == "vae":
        vae = mar.AutoencoderKL(**ckpt["config"]["arch"])
        vae.load_state_dict(ckpt["model_ema"])
        scale, config = ckpt["latent_scale"], dict(ckpt["config"]["arch"], file=os.path.basename(path))
    else:
        vae, scale, config = mar.kl16(), mar.VAE_SCALE, dict(file="kl16")
        try:
            mar.load_weights(vae, path, "model")
        except ValueError as e:
            fail(f"--vae: {e}")
    return vae.eval().requires_grad_(False).to(device), scale, config


VAE_PRESETS = {"kl16": dict(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)),  # MAR's (LDM's KL-16) architecture
               "tiny": dict(embed_dim=4, ch_mult=(1, 2, 2), ch=32, num_res_blocks=1, attn_resolutions=(), resolution=32)}
VAE_PRESETS["tiny16"] = dict(VAE_PRESETS["tiny"], embed_dim=16)  # kl16's latent width, for the Table 1 comparison
CODA_PRESETS = {"mar": dict(codebook_size=16384, levels=coda.MAR_LEVELS),   # the released CODA-MAR
                "tiny": dict(codebook_size=256, levels=(1, 2, 3, 4, 6, 8))}   # the built-in data, 8x8 latents


class TokenizerRecipe(Recipe):
    """--model vae: mar.py's KL-VAE trained from scratch (L1 + L2 + LPIPS + KL, optional GAN).
    --model coda: the CODA tokenizer on a frozen --vae (coda.py): LoRA + quantizer, trained with
    the reconstruction, GAN, quantization and entropy losses. Both: AdamW (0.5, 0.9) and a
    discriminator updated after every generator step (hinge loss, its own AdamW)."""
    betas = (0.5, 0.9)  # official CODA (and VQGAN / LDM autoencoders)

    def __init__(self, args, num_classes, device):
        self.args, self.device = args, device
        if args.model == "coda":
            vae, scale, vae_config = load_vae(args.vae, device)
            parts = {"both": ("encoder", "decoder"), "encoder": ("encoder",), "decoder": ("decoder",), "none": ()}[args.lora]
            coda.add_lora(vae, args.lora_rank, parts)
            preset = CODA_PRESETS[args.preset]
            levels = tuple(args.levels or preset["levels"])
            if levels[-1] != args.img_size // vae.stride:
                fail(f"the last level ({levels[-1]}) must equal the latent size {args.img_size // vae.stride} (--levels)")
            quantizer = coda.CODAQuantizer(vae.embed_dim, args.codebook_size or preset["codebook_size"], levels, args.quantizer)
            self.model = coda.CODA(vae, quantizer, scale)
            self.config = dict(preset=args.preset, img_size=args.img_size, vae=vae_config, scale=scale, levels=levels,
                               codebook_size=quantizer.codebook_size, quantizer=args.quantizer, lora=args.lora,
                               lora_rank=args.lora_rank)
            lora_ups = [m.lora_layer.up.weight for m in vae.decoder.modules() if isinstance(m, coda.LoRAConv2d)]
            # official: the LoRA of the decoder's first upsample conv (for kl16: up[-1].upsample)
            ups = [m.upsample.conv for m in reversed(vae.decoder.up) if hasattr(m, "upsample")]
            self.last_layer = (ups[0].lora_layer.up.weight if ups and isinstance(ups[0], coda.LoRAConv2d)
                               else lora_ups[-1] if lora_ups else quantizer.codebooks.weight)
        else:
            self.config = dict(preset=args.preset, img_size=args.img_size, arch=VAE_PRESETS[args.preset])
            self.model = mar.AutoencoderKL(**self.config["arch"])
            self.last_layer = self.model.decoder.conv_out.weight  # LDM / VQGAN's choice
        try:
            self.criterion = coda.TokenizerLoss(args.l1_weight, args.l2_weight, args.lpips_weight, args.disc,
                                                args.disc_weight, args.dino_weights).to(device)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        self.disc = self.criterion.disc
        self.d_opt = (torch.optim.AdamW([p for p in self.disc.parameters() if p.requires_grad], lr=0.0, betas=self.betas,
                                        weight_decay=args.disc_weight_decay) if self.disc else None)
        self.sums, self.count, self.usage = {}, 0, None

    def wrap(self, world, device):
        self.train_disc = self.disc
        if self.disc is not None and world > 1:
            if device.type == "cuda":  # official: SyncBatchNorm in the DINO heads
                self.disc = nn.SyncBatchNorm.convert_sync_batchnorm(self.disc)
                self.criterion.disc = self.disc
            self.train_disc = DDP(self.disc, device_ids=[device.index] if device.type == "cuda" else None)

    def inputs(self, batch, flip):
        images = batch[0].to(self.device, non_blocking=True)
        if self.args.model == "vae":  # CODA's official pipeline uses no flip
            images = torch.where(flip.to(self.device, non_blocking=True)[:, None, None, None], images.flip(3), images)
        return images, None

    def loss(self, model, x, y, progress):
        if self.args.model == "coda":
            recon, q_loss, e_loss, indices = model(x)
            extra = self.args.vq_weight * q_loss + self.args.entropy_weight * e_loss
            logs = dict(q_loss=q_loss.detach(), entropy=e_loss.detach())
            counts = sum(torch.bincount(i.flatten(), minlength=self.model.quantizer.codebook_size) for i in indices)
            self.usage = counts if self.usage is None else self.usage + counts
        else:
            recon, posterior = model(x)
            kl = posterior.kl().mean() / x[0].numel()         # LDM: KL per image, relative to per-pixel losses
            extra, logs = self.args.kl_weight * kl, dict(kl=kl.detach())
        loss, parts = self.criterion.generator_loss(x, recon, self.last_layer, progress)
        self.real, self.fake = x, recon.detach()
        self.accumulate(dict(parts, **logs))
        return loss + extra

    def after_step(self, lr):
        """The discriminator step on this step's real images and reconstructions (official order:
        after the generator step and the EMA update), same lr schedule, grad clip as the generator."""
        if self.disc is None:
            return
        d_loss, logs = self.criterion.discriminator_loss(self.real, self.fake, self.train_disc)
        for group in self.d_opt.param_groups:
            group["lr"] = lr
        self.d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.d_opt.param_groups[0]["params"], self.args.grad_clip)
        self.d_opt.step()
        self.accumulate(logs, count=False)

    def accumulate(self, logs, count=True):
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.count += count

    def lr_scale(self, name):
        """CODA's quantizer has its own lr (official codebook_learning_rate, 5e-4 as the LoRA's)."""
        return (self.args.quantizer_lr or self.args.lr) / self.args.lr if name.startswith("quantizer.") else 1.0

    def ema_decay(self, step, epoch):
        """Official CODA: the EMA copies the weights until --ema-start-epoch, then averages with a
        warm-up, decay min(0.9999, (step/2 + 1) / (step/2 + 10)), so that it never lags far behind
        in a short run (the VAE uses the same warm-up, from the start)."""
        if self.args.model == "coda" and epoch < self.args.ema_start_epoch:
            return 0.0
        return min(self.args.ema, (step // 2 + 1) / (step // 2 + 10))

    def state_dict(self):
        return dict(disc=self.disc.state_dict(), d_opt=self.d_opt.state_dict()) if self.disc else {}

    @torch.no_grad()
    def checkpoint_extras(self, ema):
        """A VAE run records the scale that makes its latents unit-variance (LDM's practice), for
        the models trained on them (--vae): 1 / std of EMA posterior samples of held-out images."""
        if self.args.model != "vae":
            return {}
        z = ema.encode(train_images(self.holdout(256).to(self.device))).sample(torch.Generator(self.device).manual_seed(0))
        return dict(latent_scale=1 / z.float().std().item())

    def load_state_dict(self, state):
        if self.disc is not None and state:
            self.disc.load_state_dict(state["disc"])
            self.d_opt.load_state_dict(state["d_opt"])

    def metrics(self):
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stats = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=self.device) for k in keys])
        if dist.is_initialized():
            dist.all_reduce(stats)
        out = {k: v / max(self.count, 1) / (dist.get_world_size() if dist.is_initialized() else 1)
               for k, v in zip(keys, stats.tolist())}
        if self.usage is not None:  # fraction of the codebook used in this logging window, all ranks
            if dist.is_initialized():
                dist.all_reduce(self.usage)
            out["codebook_usage"] = (self.usage > 0).float().mean().item()
        self.sums, self.count, self.usage = {}, 0, None
        return out

    @torch.no_grad()
    def reconstruct(self, model, images):
        """uint8 images -> (reconstructions in [-1, 1], indices, squared latent quantization error
        per image); the VAE alone reconstructs from the posterior mean."""
        x = train_images(images.to(self.device))
        if self.args.model == "coda":
            f = model.encode(x)
            indices, f_hat, _, _ = model.quantizer(f)
            return model.vae.decode(f_hat / model.scale), indices, (f_hat - f).pow(2).flatten(1).mean(1)
        return model.decode(model.encode(x).mean), None, None

    def grid(self, ema, num_classes, generator):
        """8 held-out images: each original followed by its reconstruction by the EMA weights."""
        images = self.holdout(8)
        recon, _, _ = self.reconstruct(ema, images)
        pairs = torch.stack([train_images(images.to(self.device)), recon.float()], 1).flatten(0, 1)  # orig, recon, ...
        return pairs, None, 8

    def holdout(self, n):
        if getattr(self, "_holdout", None) is None or len(self._holdout) < n:
            self._holdout = holdout_images(self.args, n)
        return self._holdout[:n]

    def report(self, ema, images, labels):
        """Reconstruction quality of the EMA weights on --num-images held-out images: PSNR, SSIM,
        pixel MSE, latent quantization error, codebook usage and, when the Inception weights are at
        hand, rFID (CODA's protocol). Also written to <output-dir>/report.json."""
        a, held = self.args, self.holdout(self.args.num_images)
        net = None
        if a.inception_weights or os.path.exists(fid.cached_weights(pytorch_fid=True)):
            net = fid.load_inception(a.inception_weights, pytorch_fid=True, device=self.device)
        metrics = fid.ReconstructionMetrics(net, distributed=False)  # CODA's protocol; rFID only with weights
        mse, q_err, all_indices = [], [], []
        for chunk in held.split(a.batch_size):
            recon, indices, err = self.reconstruct(ema, chunk)
            real = train_images(chunk.to(self.device))
            metrics.update(real, recon)
            mse.append((recon.float().clamp(-1, 1) - real).pow(2).flatten(1).mean(1))
            if indices is not None:
                all_indices += indices
                q_err.append(err)
        out = dict(images=len(held), mse=torch.cat(mse).mean().item(), **metrics.compute())
        lines = [f"reconstruction of {len(held)} held-out images (EMA weights): PSNR {out['psnr']:.2f} dB, "
                 f"SSIM {out['ssim']:.4f}, MSE {out['mse']:.5f}"]
        if all_indices:
            out["usage"], _ = coda.codebook_usage(all_indices, self.model.quantizer.codebook_size)
            out["quant_error"] = torch.cat(q_err).mean().item()
            lines.append(f"codebook usage: {out['usage']:.1%} of {self.model.quantizer.codebook_size} codes; "
                         f"latent quantization error (MSE) {out['quant_error']:.5f}")
        if "rfid" in out:
            lines.append(f"rFID (pytorch-fid Inception, as CODA): {out['rfid']:.3f}")
        else:
            lines.append("rFID skipped: no Inception weights (give --inception-weights or run `python fid.py` once online)")
        with open(os.path.join(a.output_dir, "report.json"), "w") as f:
            json.dump(out, f)
        return lines


QUANTIZER_TABLE = [  # paper Table 1 / Sec. 4, each step adding one ingredient
    ("plain VQ (one level, nearest code)", ["--quantizer", "nearest", "--lora", "none", "--levels", "LAST"]),
    ("+ residual levels (nearest code)", ["--quantizer", "nearest", "--lora", "none"]),
    ("+ attention-based assignment", ["--quantizer", "attention", "--lora", "none"]),
    ("+ LoRA on the VAE decoder", ["--quantizer", "attention", "--lora", "decoder"]),
    ("+ LoRA on encoder and decoder (CODA)", ["--quantizer", "attention", "--lora", "both"]),
]


def compare_quantizers(argv):
    """--compare-quantizers: re-run the paper's Table 1 progression with the given flags (one run per
    row, in <output-dir>/<row>, each resumable) and print the table."""
    base = parse_args(argv)
    rows, last = [], str((base.levels or CODA_PRESETS[base.preset]["levels"])[-1])  # the latent's side
    for i, (name, flags) in enumerate(QUANTIZER_TABLE):
        flags = [last if f == "LAST" else f for f in flags]
        args = parse_args([a for a in argv if a != "--compare-quantizers"] + flags +
                          ["--output-dir", os.path.join(base.output_dir, f"table1-{i}")])
        main(args)
        with open(os.path.join(args.output_dir, "report.json")) as f:
            rows.append((name, json.load(f)))
    lines = ["", f"Table 1 on {'the built-in data' if not base.data_path else base.data_path} "
             f"({base.epochs} epochs each, {rows[0][1]['images']} held-out images):",
             f"{'quantizer':40s} {'usage':>7s} {'quant. err':>10s} {'MSE':>8s} {'PSNR':>6s} {'SSIM':>6s}" +
             (f" {'rFID':>7s}" if "rfid" in rows[0][1] else "")]
    for name, r in rows:
        lines.append(f"{name:40s} {r['usage']:7.1%} {r['quant_error']:10.5f} {r['mse']:8.5f} {r['psnr']:6.2f} {r['ssim']:6.3f}" +
                     (f" {r['rfid']:7.2f}" if "rfid" in r else ""))
    print("\n".join(lines))
    with open(os.path.join(base.output_dir, "table1.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def train_images(images):
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1


def load_tokenizer(path, device):
    """The EMA weights of a `train.py --model coda` run as a frozen CODA tokenizer -> (model, config)."""
    try:
        ckpt = mar.load_checkpoint(path)
    except (ValueError, FileNotFoundError) as e:
        fail(f"--tokenizer: {e}")
    if ckpt.get("model_name") != "coda":
        fail(f"--tokenizer {path} is not a checkpoint of --model coda (it is {ckpt.get('model_name', 'not from train.py')})")
    c = ckpt["config"]
    arch = {k: v for k, v in c["vae"].items() if k != "file"}
    vae = mar.AutoencoderKL(**arch) if arch else mar.kl16()
    parts = {"both": ("encoder", "decoder"), "encoder": ("encoder",), "decoder": ("decoder",), "none": ()}[c["lora"]]
    coda.add_lora(vae, c["lora_rank"], parts)
    model = coda.CODA(vae, coda.CODAQuantizer(vae.embed_dim, c["codebook_size"], c["levels"], c["quantizer"]), c["scale"])
    model.load_state_dict(ckpt["model_ema"])
    return model.eval().requires_grad_(False).to(device), c


class TokenData(torch.utils.data.Dataset):
    """Cached token sequences: item = (tokens of the image and of its flip (2, L), label, 0)."""

    def __init__(self, tokens, labels, classes):
        self.tokens, self.labels, self.classes = tokens, labels, classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(self.tokens[i].astype(np.int64)), int(self.labels[i]), 0


class MaskGITRecipe(Recipe):
    """MaskGIT (maskgit.py) on the multi-level tokens of a frozen CODA tokenizer (--tokenizer). The
    tokens of every training image and of its horizontal flip are computed once and cached
    (<output-dir>/tokens.npy), so training never runs the VAE; the flip picks one of the two."""
    betas = (0.9, 0.96)  # official MaskGIT config

    def __init__(self, args, num_classes, device):
        self.args, self.device = args, device
        self.tokenizer, tok = load_tokenizer(args.tokenizer, device)
        if tok["img_size"] != args.img_size:
            fail(f"--tokenizer was trained on {tok['img_size']} px images, not --img-size {args.img_size}")
        self.config = dict(preset=args.preset, img_size=args.img_size, class_num=num_classes, codebook_size=tok["codebook_size"],
                           levels=tuple(tok["levels"]), tokenizer=os.path.basename(args.tokenizer))
        self.model = maskgit.PRESETS[args.preset](tok["codebook_size"], tuple(tok["levels"]), num_classes)

    @torch.no_grad()
    def training_data(self, dataset, rank, world):
        path = self.args.cache_path or os.path.join(self.args.output_dir, "tokens.npy")
        labels = (np.array([label for _, label in dataset.samples]) if hasattr(dataset, "samples")
                  else np.arange(len(dataset)) % 10)  # the built-in data: label = index % 10
        if not os.path.exists(path):
            mine = range(rank * len(dataset) // world, (rank + 1) * len(dataset) // world)
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=self.args.batch_size,
                                                 num_workers=self.args.num_workers)
            shard, skipped = [], 0
            for images, _, bad in tqdm(loader, desc="tokenizing the training set", disable=rank != 0):
                images = images.to(self.device)
                both = [maskgit.flatten_levels(self.tokenizer.tokenize(x)) for x in (images, images.flip(3))]
                shard.append(torch.stack(both, 1).to(torch.int16 if self.model.codebook_size <= 32767 else torch.int32).cpu())
                skipped += int(bad.sum())
            np.save(f"{path}.rank{rank}.npy", torch.cat(shard).numpy())
            if world > 1:
                dist.barrier()
            if rank == 0:
                parts = [np.load(f"{path}.rank{r}.npy") for r in range(world)]
                np.save(path + ".tmp.npy", np.concatenate(parts))
                os.replace(path + ".tmp.npy", path)
                for r in range(world):
                    os.remove(f"{path}.rank{r}.npy")
            if world > 1:
                dist.barrier()
        tokens = np.load(path, mmap_mode="r")
        if len(tokens) != len(labels) or tokens.shape[2] != self.model.length:
            fail(f"{path} holds tokens of another dataset or tokenizer ({tokens.shape}); delete it to re-tokenize")
        return TokenData(tokens, labels, dataset.classes)

    def inputs(self, batch, flip):
        tokens = batch[0].to(self.device, non_blocking=True)                    # (B, 2, L)
        tokens = tokens[torch.arange(len(tokens), device=self.device), flip.to(self.device, non_blocking=True).long()]
        return tokens, batch[1].to(self.device, non_blocking=True)

    @staticmethod
    def no_weight_decay(name, param):
        return param.ndim < 2 or name.endswith(".bias") or name == "pos_emb"

    @torch.no_grad()
    def samples(self, model, labels, generator):
        a = self.args
        tokens = model.generate(labels, a.num_iter, a.choice_temperature, a.temperature, a.cfg, a.cfg_schedule, generator)
        return self.tokenizer.detokenize(maskgit.unflatten_levels(tokens, model.levels)).float().clamp(-1, 1)

    grid = MarRecipe.grid
    report = MarRecipe.report


RECIPES = {"mar": MarRecipe, "vae": TokenizerRecipe, "coda": TokenizerRecipe, "maskgit": MaskGITRecipe}


@torch.no_grad()
def cache_latents(args, rank, world, device):
    """Encode every image once (center crop, no flip) and save the VAE posterior moments of the image
    and of its horizontal flip as <cache-path>/<class>/<file>.npz (official main_cache.py layout).
    Files already there are kept, so an interrupted caching job just continues."""
    data = ImageFolder(args.data_path, args.img_size)
    recipe = MarRecipe(args, len(data.classes), device)
    mine = list(range(rank, len(data), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, mine), batch_size=args.batch_size,
                                         num_workers=args.num_workers)
    skipped = 0
    for b, (images, labels, bad) in enumerate(tqdm(loader, disable=rank != 0, desc="caching latents")):
        images = images.to(device)
        moments = recipe.vae.encode(images).moments.cpu().numpy()
        moments_flip = recipe.vae.encode(images.flip(3)).moments.cpu().numpy()
        for j in range(len(images)):
            if bad[j] > 0:  # unreadable: ImageFolder substituted another image; write nothing
                skipped += 1
                continue
            path, _ = data.samples[mine[b * args.batch_size + j]]
            out = os.path.join(args.cache_path, os.path.relpath(path, args.data_path) + ".npz")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            np.savez(out + ".tmp.npz", moments=moments[j], moments_flip=moments_flip[j])
            os.replace(out + ".tmp.npz", out)
    print(f"rank {rank}: cached {len(mine) - skipped} images to {args.cache_path}, skipped {skipped} unreadable")


#################################################################################
#                               Training helpers                                #
#################################################################################

STOP = {"signal": None}


def request_stop(signum, frame):
    """SIGTERM / SIGINT: finish the current step, save a checkpoint at the next log step, exit."""
    STOP["signal"] = signal.Signals(signum).name


def setup_distributed(device_flag):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE: one process per GPU with NCCL, or CPU
    processes with gloo. Without torchrun: a single process and no process group."""
    if device_flag == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but no CUDA device is available")
    cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    rank, world, local_rank = 0, 1, 0
    if "RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if not cuda and "OMP_NUM_THREADS" not in os.environ:  # share the cores between this node's processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return rank, world, torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def check_config(path, saved, current):
    """Stop with one line naming every architecture fact that differs from the checkpoint's."""
    if saved != current:
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        fail(f"{path} was trained with another config: " + ", ".join(f"{k} {a} (checkpoint) vs {b} (now)" for k, (a, b) in diff.items()))


def learning_rate(step, lr, warmup_steps, total_steps, schedule):
    """Linear warmup from 0 over `warmup_steps`, then constant (the paper) or cosine down to 0."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return lr


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * param for every trained parameter (frozen ones, like
    CODA's VAE, never change), in one fused kernel list."""
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)


def rng_state(device, aug):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "aug": aug.get_state()}


def set_rng_state(state, device, aug):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    aug.set_state(state["aug"])


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "-uno"], capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "") or "unknown"
    except Exception:
        return "unknown"


#################################################################################
#                           Generate and score (--eval)                         #
#################################################################################

@torch.no_grad()
def builtin_statistics(args, net):
    """Reference statistics for the built-in data: Inception features of `num_images` held-out toy
    images (another seed than the training set, classes balanced), cached in the output folder."""
    path = os.path.join(args.output_dir, f"fid_stats_builtin_{args.img_size}px_{args.num_images}.npz")
    if os.path.exists(path):
        return fid.load_statistics(path)
    images = ToyDataset(args.img_size, args.num_images, seed=args.seed + 1000).images.permute(0, 3, 1, 2)  # uint8
    scorer = fid.Scorer(net)
    for chunk in tqdm(images.split(args.eval_batch_size), desc="reference statistics", disable=dist.is_initialized() and dist.get_rank() > 0):
        scorer.update(chunk)
    mu, sigma = fid.statistics(scorer.features()[0])
    if not dist.is_initialized() or dist.get_rank() == 0:
        fid.save_statistics(path, mu, sigma)
    return mu, sigma


@torch.no_grad()
def evaluate(args, rank, world, device):
    """Generate `num_images` class-balanced samples (num_images / classes per class, as the official
    MAR evaluation) with the EMA weights, score them in memory against reference statistics with the
    TF-exact Inception (torch-fidelity's numbers), and print FID, IS and seconds per image. Rank r
    draws the r-th contiguous block of the image list, so the gathered order (which IS's fixed split
    depends on) is the same for any number of processes."""
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = args.resume or os.path.join(args.output_dir, "checkpoint-last.pth")
    try:
        ckpt = mar.load_checkpoint(ckpt_path)
    except (ValueError, FileNotFoundError) as e:
        fail(f"--eval: {e}")
    if ckpt.get("model_name", args.model) != args.model:  # official MAR files carry no model_name
        fail(f"{ckpt_path} is a checkpoint of --model {ckpt['model_name']}, not {args.model}")
    # ours record the class count in `config`; the official ones in their argparse Namespace `args`
    num_classes = ckpt["config"]["class_num"] if "config" in ckpt else getattr(ckpt.get("args"), "class_num", 1000)
    if args.num_images % num_classes:
        fail(f"--num-images {args.num_images} must be a multiple of the {num_classes} classes (class-balanced samples)")
    recipe = RECIPES[args.model](args, num_classes, device)
    if "config" in ckpt:  # official MAR files carry none
        check_config(ckpt_path, ckpt["config"], recipe.config)
    model = recipe.model
    try:
        mar.load_weights(model, ckpt_path, "model_ema")       # the EMA weights, as the paper evaluates
    except ValueError as e:
        fail(f"--eval: {e} (check --preset / --img-size / --vae)")
    del ckpt
    model = model.to(device).eval()
    try:
        net = fid.load_inception(args.inception_weights, device=device)
        reference = fid.load_statistics(args.fid_stats) if args.fid_stats else builtin_statistics(args, net)
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(str(e))
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    per_class = args.num_images // num_classes
    first, last = rank * args.num_images // world, (rank + 1) * args.num_images // world
    ids = torch.arange(first, last)
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
            images = recipe.samples(model, labels, generator)   # (B, 3, H, W) in [-1, 1]
        if cuda:
            torch.cuda.synchronize()
        if i > 0 or len(batches) == 1:  # as the official code: the first batch (warm-up) is not timed
            seconds, timed = seconds + time.time() - t0, timed + len(batch)
        images = fid.to_uint8(images)
        scorer.update(images)
        if args.save_images:
            for j, im in zip(batch.tolist(), images.permute(0, 2, 3, 1).cpu().numpy()):
                Image.fromarray(im).save(os.path.join(args.save_images, f"{j:05d}.png"))
    result = scorer.compute(reference)
    if rank == 0:
        out = dict(checkpoint=ckpt_path, num_images=result["num_images"], fid=result["fid"], is_mean=result.get("is_mean"),
                   is_std=result.get("is_std"), seconds_per_image=seconds / max(timed, 1), num_iter=args.num_iter,
                   cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                   num_sampling_steps=args.num_sampling_steps, processes=world)
        with open(os.path.join(args.output_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(out) + "\n")
        if "is_mean" in result:
            print(f"IS: {result['is_mean']:.2f} +- {result['is_std']:.2f}")
        print(f"seconds per image: {out['seconds_per_image']:.4f} ({world} process(es), excluding the first batch)")
        print(f"FID: {result['fid']:.4f}  ({result['num_images']} images, cfg {args.cfg}, {args.num_iter} steps)")


#################################################################################
#                                 Training loop                                 #
#################################################################################

def main(args):
    rank, world, device = setup_distributed(args.device)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32  # no effect on CPU
    torch.manual_seed(args.seed + rank)  # per-rank seeds, as the official code
    np.random.seed(args.seed + rank)
    if args.cache_latents:
        return cache_latents(args, rank, world, device)
    if args.eval:
        return evaluate(args, rank, world, device)

    # ---- output folder and logging (rank 0 writes) ----
    os.makedirs(args.output_dir, exist_ok=True)
    if rank == 0:
        lock_output_dir(args.output_dir)
    log_file = open(os.path.join(args.output_dir, "log.txt"), "a") if rank == 0 else None

    def log(msg):
        if rank == 0:
            tqdm.write(msg)
            log_file.write(msg + "\n")
            log_file.flush()

    devices = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    log(f"command: {' '.join(sys.argv)}\ngit commit: {git_commit()}\ntorch {torch.__version__}, "
        f"{world} process(es), device: {devices}\nargs: {json.dumps(vars(args))}")

    # ---- data ----
    if args.use_cached:
        dataset = CachedLatents(args.cache_path)
    elif args.data_path:
        dataset = ImageFolder(args.data_path, args.img_size)
    else:
        dataset = ToyDataset(args.img_size, seed=args.seed, progress=rank == 0)
    num_classes = len(dataset.classes)

    # ---- model, EMA, optimizer ----
    recipe = RECIPES[args.model](args, num_classes, device)
    dataset = recipe.training_data(dataset, rank, world)
    steps_per_epoch = len(dataset) // world // args.batch_size
    if steps_per_epoch == 0:
        fail(f"{len(dataset)} images are fewer than one global batch ({args.batch_size} x {world} processes)")
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    model = recipe.model.to(device)
    log(f"{args.model} ({args.preset}): {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(dataset)} images of {num_classes} classes, {steps_per_epoch} steps per epoch")
    groups = {}  # (no weight decay?, lr scale) -> parameters; decayed groups first
    for name, p in model.named_parameters():
        if p.requires_grad:  # CODA: only LoRA and the quantizer; the VAE stays frozen
            groups.setdefault((recipe.no_weight_decay(name, p), recipe.lr_scale(name)), []).append(p)
    lr = args.lr or args.blr * args.batch_size * world / 256  # the paper's linear scaling rule
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.0 if no_wd else args.weight_decay, "lr_scale": scale}
                             for (no_wd, scale), params in sorted(groups.items())], lr=lr, betas=recipe.betas)
    trainable = [p for group in opt.param_groups for p in group["params"]]
    aug = torch.Generator().manual_seed(args.seed * 1000 + rank)  # data augmentation draws
    step = 0
    ckpt_path = os.path.join(args.output_dir, "checkpoint-last.pth")
    resume = args.resume or (ckpt_path if os.path.exists(ckpt_path) else None)
    if resume:
        try:
            ckpt = mar.load_checkpoint(resume)
        except (ValueError, FileNotFoundError) as e:
            fail(f"--resume: {e}")
        if ckpt.get("model_name") != args.model:
            fail(f"{resume} is a checkpoint of --model {ckpt.get('model_name', '(not written by train.py)')}, not {args.model}")
        check_config(resume, ckpt["config"], recipe.config)
        model.load_state_dict(ckpt["model"])
        scales = [group["lr_scale"] for group in opt.param_groups]  # from this run's flags
        opt.load_state_dict(ckpt["optimizer"])
        for group, scale in zip(opt.param_groups, scales):
            group["lr_scale"] = scale
        recipe.load_state_dict(ckpt.get("recipe", {}))
        step = ckpt["step"]
    # compile (optional) before DDP; checkpoints are always written from the plain `model`
    train_model = torch.compile(model) if args.compile else model
    if world > 1:
        train_model = DDP(train_model, device_ids=[device.index] if cuda else None)
    recipe.wrap(world, device)
    ema = copy.deepcopy(model).requires_grad_(False)  # after the DDP wrap, so every rank starts equal
    if resume:
        ema.load_state_dict(ckpt["model_ema"])
        if ckpt.get("world_size") == world:
            set_rng_state(ckpt["rng"][rank], device, aug)
        else:
            log(f"note: resuming on {world} processes instead of {ckpt.get('world_size')}: random streams re-seeded")
        log(f"resumed from {resume} at step {step} / {total_steps}")
        del ckpt
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()  # bf16: no GradScaler

    def save(final=False):
        """Atomic: write a temporary file, then rename, so a crash never leaves a broken checkpoint."""
        states = [None] * world if rank == 0 else None
        if world > 1:
            dist.gather_object(rng_state(device, aug), states, dst=0)
        else:
            states = [rng_state(device, aug)]
        extras = recipe.checkpoint_extras(ema) if rank == 0 else {}
        if rank == 0:
            torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "optimizer": opt.state_dict(),
                        "step": step, "epoch": step / steps_per_epoch, "args": vars(args), "model_name": args.model,
                        "config": recipe.config, "rng": states, "world_size": world, "recipe": recipe.state_dict(),
                        **extras}, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
        if world > 1:
            dist.barrier()

    def grid(name):
        """The recipe's picture of the EMA model (MAR: samples, one row per class; tokenizers:
        originals next to reconstructions), on rank 0."""
        if rank == 0:
            ema.eval()
            with amp:
                images, labels, cols = recipe.grid(ema, num_classes, torch.Generator().manual_seed(args.seed))
            save_grid(images, os.path.join(args.output_dir, f"samples-{name}.png"), cols)
            return images.float().cpu(), labels
        return None, None

    # ---- the loop ----
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    metrics = open(os.path.join(args.output_dir, "metrics.jsonl"), "a") if rank == 0 else None
    if step >= total_steps:
        log(f"the run in {args.output_dir} is already complete ({step} steps); use another --output-dir for a new run")
    train_model.train()
    pbar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc="training")
    loss_sum, skipped, t_window, n_window = torch.zeros((), device=device), 0, time.time(), 0
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        loader = torch.utils.data.DataLoader(
            dataset, args.batch_size, sampler=ShardSampler(len(dataset), rank, world, args.seed, epoch, offset * args.batch_size),
            num_workers=args.num_workers, pin_memory=cuda, drop_last=True,
            generator=torch.Generator().manual_seed(epoch))  # its own seed draw, not the global RNG's: exact resume
        for batch in loader:
            flip = torch.rand(args.batch_size, generator=aug) < 0.5
            x, y = recipe.inputs(batch, flip.pin_memory() if cuda else flip)  # pinned: async copy, no sync
            skipped += int(batch[-1].sum())  # a CPU tensor: no device sync
            cur_lr = learning_rate(step, lr, warmup_steps, total_steps, args.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = cur_lr * group["lr_scale"]
            with amp:
                loss = recipe.loss(train_model, x, y, step / total_steps)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, model, recipe.ema_decay(step, epoch))
            with amp:
                recipe.after_step(cur_lr)  # a second player (the GAN discriminator), if any
            loss_sum += loss.detach()
            step, n_window = step + 1, n_window + 1
            pbar.update()
            last = step == total_steps
            if step % args.log_every == 0 or last:  # the only host-device sync point of the loop
                stats = torch.stack([loss_sum, torch.tensor(float(STOP["signal"] is not None), device=device)])
                if world > 1:
                    dist.all_reduce(stats)
                avg_loss, stop = stats[0].item() / (n_window * world), stats[1].item() > 0
                extra = recipe.metrics()
                if not math.isfinite(avg_loss):
                    good = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was written yet"
                    log(f"loss is {avg_loss} at step {step}: stopping; {good}")
                    fail(f"loss is {avg_loss} at step {step} (try a lower --blr); {good}")
                ips = n_window * args.batch_size * world / (time.time() - t_window)
                pbar.set_postfix(loss=f"{avg_loss:.4f}", lr=f"{cur_lr:.2e}", img_s=f"{ips:.0f}",
                                 **{k: f"{v:.3g}" for k, v in extra.items() if k in ("codebook_usage", "l1", "d_loss")})
                if rank == 0:
                    metrics.write(json.dumps(dict(step=step, epoch=round(step / steps_per_epoch, 4), loss=avg_loss, lr=cur_lr,
                                                  grad_norm=grad_norm.item(), images_per_s=ips, skipped_images=skipped,
                                                  time=time.time(), **extra)) + "\n")
                    metrics.flush()
                loss_sum.zero_()
                t_window, n_window = time.time(), 0
                if stop:
                    save()
                    log(f"stopped by {STOP['signal'] or 'a signal on another rank'} at step {step}: checkpoint saved "
                        f"to {ckpt_path}; run the same command to resume")
                    pbar.close()
                    return
            if step % args.ckpt_every == 0 or last:
                save()
            if step % args.sample_every == 0 and not last:
                grid(f"{step:07d}")
            if last:
                break
    pbar.close()
    if world > 1:  # DDP keeps replicas equal; check it once, bit for bit (silent divergence is costly)
        digest = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        log(f"parameters identical on all {world} ranks: {'yes' if len(set(digests)) == 1 else 'NO'} (sha1 {digest[:12]})")
    if skipped:
        log(f"skipped {skipped} unreadable images (replaced by the next readable one)")
    images, labels = grid("final")
    if rank == 0 and images is not None:
        log(f"wrote {os.path.join(args.output_dir, 'samples-final.png')}")
        for line in recipe.report(ema, images, labels):
            log(line)
    log(f"done: {step} steps, checkpoint {ckpt_path}")


#################################################################################
#                                   Arguments                                   #
#################################################################################

# The paper's ImageNet recipe (MAR paper Sec. 5 / App. B and the official README), used with
# --data-path, --use-cached or --eval --fid-stats; and the CPU-sized values used on the built-in data.
# Per model: the paper's recipe (used with --data-path, --use-cached or --eval --fid-stats) and the
# CPU-sized values used on the built-in data. MAR: paper Sec. 5 / App. B and the official README.
# CODA: the official MAR config (AdamW 5e-4 cosine, 10 epochs, global batch 16 x 4 accumulation x 8
# GPUs = 512 -> 64 per GPU on 8 GPUs here). VAE: LDM's KL-16 recipe as MAR retrained it (LTH14/mar#3).
COMMON = dict(log_every=20, warmup_epochs=0, lr_schedule="cosine", weight_decay=0.0, grad_clip=10.0, ema=0.9999,
              num_iter=64, cfg=2.9, cfg_schedule="linear", diffusion_batch_mul=4, lpips_weight=1.0, disc="patch")
DEFAULTS = {
    "mar": (dict(COMMON, preset="base", img_size=256, epochs=400, warmup_epochs=100, batch_size=64, blr=1e-4,
                 lr_schedule="constant", weight_decay=0.02, grad_clip=3.0, ckpt_every=1000, sample_every=5000, num_images=50000),
            dict(COMMON, preset="tiny", img_size=32, epochs=25, warmup_epochs=1, batch_size=64, blr=4e-3, ema=0.999,
                 lr_schedule="constant", weight_decay=0.02, grad_clip=3.0, diffusion_batch_mul=1, ckpt_every=500,
                 sample_every=1000, num_iter=8, cfg=6.0, num_images=1000)),
    "coda": (dict(COMMON, preset="mar", img_size=256, epochs=10, batch_size=64, lr=5e-4, weight_decay=0.005, disc="dino", lora_rank=32,
                  ckpt_every=1000, sample_every=1000, num_images=5000),
             dict(COMMON, preset="tiny", img_size=32, epochs=5, batch_size=64, lr=2e-3, weight_decay=0.005, ema=0.999, lora_rank=8,
                  lpips_weight=0.0, disc="none", ckpt_every=500, sample_every=500, num_images=1000)),
    "vae": (dict(COMMON, preset="kl16", img_size=256, epochs=40, batch_size=32, lr=1e-4, ckpt_every=1000, sample_every=1000,
                 num_images=5000),
            dict(COMMON, preset="tiny", img_size=32, epochs=5, batch_size=64, lr=1e-3, ema=0.999, lpips_weight=0.0,
                 disc="none", ckpt_every=500, sample_every=500, num_images=1000)),
}
DEFAULTS["maskgit"] = (  # official MaskGIT config (Adam 1e-4 at batch 256, betas (0.9, 0.96), wd 0.045, 5k warmup)
    dict(COMMON, preset="large", img_size=256, epochs=300, warmup_epochs=1, batch_size=32, blr=1e-4, weight_decay=0.045,
         grad_clip=1.0, ema=0.999, num_iter=8, cfg=1.0, ckpt_every=1000, sample_every=5000, num_images=50000),
    dict(COMMON, preset="tiny", img_size=32, epochs=20, warmup_epochs=1, batch_size=64, blr=1.2e-2, weight_decay=0.045,
         grad_clip=1.0, ema=0.999, num_iter=8, cfg=3.0, cfg_schedule="constant", ckpt_every=500, sample_every=1000,
         num_images=1000))  # measured: 20 epochs at lr 3e-3 -> 86% class accuracy (README); 8 epochs at 1e-3 -> 24%
PRESETS = {"mar": list(mar.PRESETS), "coda": list(CODA_PRESETS), "vae": list(VAE_PRESETS), "maskgit": list(maskgit.PRESETS)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mar", choices=list(RECIPES))
    p.add_argument("--preset", help="mar: tiny/base/large/huge; coda: tiny/mar; vae: tiny/tiny16/kl16. Default: the paper's on "
                                    "ImageNet (base, mar, kl16), tiny on the built-in data")
    # data
    p.add_argument("--data-path", help="ImageNet-style folder (one subfolder per class); default: built-in data")
    p.add_argument("--val-path", help="held-out images for the tokenizers' grids and final report (default: --data-path)")
    p.add_argument("--img-size", type=int, help="default: 256 (paper), 32 on the built-in data")
    p.add_argument("--vae", help="KL-VAE: official kl16.ckpt or a --model vae run's checkpoint; MAR without it models pixels")
    p.add_argument("--patch-size", type=int, help="latent/pixel patch per token; default 1 with a VAE (paper), 4 without")
    p.add_argument("--cache-latents", action="store_true", help="encode --data-path once into --cache-path, then exit")
    p.add_argument("--use-cached", action="store_true", help="train from the latents in --cache-path")
    p.add_argument("--cache-path")
    p.add_argument("--num-workers", type=int, default=8 if torch.cuda.is_available() else 0)
    # optimization (None = the paper's value for the model, see DEFAULTS)
    p.add_argument("--epochs", type=int, help="default: 400 (paper's ablations; the released B/L/H used 800)")
    p.add_argument("--warmup-epochs", type=int, help="default: 100 (paper)")
    p.add_argument("--batch-size", type=int, help="per process; default 64 (paper: 64 x 32 GPUs = 2048)")
    p.add_argument("--blr", type=float, help="base lr; lr = blr x global batch / 256. Default 1e-4 (paper)")
    p.add_argument("--lr", type=float, help="absolute lr (overrides --blr)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], help="MAR: constant (paper); CODA: cosine (official)")
    p.add_argument("--weight-decay", type=float, help="MAR 0.02 (paper), CODA 0.005 (official)")
    p.add_argument("--grad-clip", type=float, help="MAR 3.0 (paper), CODA 10.0 (official)")
    p.add_argument("--ema", type=float, help="EMA decay; default 0.9999 (paper), 0.999 on the built-in data")
    p.add_argument("--diffusion-batch-mul", type=int, help="default: 4 (official README), 1 on the built-in data")
    p.add_argument("--num-sampling-steps", type=int, default=100)  # paper
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-tf32", dest="tf32", action="store_false")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--seed", type=int, default=1)  # official
    # run folder, logging, samples
    p.add_argument("--output-dir", help="default: runs/<model>-<preset>")
    p.add_argument("--resume", help="checkpoint to resume from (default: <output-dir>/checkpoint-last.pth if present)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--sample-every", type=int)
    p.add_argument("--num-iter", type=int, help="generation steps for sample grids; default 64 (paper), 8 built-in")
    p.add_argument("--cfg", type=float, help="CFG scale for sample grids; default 2.9 (MAR-B), 6.0 built-in")
    p.add_argument("--cfg-schedule", choices=["linear", "constant"], help="default: linear (MAR paper); constant for the "
                                                                          "built-in MaskGIT")
    p.add_argument("--temperature", type=float, default=1.0)  # paper (with CFG)
    # tokenizers (--model coda / vae); defaults are the official CODA-MAR config
    p.add_argument("--codebook-size", type=int, help="default: 16384 (CODA-MAR release), 256 on the built-in data")
    p.add_argument("--levels", type=int, nargs="+", help="residual level sides; default 1 2 3 4 5 6 8 10 13 16 (CODA-MAR)")
    p.add_argument("--quantizer", default="attention", choices=["attention", "nearest"], help="nearest: plain (residual) VQ")
    p.add_argument("--lora", default="both", choices=["both", "encoder", "decoder", "none"])  # official: both
    p.add_argument("--quantizer-lr", type=float, help="coda: the quantizer's lr; default --lr (official: both 5e-4)")
    p.add_argument("--lora-rank", type=int, help="32 (official); 8 on the built-in data's small VAE")
    p.add_argument("--l1-weight", type=float, default=0.2)  # official
    p.add_argument("--l2-weight", type=float, default=1.0)  # official
    p.add_argument("--lpips-weight", type=float, help="1.0 (official); 0 on the built-in data (no VGG download)")
    p.add_argument("--disc", choices=["dino", "patch", "none"], help="GAN discriminator: dino (paper, downloads DINO ViT-S/16), "
                                                                  "patch (PatchGAN, no pretrained weights), none")
    p.add_argument("--dino-weights", help="dino_deitsmall16_pretrain.pth (default: download once)")
    p.add_argument("--disc-weight", type=float, default=1.0)  # official
    p.add_argument("--disc-weight-decay", type=float, default=0.0005)  # official
    p.add_argument("--vq-weight", type=float, default=1.0)  # official
    p.add_argument("--entropy-weight", type=float, default=0.05)  # official
    p.add_argument("--kl-weight", type=float, default=1e-6)  # LDM's KL-VAE
    p.add_argument("--ema-start-epoch", type=int, default=4)  # official CODA: EMA copies the weights before
    p.add_argument("--tokenizer", help="--model maskgit: the checkpoint of a --model coda run")
    p.add_argument("--choice-temperature", type=float, default=4.5)  # official MaskGIT
    p.add_argument("--compare-quantizers", action="store_true", help="--model coda: run the paper's Table 1 "
                   "progression (VQ, residual VQ, attention, + LoRA) with these flags and print the table")
    # generate and score
    p.add_argument("--eval", action="store_true", help="generate --num-images samples from --resume and print FID / IS")
    p.add_argument("--num-images", type=int, help="default: 50000 (paper, FID-50K), 1000 on the built-in data")
    p.add_argument("--eval-batch-size", type=int, default=64, help="generation batch per process (official eval_bsz)")
    p.add_argument("--fid-stats", help="reference statistics (.npz with mu, sigma), e.g. MAR's fid_stats/adm_in256_stats.npz; "
                                       "default on the built-in data: computed from held-out toy images")
    p.add_argument("--inception-weights", help="FID Inception weights (torch-fidelity's .pth); default: download once")
    p.add_argument("--save-images", metavar="DIR", help="also write the samples as PNGs (00000.png, ...)")
    args = p.parse_args(argv)

    imagenet = args.data_path or args.use_cached or (args.eval and args.fid_stats)  # else: the built-in data
    defaults = DEFAULTS[args.model][0 if imagenet else 1]
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.preset not in PRESETS[args.model]:
        fail(f"--preset {args.preset} is not a {args.model} preset (choose from {', '.join(PRESETS[args.model])})")
    if args.model == "maskgit" and not args.tokenizer:
        fail("--model maskgit needs --tokenizer: the checkpoint of a `--model coda` run")
    if args.eval and args.model not in ("mar", "maskgit"):
        fail(f"--eval generates and scores samples: not for --model {args.model} (its report runs at the end of training)")
    if args.model == "coda" and not args.vae:
        fail("--model coda needs --vae: the official kl16.ckpt, or the checkpoint of a `--model vae` run")
    args.output_dir = args.output_dir or os.path.join("runs", f"{args.model}-{args.preset}")
    # flags that contradict each other
    if args.use_cached and not args.cache_path:
        fail("--use-cached needs --cache-path (the folder written by --cache-latents)")
    if args.use_cached and not args.vae:
        fail("--use-cached trains on VAE latents: give the same --vae that cached them (needed to decode samples)")
    if args.cache_latents and not (args.data_path and args.vae and args.cache_path):
        fail("--cache-latents needs --data-path, --vae and --cache-path")
    if args.cache_latents and args.use_cached:
        fail("--cache-latents and --use-cached are two separate runs: cache first, then train")
    if args.use_cached and args.data_path:
        fail("--use-cached reads --cache-path; drop --data-path (or drop --use-cached to train from images)")
    if args.cache_path and not (args.use_cached or args.cache_latents or args.model == "maskgit"):
        fail("--cache-path is only used with --cache-latents or --use-cached")
    if args.eval and imagenet and not args.fid_stats:
        fail("--eval on ImageNet needs --fid-stats (MAR's fid_stats/adm_in256_stats.npz, or `python fid.py DIR --save-stats`)")
    if args.eval and args.cache_latents:
        fail("--eval and --cache-latents are separate runs")
    if args.resume and not os.path.exists(args.resume):
        fail(f"--resume: checkpoint not found: {args.resume}")
    for key in ("epochs", "batch_size", "log_every", "ckpt_every", "sample_every", "num_iter", "num_images", "eval_batch_size"):
        if getattr(args, key) < 1:
            fail(f"--{key.replace('_', '-')} must be at least 1")
    return args


if __name__ == "__main__":
    if "--compare-quantizers" in sys.argv:
        compare_quantizers(sys.argv[1:])
    else:
        main(parse_args())
