"""
MaskGIT over CODA's multi-level tokens, all of it in one file.

Paper: H. Chang, H. Zhang, L. Jiang, C. Liu, W. T. Freeman, "MaskGIT: Masked Generative Image
Transformer", CVPR 2022 (arXiv:2202.04200). Official code (inference only):
github.com/google-research/maskgit. CODA (arXiv:2503.17760, Sec. 5.1) trains a MaskGIT on its
residual multi-level tokens but never released that code; this file follows MaskGIT's official
decoding exactly and the CODA paper's description of the inputs.

Read it top to bottom:
  1. The token layout: CODA's 10 residual levels (1x1 ... 16x16 = 680 tokens) as one sequence.
  2. The mask schedule gamma (paper Sec. 3.2) and the training objective (Sec. 3.1, Eq. 1).
  3. The bidirectional transformer: class token first, a shared code embedding plus a [MASK] token,
     learned position embeddings per level plus a level embedding, logits over the codebook.
  4. Iterative decoding (Sec. 3.2, Fig. 3), step for step as the official parallel_decode.py:
     sample every masked token, keep the most confident ones, re-mask the rest by the schedule.
  5. Presets.
  6. Training with train.py: the recipe, cached tokens as inputs, the loss, sampling.
  7. A benchmark (python maskgit.py --bench).
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import coda
import mar  # upstream of coda: the shared sampling flags and benchmark helper

# =============================================================================================
# 1. Token layout: levels coarse -> fine, each row-major
# =============================================================================================

def level_layout(levels):
    """For a sequence of sum(p^2) tokens: the level, row and column of every position (three
    (L,) long tensors). Position = offset(level) + row * p + col; offsets are cumulative p^2."""
    lv, rows, cols = [], [], []
    for k, p in enumerate(levels):
        lv.append(torch.full((p * p,), k))
        rows.append(torch.arange(p).repeat_interleave(p))
        cols.append(torch.arange(p).repeat(p))
    return torch.cat(lv), torch.cat(rows), torch.cat(cols)


def flatten_levels(indices):
    """CODA indices [(B, p1, p1), ..., (B, pK, pK)] -> one sequence (B, L)."""
    return torch.cat([i.flatten(1) for i in indices], 1)


def unflatten_levels(tokens, levels):
    """(B, L) -> [(B, p, p) for each level]: the inverse of flatten_levels."""
    return [t.view(len(tokens), p, p) for t, p in zip(tokens.split([p * p for p in levels], 1), levels)]


# =============================================================================================
# 2. Mask schedule and training objective (paper Sec. 3.1-3.2)
# =============================================================================================

def rand(shape, generator, device):
    """U[0, 1) noise, drawn on the generator's device (a CPU generator gives the same numbers on
    every machine) and moved to `device`."""
    g_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=g_device).to(device)


def gamma(r):
    """The cosine mask schedule gamma(r) = cos(pi r / 2), clipped to [1e-6, 1] as the official
    mask_schedule.py: the fraction of tokens masked at "time" r in [0, 1)."""
    return torch.cos(math.pi / 2 * r).clamp(1e-6, 1.0)


def random_mask(batch, length, device, generator=None):
    """Training masks (B, L) bool: per image, r ~ U[0, 1) and ceil(gamma(r) * L) positions chosen
    uniformly at random (paper Sec. 3.1)."""
    r = rand((batch,), generator, device)
    n = torch.ceil(gamma(r) * length)                                      # (B,), at least 1
    order = rand((batch, length), generator, device).argsort(1).argsort(1)
    return order < n[:, None]                                             # the n positions ranked first


# =============================================================================================
# 3. The bidirectional transformer
# =============================================================================================

class Block(nn.Module):
    """Pre-norm transformer block with full (bidirectional) attention through SDPA."""

    def __init__(self, dim, heads, mlp_ratio=4.0, dropout=0.1):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = mar.attention(q, k, v, self.dropout if self.training else 0.0)      # (B, heads, L, C / heads)
        x = x + self.drop(self.proj(h.transpose(1, 2).reshape(B, L, C)))   # (B, L, C)
        return x + self.drop(self.mlp(self.norm2(x)))


class MaskGIT(nn.Module):
    """Input sequence: [class token] + L code tokens, [MASK] = codebook_size. Output: logits over the
    codebook for every code position (the class token's output is unused)."""

    def __init__(self, codebook_size, levels, num_classes=1000, dim=768, depth=24, heads=16, mlp_ratio=4.0,
                 dropout=0.1, class_dropout=0.1, label_smoothing=0.1):
        super().__init__()
        self.codebook_size, self.levels, self.num_classes = codebook_size, tuple(levels), num_classes
        self.mask_id, self.length = codebook_size, sum(p * p for p in levels)
        self.class_dropout, self.label_smoothing = class_dropout, label_smoothing
        self.tok_emb = nn.Embedding(codebook_size + 1, dim)                 # the codes (shared by all levels) + [MASK]
        self.class_emb = nn.Embedding(num_classes + 1, dim)                 # + the null class, for CFG
        # "learnable positional embeddings specific to each quantization level" (CODA Sec. 5.1):
        # one table per level, concatenated, plus one embedding per level (as VAR)
        self.pos_emb = nn.Parameter(torch.zeros(1, 1 + self.length, dim))
        self.level_emb = nn.Embedding(len(levels), dim)
        self.register_buffer("level_of", level_layout(levels)[0], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, codebook_size)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():  # trunc-normal(0.02), as the official config
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)

    def logits(self, tokens, labels):
        """tokens (B, L) with mask_id at unknown positions, labels (B,) (num_classes = null) ->
        logits (B, L, codebook_size)."""
        x = torch.cat([self.class_emb(labels)[:, None], self.tok_emb(tokens) + self.level_emb(self.level_of)], 1)
        x = x + self.pos_emb                                                # (B, 1 + L, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 1:]))                               # (B, L, V)

    def forward(self, tokens, labels, generator=None):
        """Training loss (paper Eq. 1): cross-entropy on the masked positions only, with label
        smoothing 0.1; class labels dropped to the null class with probability class_dropout."""
        B, L = tokens.shape
        mask = random_mask(B, L, tokens.device, generator)
        if self.training and self.class_dropout > 0:
            drop = rand((B,), generator, tokens.device) < self.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        logits = self.logits(torch.where(mask, self.mask_id, tokens), labels)
        return masked_cross_entropy(logits, tokens, mask, self.label_smoothing)

    # -----------------------------------------------------------------------------------------
    # 4. Iterative decoding (paper Sec. 3.2; official libml/parallel_decode.py)
    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, labels, num_iter=8, choice_temperature=4.5, temperature=1.0, cfg=1.0, cfg_schedule="linear",
                 generator=None, trace=None):
        """Class labels (B,) -> code tokens (B, L) by iterative decoding (see `decode`)."""
        return decode(lambda x: self.guided_logits(x, labels, cfg, cfg_schedule), len(labels), self.length, self.mask_id,
                      num_iter, choice_temperature, temperature, generator, labels.device, trace)

    @torch.no_grad()
    def guided_logits(self, x, labels, cfg, schedule):
        """Classifier-free guidance on the logits, l_u + s (l_c - l_u). 'linear' grows s from 1 with
        the fraction of tokens known entering the step (MAR's schedule counts those known after it, so
        it starts one step later here); 'constant' uses s = cfg."""
        if cfg == 1.0:
            return self.logits(x, labels).float()
        null = torch.full_like(labels, self.num_classes)
        lc, lu = self.logits(torch.cat([x, x]), torch.cat([labels, null])).chunk(2)  # (B, L, V) each
        s = cfg
        if schedule == "linear":
            s = 1 + (cfg - 1) * (x != self.mask_id).sum(1, keepdim=True)[..., None] / self.length  # (B, 1, 1)
        # in fp32, in place: one (B, L, V) fp32 tensor (MaskGIT-L at batch 256: 11 GiB each)
        return lc.float().sub_(lu).mul_(s).add_(lu)


@torch.no_grad()
def decode(logits_fn, batch, length, mask_id, num_iter=8, choice_temperature=4.5, temperature=1.0, generator=None,
           device="cpu", trace=None):
    """MaskGIT's iterative decoding (paper Sec. 3.2), step for step as the official
    parallel_decode.py. Starting from all [MASK], each step t of T:
      1. logits for every position (logits_fn, which may apply CFG);
      2. sample a token at every position (categorical, as Gumbel-max), keep the known ones;
      3. unless it is the last step, re-mask the least confident (`remask`).
    As the official code, the result is the last step's sample BEFORE re-masking: complete, although
    the schedule keeps at least one token masked in the state. `trace` (a list) receives the state
    entering every step."""
    x = torch.full((batch, length), mask_id, device=device)
    n0 = torch.full((batch, 1), float(length), device=device)              # unknown tokens at the start
    for t in range(num_iter):
        if trace is not None:
            trace.append(x.clone())
        unknown = x == mask_id                                              # (B, L)
        logits = logits_fn(x).float()                                       # (B, L, V): one fp32 tensor
        if temperature != 1.0:  # (the paper's 1.0: no copy)
            logits = logits / temperature
        log_z = logits.logsumexp(-1)                                        # (B, L), before the noise is added
        gumbel = sample_noise(logits.shape, generator, device)              # (B, L, V): the second, and last
        sampled = gumbel.add_(logits).argmax(-1)                            # categorical sample (Gumbel-max)
        del gumbel
        sampled = torch.where(unknown, sampled, x)                          # decoded tokens are kept
        if t == num_iter - 1:
            return sampled
        log_p = logits.gather(-1, sampled[..., None])[..., 0] - log_z       # log p(sampled token), (B, L)
        noise = sample_noise((batch, length), generator, device)
        x = torch.where(remask(log_p, unknown, n0, t, num_iter, choice_temperature, noise), mask_id, sampled)
    return x


def remask(log_p, unknown, n0, step, num_iter, choice_temperature, noise):
    """Which tokens go back to [MASK] after step `step` (official mask_by_random_topk):
      mask_len   = floor(N0 * gamma((t+1)/T)), clamped to [1, #unknown - 1] (at least one token is
                   revealed per step and at least one kept for the next; float32 as the JAX code);
      confidence = log p(sampled) + choice_temperature * (1 - (t+1)/T) * Gumbel noise, and +inf for
                   the tokens known before this step, so they are never re-masked;
      the mask_len lowest confidences are re-masked. The schedule terms are host scalars (float32
      values, computed on the CPU): no copy to the device and no sync per step."""
    ratio = torch.tensor(float(step + 1), dtype=torch.float32) / num_iter
    mask_len = torch.floor(n0 * gamma(ratio).item())                       # (B, 1), float32 times a float32 value
    mask_len = torch.maximum(torch.ones_like(mask_len), torch.minimum(unknown.sum(1, keepdim=True) - 1.0, mask_len))
    confidence = torch.where(unknown, log_p, torch.inf) + choice_temperature * (1.0 - ratio.item()) * noise
    cutoff = confidence.sort(-1).values.gather(-1, mask_len.long())        # the (mask_len + 1)-th lowest score
    return confidence < cutoff


def sample_noise(shape, generator, device):
    """Gumbel(0, 1) noise of `shape`."""
    u = rand(shape, generator, device)
    e = u.clamp_min_(1e-20).log_().neg_()                                   # Exponential(1), in place
    return e.clamp_min_(1e-20).log_().neg_()


def masked_cross_entropy(logits, targets, mask, label_smoothing=0.1):
    """Mean cross-entropy over the masked positions only; unmasked positions get zero weight."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none",  # (B L, V): rows contiguous
                           label_smoothing=label_smoothing).view_as(targets)                       # (B, L)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


# =============================================================================================
# 5. Presets
# =============================================================================================

def maskgit_large(codebook_size=16384, levels=coda.MAR_LEVELS, num_classes=1000, **kw):
    """MaskGIT-L: 24 layers, width 768, 16 heads, MLP 3072 (official config)."""
    return MaskGIT(codebook_size, levels, num_classes, dim=768, depth=24, heads=16, **kw)


def maskgit_tiny(codebook_size=256, levels=(1, 2, 3, 4), num_classes=10, dropout=0.0, **kw):
    """CPU-sized, for the built-in data's 30 tokens. No dropout: at this size it slows learning
    (and dropout's random masks take a quarter of a CPU step)."""
    return MaskGIT(codebook_size, levels, num_classes, dim=128, depth=4, heads=4, dropout=dropout, **kw)


PRESETS = {"tiny": maskgit_tiny, "large": maskgit_large}


# =============================================================================================
# 6. Training with train.py --model maskgit (on the tokens of a --model coda run)
# =============================================================================================
# Official MaskGIT config: Adam(W) betas (0.9, 0.96), lr 1e-4 at batch 256 with 5k warm-up steps
# (about one epoch), weight decay 0.045, grad clip 1.0, EMA 0.999, 300 epochs. The tokens of every
# training image and of its horizontal flip are computed once by train.py (`encode`) and cached, so
# training never runs the VAE; the flip draw picks one of the two.

PAPER = dict(preset="large", img_size=256, epochs=300, warmup_epochs=1, batch_size=32, blr=1e-4, lr_schedule="cosine",
             weight_decay=0.045, grad_clip=1.0, ema=0.999, ckpt_every=1000, sample_every=5000, num_images=50000,
             num_iter=8, cfg=1.0, cfg_schedule="linear", temperature=1.0)
BUILTIN = dict(PAPER, preset="tiny", img_size=32, epochs=96, batch_size=64, blr=1.2e-2, ckpt_every=500,
               sample_every=1000, num_images=1000, cfg=3.0, cfg_schedule="constant")
# measured on the built-in data (30 tokens per image): lr 3e-3 (blr 1.2e-2); 96 epochs (squares 70%
# and triangles 83% of 1,000 samples; 48 epochs: 53% and 60%); bf16 training steps on a bf16 CPU: README


def add_args(p):
    """MaskGIT's own flags (train.py adds the shared ones)."""
    p.add_argument("--tokenizer", required=True, help="the checkpoint of a --model coda run (frozen)")
    p.add_argument("--cache-path", help="the cached tokens (default: <output-dir>/tokens.npy)")
    p.add_argument("--choice-temperature", type=float, default=4.5)  # official MaskGIT
    mar.add_sampling_args(p)


def check_args(args):
    """-> an error message for flags MaskGIT cannot use, else None (train.py fails with it)."""
    if args.temperature is not None and args.temperature <= 0:
        return f"--temperature {args.temperature}: must be positive (it divides MaskGIT's logits)"
    if args.cache_path and (os.path.isdir(args.cache_path) or not os.path.isdir(os.path.dirname(os.path.abspath(args.cache_path)))):
        return f"--cache-path {args.cache_path}: give a file name (such as tokens.npy) in an existing folder"
    return None


class Training(nn.Module):
    """What train.py needs to train MaskGIT: the model, the frozen CODA tokenizer (images <->
    tokens), the inputs of a batch of cached tokens, the loss and decoding."""
    betas = (0.9, 0.96)  # official MaskGIT config
    bf16 = True  # train.py's autocast on CUDA and bf16 CPUs (no official training code: as MAR)
    PRESETS, PAPER, BUILTIN, add_args, check_args = PRESETS, PAPER, BUILTIN, staticmethod(add_args), staticmethod(check_args)

    def __init__(self, args, num_classes, device):
        super().__init__()
        self.args, self.device = args, device
        try:
            self.tokenizer, tok = coda.load_trained(args.tokenizer, device)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--tokenizer: {e}") from None
        if tok["img_size"] != args.img_size:
            raise ValueError(f"--tokenizer was trained on {tok['img_size']} px images, not --img-size {args.img_size}")
        self.config = dict(preset=args.preset, img_size=args.img_size, class_num=num_classes, codebook_size=tok["codebook_size"],
                           levels=tuple(tok["levels"]))  # which tokenizer: its weights' SHA-256 (train.py), not its file name
        self.model = PRESETS[args.preset](tok["codebook_size"], tuple(tok["levels"]), num_classes)

    @torch.no_grad()
    def encode(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> the tokens of each image and of its flip (B, 2, L), for the cache."""
        both = [flatten_levels(self.tokenizer.tokenize(x)) for x in (images, images.flip(3))]
        return torch.stack(both, 1).to(torch.int16 if self.model.codebook_size <= 32767 else torch.int32)

    def inputs(self, batch, flip):
        tokens = batch[0].to(self.device, non_blocking=True)                    # (B, 2, L)
        tokens = tokens[torch.arange(len(tokens), device=self.device), flip.to(self.device, non_blocking=True).long()]
        return tokens.long(), batch[1].to(self.device, non_blocking=True)

    def loss(self, model, tokens, labels, progress):
        return model(tokens, labels)  # masked cross-entropy (Eq. 1)

    @staticmethod
    def no_weight_decay(name, param):
        return param.ndim < 2 or name.endswith(".bias") or name == "pos_emb"

    def ema_decay(self, step, epoch):
        return self.args.ema

    @torch.no_grad()
    def sample(self, model, labels, generator):
        """Class labels (B,) -> images (B, 3, H, W) in [-1, 1]: decode tokens (section 4), then detokenize."""
        a = self.args
        tokens = model.generate(labels, a.num_iter, a.choice_temperature, a.temperature, a.cfg, a.cfg_schedule, generator)
        return self.tokenizer.detokenize(unflatten_levels(tokens, model.levels)).float().clamp(-1, 1)


# =============================================================================================
# 7. Benchmark: python maskgit.py --bench
# =============================================================================================

def benchmark(preset="large", batch_size=32, sample_batch=64, steps=10, iters=(8, 32), cfg=2.0):
    """Training images/s and generation images/s (tokens only, no VAE decode) on the current device."""
    device, amp, sync = mar.bench_device()
    model = PRESETS[preset]().to(device)
    print(f"maskgit_{preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{model.length} tokens, codebook {model.codebook_size}, on {device}")
    tokens = torch.randint(0, model.codebook_size, (batch_size, model.length), device=device)
    labels = torch.randint(0, model.num_classes, (batch_size,), device=device)
    speed = mar.training_speed(model, (tokens, labels), steps, amp, sync, betas=(0.9, 0.96))
    print(f"training: {speed:.3g} images/s (batch {batch_size})")
    model.eval()
    labels = torch.arange(sample_batch, device=device) % model.num_classes
    with amp:  # warm-up, not timed
        model.generate(labels, 1, cfg=cfg)
    for num_iter in iters:
        sync()
        t0 = time.perf_counter()
        with amp:
            model.generate(labels, num_iter, cfg=cfg)
        sync()
        print(f"generation: {sample_batch / (time.perf_counter() - t0):.3g} images/s ({num_iter} steps, cfg {cfg}, "
              f"batch {sample_batch}, tokens only)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="MaskGIT benchmark (training and generation images/s)")
    parser.add_argument("--bench", action="store_true", required=True)
    parser.add_argument("--preset", default="large", choices=list(PRESETS))
    # On a GPU: the per-GPU batch of PAPER. On a CPU, where MaskGIT-L takes about 6 s an image
    # to train (0.8 TFLOP) and peaked at 13 GiB at batch 4, sizes that fit its memory and a few minutes.
    gpu = torch.cuda.is_available()
    parser.add_argument("--batch-size", type=mar.positive, default=32 if gpu else 4)
    parser.add_argument("--sample-batch", type=mar.positive, default=64 if gpu else 4)
    parser.add_argument("--steps", type=mar.positive, default=10 if gpu else 2)
    parser.add_argument("--num-iter", type=mar.positive, nargs="+", default=[8, 32] if gpu else [8])
    args = parser.parse_args()
    benchmark(args.preset, args.batch_size, args.sample_batch, args.steps, args.num_iter)
