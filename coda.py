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
The training losses (L1 + L2 + LPIPS, GAN, quantization and entropy terms) follow in section 5.

Every module and parameter name equals the official one, so the released `vae.pth` /
`quantizer.pth` load with strict=True; test_all.py checks outputs and gradients against tensors
produced by running the official modules.
"""
import math

import torch
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


def codebook_usage(indices, codebook_size):
    """Fraction of the codebook selected at least once in `indices` (any tensors of code ids, e.g.
    all levels of all images of a validation set), and the per-code counts."""
    counts = torch.zeros(codebook_size, dtype=torch.long, device=indices[0].device)
    for index in indices:
        counts += torch.bincount(index.flatten(), minlength=codebook_size)
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
        return self.vae.decode(self.quantizer.decode(indices) / self.scale)


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


def dino_weights_path():
    """The DINO ViT-S/16 file in the torch hub cache, downloaded on first use (83 MB)."""
    import os
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(DINO_URL))
    if not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(DINO_URL, path)
        except Exception as e:
            raise FileNotFoundError(f"cannot download the DINO weights ({type(e).__name__}); put {DINO_URL} at {path}, "
                                    f"pass --dino-weights FILE, or use --disc patch (no pretrained weights)") from None
    return path


def make_lpips():
    """LPIPS-VGG (Zhang et al. 2018; the `lpips` package, whose linear weights ship with it). Its
    VGG16 trunk comes from torchvision's download (vgg16-397923af.pth, 528 MB, torch hub cache);
    offline without that file this raises one line instead of training with a random trunk."""
    import lpips
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated"
            net = lpips.LPIPS(net="vgg", verbose=False)
    except Exception as e:
        raise FileNotFoundError(f"LPIPS needs torchvision's VGG16 weights ({type(e).__name__}: {str(e)[:120]}); put "
                                "https://download.pytorch.org/models/vgg16-397923af.pth in the torch hub cache "
                                "(checkpoints/), or train without it: --lpips-weight 0") from None
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
            g_loss = -disc(recon).mean()
        finally:
            for p in params:
                p.requires_grad_(True)
        lam = adaptive_weight(nll, g_loss, last_layer, self.disc_weight)
        parts.update(g_loss=g_loss.detach(), d_weight=lam)
        return nll + ramp * lam * g_loss, parts

    def discriminator_loss(self, x, recon, disc=None):
        """Hinge loss on real images and detached reconstructions (the D step)."""
        disc = disc or self.disc
        real, fake = disc(x.detach()), disc(recon.detach())
        d_loss = hinge_d_loss(real, fake)
        return d_loss, dict(d_loss=d_loss.detach(), logits_real=real.detach().mean(), logits_fake=fake.detach().mean())
