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
