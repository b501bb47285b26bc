"""
The papers' evaluation table in one file: FID, sFID, Inception Score, precision and recall (and
the built-in data's colour-blind class judge).

    python fid.py samples/ VIRTUAL_imagenet256_labeled.npz  # all five, as ADM's evaluator and torch-fidelity
    python fid.py samples/ adm_in256_stats.npz          # FID and IS only: the file holds pool3 statistics only
    python fid.py dirA dirB --pytorch-fid                # pytorch-fid's pipeline (CODA's rFID)
    python fid.py imagenet_val/ --save-stats val.npz     # statistics of a folder (--save-features: for P/R too)
    torchrun --nproc_per_node=8 fid.py samples/ ref.npz  # features computed in shards on every GPU

References:
  FID:  M. Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
        Equilibrium", NeurIPS 2017, Sec. 3 / Eq. (6) (code: github.com/bioinf-jku/TTUR).
  IS:   T. Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016, Sec. 4.
  sFID: C. Nash et al., "Generating Images with Sparse Representations", ICML 2021, Sec. 4.
  P/R:  T. Kynkaanniemi et al., "Improved Precision and Recall Metric for Assessing Generative
        Models", NeurIPS 2019, Sec. 3.
  The network is the 2015-12-05 TensorFlow Inception-v3 graph FID, IS and sFID were defined with;
  ADM's evaluator (Dhariwal & Nichol 2021, github.com/openai/guided-diffusion,
  evaluations/evaluator.py), which the papers' precision / recall columns come from, uses its pool3
  features for those too (Kynkaanniemi et al. used VGG-16). MAR reports FID-50K / IS with
  torch-fidelity (github.com/toshas/torch-fidelity) against ADM's ImageNet-256 statistics;
  CODA reports rFID with pytorch-fid (github.com/mseitzer/pytorch-fid). The tools run the same
  network and weights but feed it differently; this file does either, from one forward pass per
  image, and test_all.py checks its numbers against tensors produced by running those tools.

Read it top to bottom:
  1. The FID Inception network and where it differs from torchvision's Inception-v3.
  2. The two input pipelines (TF1-exact resize, or pytorch-fid's) and loading the weights.
  3. Statistics, the Frechet distance, both Inception Scores, precision and recall.
  4. Feeding images: folders, .npz files, and generators scoring batches as they make them (DDP).
  5. Reconstruction metrics for tokenizers (rFID, PSNR, SSIM).
  6. The built-in benchmark of train.py's CPU-sized runs: ten classes of drawn images that differ
     in shape or texture only, and a judge that sees luminance only, so it cannot name a class by
     its colour.
  7. The command line.
"""
import argparse
import colorsys
import hashlib
import os
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# =============================================================================================
# 1. The FID Inception-v3 (the TF graph `inception-2015-12-05`, ported to PyTorch)
# =============================================================================================
# Layer names equal torchvision's Inception3 (and both tools' weight files), so the released
# weights load directly. The graph differs from torchvision's Inception-v3 in three ways that change
# the features, all reproduced here:
#   * 1008 output classes instead of 1000 (the 2015 graph has 8 unused extra classes);
#   * the average-pool branches exclude the zero padding from the mean (TF semantics):
#     count_include_pad=False;
#   * the pool branch of the LAST block (Mixed_7c) is a 3x3 max-pool, not an average-pool (a quirk
#     of that TF graph; every FID implementation keeps it).

class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's value) -> ReLU. Names .conv / .bn as torchvision."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Mixed(nn.Module):
    """One Inception block: parallel towers whose outputs are concatenated along channels.

    `towers` lists each tower as its conv layers in order, each (name, in, out, kernel, stride,
    padding). A tower may end in a pair of layers applied side by side to the same input and
    concatenated (the 1x3 / 3x1 split of the E blocks). `pool` is the pooling tower, always last:
    'avg' (3x3 TF average pool, then the 1x1 conv `branch_pool`), 'max' (3x3 max pool, stride 1, then
    `branch_pool`: Mixed_7c) or 'reduce' (3x3 max pool with stride 2 and no conv: Mixed_6a, Mixed_7a).
    """

    def __init__(self, towers, pool, pool_features=0, cin=0):
        super().__init__()
        self.towers, self.pool = [], pool
        for tower in towers:
            names = []
            for layer in tower:
                group = layer if isinstance(layer[0], tuple) else (layer,)
                for name, *spec in group:
                    self.add_module(name, BasicConv2d(*spec))
                names.append(tuple(name for name, *_ in group))
            self.towers.append(names)
        if pool != "reduce":
            self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        outs = []
        for tower in self.towers:
            h = x
            for group in tower:
                h = torch.cat([getattr(self, name)(h) for name in group], 1) if len(group) > 1 else getattr(self, group[0])(h)
            outs.append(h)
        if self.pool == "avg":
            outs.append(self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)))
        elif self.pool == "max":
            outs.append(self.branch_pool(F.max_pool2d(x, 3, 1, 1)))
        else:
            outs.append(F.max_pool2d(x, 3, 2))
        return torch.cat(outs, 1)


# The five block types of Inception-v3 (Szegedy et al., "Rethinking the Inception Architecture",
# Fig. 5-7 and Table 1), as tower specifications: (name, in, out, kernel, stride, padding).
def block_a(cin, pool_features):  # 35x35: 1x1 | 5x5 | double 3x3 | pool
    return Mixed([[("branch1x1", cin, 64, 1)],
                  [("branch5x5_1", cin, 48, 1), ("branch5x5_2", 48, 64, 5, 1, 2)],
                  [("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1), ("branch3x3dbl_3", 96, 96, 3, 1, 1)]],
                 "avg", pool_features, cin)


def block_b(cin):  # 35x35 -> 17x17 grid reduction
    return Mixed([[("branch3x3", cin, 384, 3, 2)],
                  [("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1), ("branch3x3dbl_3", 96, 96, 3, 2)]],
                 "reduce")


def block_c(c7):  # 17x17 with factorized 7x7 (1x7 then 7x1)
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return Mixed([[("branch1x1", 768, 192, 1)],
                  [("branch7x7_1", 768, c7, 1), ("branch7x7_2", c7, c7, *row), ("branch7x7_3", c7, 192, *col)],
                  [("branch7x7dbl_1", 768, c7, 1), ("branch7x7dbl_2", c7, c7, *col), ("branch7x7dbl_3", c7, c7, *row),
                   ("branch7x7dbl_4", c7, c7, *col), ("branch7x7dbl_5", c7, 192, *row)]],
                 "avg", 192, 768)


def block_d():  # 17x17 -> 8x8 grid reduction
    return Mixed([[("branch3x3_1", 768, 192, 1), ("branch3x3_2", 192, 320, 3, 2)],
                  [("branch7x7x3_1", 768, 192, 1), ("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
                   ("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)), ("branch7x7x3_4", 192, 192, 3, 2)]],
                 "reduce")


def block_e(cin, pool):  # 8x8 with the 1x3 / 3x1 split at the end of two towers
    split = lambda a, b: ((a, 384, 384, (1, 3), 1, (0, 1)), (b, 384, 384, (3, 1), 1, (1, 0)))
    return Mixed([[("branch1x1", cin, 320, 1)],
                  [("branch3x3_1", cin, 384, 1), split("branch3x3_2a", "branch3x3_2b")],
                  [("branch3x3dbl_1", cin, 448, 1), ("branch3x3dbl_2", 448, 384, 3, 1, 1),
                   split("branch3x3dbl_3a", "branch3x3dbl_3b")]],
                 pool, 192, cin)


class FIDInception(nn.Module):
    """uint8 images (B, 3, H, W) -> (pool3 (B, 2048), unbiased logits (B, 1008), spatial (B, 2023)).

    pool3 (the 2048-d global average pool) is what FID, precision and recall compare; IS uses the
    logits WITHOUT the fc bias ("logits_unbiased"), as the original TF code, ADM's evaluator and
    torch-fidelity do. `spatial` is what sFID compares: ADM's evaluator reads the TF graph's tensor
    `mixed_6/conv`, the 1x1 tower (branch1x1, 192 channels, after its ReLU) of the block named
    Mixed_6d here, and keeps its first 7 channels at all 17 x 17 positions, flattened in TF's
    (H, W, C) order, so that ADM's stored mu_s / sigma_s apply unchanged.
    """

    def __init__(self, pytorch_fid=False):
        super().__init__()
        self.pytorch_fid = pytorch_fid
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, 2)         # 299 -> 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)           # -> 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, 1, 1)     # -> 147, then max pool -> 73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)          # -> 71, then max pool -> 35
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = block_a(192, 32), block_a(256, 64), block_a(288, 64)
        self.Mixed_6a = block_b(288)                          # -> 17
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = block_c(128), block_c(160), block_c(160), block_c(192)
        self.Mixed_7a = block_d()                             # -> 8
        self.Mixed_7b, self.Mixed_7c = block_e(1280, "avg"), block_e(2048, "max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = preprocess(images, self.pytorch_fid)              # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)                             # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d):
            x = block(x)                                      # ... -> (B, 768, 17, 17)
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)     # Mixed_6d.branch1x1 comes first: (B, 17 * 17 * 7)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)                                      # ... -> (B, 2048, 8, 8)
        pool3 = x.mean((2, 3))                                # (B, 2048)
        return pool3, pool3 @ self.fc.weight.T, spatial       # (B, 2048), (B, 1008), (B, 2023)


# =============================================================================================
# 2. Input pipelines and weights
# =============================================================================================

def resize_tf1(x, size=299):
    """Bilinear resize exactly as TensorFlow 1.x's resize_bilinear (align_corners=False), which the
    TF FID graph applies: output pixel i reads input coordinate i * in/out, with NO half-pixel offset
    (PyTorch's interpolate reads (i + 0.5) * in/out - 0.5), and the far neighbour clamped at the
    border. Same arithmetic, in the same order, as torch-fidelity, so CPU results are bit-identical."""
    def taps(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.long()                                       # floor (coordinates are >= 0)
        return lo, (lo + 1).clamp(max=n_in - 1), src - lo.float()
    y0, y1, dy = taps(x.shape[2])
    x0, x1, dx = taps(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]                    # (B, C, size, W)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]                 # (B, C, size, size)


def preprocess(images, pytorch_fid=False):
    """Images -> the network's input in [-1, 1] at 299x299.

    Default (TF / torch-fidelity / ADM / MAR): uint8 -> float, TF1 resize, (x - 128) / 128.
    pytorch_fid=True: x / 255 (uint8) or floats in [0, 1] as given (CODA feeds its reconstructions
    this way), PyTorch's half-pixel bilinear resize, then 2x - 1 = (v - 127.5) / 127.5. Resize before
    normalising, as pytorch-fid does (the other order changes pool3 by ~1e-4).
    """
    if pytorch_fid:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    if images.dtype != torch.uint8:
        raise ValueError(f"the TF-exact pipeline takes uint8 images, got {images.dtype} (use to_uint8 first)")
    return (resize_tf1(images.float()) - 128) / 128


def to_tensor(arr):
    """uint8 (..., H, W, C) array or tensor -> float (..., C, H, W) in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    return torch.as_tensor(arr).movedim(-1, -3).float() / 127.5 - 1


def to_uint8(images):
    """Images in [-1, 1] -> uint8 in [0, 255], rounded: exactly what MAR's evaluation writes to its
    PNGs (round(clip((x + 1) / 2 * 255))), so scoring in memory equals scoring the saved files."""
    return ((images.float() + 1) / 2 * 255).clamp(0, 255).round().to(torch.uint8)


# The converted TF weights as torch-fidelity publishes them, and the file's SHA-256 (its name carries
# the first 8 digits, torch.hub's convention). pytorch-fid's copy holds the same tensors; both modes
# below load this one file, so one download serves FID, IS and CODA's rFID.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


def cached_weights():
    """Where the weight file lives once downloaded, $TORCH_HOME/hub/checkpoints/ (it may not exist yet)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))


def check_sha256(path, sha256):
    """One-line error unless the file's SHA-256 is the published one (a truncated or altered file
    would load, or half load, and give wrong numbers)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != sha256:
        raise ValueError(f"{path} has SHA-256 {digest[:16]}..., not the published {sha256[:16]}...: a truncated "
                         f"or altered download; delete it to download again")


def everywhere(true):
    """-> whether `true` holds on every process (a collective under torch.distributed)."""
    if not dist.is_initialized():
        return true
    answers = [None] * dist.get_world_size()
    dist.all_gather_object(answers, bool(true))
    return all(answers)


def writable(path):
    """-> whether a file can be written at `path` (probed by a temporary file beside it)."""
    try:
        tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))).close()
    except OSError:
        return False
    return not os.path.isdir(path)


def weights_path(flag="--weights"):
    """The cached weight file, downloaded on first use (by rank 0; the others wait) and checked
    against its SHA-256 every time it is used. `flag`: the calling script's flag for a file."""
    path = cached_weights()
    if not everywhere(os.path.exists(path)):  # one decision for all ranks, so they take the same collectives
        if not os.path.exists(path) and (not dist.is_initialized() or dist.get_rank() == 0):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:  # written to a temporary file and renamed only when its SHA-256 matches
                torch.hub.download_url_to_file(INCEPTION_URL, path, hash_prefix=INCEPTION_SHA256, progress=True)
            except RuntimeError as e:  # torch.hub's "invalid hash value"
                raise ValueError(f"the downloaded Inception weights are not the published file ({e})") from None
            except Exception as e:  # offline, proxy, HTTP error
                if not dist.is_initialized():
                    raise FileNotFoundError(f"cannot download the Inception weights ({type(e).__name__}: {e}); download "
                                            f"{INCEPTION_URL} by hand to {path}, or pass {flag} FILE") from None
        if not everywhere(os.path.exists(path)):              # the other ranks wait for rank 0's download
            raise FileNotFoundError(f"cannot download the Inception weights, or a process cannot see rank 0's download "
                                    f"(a disk of its own); download {INCEPTION_URL} by hand to {path}, or pass {flag} FILE")
    check_sha256(path, INCEPTION_SHA256)
    return path


def load_inception(weights=None, pytorch_fid=False, device="cpu", flag="--weights"):
    """The FID Inception in eval mode on `device`, from `weights` (either tool's .pth file) or the
    downloaded copy (`flag` names the file's flag in the error if neither is there). Both files hold
    the same tensors under torchvision's names; torch-fidelity's has no BatchNorm
    `num_batches_tracked` counters, which evaluation never reads."""
    path = weights or weights_path(flag)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"Inception weights not found: {path}") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable weight file: {str(e).strip().splitlines()[0][:200]}") from None
    net = FIDInception(pytorch_fid)
    own = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")} if isinstance(state, dict) else {}
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} is not the FID Inception-v3: {len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(shapes)} mis-shaped tensors (first: {(missing + unexpected + shapes)[0]})")
    net.load_state_dict(state, strict=False)
    net = net.eval().requires_grad_(False).to(device)
    return net.to(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else net


# =============================================================================================
# 3. Statistics, Frechet distance, Inception Scores, precision and recall
# =============================================================================================

def statistics(features):
    """pool3 features (N, 2048) -> (mu, sigma) in float64: the mean and the unbiased (N - 1)
    covariance of the Gaussian FID fits to each image set (Heusel et al. 2017, Sec. 3)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 images, got {f.shape[0] if f.ndim == 2 else 0}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))  (Heusel et al. 2017, Eq. (6)).

    The trace of the matrix square root is the sum of the square roots of the eigenvalues of S1 S2
    (similar to the PSD matrix S1^(1/2) S2 S1^(1/2), so they are real and >= 0 up to rounding), as
    torch-fidelity >= 0.4 computes it. This avoids scipy.linalg.sqrtm, whose `disp` argument is
    gone from recent SciPy and whose 1.11.2 release returned wrong results (pytorch-fid #100)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    tr_covmean = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, splits=10, seed=2020):
    """IS = exp(E_x KL(p(y|x) || p(y))) on the 1008 unbiased logits (Salimans et al. 2016, Sec. 4),
    as torch-fidelity: shuffle with its seed (2020), 10 splits, p(y) the mean within each split,
    float64; returns (mean, std) over splits."""
    logits = torch.as_tensor(logits)
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"the Inception Score needs at least {splits} images (one per split), got {n}")
    logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n))].double()
    p, log_p = logits.softmax(1), logits.log_softmax(1)
    scores = []
    for i in range(splits):
        part = slice(i * n // splits, (i + 1) * n // splits)
        p_y = p[part].mean(0, keepdim=True)                   # marginal class distribution of the split
        scores.append((p[part] * (log_p[part] - p_y.log())).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_adm(logits, split_size=5000):
    """IS as ADM's evaluator computes it (Dhariwal & Nichol 2021, `evaluations/evaluator.py`): the
    same softmax of the unbiased logits, but in the given order (no shuffle), consecutive splits of
    `split_size` images (the last one may be shorter), and the mean over splits only. On 50,000
    images both variants average 10 splits of 5,000; they differ in which images share a split."""
    logits = torch.as_tensor(logits).double()
    if len(logits) == 0:
        raise ValueError("the Inception Score needs at least one image")
    scores = []
    for part in logits.split(split_size):
        p, log_p = part.softmax(1), part.log_softmax(1)
        p_y = p.mean(0, keepdim=True)
        scores.append((p * (log_p - p_y.log())).sum(1).mean().exp().item())
    return float(np.mean(scores))


# ---- Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019), as ADM computes them ----
# Each set of pool3 features spans a manifold: the union of balls around its points, each as large
# as the distance to the point's k-th nearest neighbour in its own set (k = 3; Sec. 3, Eq. (1)).
# Precision is the share of samples inside the reference manifold, recall the share of references
# inside the sample manifold (Eq. (2)-(3)). ADM's evaluator fixes the details that change the
# numbers, reproduced below: squared distances, computed in float16 first and again in float32 for
# any 10,000 x 10,000 block with a non-finite entry; a point counts as its own 0-th neighbour;
# "inside" is distance <= radius.

PR_BLOCK = 10000  # ADM's row and column batch; its float16 -> float32 fallback is decided per block


def squared_distances(u, v):
    """(N, D), (M, D) -> (N, M) squared Euclidean distances as ADM's DistanceBlock: |u|^2 - 2 u.v +
    |v|^2, clamped at 0, in float16 (inputs, squares, norms, dot products and each sum rounded to
    float16; sums accumulated in float32, as TF's GPU kernels do), recomputed in float32 if any
    entry is not finite (float16 overflows above 65,504)."""
    d = _distances(u, v, torch.float16)
    return d if torch.isfinite(d).all() else _distances(u, v, torch.float32)


def _distances(u, v, dtype):
    u, v = u.to(dtype).float(), v.to(dtype).float()
    norm = lambda x: x.square().to(dtype).float().sum(1).to(dtype)           # (N,) rounded like TF's reduce_sum
    d = (u @ v.T).to(dtype).mul_(-2)                                         # (N, M), in place from here on:
    return d.add_(norm(u)[:, None]).add_(norm(v)[None, :]).clamp_min_(0).float()  # each step rounded to dtype


def manifold_radii(features, k=3, block=PR_BLOCK):
    """(N, D) -> (N,) squared distance of each point to its k-th nearest neighbour in the same set,
    the point itself being the 0-th (ADM's ManifoldEstimator.manifold_radii, nhood_sizes=(3,)).
    Column blocks are folded into a running k + 1 smallest, so memory stays one block."""
    if len(features) <= k:
        raise ValueError(f"precision and recall need more than k = {k} images per set, got {len(features)}")
    radii = []
    for rows in features.split(block):
        nearest = torch.empty(len(rows), 0, device=features.device)
        for cols in features.split(block):
            nearest = torch.cat([nearest, squared_distances(rows, cols)], 1).topk(k + 1, 1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


@torch.no_grad()
def precision_recall(reference, samples, k=3, block=PR_BLOCK, device=None):
    """pool3 features of the reference set (N, 2048) and the samples (M, 2048) -> (precision,
    recall), in blocks of `block` x `block` (on the GPU when `device` is one: 50,000 x 10,000
    features take seconds there, minutes on a CPU)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False              # TF32 would change the float32 distances
    try:
        ref, sam = (torch.as_tensor(x, dtype=torch.float32).to(device or "cpu") for x in (reference, samples))
        r_ref, r_sam = manifold_radii(ref, k, block), manifold_radii(sam, k, block)
        ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)   # inside the sample manifold
        sam_in = torch.zeros(len(sam), dtype=torch.bool, device=ref.device)   # inside the reference manifold
        for i in range(0, len(ref), block):
            for j in range(0, len(sam), block):
                d = squared_distances(ref[i:i + block], sam[j:j + block])      # (block, block)
                ref_in[i:i + block] |= (d <= r_sam[None, j:j + block]).any(1)
                sam_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(0)
        return sam_in.sum().item() / len(sam), ref_in.sum().item() / len(ref)  # CUDA's mean multiplies by 1/N: off by an ulp
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def open_npz(path):
    """np.load of an .npz archive, or one clear line for anything else (an .npy renamed .npz, a
    pickle, a truncated file)."""
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz archive ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not an .npz archive (save it with np.savez)")
    return f


def summarize(pool, logits=None, spatial=None):
    """Features of one image set -> what the metrics compare: {'num_images', 'mu', 'sigma' (pool3),
    'mu_s', 'sigma_s' (spatial, for sFID), 'pool' (for precision and recall), 'logits' (for IS)}."""
    out = dict(num_images=len(pool), pool=torch.as_tensor(pool))
    out["mu"], out["sigma"] = statistics(pool)
    if spatial is not None:
        out["mu_s"], out["sigma_s"] = statistics(spatial)
    if logits is not None:
        out["logits"] = logits
    return out


def compare(samples, reference=None, device=None):
    """Every number of the papers' tables that the two sets allow -> dict: 'fid', 'sfid',
    'precision', 'recall' (against `reference`), 'is_mean' / 'is_std' (torch-fidelity's IS) and
    'is_adm' (ADM's) of the samples, 'missing' ({metric: why not}) and 'seconds' per stage. Either
    set may hold statistics only (as from load_statistics)."""
    out, missing, seconds = dict(num_images=samples.get("num_images"), mu=samples["mu"], sigma=samples["sigma"]), {}, {}
    if "logits" in samples and len(samples["logits"]) >= 10:
        out["is_mean"], out["is_std"] = inception_score(samples["logits"])
        out["is_adm"] = inception_score_adm(samples["logits"])
    elif "logits" in samples:
        missing["IS"] = f"{len(samples['logits'])} images are fewer than its 10 splits"
    if reference is None:
        return dict(out, missing=missing, seconds=seconds)
    t = time.time()
    out["fid"] = frechet_distance(samples["mu"], samples["sigma"], reference["mu"], reference["sigma"])
    if "mu_s" in samples and "mu_s" in reference:
        out["sfid"] = frechet_distance(samples["mu_s"], samples["sigma_s"], reference["mu_s"], reference["sigma_s"])
    else:
        missing["sFID"] = f"the {'reference' if 'mu_s' in samples else 'sample set'} has no spatial statistics (mu_s, sigma_s)"
    seconds["Frechet distances"] = time.time() - t
    t = time.time()
    if "pool" in samples and "pool" in reference and min(len(samples["pool"]), len(reference["pool"])) <= 3:
        missing["precision/recall"] = "they need more than k = 3 images in each set"
    elif "pool" in samples and "pool" in reference:
        out["precision"], out["recall"] = precision_recall(reference["pool"], samples["pool"], device=device)
        out["num_reference"] = len(reference["pool"])
        seconds["precision/recall"] = time.time() - t
    else:
        missing["precision/recall"] = (f"the {'reference' if 'pool' in samples else 'sample set'} is statistics only; "
                                       f"they need its images (or features saved with --save-features)")
    return dict(out, missing=missing, seconds=seconds)


def report(result, reference_name="the reference"):
    """compare()'s result -> printable lines, each naming its protocol, in the papers' column order."""
    r, n = result, result.get("num_images")
    lines = []
    if "fid" in r:
        lines.append(f"FID: {r['fid']:.4f}  (pool3 statistics, {n or 'given'} samples vs {reference_name})")
    if "is_mean" in r:
        lines.append(f"IS: {r['is_mean']:.4f} +- {r['is_std']:.4f}  (torch-fidelity's protocol: 10 splits after a fixed shuffle)")
        lines.append(f"IS (ADM evaluator): {r['is_adm']:.4f}  (consecutive splits of 5,000 images, in order)")
    if "precision" in r:
        lines.append(f"Precision: {r['precision']:.4f}  (ADM evaluator: k = 3 neighbours, {r['num_reference']} reference images)")
        lines.append(f"Recall: {r['recall']:.4f}")
    if "sfid" in r:
        lines.append(f"sFID: {r['sfid']:.4f}  (ADM evaluator: mixed_6/conv, 7 channels x 17 x 17)")
    lines += [f"{name}: not computed: {why}" for name, why in r["missing"].items()]
    return lines


def load_statistics(path):
    """The statistics an .npz holds -> dict with 'mu', 'sigma' and, where present, 'mu_s', 'sigma_s'
    (spatial, for sFID) and 'pool' (reference features saved with --save-features). Reads MAR's
    fid_stats/adm_in256_stats.npz (mu, sigma), pytorch-fid's --save-stats files, this file's, and
    ADM's reference batches such as VIRTUAL_imagenet256_labeled.npz, whose mu/sigma/mu_s/sigma_s
    describe the whole ImageNet training set (their 10,000 images in arr_0 are read by load_set)."""
    with open_npz(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} holds no statistics (keys {sorted(f.keys())}; need mu and sigma)")
        out = {k: f[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in f}
        if "pool3" in f:
            out["pool"] = torch.from_numpy(f["pool3"].astype(np.float32))
        if "pipeline" in f:  # written by save_statistics; other tools' files do not say
            out["pipeline"] = str(f["pipeline"])
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if mu not in out:
            continue
        m, s = out[mu], out.get(sigma, np.zeros(0))
        if m.ndim != 1 or s.shape != (len(m),) * 2:
            raise ValueError(f"{path}: {mu} {m.shape} and {sigma} {s.shape} are not a mean and its covariance")
        if not (np.isfinite(m).all() and np.isfinite(s).all()):
            raise ValueError(f"{path}: {mu} or {sigma} holds NaN or infinite values")
    for key, size in (("mu", 2048), ("mu_s", 7 * 17 * 17)):  # pool3; ADM's spatial features (mixed_6/conv, 7 channels)
        if key in out and out[key].shape != (size,):
            raise ValueError(f"{path}: {key} has {len(out[key])} values, not the {size} of the Inception features "
                             f"compared here (pytorch-fid's --dims 2048)")
    if "pool" in out and tuple(out["pool"].shape[1:]) != out["mu"].shape:
        raise ValueError(f"{path}: pool3 {tuple(out['pool'].shape)} is not features of the size of mu {out['mu'].shape}")
    return out


def save_statistics(path, summary, features=False, pytorch_fid=False):
    """ADM's layout (mu, sigma, mu_s, sigma_s), plus the pool3 features (for precision and recall
    against this set) when `features`, and the input pipeline the features came through (which
    ADM's and pytorch-fid's readers ignore), so that check_pipeline can refuse to mix them."""
    arrays = {k: summary[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in summary}
    arrays["pipeline"] = np.array(summary.get("pipeline", pipeline_name(pytorch_fid)))
    if features:
        arrays["pool3"] = np.asarray(summary["pool"], dtype=np.float32)
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)  # whole or not at all: an interrupted write leaves no cut file


def pipeline_name(pytorch_fid):
    return "pytorch-fid" if pytorch_fid else "TF"


def check_pipeline(path, stats, pytorch_fid):
    """Raise one line if the statistics of `path` record another input pipeline than the features
    they are to be compared with: the two resize differently, so FID across them measures the
    pipelines too. Files of other tools (ADM's, MAR's, pytorch-fid's) record none and pass."""
    have, want = stats.get("pipeline"), pipeline_name(pytorch_fid)
    if have is not None and have != want:
        raise ValueError(f"{path} holds statistics computed through the {have} input pipeline, and these features go "
                         f"through the {want} one: compute both through one (fid.py's --pytorch-fid chooses pytorch-fid's)")


# =============================================================================================
# 4. Feeding images: in-memory scoring (generators), folders and .npz files, over DDP ranks
# =============================================================================================

def gather(t):
    """Concatenate a (n_rank, ...) tensor from every rank in rank order (n may differ per rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([len(t)], device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    padded = torch.zeros((int(max(sizes)), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).cpu()


class Scorer:
    """Collects Inception features of images as they are produced (no PNG round trip). Under DDP
    every rank calls update() with its own images; features() gathers them in rank order (so give
    rank r the r-th contiguous block of the image list to keep a fixed order).

        scorer = Scorer(load_inception(device=device))
        for batch in generator: scorer.update(to_uint8(batch))   # (B, 3, H, W) uint8
        result = scorer.compute(load_statistics("VIRTUAL_imagenet256_labeled.npz"))  # {'fid', 'sfid', ...}
    """

    def __init__(self, net, distributed=True):
        self.net, self.pool, self.logits, self.spatial, self.distributed = net, [], [], [], distributed

    @torch.no_grad()
    def update(self, images):
        device = next(self.net.parameters()).device
        x = images.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 features
        try:
            pool, logits, spatial = self.net(x)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        for store, t in ((self.pool, pool), (self.logits, logits), (self.spatial, spatial)):
            store.append(t.float().cpu())

    def features(self):
        """(pool3 (N, 2048), logits (N, 1008), spatial (N, 2023)) of all images on all ranks, in rank
        order. A collective under DDP: every rank calls it."""
        collect = gather if self.distributed else (lambda t: t)
        cat = lambda xs, d: collect(torch.cat(xs) if xs else torch.zeros(0, d))
        return cat(self.pool, 2048), cat(self.logits, 1008), cat(self.spatial, 2023)

    def compute(self, reference=None, device=None):
        """compare() of these images against `reference` (a dict as load_statistics / load_set give)."""
        return compare(summarize(*self.features()), reference, device)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_rgb(image):
    """A PIL image -> uint8 (H, W, 3). 16-bit grayscale (PNG "I;16", or "I" holding 0..65535) is
    scaled to 8 bits: `convert("RGB")` would clip it to a white square. 32-bit float images are
    refused (their range is unknown)."""
    if image.mode.startswith("I"):
        arr = np.asarray(image, dtype=np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"{image.mode} image with values outside 0..65535; save it with 8 or 16 bits")
        return np.repeat(np.round(arr / 257).astype(np.uint8)[..., None], 3, axis=-1)
    if image.mode == "F":
        raise ValueError("32-bit float image (range unknown); save it with 8 or 16 bits")
    return np.asarray(image.convert("RGB"))


class ImageFiles(torch.utils.data.Dataset):
    """The images of one folder (not recursive), sorted by path as torch-fidelity does, as uint8
    (3, H, W). Lossy JPEG samples change FID noticeably (clean-fid): prefer PNG for generated sets."""

    def __init__(self, root):
        self.files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            inside = any(os.path.isdir(os.path.join(root, f)) for f in os.listdir(root))
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}" +
                             (" (the images of one folder are read, not of its subfolders)" if inside else ""))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                return torch.from_numpy(to_rgb(im).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        except Exception as e:
            raise ValueError(f"cannot read image {self.files[i]}: {e}") from None


class ArrayImages(torch.utils.data.Dataset):
    """The images of an .npz sample batch: `arr_0` of shape (N, H, W, 3), uint8 (ADM's format)."""

    def __init__(self, path):
        with open_npz(path) as f:
            if "arr_0" not in f:
                raise ValueError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma): keys {sorted(f.keys())}")
            self.images = f["arr_0"]
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[3] != 3:
            raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]).permute(2, 0, 1)


def open_set(path, pytorch_fid):
    """An image folder, an .npz of images (arr_0) or an .npz of statistics -> (images to score or
    None, the statistics stored in the file), checked before any work, the statistics' input
    pipeline against the one in use (`pytorch_fid`, check_pipeline) too. Stored statistics are used
    as they are (ADM's semantics); the images are scored only for what the file lacks (ADM's
    reference batches: their 10,000 images give the features for precision and recall)."""
    if os.path.isdir(path):
        return ImageFiles(path), {}
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such folder or file: {path}")
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: expected an image folder or an .npz file")
    with open_npz(path) as f:
        keys = set(f.keys())
    if "arr_0" not in keys and not {"mu", "sigma"} <= keys:
        raise ValueError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma): keys {sorted(keys)}")
    stats = load_statistics(path) if {"mu", "sigma"} <= keys else {}
    check_pipeline(path, stats, pytorch_fid)
    return (ArrayImages(path) if "arr_0" in keys and not {"mu_s", "pool"} <= set(stats) else None), stats


def load_set(path, net, batch_size=100, num_workers=0, opened=None):
    """open_set(path), its images scored -> (the dict compare() takes, seconds spent on features)."""
    images, stats = opened or open_set(path, net.pytorch_fid)
    if images is None:
        return stats, 0.0
    t = time.time()
    features = score_dataset(images, net, batch_size, num_workers, os.path.basename(path.rstrip("/"))).features()
    return {**summarize(*features), **stats}, time.time() - t


def score_dataset(dataset, net, batch_size=100, num_workers=0, desc="features"):
    """Inception features of a dataset; rank r of W processes the r-th contiguous block, so the
    gathered result is in dataset order (which IS's fixed shuffle depends on)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = len(dataset)
    shard = torch.utils.data.Subset(dataset, range(rank * n // world, (rank + 1) * n // world))
    loader = torch.utils.data.DataLoader(shard, batch_size, num_workers=num_workers, collate_fn=stack_same_size,
                                         pin_memory=torch.cuda.is_available())
    scorer = Scorer(net)
    try:
        for images in tqdm(loader, desc=desc, disable=rank != 0, dynamic_ncols=True):
            scorer.update(images)
    except ValueError as e:  # from a worker it arrives with the worker's traceback: keep its message only
        raise ValueError(str(e).strip().splitlines()[-1].removeprefix("ValueError: ")) from None
    return scorer


def stack_same_size(images):
    """The batch of (3, H, W) images as one tensor, or one line if their sizes differ."""
    if len({im.shape for im in images}) > 1:
        raise ValueError(f"the images differ in size ({', '.join(sorted({'x'.join(map(str, im.shape[1:])) for im in images}))}); "
                         f"resize them to one size first")
    return torch.stack(images)


# =============================================================================================
# 5. Reconstruction metrics (tokenizers)
# =============================================================================================

def psnr(a, b):
    """Per-image PSNR in dB of uint8 images (B, 3, H, W): 20 log10(255 / sqrt(MSE)), MSE over all
    pixels and channels in float64 (CODA's calculate_psnr); inf for identical images."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 20 * torch.log10(255 / mse.sqrt())


def ssim(a, b):
    """Per-image SSIM of uint8 images (B, 3, H, W) as MATLAB's ssim.m (Wang et al. 2004): 11x11
    Gaussian window with sigma 1.5, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, 'valid' filtering (no
    padding), computed per RGB channel and averaged, in float64 (CODA's calculate_ssim)."""
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).to(a.device).expand(3, 1, 11, 11)
    x, y = a.double(), b.double()
    blur = lambda t: F.conv2d(t, window, groups=3)            # (B, 3, H - 10, W - 10)
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean((2, 3)).mean(1)


class ReconstructionMetrics:
    """rFID, PSNR and SSIM of reconstructions against their originals, as CODA evaluates them:
    images in [-1, 1] are mapped to [0, 1] and clamped; the Inception sees those floats directly
    (net built with pytorch_fid=True, CODA's protocol) or their rounded uint8 (TF pipeline); PSNR and
    SSIM use uint8 images made by truncation, (x * 255).astype(uint8), as CODA's code does. With
    net=None only PSNR and SSIM are computed (no Inception weights at hand)."""

    def __init__(self, net, distributed=True):
        self.net, self.psnr, self.ssim = net, [], []
        if net is not None:
            self.real, self.fake = Scorer(net, distributed), Scorer(net, distributed)
        self.collect = gather if distributed else (lambda t: t)

    def update(self, originals, reconstructions):
        a, b = [((x.float() + 1) / 2).clamp(0, 1) for x in (originals, reconstructions)]
        ua, ub = (a * 255).to(torch.uint8), (b * 255).to(torch.uint8)
        self.psnr.append(psnr(ua, ub).cpu())
        self.ssim.append(ssim(ua, ub).cpu())
        if self.net is not None:
            feed = (lambda x: x) if self.net.pytorch_fid else (lambda x: (x * 255).round().to(torch.uint8))
            self.real.update(feed(a))
            self.fake.update(feed(b))

    def compute(self):
        out = dict(psnr=self.collect(torch.cat(self.psnr)).mean().item(), ssim=self.collect(torch.cat(self.ssim)).mean().item())
        if self.net is not None:
            real, fake = self.real.features()[0], self.fake.features()[0]  # pool3: rFID needs nothing else
            out.update(rfid=frechet_distance(*statistics(fake), *statistics(real)), num_images=len(real))
        return out


# =============================================================================================
# 6. The built-in benchmark: ten classes told apart by shape, and a judge that sees no colour
# =============================================================================================
# The project's own data and evaluation for the CPU-sized runs (train.py without --data-path):
# ten classes that differ in SHAPE or TEXTURE only: disc, square, triangle, ring, plus, horizontal
# stripes, vertical stripes, checkerboard, gradient, dots. Every image is a light shape on a dark
# ground in one colour (any hue and saturation, drawn alike for every class), so colour says
# nothing about the class, while the light/dark contrast shows every shape to a colour-blind eye.
# Random position, size, rotation, hue and a faint background ramp give variety inside a class.
# Drawn from signed distance fields (anti-aliased at any size), deterministic from (seed, label,
# index), no download, generated once into memory. Why light on dark, and why these sizes: README,
# "How the CPU-sized recipes were found".

TOY_CLASSES = ["disc", "square", "triangle", "ring", "plus", "h-stripes", "v-stripes", "checkerboard",
               "gradient", "dots"]
NO_CLASS = len(TOY_CLASSES)  # the judge's eleventh answer: none of them (see no_class_coverage)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B: all a colour-blind judge sees


def toy_image(label, index, seed=0, size=32):
    """uint8 array (size, size, 3) of class `label`; deterministic in (seed, label, index)."""
    rng = np.random.default_rng([seed, label, index])
    x = ((np.arange(size) + 0.5) / size * 2 - 1)[None, :]  # pixel centres in [-1, 1]
    y = x.T
    hue, saturation = rng.uniform(), rng.uniform(0, 0.9)
    fg, bg = (np.array(colorsys.hsv_to_rgb(hue, saturation, v)) for v in (rng.uniform(0.75, 1), rng.uniform(0, 0.35)))
    if label == NO_CLASS:  # for the judge only
        d = (no_class_coverage(rng, index, seed, size) - 0.5) * 2 / size
    else:
        d = shape_distance(label, rng, x, y, size)
    shade = 1 + 0.15 * (np.cos(a := rng.uniform(0, 2 * np.pi)) * x + np.sin(a) * y)[..., None]  # faint ramp
    coverage = np.clip(0.5 + d * size / 2, 0, 1)[..., None]  # anti-aliased: distance in pixels
    return np.round(np.clip(bg * shade + (fg - bg * shade) * coverage, 0, 1) * 255).astype(np.uint8)


def shape_distance(label, rng, x, y, size):
    """Class `label`'s shape or texture at pixel centres x (1, size), y (size, 1) in [-1, 1] -> its
    signed distance (size, size), > 0 inside, in the same units (size / 2 a pixel), drawn from rng."""
    rotate = lambda u, v, a: (np.cos(a) * u + np.sin(a) * v, np.cos(a) * v - np.sin(a) * u)
    stripes = lambda u, f: (0.25 - np.abs(np.mod(u * f + rng.uniform(), 1.0) - 0.5)) / f  # > 0 on a stripe
    u0, v0 = x - rng.uniform(-0.15, 0.15), y - rng.uniform(-0.15, 0.15)
    u, v = rotate(u0, v0, rng.uniform(0, 2 * np.pi))
    r = np.hypot(u0, v0)
    if label == 0:  # disc
        d = rng.uniform(0.45, 0.9) - r
    elif label == 1:  # square, any rotation
        d = rng.uniform(0.42, 0.75) - np.maximum(np.abs(u), np.abs(v))
    elif label == 2:  # equilateral triangle: the intersection of three half-planes
        d = np.min([rng.uniform(0.3, 0.48) - rotate(u, v, k * 2 * np.pi / 3)[0] for k in range(3)], axis=0)
    elif label == 3:  # ring
        d = rng.uniform(0.15, 0.27) - np.abs(r - rng.uniform(0.57, 0.9))
    elif label == 4:  # plus (an x when rotated)
        w, arm = rng.uniform(0.15, 0.255), rng.uniform(0.675, 0.975)
        d = np.maximum(np.minimum(w - np.abs(u), arm - np.abs(v)), np.minimum(w - np.abs(v), arm - np.abs(u)))
    elif label in (5, 6, 7):  # horizontal / vertical stripes, checkerboard: up to 12 degrees off axis
        u, v = rotate(x, y, rng.uniform(-0.2, 0.2))
        f = rng.uniform(1.5, 2.8) if label < 7 else rng.uniform(1.2, 2.0)
        a, b = stripes(v, f), stripes(u, f)
        d = a if label == 5 else b if label == 6 else np.sign(a * b) * np.minimum(np.abs(a), np.abs(b))
    elif label == 8:  # gradient: the whole image ramps from dark to light
        d = (np.cos(a := rng.uniform(0, 2 * np.pi)) * x + np.sin(a) * y) / size * rng.uniform(1.5, 3)
    elif label == 9:  # dots: 5-12 small discs anywhere
        n = rng.integers(5, 13)
        centres, radii = rng.uniform(-0.8, 0.8, size=(n, 2)), rng.uniform(0.08, 0.15, size=n)
        d = np.max(radii - np.hypot(x[..., None] - centres[:, 0], y[..., None] - centres[:, 1]), axis=-1)
    return d


def no_class_coverage(rng, index, seed, size):
    """What a failed generator draws, for the judge's NO_CLASS: a coverage map (size, size) in [0, 1]
    (toy_image colours it as a class's shape) of one of eight kinds, at full or faint contrast. Half
    of them are blobs, the kind nearest to real shapes (one CNN of the judge named 58% of blobs none
    with one in eight, 80% with one in two; README)."""
    kind = 7 if rng.uniform() < 0.5 else rng.integers(7)
    level, luma, shapes = rng.uniform(0, 0.6), np.array(LUMA), [0, 1, 2, 3, 4, 9]
    if kind in (5, 6):  # mixed 8x8 tokens: patches of 2-8 images of a shape or the dots, or polyphase tokens of 4-8
        polyphase = kind == 6  # dots images, dithered into one: many faint specks, not 5-12 dots
        k = 9 if polyphase else rng.choice(shapes)
        images = np.stack([toy_image(k, index * 8 + j, seed + 1, size) for j in range(rng.integers(4 if polyphase else 2, 9))])
        which = rng.integers(len(images), size=(size // 8, size // 8))  # (g, g): whose token goes where
        which = np.tile(which, (8, 8)) if polyphase else np.kron(which, np.ones((8, 8), int))  # (size, size)
        p = np.take_along_axis(images @ luma, which[None], 0)[0]
    elif kind == 7:  # a blob: a square or a triangle with no straight side or sharp corner left
        p = blob_coverage(rng.choice([1, 2]), rng, size)
    elif kind == 4:  # the spectrum of a shape or of the dots with random phases: its texture, no shape
        L = toy_image(rng.choice(shapes), index, seed + 1, size) @ luma
        phase = np.angle(np.fft.fft2(rng.standard_normal((size, size))))  # a real image's: the result is real
        p = np.fft.ifft2(np.abs(np.fft.fft2(L - L.mean())) * np.exp(1j * phase)).real
    elif kind == 0:  # one flat level
        p = np.full((size, size), rng.uniform(0, 1))
    elif kind == 1:  # pixel noise
        p = level + rng.uniform(0.1, 0.5) * rng.standard_normal((size, size))
    elif kind == 2:  # specks: single pixels lit at random, on faint noise
        p = (rng.random((size, size)) < rng.uniform(0.02, 0.15)) * rng.uniform(0.3, 1, (size, size))
        p = p + level / 3 + 0.1 * rng.standard_normal((size, size))
    else:  # clouds and blotches: pixel noise blurred (sigma 0.7-4 px), soft or sharp
        p = 1 / (1 + np.exp(-rng.uniform(1, 8) * smooth_noise(rng, size, rng.uniform(0.7, 4)) + rng.uniform(-3, 2)))
    if kind in (4, 5, 6):  # stretched to [0, 1]
        p = (p - p.min()) / max(p.max() - p.min(), 1e-6)
    return np.clip(p * rng.uniform(0.25, 1), 0, 1)  # faint or full contrast


def blob_coverage(label, rng, size, wander=None, sigma=None):
    """A weak generator's square (label 1) or triangle (2): its signed distance plus smooth noise of
    `wander` pixels' std, blurred over `sigma` pixels (drawn from rng, 2-5 and 2.5-5, when not given)
    -> coverage (size, size) in [0, 1], with crisp edges."""
    x = ((np.arange(size) + 0.5) / size * 2 - 1)[None, :]  # pixel centres in [-1, 1]
    d = shape_distance(label, rng, x, x.T, size) * size / 2  # signed distance in pixels
    wander = rng.uniform(2, 5) if wander is None else wander
    sigma = rng.uniform(2.5, 5) if sigma is None else sigma
    return np.clip(0.5 + d + wander * smooth_noise(rng, size, sigma), 0, 1)


def smooth_noise(rng, size, sigma):
    """(size, size) white noise blurred by a Gaussian of `sigma` pixels (in the Fourier domain), unit std."""
    f = np.fft.fftfreq(size) ** 2
    c = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * np.exp(-2 * (np.pi * sigma) ** 2 * (f[:, None] + f))).real
    return c / c.std()


BUILTIN_IMAGES = 10000  # the built-in training set


def toy_images(size=32, num_images=BUILTIN_IMAGES, seed=0, progress=False, classes=10):
    """uint8 (num_images, size, size, 3): image i of class i % classes (about 3 s for 10,000; the
    judge's 11 classes include NO_CLASS)."""
    return torch.from_numpy(np.stack([toy_image(i % classes, i // classes, seed, size) for i in
                                      tqdm(range(num_images), desc="drawing built-in data", disable=not progress)]))


def luminance(x):
    """(B, 3, H, W) RGB in [-1, 1] -> (B, 1, H, W) luma (ITU-R BT.601): all a colour-blind judge sees."""
    return (x * torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)


# toy_judge's CNNs at 32 px (write_judge), kept with the reference tensors the tests check them against
JUDGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".ci", "reference", "judge.pt")


def toy_judge(size=32, steps=1000, seed=0, members=3, weights=JUDGE):
    """The built-in data's judge: small CNNs that see luminance only (they cannot use colour), trained
    on fresh toy images that no model trains on (seed + 1000), half of them blurred and all with some
    noise so that they tolerate soft samples. Its eleventh answer, NO_CLASS, is trained on images of
    no class (`no_class_coverage`): without it the judge must name a class for anything, and it named
    a flat or noisy image "gradient", scattered specks "dots" and a lumpy blob "square" or
    "triangle". It is an ensemble: `members` CNNs trained on the same images from seeds of their own
    (weights, augmentation, order), their class probabilities averaged, because one CNN's verdict
    on borderline samples moves with its seed (MAR's triangles 46% to 71% over three; README).
    99-100% on real held-out images. -> images (B, 3, H, W) -> (B, 11) class probabilities."""
    nets = judge_nets(size, steps, seed, members, weights)
    return lambda images: torch.stack([net(judge_view(images)).softmax(1) for net in nets]).mean(0)


def judge_nets(size=32, steps=1000, seed=0, members=3, weights=JUDGE):
    """The judge's CNNs in eval mode. At 32 px, the built-in runs' size, they are loaded from
    `weights` (.ci/reference/judge.pt, which `write_judge` wrote from this function's training on a
    CPU with bf16 instructions): every run on every machine then judges with the same weights, and
    none spends the 85 s that training them takes on 2 CPU cores. Other sizes train their own: in
    bf16 autocast where the CPU has bf16 instructions and channels_last (2x faster there)."""
    if weights and os.path.exists(weights) and (size, steps, seed, members) == (32, 1000, 0, 3):
        nets = [judge_cnn() for _ in range(members)]
        for net, state in zip(nets, torch.load(weights, map_location="cpu", weights_only=True), strict=True):
            net.load_state_dict(state)
        return [net.eval() for net in nets]
    data = toy_images(size, steps * 64, seed=seed + 1000, classes=NO_CLASS + 1)
    return [judge_net(data, steps, seed + m) for m in range(members)]


def write_judge(path=JUDGE):
    """Trains the 32 px judge and saves its CNNs to `path` (python -c "import fid; fid.write_judge()",
    after a change to the built-in data)."""
    torch.save([net.state_dict() for net in judge_nets(weights=None)], path)


def judge_view(images):
    """Images (B, 3, H, W) in [-1, 1] -> what the judge's CNNs see: (B, 1, H, W) fp32 luma, channels_last."""
    return luminance(images.float().cpu()).contiguous(memory_format=torch.channels_last)


def judge_cnn():
    """One of the judge's CNNs: (B, 1, H, W) luma -> (B, 11) logits."""
    block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(1, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, NO_CLASS + 1)).to(memory_format=torch.channels_last)


def judge_net(data, steps, seed):
    """One of the judge's CNNs, trained on uint8 images `data` (image i of class i % 11), 64 a step,
    in an order of its seed -> the CNN in eval mode."""
    g, answers = torch.Generator().manual_seed(seed), NO_CLASS + 1
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=torch.ops.mkldnn._is_mkldnn_bf16_supported())
    with torch.random.fork_rng():  # the same judge in every run, and the run's own random stream untouched
        torch.manual_seed(seed)
        net = judge_cnn()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    order = torch.randperm(steps * 64, generator=g)
    for i in range(steps):
        batch = order[i * 64: (i + 1) * 64]
        x = judge_view(to_tensor(data[batch]))  # (64, 1, H, W)
        x = gaussian_blur(x, float(torch.empty(()).uniform_(0.3, 1.0, generator=g))) if torch.rand((), generator=g) < 0.5 else x
        x = x + torch.rand(64, 1, 1, 1, generator=g) * 0.15 * torch.randn(x.shape, generator=g)
        with amp:
            loss = F.cross_entropy(net(x), batch % answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def gaussian_blur(x, sigma):
    """Separable 7-tap Gaussian blur of (B, C, H, W), per channel."""
    k = torch.exp(-torch.arange(-3, 4, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(-1, 1, 1, 7), groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(-1, 1, 7, 1), groups=x.shape[1])


@torch.no_grad()
def class_accuracy(judge, images, labels):
    """-> (overall accuracy, accuracy per class, the share named NO_CLASS) of the judge's predictions."""
    pred = judge(images).argmax(1)
    hit = (pred == labels.cpu()).float()
    return hit.mean().item(), [hit[labels.cpu() == c].mean().item() for c in range(len(TOY_CLASSES))], \
        (pred == NO_CLASS).float().mean().item()


def token_steps(images, block=8):
    """What class accuracy does not see -> (seams, speckle, roughness): the mean luma step between
    neighbouring pixels across the borders of the block x block grid (MAR's pixel tokens) divided by
    the mean step everywhere else (about 1 for real images; > 2 for a mosaic of tokens each at its
    own level), that mean step inside the blocks (noise inside tokens raises it, and would lower
    the seam ratio if it were reported alone), and the mean step over the whole image (steps moved
    off the borders, spread over a few pixels, lower the seam ratio but not this)."""
    y = luminance(images.float().cpu())[:, 0]                               # (B, H, W)
    dx, dy = (y[:, :, 1:] - y[:, :, :-1]).abs(), (y[:, 1:] - y[:, :-1]).abs()
    border = torch.arange(1, y.shape[-1]) % block == 0                     # steps from pixel i-1 to i
    across = torch.cat([dx[:, :, border].flatten(), dy[:, border].flatten()]).mean()
    inside = torch.cat([dx[:, :, ~border].flatten(), dy[:, ~border].flatten()]).mean()
    return (across / inside).item(), inside.item(), torch.cat([dx.flatten(), dy.flatten()]).mean().item()


def judge_samples(images, labels, size, seed, grid):
    """The built-in data's verdict on generated images, the first `grid` of them the final grid's ->
    log lines: the colour-blind judge's class accuracy, overall and per class, on all of them and on
    the grid alone, the share it names no class, the token seams and speckle, each beside real held-out images'."""
    judge, real = toy_judge(size), to_tensor(toy_images(size, 1000, seed=seed + 2000))  # nobody trained on them
    ceiling, _, real_none = class_accuracy(judge, real, torch.arange(1000) % 10)
    accuracy, per_class, none = class_accuracy(judge, images, labels)
    on_grid, per_class_grid, _ = class_accuracy(judge, images[:grid], labels[:grid])
    (seams, speckle, rough), (real_seams, real_speckle, real_rough) = token_steps(images), token_steps(real)
    return [f"class accuracy of {len(images)} final samples, by a judge that sees luminance only: {accuracy:.0%} "
            f"(the grid's {grid}: {on_grid:.0%}; real held-out images: {ceiling:.0%})",
            f"named none of the classes (flat, noise, specks, clouds, mixed tokens, blobs): {none:.0%} of the samples "
            f"(real held-out images: {real_none:.0%})",
            f"per class ({len(images)} / grid): " + ", ".join(f"{name} {a:.0%} / {b:.0%}"
                                                              for name, a, b in zip(TOY_CLASSES, per_class, per_class_grid)),
            f"token seams (luma steps across 8x8 block borders / elsewhere; 1 = none): {seams:.2f} (real held-out "
            f"images: {real_seams:.2f}); speckle (mean luma step inside the blocks): {speckle:.3f} (real: {real_speckle:.3f}); "
            f"roughness (mean luma step over the whole image): {rough:.3f} (real: {real_rough:.3f})"]


@torch.no_grad()
def builtin_reference(folder, size, num_images, seed, net, batch_size=100):
    """The built-in data's reference set for FID and the rest: Inception statistics (pool3 and
    spatial) and pool3 features of `num_images` toy images of `seed` (held out: not the training
    set's seed), classes balanced, computed in shards over the DDP ranks and cached in `folder`
    under a name that changes with the drawing code."""
    drawn = hashlib.sha1(toy_images(size, 10, seed=seed).numpy().tobytes()).hexdigest()[:8]
    path = os.path.join(folder, f"fid_stats_builtin_{size}px_{num_images}_{drawn}.npz")
    if everywhere(os.path.exists(path)):  # one decision for all ranks: computing it takes collectives
        reference = load_statistics(path)
        if {"mu_s", "pool"} <= set(reference) and reference.get("pipeline", "TF") == pipeline_name(net.pytorch_fid):
            return reference  # (a cache written before sFID / precision-recall, or by the other pipeline, is redone)
    images = toy_images(size, num_images, seed=seed).permute(0, 3, 1, 2)  # uint8 (N, 3, H, W)
    scorer = score_dataset(images, net, batch_size, desc="reference statistics")  # each rank its block
    reference = summarize(*scorer.features())
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_statistics(path, reference, features=True, pytorch_fid=net.pytorch_fid)
    return reference


# =============================================================================================
# 7. The command line
# =============================================================================================

def main(argv=None):
    p = argparse.ArgumentParser(description="FID, sFID, IS, precision and recall (torch-fidelity's and ADM's numbers; "
                                            "pytorch-fid's FID with --pytorch-fid)")
    p.add_argument("inputs", nargs="+", metavar="SAMPLES [REF]",
                   help="image folder, .npz of images (arr_0, N x H x W x 3 uint8), or .npz of statistics (mu, sigma, "
                        "and optionally mu_s, sigma_s, pool3), e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--weights", help="Inception weights (torch-fidelity's or pytorch-fid's .pth); default: download once")
    p.add_argument("--pytorch-fid", action="store_true", help="pytorch-fid's input pipeline (CODA's rFID) instead of TF's")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--save-stats", metavar="OUT.npz", help="save the statistics of SAMPLES (ADM's layout: mu, sigma, mu_s, sigma_s)")
    p.add_argument("--save-features", action="store_true", help="with --save-stats: also save the pool3 features, "
                                                                "so that precision and recall can use the file as a reference")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = p.parse_args(argv)
    if len(args.inputs) > 2 or (len(args.inputs) == 1 and not args.save_stats) or (len(args.inputs) == 2 and args.save_stats):
        p.error("give SAMPLES REF to compare, or SAMPLES --save-stats OUT.npz")
    if args.save_features and not args.save_stats:
        p.error("--save-features goes with --save-stats")
    if args.save_stats and not (args.save_stats.endswith(".npz") and os.path.isdir(os.path.dirname(os.path.abspath(args.save_stats)))):
        sys.exit(f"fid.py: error: --save-stats {args.save_stats}: give a .npz file name in an existing folder")
    if args.save_stats and not writable(args.save_stats):  # checked before any feature is computed
        sys.exit(f"fid.py: error: --save-stats {args.save_stats}: cannot write it (a folder of that name, or no write access)")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("fid.py: error: --device cuda: no CUDA device")
    if "RANK" in os.environ:  # torchrun: one process per GPU, features computed in shards
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    try:
        opened = [open_set(path, args.pytorch_fid) for path in args.inputs]  # every input checked before hours of work
        if args.save_features and opened[0][0] is None and "pool" not in opened[0][1]:
            raise ValueError(f"--save-features: {args.inputs[0]} holds statistics only, no images or features to save")
        net = load_inception(args.weights, args.pytorch_fid, device)
        sets, seconds = [], {}
        for name, path, o in zip(("samples", "reference"), args.inputs, opened):
            data, seconds[f"{name} features"] = load_set(path, net, args.batch_size, args.num_workers, o)
            sets.append(data)
        if rank0 and args.save_stats:
            save_statistics(args.save_stats, sets[0], args.save_features, args.pytorch_fid)
            n = sets[0].get("num_images")  # None: SAMPLES was statistics already
            print(f"saved statistics{f' of {n} images' if n else ''} to {args.save_stats}")
        if rank0:
            result = compare(sets[0], sets[1] if len(sets) == 2 else None, device)
            print("\n".join(report(result, os.path.basename(args.inputs[-1].rstrip("/")))))
            times = {**seconds, **result["seconds"]}
            print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items() if v > 0))
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"fid.py: error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
