"""
CODA: discrete tokens from a frozen continuous VAE, all of it in one file.

Paper: Z. Liu, Z. Ni, Y. Hua, X. Deng, X. Ma, C. Zhong, G. Huang, "CODA: Repurposing Continuous
VAEs for Discrete Tokenization", ICCV 2025 (arXiv:2503.17760). Official code (tokenizer only):
github.com/LeapLabTHU/CODA.

The argument of the paper (Sec. 4), in the order this file follows it:
  1. A VQ tokenizer has to learn compression AND discretization at once. Instead, take a VAE that
     already compresses well (MAR's KL-16, from mar.py), keep it frozen, and only learn to
     discretize its continuous latents f (B, 16, 16, 16).
  2. Plain vector quantization of f is poor: one code per position cannot express a continuous
     latent (rFID 41.5, 49% of the codes used). Residual quantization over scales (VAR-style:
     1x1, 2x2, ..., 16x16, each level coding what the previous ones missed) enlarges the
     capacity (rFID 14.2).
  3. Nearest-neighbour assignment is ambiguous (many codes lie at similar distances). CODA assigns
     codes by attention: latents and codes are projected and normalised onto a hypersphere, and a
     softmax over the codebook picks one code per position, trained end to end through a
     straight-through estimator. Codes compete in the softmax: sparse, confident assignments and
     every code used (rFID 7.06, 100% usage).
  4. Finally the frozen VAE is adapted with LoRA on its convolutions (rFID 1.34).
Then: the tokenizer (encode -> quantize -> decode, indices <-> images) and loading the release.
The training losses (L1 + L2 + LPIPS, GAN, quantization and entropy terms) follow in section 5,
and how train.py trains the VAE and CODA with them (and re-runs Table 1) in section 6.

Every module and parameter name equals the official one, so the released `vae.pth` /
`quantizer.pth` load with strict=True; test_all.py checks outputs and gradients against tensors
produced by running the official modules.
"""
import argparse
import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import mar

MAR_LEVELS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # side of each residual level on the 16x16 latent (VAR's)


# =============================================================================================
# 1-3. Quantizers: nearest-neighbour VQ and the attention-based assignment (paper Sec. 4.1-4.3)
# =============================================================================================

class RMSNorm(nn.Module):
    """x / rms(x) * gain over the last dimension (eps 1e-5): puts queries and keys on a sphere of
    radius sqrt(d) (times the learned gain), the paper's "normed hypersphere"."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Attention-based code assignment (paper Sec. 4.3): one attention step whose queries are the
    latents, whose keys and values are the codebook, and whose softmax is made hard.

    logits[t, n] = <norm(W_q u_t), norm(W_k e_n)> / sqrt(d_attn)  for token t and code n
    index_t      = argmax_n logits[t, n]
    z_t          = sum_n onehot_st[t, n] (W_v e_n)   with onehot_st = onehot - sg(softmax) + softmax
    The forward value is the value vector W_v e_index of the chosen code (not e itself); the
    backward pass sees the softmax, so the logits (W_q, W_k, the codebook and the latent) learn
    which code to pick. A second output z2 = W_v e_index carries gradient to the values only.
    """

    def __init__(self, dim=16, attn_dim=32, norm="rms_norm"):
        super().__init__()
        self.to_q = nn.Linear(dim, attn_dim)
        self.to_k = nn.Linear(dim, attn_dim)
        self.to_v = nn.Linear(dim, dim)
        make = {"rms_norm": lambda: RMSNorm(attn_dim), "layer_norm": lambda: nn.LayerNorm(attn_dim), "none": lambda: None}
        self.norm_q, self.norm_k = make[norm](), make[norm]()

    def forward(self, u, codebook):
        B, C, h, w = u.shape
        q = self.to_q(u.flatten(2).transpose(1, 2))            # (B, hw, d_attn)
        k = self.to_k(codebook)                               # (V, d_attn)
        scale = 1 / math.sqrt(q.shape[-1])
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        logits = q @ k.T * scale                              # (B, hw, V)
        soft = logits.softmax(-1)
        index = soft.argmax(-1)                               # (B, hw); argmax of the softmax, as the official code
        hard = F.one_hot(index, codebook.shape[0]).to(soft.dtype)
        value = self.to_v(codebook)                           # (V, C): the latent each code stands for
        z = (hard - soft.detach() + soft) @ value             # straight-through one-hot (B, hw, C)
        z2 = hard @ value                                     # same forward value, gradient to the values only
        to_map = lambda t: t.transpose(1, 2).reshape(B, C, h, w)
        return logits, index.view(B, h, w), to_map(z), to_map(z2)


def nearest_assign(u, codebook):
    """Plain VQ (VQ-VAE, van den Oord et al. 2017): the nearest code in L2, with the identity
    straight-through estimator z = u + sg(e - u) so the gradient skips the (non-differentiable)
    lookup. Returns the same four outputs as Attention (logits = minus the squared distances)."""
    B, C, h, w = u.shape
    x = u.flatten(2).transpose(1, 2)                          # (B, hw, C)
    dist = x.pow(2).sum(-1, keepdim=True) - 2 * x @ codebook.T + codebook.pow(2).sum(-1)  # (B, hw, V)
    index = dist.argmin(-1)                                   # (B, hw)
    e = codebook[index].transpose(1, 2).reshape(B, C, h, w)
    return -dist, index.view(B, h, w), u + (e - u).detach(), e


def entropy_loss(logits, temperature=0.01, eps=1e-5):
    """MAGVIT-v2's entropy penalty (Yu et al. 2024, Eq. 5) on the assignment logits (N, V): make each
    token's code distribution confident (low per-sample entropy) while the codebook as a whole is
    used evenly (high entropy of the batch-average distribution). The +eps inside log_softmax is
    the official code's (it cancels out); the one inside log(avg) guards log(0)."""
    p = F.softmax(logits / temperature, -1)
    log_p = F.log_softmax(logits / temperature + eps, -1)
    sample_entropy = -(p * log_p).sum(-1).mean()
    avg = p.mean(0)
    batch_entropy = -(avg * torch.log(avg + eps)).sum()
    return sample_entropy - batch_entropy


class CODAQuantizer(nn.Module):
    """Residual multi-scale quantization with ONE shared codebook and ONE shared assignment module
    (paper Sec. 4.2-4.3). For level k with side p_k, starting from r = f and f_hat = 0:

        u_k   = area-downsample(r, p_k)             # what is left to explain, at this level's size
        z_k   = assign(u_k)                         # (B, C, p_k, p_k): one code per position
        h_k   = bicubic-upsample(z_k, H)            # back to the latent grid
        f_hat = f_hat + h_k ;  r = r - h_k

    f_hat approximates f with sum_k p_k^2 codes (680 for the MAR levels). Nothing is detached: the
    decoder's gradient reaches the assignment through the straight-through softmax of every level.

    assign='attention' is CODA; assign='nearest' gives plain residual VQ, and levels=(16,) with
    'nearest' plain VQ: the paper's Table 1 progression.
    """

    def __init__(self, dim=16, codebook_size=16384, levels=MAR_LEVELS, assign="attention", beta=None,
                 attn_dim=32, norm="rms_norm", entropy_temperature=0.01):
        super().__init__()
        self.levels, self.codebook_size, self.entropy_temperature = tuple(levels), codebook_size, entropy_temperature
        self.codebooks = nn.Embedding(codebook_size, dim)     # N(0, 1) init, as the official code
        self.attn = Attention(dim, attn_dim, norm) if assign == "attention" else None
        # official CODA config: 0.05; VQ-VAE's commitment weight: 0.25
        self.beta = beta if beta is not None else (0.05 if self.attn is not None else 0.25)

    def assign(self, u):
        return self.attn(u, self.codebooks.weight) if self.attn is not None else nearest_assign(u, self.codebooks.weight)

    def level_loss(self, u, z, z2):
        """Quantization loss of one level, on the downsampled residual u."""
        if self.attn is not None:  # official CODA: ||z - u||^2 + ||sg(z2) - u||^2 + beta ||z2 - sg(u)||^2
            return F.mse_loss(z, u) + F.mse_loss(z2.detach(), u) + self.beta * F.mse_loss(z2, u.detach())
        # VQ-VAE (van den Oord et al. 2017, Eq. 3): codebook term + beta * commitment term
        return F.mse_loss(z2, u.detach()) + self.beta * F.mse_loss(u, z2.detach())

    def forward(self, f):
        """f (B, C, H, W) -> (indices: list of (B, p_k, p_k) long, f_hat (B, C, H, W),
        quantization loss, entropy loss), both losses averaged over levels."""
        H, W = f.shape[-2:]
        f_hat, residual = torch.zeros_like(f), f
        indices, q_losses, e_losses = [], [], []
        for p in self.levels:
            u = F.interpolate(residual, size=(p, p), mode="area")               # (B, C, p, p)
            logits, index, z, z2 = self.assign(u)
            h = F.interpolate(z, size=(H, W), mode="bicubic")                   # (B, C, H, W)
            f_hat, residual = f_hat + h, residual - h
            indices.append(index)
            q_losses.append(self.level_loss(u, z, z2))
            if self.attn is not None:
                e_losses.append(entropy_loss(logits.reshape(-1, self.codebook_size), self.entropy_temperature))
        entropy = torch.stack(e_losses).mean() if e_losses else f.new_zeros(())
        return indices, f_hat, torch.stack(q_losses).mean(), entropy

    def code_vectors(self, index):
        """(...) code indices -> (..., C): the latent vector each code contributes (W_v e + b_v for
        the attention quantizer, e for plain VQ). A generator's tokens are decoded through this."""
        e = self.codebooks(index)
        return self.attn.to_v(e) if self.attn is not None else e

    def decode(self, indices, size=None):
        """Indices (a list of (B, p_k, p_k), one per level) -> f_hat (B, C, H, W): the same sum of
        upsampled code vectors the forward pass builds."""
        H = size or self.levels[-1]
        f_hat = 0
        for index in indices:
            z = self.code_vectors(index).permute(0, 3, 1, 2)                   # (B, C, p, p)
            f_hat = f_hat + F.interpolate(z, size=(H, H), mode="bicubic")
        return f_hat


def code_counts(indices, codebook_size):
    """(codebook_size,) how often each code occurs in `indices` (any tensors of code ids), counted
    with a fixed-size scatter: torch.bincount would wait on the GPU for the largest id, once per
    level and training step."""
    flat = torch.cat([index.flatten() for index in indices])
    return torch.zeros(codebook_size, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def codebook_usage(indices, codebook_size):
    """Fraction of the codebook selected at least once in `indices` (e.g. all levels of all images
    of a validation set), and the per-code counts."""
    counts = code_counts(indices, codebook_size)
    return (counts > 0).float().mean().item(), counts


# =============================================================================================
# 4. Adapting the frozen VAE with LoRA (paper Sec. 4.4)
# =============================================================================================
# Each adapted conv computes W*x + b + Up(Down(x)): Down has the base conv's kernel, stride and
# padding and maps to `rank` channels, Up is a 1x1 conv back. Up starts at zero, so training starts
# from the pretrained VAE exactly; only Down/Up are trained (about 6M parameters for kl16).

class LoRALayer(nn.Module):
    def __init__(self, conv, rank):
        super().__init__()
        self.down = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, bias=False)
        self.up = nn.Conv2d(rank, conv.out_channels, 1, bias=False)
        nn.init.normal_(self.down.weight, std=1 / rank)       # official init
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.up(self.down(x))


class LoRAConv2d(nn.Conv2d):
    """A frozen conv (same `weight` / `bias` names) plus a trainable low-rank branch `lora_layer`."""

    def forward(self, x):
        return super().forward(x) + self.lora_layer(x)


LORA_TARGETS = ("conv1", "conv2", "upsample", "downsample")  # official MAR config: 66 convs of kl16


def add_lora(vae, rank=32, parts=("encoder", "decoder"), targets=LORA_TARGETS):
    """Freeze `vae` and give every Conv2d whose name contains one of `targets`, inside `parts`
    (encoder, decoder, both or neither: the paper's ablation), a LoRA branch. In place."""
    vae.requires_grad_(False)
    for name, conv in list(vae.named_modules()):
        if type(conv) is nn.Conv2d and name.split(".")[0] in parts and any(t in name for t in targets):
            new = LoRAConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             bias=conv.bias is not None).to(conv.weight.device)
            new.load_state_dict(conv.state_dict())
            new.requires_grad_(False)
            new.lora_layer = LoRALayer(conv, rank).to(conv.weight.device)  # trainable
            parent, _, attr = name.rpartition(".")
            setattr(vae.get_submodule(parent), attr, new)
    return vae


# =============================================================================================
# The tokenizer: image -> 680 discrete tokens -> image
# =============================================================================================

class CODA(nn.Module):
    """Frozen VAE (+ LoRA) and the quantizer between its encoder and decoder. The latent is the
    posterior SAMPLE times the VAE's scale (0.2325 for kl16), as the official code, in training
    and evaluation alike."""

    def __init__(self, vae, quantizer, scale=mar.VAE_SCALE):
        super().__init__()
        self.vae, self.quantizer, self.scale = vae, quantizer, scale

    def encode(self, images, generator=None):
        """Images in [-1, 1] -> the scaled continuous latent f (B, C, H/16, W/16)."""
        return self.vae.encode(images).sample(generator) * self.scale

    def forward(self, images, generator=None):
        """-> (reconstruction in [-1, 1] (approximately), quantization loss, entropy loss, indices)."""
        indices, f_hat, q_loss, e_loss = self.quantizer(self.encode(images, generator))
        return self.vae.decode(f_hat / self.scale), q_loss, e_loss, indices

    @torch.no_grad()
    def tokenize(self, images, generator=None):
        """Images -> a list of per-level index maps [(B, 1, 1), (B, 2, 2), ..., (B, 16, 16)]."""
        return self.quantizer(self.encode(images, generator))[0]

    @torch.no_grad()
    def detokenize(self, indices):
        """Per-level index maps -> images."""
        return mar.decode_in_chunks(self.vae, self.quantizer.decode(indices) / self.scale)


def coda_mar(codebook_size=16384, lora_rank=32, lora_parts=("encoder", "decoder"), assign="attention", levels=MAR_LEVELS):
    """CODA on MAR's kl16 (the paper's 16x tokenizer; released with V = 16384)."""
    vae = add_lora(mar.kl16(), lora_rank, lora_parts) if lora_parts else mar.kl16().requires_grad_(False)
    return CODA(vae, CODAQuantizer(16, codebook_size, levels, assign))


def load_release(model, vae_path, quantizer_path):
    """Load the CODA-MAR release (huggingface.co/shuidi0020/CODA, folder mar_v16384): `vae.pth` is
    the whole kl16 state dict with the LoRA branches (`<conv>.lora_layer.down/up.weight`, the
    names add_lora creates) and `quantizer.pth` the CODAQuantizer's (`codebooks.weight`,
    `attn.to_q/to_k/to_v`, `attn.norm_q/norm_k`). Use vae_ema.pth / quantizer_ema.pth, the EMA
    weights the paper evaluates. Both load with strict=True or raise one line naming the difference."""
    mar.load_weights(model.vae, vae_path, None)
    mar.load_weights(model.quantizer, quantizer_path, None)
    return model


# =============================================================================================
# 5. Training losses (official train_mar.py and losses/contperceptual.py)
# =============================================================================================
# Generator step (LoRA + quantizer), per batch:
#   L = 0.2 L1 + 1.0 L2 + 1.0 LPIPS                      (reconstruction, "nll")
#     + ramp * lambda * (-mean D(x_hat))                  (hinge GAN, ramp = step / total steps)
#     + 1.0 quantization loss + 0.05 entropy loss          (section 1-3)
# with lambda the VQGAN adaptive weight (Esser et al. 2021, Eq. 7). Discriminator step on the
# same batch, detached: 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))).

def adaptive_weight(nll, g_loss, last_layer, weight=1.0):
    """lambda = ||grad_w nll|| / (||grad_w g_loss|| + 1e-6), clamped to [0, 1e4], detached: the
    GAN term gets as much gradient at `last_layer` as the reconstruction term (VQGAN Eq. 7)."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0].norm()
    return (g_nll / (g_gan + 1e-6)).clamp(0, 1e4).detach() * weight


def hinge_d_loss(real_logits, fake_logits):
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


class PatchDiscriminator(nn.Module):
    """The weight-free discriminator: pix2pix / VQGAN's PatchGAN (Isola et al. 2017), trained from
    scratch, one logit per overlapping patch. For small data or machines without the DINO file."""

    def __init__(self, ch=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2)], ch
        for i in range(1, n_layers + 1):
            c_out = ch * min(2 ** i, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2 if i < n_layers else 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # VQGAN's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x).flatten(1)                        # (B, patches)


# --- The paper's discriminator: frozen DINO ViT-S/16 features + small trainable heads ---------
# (StyleGAN-T / VAR-style, as CODA's losses/dino.py). Five token maps are read from the frozen
# ViT: after the patch + position embedding and after blocks 2, 5, 8 and 11, each as patch tokens
# plus the CLS token. Each gets a head of spectral-normalised 1-D convolutions over the 196 tokens.

DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"


class ViTBlock(nn.Module):
    """Pre-norm transformer block with DINO's parameter names (norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2); GELU with the tanh approximation, as CODA's frozen copy."""

    def __init__(self, dim=384, heads=6):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)), approximate="tanh"))


class DinoDiscriminator(nn.Module):
    def __init__(self, dino_weights=None, depth=12, taps=(2, 5, 8, 11), dim=384, kernel=9):
        super().__init__()
        self.taps = taps
        self.patch_embed = nn.Conv2d(3, dim, 16, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 197, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim) for _ in range(max(taps) + 1))
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)  # [-1, 1] -> ImageNet-normalised
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)
        if dino_weights is not None:
            self.load_dino(dino_weights)
        self.requires_grad_(False)

        def block(k):
            conv = nn.utils.spectral_norm(nn.Conv1d(dim, dim, k, padding=k // 2, padding_mode="circular"), eps=1e-12)
            return nn.Sequential(conv, nn.BatchNorm1d(dim, eps=1e-6), nn.LeakyReLU(0.2))
        self.heads = nn.ModuleList(nn.ModuleDict(dict(a=block(1), b=block(kernel), out=nn.utils.spectral_norm(nn.Conv1d(dim, 1, 1))))
                                   for _ in range(len(taps) + 1))
        for m in self.heads.modules():  # official: trunc-normal(0.02) convs, zero biases
            if isinstance(m, nn.Conv1d):
                nn.init.trunc_normal_(m.weight_orig, std=0.02)
                nn.init.zeros_(m.bias)

    def load_dino(self, path):
        """DINO's released ViT-S/16 (dino_deitsmall16_pretrain.pth: patch_embed.proj.*, cls_token,
        pos_embed, blocks.N.*). The key part of each qkv bias is zeroed, as the official code does
        (it cancels in the softmax anyway)."""
        state = mar.load_checkpoint(path)
        state = {k.replace("patch_embed.proj.", "patch_embed."): v for k, v in state.items()
                 if not k.startswith("norm.") and not (k.startswith("blocks.") and int(k.split(".")[1]) >= len(self.blocks))}
        for k, v in state.items():
            if k.endswith("attn.qkv.bias"):
                v[v.numel() // 3: 2 * v.numel() // 3] = 0
        own = {k for k in self.state_dict() if not k.startswith("heads.")}
        if set(state) != own:
            raise ValueError(f"{path} is not DINO ViT-S/16 (missing {sorted(own - set(state))[:3]}, unexpected {sorted(set(state) - own)[:3]})")
        self.load_state_dict(state, strict=False)

    def features(self, x):
        """Images in [-1, 1] -> five (B, 384, 196) token maps (patch tokens + CLS: the "readout")."""
        x = self.x_scale * x.float() + self.x_shift
        H, W = x.shape[-2:]
        if H > 224 and W > 224 and torch.rand(()) < 0.5:      # half the time a random 224 crop...
            top, left = (torch.randint(0, n - 223, ()) for n in (H, W))
            x = x[:, :, top:top + 224, left:left + 224]
        else:                                                  # ...else a resize to 224
            x = F.interpolate(x, size=(224, 224), mode="area" if H > 224 else "bicubic")
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), self.patch_embed(x).flatten(2).transpose(1, 2)], 1)
        x = x + self.pos_embed                                 # (B, 197, 384)
        maps = [(x[:, 1:] + x[:, :1]).transpose(1, 2)]
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.taps:
                maps.append((x[:, 1:] + x[:, :1]).transpose(1, 2))
        return maps

    def forward(self, x):
        logits = []
        for head, h in zip(self.heads, self.features(x)):
            h = head["a"](h)
            h = (head["b"](h) + h) / math.sqrt(2)             # residual block, variance preserving
            logits.append(head["out"](h).flatten(1))          # (B, 196)
        return torch.cat(logits, 1)                           # (B, 5 * 196)


def hub_file(url, sha256=None, what="weights", instead=""):
    """The torch hub cache's copy of `url` ($TORCH_HOME/hub/checkpoints/), downloaded on first use.
    With the published SHA-256, the download is renamed into place only if it matches, and a cached
    copy is checked every time (a truncated or altered file is a one-line error, not wrong numbers)."""
    import hashlib
    import os
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, hash_prefix=sha256)
        except RuntimeError as e:  # torch.hub's "invalid hash value"
            raise ValueError(f"the downloaded {what} are not the published file ({e})") from None
        except Exception as e:  # offline, proxy, HTTP error
            raise FileNotFoundError(f"cannot download the {what} ({type(e).__name__}); put {url} at {path}{instead}") from None
    if sha256:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != sha256:
            raise ValueError(f"{path} has SHA-256 {digest[:16]}..., not the published {sha256[:16]}...: a truncated "
                             f"or altered download; delete it to download again")
    return path


def dino_weights_path():
    """DINO ViT-S/16 (83 MB). Its authors publish no checksum: `load_dino` checks every tensor's name
    and shape instead (a truncated file does not load); pin your own copy with --dino-weights."""
    return hub_file(DINO_URL, None, "DINO weights", ", pass --dino-weights FILE, or use --disc patch (no pretrained weights)")


VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's, used by LPIPS
VGG16_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"


def make_lpips():
    """LPIPS-VGG (Zhang et al. 2018; the `lpips` package, whose linear weights ship with it). Its
    VGG16 trunk is torchvision's vgg16-397923af.pth (528 MB), fetched and checked by `hub_file` before
    torchvision reads it from the same cache."""
    import lpips
    import warnings
    hub_file(VGG16_URL, VGG16_SHA256, "VGG16 weights for LPIPS", ", or train without LPIPS: --lpips-weight 0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated"
        net = lpips.LPIPS(net="vgg", verbose=False)
    return net.eval().requires_grad_(False)


class TokenizerLoss(nn.Module):
    """The tokenizer's image losses: reconstruction (0.2 L1 + 1.0 L2 + 1.0 LPIPS, official CODA
    weights) and the hinge GAN with the adaptive weight, ramped in linearly over the run."""

    def __init__(self, l1=0.2, l2=1.0, lpips_weight=1.0, disc="dino", disc_weight=1.0, dino_weights=None, patch_ch=64, lpips=None):
        super().__init__()
        self.l1, self.l2, self.lpips_weight, self.disc_weight = l1, l2, lpips_weight, disc_weight
        self.lpips = (lpips or make_lpips()) if lpips_weight > 0 else None
        if disc == "dino":
            self.disc = DinoDiscriminator(dino_weights or dino_weights_path())
        else:
            self.disc = PatchDiscriminator(patch_ch) if disc == "patch" else None

    def reconstruction(self, x, recon):
        """(nll, parts): the weighted reconstruction loss and its detached parts for logging."""
        l1, l2 = F.l1_loss(recon, x), F.mse_loss(recon, x)
        nll = self.l1 * l1 + self.l2 * l2
        parts = dict(l1=l1.detach(), l2=l2.detach())
        if self.lpips is not None:
            p = self.lpips(x, recon).mean()                   # inputs in [-1, 1]
            nll = nll + self.lpips_weight * p
            parts["lpips"] = p.detach()
        return nll, parts

    def generator_loss(self, x, recon, last_layer, ramp, disc=None):
        """nll + ramp * lambda * (-mean D(recon)). `disc` (default self.disc) is called with its
        parameters frozen: the generator step must not train the discriminator. (The official
        script lets this step's gradient reach the discriminator heads too, adding to their next
        update; we keep the two players' gradients apart.)"""
        nll, parts = self.reconstruction(x, recon)
        disc = disc or self.disc
        if disc is None or ramp <= 0 or not recon.requires_grad:  # frozen VAE + plain VQ: nothing to train
            return nll, parts
        params = [p for p in disc.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            g_loss = -disc(recon).float().mean()  # fp32 under autocast too: the adaptive weight divides by its gradient
        finally:
            for p in params:
                p.requires_grad_(True)
        lam = adaptive_weight(nll, g_loss, recon if last_layer is None else last_layer, self.disc_weight)
        parts.update(g_loss=g_loss.detach(), d_weight=lam)
        return nll + ramp * lam * g_loss, parts

    def discriminator_loss(self, x, recon, disc=None):
        """Hinge loss on real images and detached reconstructions (the D step)."""
        disc = disc or self.disc
        real, fake = disc(x.detach()).float(), disc(recon.detach()).float()  # the hinge in fp32 under autocast too
        d_loss = hinge_d_loss(real, fake)
        return d_loss, dict(d_loss=d_loss.detach(), logits_real=real.detach().mean(), logits_fake=fake.detach().mean())


# =============================================================================================
# 6. Training the tokenizers with train.py (--model vae, then --model coda)
# =============================================================================================
# Official train_mar.py of CODA: AdamW (0.5, 0.9), lr 5e-4 (LoRA and codebook alike) with cosine
# decay, weight decay 0.005, global batch 512 (16 x 4 accumulation x 8 GPUs: --batch-size 64
# --grad-accum 4 here), 10 epochs, grad clip 10, EMA copying the weights for 4 epochs and then
# averaging with a warm-up; the discriminator is updated after every generator step with its own AdamW.
# --model vae trains mar.py's KL-VAE from scratch with the same losses plus LDM's KL term (LDM's
# KL-16 recipe as MAR retrained it, LTH14/mar#3): the VAE the built-in pipeline's CODA sits on.

PRESETS = {"mar": dict(codebook_size=16384, levels=MAR_LEVELS),        # the released CODA-MAR
           "tiny": dict(codebook_size=256, levels=(1, 2, 3, 4, 6, 8))}  # small data, up to 8x8 latents
# The built-in VAE: 32 px -> 4x4x16 latents (stride 8, kl16's width), so CODA's levels are 1-4 and
# MaskGIT models 30 tokens per image (README: the 8x8x4 latents of "tiny4" need 130, which 2 CPU
# cores cannot train MaskGIT on well enough to draw squares and triangles).
VAE_PRESETS = {"kl16": dict(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)),  # MAR's (LDM's KL-16) architecture
               "tiny": dict(embed_dim=16, ch_mult=(1, 2, 2, 2), ch=32, num_res_blocks=1, attn_resolutions=(), resolution=32)}
# LDM's 32 GroupNorm groups are single channels at ch=32 and "tiny" draws grey; groups of 4 channels
# keep colour, but MaskGIT then draws fewer squares (README)
VAE_PRESETS["tiny-colour"] = dict(VAE_PRESETS["tiny"], group_channels=4)
VAE_PRESETS["tiny4"] = dict(VAE_PRESETS["tiny"], embed_dim=4, ch_mult=(1, 2, 2))  # stride 4: 8x8x4 (the earlier built-in)
VAE_PRESETS["tiny16"] = dict(VAE_PRESETS["tiny4"], embed_dim=16)  # 8x8x16, for the Table 1 comparison
LORA_PARTS = {"both": ("encoder", "decoder"), "encoder": ("encoder",), "decoder": ("decoder",), "none": ()}

# 64 a GPU in 4 micro-batches of 16, as the official 16 x 4 accumulation: at 256 px in fp32 one image's
# training step holds about 1.9 GiB (README), so 64 at once would need about 124 GiB
PAPER = dict(preset="mar", img_size=256, epochs=10, warmup_epochs=0, batch_size=64, grad_accum=4, lr=5e-4, lr_schedule="cosine",
             weight_decay=0.005, grad_clip=10.0, ema=0.9999, ckpt_every=1000, sample_every=1000, num_images=5000,
             lora="both", lora_rank=32, lpips_weight=1.0, disc="dino", bf16=False)
# built-in: no VGG / DINO download; LoRA on the decoder only, which keeps the frozen encoder's latent
# and its small posterior noise, so an image's tokens barely change from one encoding to the next
# (README: the better tokens for MaskGIT on the built-in data). The CPU-sized recipes of both tokenizers
# train in bf16 autocast (CUDA, or a CPU with bf16 instructions): on the AMD CPU the VAE's steps run 1.6x
# and CODA's 1.5x as fast as in fp32, with the same PSNR and MaskGIT verdicts (README, "The discrete
# pipeline"); the paper's recipes keep the official fp32
BUILTIN = dict(PAPER, preset="tiny", img_size=32, epochs=5, grad_accum=1, lr=2e-3, ema=0.999, ckpt_every=500, sample_every=500,
               num_images=1000, lora="decoder", lora_rank=8, lpips_weight=0.0, disc="none", bf16=True)
VAE_PAPER = dict(PAPER, preset="kl16", epochs=40, batch_size=32, grad_accum=2, lr=1e-4, weight_decay=0.0, disc="patch")
VAE_BUILTIN = dict(BUILTIN, preset="tiny", lr=1e-3, weight_decay=0.0)


def add_loss_args(p):
    """The image losses both tokenizers train with (official CODA weights)."""
    p.add_argument("--l1-weight", type=float, default=0.2)  # official
    p.add_argument("--l2-weight", type=float, default=1.0)  # official
    p.add_argument("--lpips-weight", type=float, help="LPIPS-VGG weight (official 1.0; needs torchvision's VGG16 file)")
    p.add_argument("--disc", choices=["dino", "patch", "none"], help="GAN discriminator: dino (paper, downloads DINO "
                   "ViT-S/16), patch (PatchGAN, no pretrained weights), none")
    p.add_argument("--dino-weights", help="dino_deitsmall16_pretrain.pth (default: download once)")
    p.add_argument("--disc-weight", type=float, default=1.0)  # official
    p.add_argument("--disc-weight-decay", type=float, default=0.0005)  # official
    p.add_argument("--inception-weights", help="pytorch-fid Inception weights for the rFID of the final report")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="train in bf16 autocast on CUDA or a bf16 CPU "
                   "(default: the CPU-sized recipes; the paper's, as official CODA, in fp32, TF32 unless --no-tf32: "
                   "bf16 changes token assignments of a 16,384-code codebook)")


def add_vae_args(p):
    add_loss_args(p)
    p.add_argument("--kl-weight", type=float, default=1e-6)  # LDM's KL-VAE


def add_args(p):
    """CODA's own flags (train.py adds the shared ones)."""
    p.add_argument("--vae", required=True, help="the frozen VAE: official kl16.ckpt or a --model vae run's checkpoint")
    p.add_argument("--codebook-size", type=int, help="default: the preset's (16384 for CODA-MAR, 256 tiny)")
    p.add_argument("--levels", type=int, nargs="+", help="residual level sides; default: the preset's up to the latent's "
                                                         "side (1 2 3 4 5 6 8 10 13 16 for CODA-MAR, 1 2 3 4 6 8 tiny)")
    p.add_argument("--quantizer", default="attention", choices=["attention", "nearest"], help="nearest: plain (residual) VQ")
    p.add_argument("--lora", choices=list(LORA_PARTS), help="where LoRA adapts the VAE (official: both)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (official 32)")
    p.add_argument("--quantizer-lr", type=float, help="the quantizer's lr (official codebook_learning_rate); default --lr")
    p.add_argument("--vq-weight", type=float, default=1.0)  # official
    p.add_argument("--entropy-weight", type=float, default=0.05)  # official
    p.add_argument("--ema-start-epoch", type=int, default=4)  # official: the EMA copies the weights before
    p.add_argument("--compare-quantizers", action="store_true", help="run the paper's Table 1 progression (VQ, residual "
                   "VQ, attention, + LoRA) with these flags, one run per row, and print the table")
    add_loss_args(p)


class TokenizerTraining(nn.Module):
    """What train.py needs to train a tokenizer (the VAE or CODA, below): the image losses of
    section 5, a discriminator updated after every generator step, the EMA warm-up, logged
    metrics and the reconstruction report. The subclasses add the model and its own loss terms."""
    betas = (0.5, 0.9)  # official CODA (and VQGAN / LDM autoencoders)

    def __init__(self, args, num_classes, device):
        super().__init__()
        self.args, self.device = args, device
        self.bf16 = args.bf16  # train.py's autocast (CUDA or a bf16 CPU): the CPU-sized recipes; official CODA trains in fp32
        self.build(args, device)
        self.criterion = TokenizerLoss(args.l1_weight, args.l2_weight, args.lpips_weight, args.disc,
                                       args.disc_weight, args.dino_weights).to(device)
        self.disc = self.train_disc = self.criterion.disc
        self.d_opt = (torch.optim.AdamW([p for p in self.disc.parameters() if p.requires_grad], lr=0.0, betas=self.betas,
                                        weight_decay=args.disc_weight_decay, fused=True) if self.disc else None)
        self.sums, self.count, self.usage, self.pairs = {}, 0, None, []

    def wrap(self, ddp):
        """DDP-wrap the discriminator with train.py's `ddp` (official: SyncBatchNorm on GPUs)."""
        if self.disc is not None and dist.is_initialized() and dist.get_world_size() > 1:
            if self.device.type == "cuda":
                self.disc = self.criterion.disc = nn.SyncBatchNorm.convert_sync_batchnorm(self.disc)
            self.train_disc = ddp(self.disc, buffers=True)  # BatchNorm statistics stay equal on every rank

    def image_loss(self, x, recon, progress, extra, logs):
        """Reconstruction + ramped GAN term (section 5) + the model's own terms `extra`."""
        loss, parts = self.criterion.generator_loss(x, recon, self.last_layer, progress)
        if self.disc is not None:  # for after_step: one pair per micro-batch (--grad-accum)
            self.pairs.append((x, recon.detach()))
        self.accumulate(dict(parts, **logs))
        return loss + extra

    @staticmethod
    def no_weight_decay(name, param):
        return False

    def lr_scale(self, name, lr):
        return 1.0

    def ema_decay(self, step, epoch):
        """Official CODA: a warm-up, decay min(0.9999, (step/2 + 1) / (step/2 + 10)), so that the
        EMA never lags far behind in a short run."""
        return min(self.args.ema, (step // 2 + 1) / (step // 2 + 10))

    def after_step(self, lr):
        """The discriminator step on this step's real images and reconstructions (official order:
        after the generator step and the EMA update), same lr schedule and grad clip."""
        pairs, self.pairs = self.pairs, []
        if self.disc is None:
            return
        for group in self.d_opt.param_groups:
            group["lr"] = lr
        self.d_opt.zero_grad(set_to_none=True)
        for i, (real, fake) in enumerate(pairs):  # micro-batches as the generator's: gradients summed, one step
            last = i == len(pairs) - 1
            with nullcontext() if last or not hasattr(self.train_disc, "no_sync") else self.train_disc.no_sync():
                d_loss, logs = self.criterion.discriminator_loss(real, fake, self.train_disc)
                (d_loss / len(pairs) if len(pairs) > 1 else d_loss).backward()
            self.accumulate(logs, count=False)
        torch.nn.utils.clip_grad_norm_(self.d_opt.param_groups[0]["params"], self.args.grad_clip)
        self.d_opt.step()

    def accumulate(self, logs, count=True):
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.count += count

    def metrics(self):
        """Means of the logged loss parts over this logging window and all ranks, and the fraction
        of the codebook used in it. Called at log steps only (it synchronises with the device)."""
        if not self.sums:
            return {}
        keys, world = sorted(self.sums), dist.get_world_size() if dist.is_initialized() else 1
        stats = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=self.device) for k in keys])
        if world > 1:
            dist.all_reduce(stats)
        out = {k: v / max(self.count, 1) / world for k, v in zip(keys, stats.tolist())}
        if self.usage is not None:
            if world > 1:
                dist.all_reduce(self.usage)
            out["codebook_usage"] = (self.usage > 0).float().mean().item()
        self.sums, self.count, self.usage = {}, 0, None
        return out

    def checkpoint_state(self, ema, held_out):
        """Extra checkpoint entries: the discriminator and its optimizer."""
        return dict(second_player=dict(disc=self.disc.state_dict(), d_opt=self.d_opt.state_dict()) if self.disc else {})

    def load_checkpoint_state(self, ckpt):
        state = ckpt.get("second_player", ckpt.get("recipe", {}))  # "recipe": checkpoints before the restructuring
        if self.disc is not None and state:
            try:
                self.disc.load_state_dict(state["disc"])
                self.d_opt.load_state_dict(state["d_opt"])
            except (RuntimeError, ValueError) as e:  # another --disc than the run's
                raise ValueError(f"its discriminator does not fit --disc {self.args.disc} ({str(e).splitlines()[0]})")

    @torch.no_grad()
    def report(self, ema, images, metrics, batch_size):
        """Reconstruction quality of the EMA weights on held-out images (in [-1, 1]): PSNR, SSIM,
        pixel MSE, latent quantization error and codebook usage, and rFID when `metrics` (train.py's
        fid.ReconstructionMetrics, CODA's protocol) has the Inception weights -> (lines, numbers)."""
        mse, q_err, all_indices = [], [], []
        for real in images.split(batch_size):
            real = real.to(self.device)
            recon, indices, err = self.reconstruct(ema, real)
            metrics.update(real, recon)
            mse.append((recon.float().clamp(-1, 1) - real).pow(2).flatten(1).mean(1))
            if indices is not None:
                all_indices, q_err = all_indices + indices, q_err + [err]
        out = dict(images=len(images), mse=torch.cat(mse).mean().item(), **metrics.compute())
        lines = [f"reconstruction of {len(images)} held-out images (EMA weights): PSNR {out['psnr']:.2f} dB, "
                 f"SSIM {out['ssim']:.4f}, MSE {out['mse']:.5f}"]
        if all_indices:
            size = self.model.quantizer.codebook_size
            out["usage"], _ = codebook_usage(all_indices, size)
            out["quant_error"] = torch.cat(q_err).mean().item()
            lines.append(f"codebook usage: {out['usage']:.1%} of {size} codes; latent quantization error (MSE) "
                         f"{out['quant_error']:.5f}")
        lines.append(f"rFID (pytorch-fid Inception, as CODA): {out['rfid']:.3f}" if "rfid" in out else
                     "rFID skipped: no Inception weights (give --inception-weights or run `python fid.py` once online)")
        return lines, out


def preset_levels(preset, side):
    """The preset's residual levels up to the latent's side (tiny: 1-4 on 4x4 latents, 1-8 on 8x8)."""
    return tuple(p for p in PRESETS[preset]["levels"] if p <= side)


class VAETraining(TokenizerTraining):
    """train.py --model vae: mar.py's KL-VAE from scratch, trained with L1 + L2 + LPIPS + KL and an
    optional GAN."""
    PRESETS, PAPER, BUILTIN, add_args = VAE_PRESETS, VAE_PAPER, VAE_BUILTIN, staticmethod(add_vae_args)

    def build(self, args, device):
        stride = 2 ** (len(VAE_PRESETS[args.preset]["ch_mult"]) - 1)
        if args.img_size % stride:
            raise ValueError(f"--img-size {args.img_size} is not a multiple of the VAE's stride {stride}")
        self.config = dict(preset=args.preset, img_size=args.img_size, arch=VAE_PRESETS[args.preset])
        self.model = mar.AutoencoderKL(**self.config["arch"])
        self.last_layer = self.model.decoder.conv_out.weight  # LDM / VQGAN's choice for the adaptive weight

    def inputs(self, batch, flip):
        images = batch[0].to(self.device, non_blocking=True)
        return torch.where(flip.to(self.device, non_blocking=True)[:, None, None, None], images.flip(3), images), None

    def loss(self, model, x, y, progress):
        recon, posterior = model(x)
        kl = posterior.kl().mean() / x[0].numel()  # LDM: KL per image, relative to the per-pixel losses
        return self.image_loss(x, recon, progress, self.args.kl_weight * kl, dict(kl=kl.detach()))

    def checkpoint_state(self, ema, held_out):
        """+ the scale that makes the VAE's latents unit-variance (LDM's practice) for the models
        trained on them: 1 / std of EMA posterior samples of 256 held-out images, encoded mar.CHUNK_PIXELS at
        a time (256 at once took about 30 GB at 256 px), sampled at once."""
        with torch.no_grad():
            images = held_out(256).to(self.device)
            chunk = max(1, mar.CHUNK_PIXELS // images.shape[-1] ** 2)  # 32 px: all 256 at once
            moments = torch.cat([ema.encode(part).moments for part in images.split(chunk)])
            z = mar.DiagonalGaussian(moments).sample(torch.Generator(self.device).manual_seed(0))
        return dict(super().checkpoint_state(ema, held_out), latent_scale=1 / z.float().std().item())

    @torch.no_grad()
    def reconstruct(self, model, x):
        """Images in [-1, 1] -> (reconstructions, indices, squared latent quantization error per
        image); the VAE reconstructs from the posterior mean and has no indices."""
        return model.decode(model.encode(x).mean), None, None


class Training(TokenizerTraining):
    """train.py --model coda: the CODA tokenizer on a frozen --vae: LoRA + quantizer, trained with
    the reconstruction, GAN, quantization and entropy losses (section 5)."""
    PRESETS, PAPER, BUILTIN, add_args = PRESETS, PAPER, BUILTIN, staticmethod(add_args)

    def build(self, args, device):
        vae, scale, vae_config = mar.load_vae(args.vae, device)
        add_lora(vae, args.lora_rank, LORA_PARTS[args.lora])
        if args.img_size % vae.stride:
            raise ValueError(f"--img-size {args.img_size} is not a multiple of the VAE's stride {vae.stride}")
        side = args.img_size // vae.stride  # the latent's side
        levels = tuple(args.levels or preset_levels(args.preset, side))
        if levels[-1] != side or not all(1 <= s <= side for s in levels):
            given = f"--levels {' '.join(map(str, levels))}" if args.levels else (
                f"--img-size {args.img_size}: its latent side {side} is not one of --preset {args.preset}'s levels, so give "
                f"--levels; levels {' '.join(map(str, levels))}")
            raise ValueError(f"{given}: each side from 1 to the latent size {side}, the last equal to it")
        quantizer = CODAQuantizer(vae.embed_dim, args.codebook_size or PRESETS[args.preset]["codebook_size"], levels, args.quantizer)
        self.model = CODA(vae, quantizer, scale)
        self.config = dict(preset=args.preset, img_size=args.img_size, vae=vae_config, scale=scale, levels=levels,
                           codebook_size=quantizer.codebook_size, quantizer=args.quantizer, lora=args.lora,
                           lora_rank=args.lora_rank)
        # official: the adaptive weight at the LoRA of the decoder's first upsample conv (kl16: up[-1].upsample)
        lora_ups = [m.lora_layer.up.weight for m in vae.decoder.modules() if isinstance(m, LoRAConv2d)]
        ups = [m.upsample.conv for m in reversed(vae.decoder.up) if hasattr(m, "upsample")]
        if ups and isinstance(ups[0], LoRAConv2d):
            self.last_layer = ups[0].lora_layer.up.weight
        elif lora_ups:
            self.last_layer = lora_ups[-1]
        elif args.quantizer == "attention":  # no LoRA in the decoder: the codebook, trained through it
            self.last_layer = quantizer.codebooks.weight
        else:  # nearest codes pass the codebook no gradient from the decoder: at the decoded image
            self.last_layer = None

    def inputs(self, batch, flip):
        return batch[0].to(self.device, non_blocking=True), None  # CODA's official pipeline uses no flip

    def loss(self, model, x, y, progress):
        recon, q_loss, e_loss, indices = model(x)
        counts = code_counts(indices, self.model.quantizer.codebook_size)  # no host sync in the step
        self.usage = counts if self.usage is None else self.usage + counts
        extra = self.args.vq_weight * q_loss + self.args.entropy_weight * e_loss  # sections 1-3
        return self.image_loss(x, recon, progress, extra, dict(q_loss=q_loss.detach(), entropy=e_loss.detach()))

    def lr_scale(self, name, lr):
        """The quantizer has its own lr (official codebook_learning_rate; 5e-4 as the LoRA's); `lr`: the run's."""
        return (self.args.quantizer_lr or lr) / lr if name.startswith("quantizer.") else 1.0

    def ema_decay(self, step, epoch):
        """Official CODA: the EMA copies the weights until --ema-start-epoch, then the warm-up."""
        return 0.0 if epoch < self.args.ema_start_epoch else super().ema_decay(step, epoch)

    @torch.no_grad()
    def reconstruct(self, model, x):
        f = model.encode(x)
        indices, f_hat, _, _ = model.quantizer(f)
        return model.vae.decode(f_hat / model.scale), indices, (f_hat - f).pow(2).flatten(1).mean(1)


def load_trained(path, device):
    """The EMA weights of a `train.py --model coda` run as a frozen CODA tokenizer -> (model, config)."""
    ckpt = mar.load_checkpoint(path)
    if ckpt.get("model_name") != "coda":
        raise ValueError(f"{path} is not a checkpoint of --model coda (it is {ckpt.get('model_name', 'not from train.py')})")
    c = ckpt["config"]
    arch = {k: v for k, v in c["vae"].items() if k != "file"}
    vae = add_lora(mar.AutoencoderKL(**arch) if arch else mar.kl16(), c["lora_rank"], LORA_PARTS[c["lora"]])
    model = CODA(vae, CODAQuantizer(vae.embed_dim, c["codebook_size"], c["levels"], c["quantizer"]), c["scale"])
    model.load_state_dict(ckpt["model_ema"])
    return model.eval().requires_grad_(False).to(device), c


# ---- Table 1 (paper Sec. 4): each row adds one ingredient -----------------------------------
TABLE1 = [
    ("plain VQ (one level, nearest code)", ["--quantizer", "nearest", "--lora", "none", "--levels", "LAST"]),
    ("+ residual levels (nearest code)", ["--quantizer", "nearest", "--lora", "none"]),
    ("+ attention-based assignment", ["--quantizer", "attention", "--lora", "none"]),
    ("+ LoRA on the VAE decoder", ["--quantizer", "attention", "--lora", "decoder"]),
    ("+ LoRA on encoder and decoder (CODA)", ["--quantizer", "attention", "--lora", "both"]),
]


def table1_rows(args):
    """-> [(row name, the flags that make that row)] for --compare-quantizers ("LAST": the latent's side)."""
    last = str(args.levels[-1] if args.levels else args.img_size // mar.load_vae(args.vae, "cpu")[0].stride)
    return [(name, [last if f == "LAST" else f for f in flags]) for name, flags in TABLE1]


def format_table1(rows, where, epochs):
    """rows: [(row name, its report numbers)] -> the printed table, one line per row."""
    rfid = any("rfid" in r for _, r in rows)  # rows of earlier runs may lack it (no Inception weights then)
    lines = ["", f"Table 1 on {where} ({epochs} epochs each, {rows[0][1]['images']} held-out images):",
             f"{'quantizer':40s} {'usage':>7s} {'quant. err':>10s} {'MSE':>8s} {'PSNR':>6s} {'SSIM':>6s}" + (f" {'rFID':>7s}" if rfid else "")]
    for name, r in rows:
        lines.append(f"{name:40s} {r['usage']:7.1%} {r['quant_error']:10.5f} {r['mse']:8.5f} {r['psnr']:6.2f} {r['ssim']:6.3f}" +
                     (f" {r['rfid']:7.2f}" if "rfid" in r else f" {'-':>7s}" if rfid else ""))
    return lines


if __name__ == "__main__":  # the model and its recipe; train.py trains it
    raise SystemExit("coda.py holds CODA's model and recipe; train it with `torchrun train.py --model coda` "
                     "(README, \"The discrete pipeline\")")
