"""
All tests, on CPU: `python test_all.py` (or `python test_all.py mar` to run the tests whose name
contains "mar"). Prints one line per test and ends with `N passed, N failed`; exits 1 on failure.
The tests run in two processes of one thread each (`main`), the longest first, since most of them
wait on one single-threaded `train.py` or `fid.py` at a time; the order of the lines varies.

Parity tests compare against `.ci/reference/mar_ref.pt`: tensors produced by running the official
LTH14/mar code (commit fe470ac: models/mar.py, models/diffloss.py, models/vae.py, diffusion/) in a
scratch virtualenv with timm 0.9.12 and torch 2.14.1, on CPU in float32 with `.cuda()` patched to a
no-op, on small configs (recorded in the file, with a README string) with random weights perturbed
so that the zero-initialised layers are not zero. Every official RNG draw was pinned: numpy orders
recorded and passed in, torch draws from seeded global generators, which our code reproduces from
a seeded torch.Generator. No official code is in this repository.
"""
import collections
import concurrent.futures
import contextlib
import copy
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import urllib.error

import numpy as np
import torch

import coda
import fid
import mar
import maskgit

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(HERE, ".ci", "reference")
_ref_cache = {}


def ref(name):
    if name not in _ref_cache:
        _ref_cache[name] = torch.load(os.path.join(REF, name), weights_only=True)
    return _ref_cache[name]


def assert_close(actual, expected, rtol=1e-5, what=""):
    """max |a - e| <= rtol * rms(e): every element within rtol of the tensor's typical value (its
    root mean square), not of its largest element, which an outlier could inflate; an elementwise
    relative test would be meaningless for values near zero."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, scale = (actual - expected).abs().max().item(), expected.pow(2).mean().sqrt().item()
    assert err <= rtol * max(scale, 1e-12), f"{what}: max error {err:.3g} > {rtol:g} * {scale:.3g}"


@torch.no_grad()
def perturbed(model, scale=0.05):
    """`model` with every parameter moved by N(0, scale^2) noise (seeded): zero-initialised layers
    (the denoiser's output, adaLN) then do not hide the network, whose outputs a test compares."""
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g).to(p.device) * scale)
    return model


def bf16_sampling_drift(model, device):
    """MAR samples of the same seed under bf16 autocast and in fp32 -> mean |bf16 - fp32| / mean |fp32|,
    after checking that the bf16 ones are finite float32 tokens."""
    samples = []
    for amp in (False, True):
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            samples.append(model.eval().sample_tokens(8, 4, cfg=2.0, labels=torch.arange(8, device=device),
                                                      generator=torch.Generator(device).manual_seed(3)))
    assert samples[1].dtype == torch.float32 and torch.isfinite(samples[1]).all()
    return ((samples[1] - samples[0]).abs().mean() / samples[0].abs().mean()).item()


def read(path, mode="r"):
    """The whole file at `path` (closed again at once)."""
    with open(path, mode) as f:
        return f.read()


def image(path):
    """The PIL image at `path`, in memory (its file closed again at once)."""
    from PIL import Image
    with Image.open(path) as im:
        return im.copy()


def raises(error, fn, *args):
    """Call fn(*args), which must raise `error`; -> the exception (to check its message)."""
    try:
        fn(*args)
    except error as e:
        return e
    raise AssertionError(f"{getattr(fn, '__name__', fn)} raised no {error.__name__}")


GPU_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # one thread each: two processes share 2 cores
ENV = dict(GPU_ENV, CUDA_VISIBLE_DEVICES="")  # the scripts of CPU tests see no GPU: on a GPU machine they check what CI does


def script_in(d, name, template):
    """Write `template` (a script that imports the repository from {here}) as d/name -> its path."""
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(template.format(here=HERE))
    return path


def run_script(script, *flags, nproc=1, check=True, timeout=600, env=None, gpu=False):
    """Run one of the repository's scripts as a user would: `python script ...`, or under torchrun
    with `nproc` gloo processes, in an empty working directory (default outputs never land in the repo);
    `env`: variables to set besides ENV; `gpu`: the script sees the machine's GPUs (the CUDA tests)."""
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    with tempfile.TemporaryDirectory() as cwd:
        p = subprocess.run(launch + [script] + [str(f) for f in flags], capture_output=True, text=True, env=dict(GPU_ENV if gpu else ENV, **(env or {})),
                           timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{os.path.basename(script)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def two_at_a_time(run, cases):
    """run(case) for independent cases, two at once (each run has one thread: two fill the 2 cores;
    most of a failing run is importing torch) -> the results, in the order of `cases`."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(run, cases))


def expect_error(p, text, prog):
    """A failed run printed one line, `<prog>: error: ...` containing `text`, and no traceback."""
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert p.returncode != 0, f"exited 0, expected an error containing {text!r}"
    assert lines and lines[-1].startswith(f"{prog}: error:") and text in lines[-1], p.stderr[-1000:]
    assert "Traceback" not in p.stderr, p.stderr[-1000:]


@contextlib.contextmanager
def offline_hub():
    """An empty torch hub cache and no network: every download raises URLError. Yields the cache dir."""
    hub_dir, download = torch.hub.get_dir(), torch.hub.download_url_to_file
    with tempfile.TemporaryDirectory() as d:
        torch.hub.set_dir(d)
        torch.hub.download_url_to_file = lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline"))
        try:
            yield d
        finally:
            torch.hub.set_dir(hub_dir)
            torch.hub.download_url_to_file = download


# ---------------------------------------------------------------------------------------------
# mar.py: parity with the official code
# ---------------------------------------------------------------------------------------------

def ref_vae():
    r = ref("mar_ref.pt")
    c = r["vae_config"]
    vae = mar.AutoencoderKL(c["embed_dim"], tuple(c["ch_mult"]), c["ch"], c["num_res_blocks"],
                            tuple(c["attn_resolutions"]), c["resolution"])
    vae.load_state_dict(r["vae_state_dict"], strict=True)
    return vae.eval(), r


def ref_mar():
    r = ref("mar_ref.pt")
    c = dict(r["mar_config"])
    c.pop("norm_eps")  # 1e-6 everywhere, as in every official preset
    model = mar.MAR(**c)
    model.load_state_dict(r["mar_state_dict"], strict=True)
    return model.eval(), r


def test_mar_vae_posterior_and_decode():
    # in float64: ours then adds almost no rounding, and what is left is the official fp32 run's (5e-6 of
    # the rms after the decoder). In fp32 the two roundings added up to 0.6-1.0e-5 on an AVX2 CPU,
    # depending on the thread count: a test of the CPU's kernels, not of the code.
    vae, r = ref_vae()
    vae = vae.double()
    with torch.no_grad():
        post = vae.encode(r["vae_x"].double())
        assert_close(post.moments, r["vae_moments"], what="moments")
        assert_close(post.mean, r["vae_mean"], what="mean")
        assert_close(post.std, r["vae_std"], what="std")
        assert_close(post.kl(), r["vae_kl"], what="kl")
        low = mar.DiagonalGaussian(post.moments.bfloat16())  # under CPU autocast: bf16 moments, the KL summed in fp32
        assert low.kl().dtype == torch.float32 and torch.equal(low.kl(), mar.DiagonalGaussian(low.moments.float()).kl())
        # the official draws from the global CPU generator seeded with 123
        assert_close(post.sample(torch.Generator().manual_seed(123)), r["vae_sample"], what="sample")
        assert_close(vae.decode(r["vae_z"].double()), r["vae_decoded"], what="decode")


def test_mar_decoding_on_a_cpu_goes_in_chunks_in_fp32_with_the_same_images():
    """On a CPU, latents of 256 px images are decoded 16 images at a time (a whole --eval-batch-size
    of 256 needs more memory than a 24 GiB machine has), 32 px ones all at once; the chunks give
    the images of a decode of the whole batch, up to float rounding, and so does a decode under
    bf16 autocast (sampling's): the decoder runs in fp32, whose output FID's uint8 images are
    rounded from (in bf16 a quarter of the pixels moved by a level)."""
    torch.manual_seed(0)
    vae, sizes = mar.kl16().eval(), []

    class Counted:  # a stand-in decoder that records its batch sizes
        stride = 16

        def decode(self, z):
            sizes.append(len(z))
            return torch.nn.functional.interpolate(z[:, :3], scale_factor=16)

    mar.latents_to_images(Counted(), torch.zeros(18, 16, 16, 16))   # 256 px
    mar.latents_to_images(Counted(), torch.zeros(100, 16, 2, 2))    # 32 px: the built-in runs' grids
    assert sizes == [16, 2, 100], sizes
    z = torch.randn(5, 16, 4, 4)  # the real decoder at 64 px, two images per chunk
    with torch.no_grad():
        whole, chunked = vae.decode(z), mar.decode_in_chunks(vae, z, pixels=2 * 64 * 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sampled = mar.latents_to_images(vae, z * mar.VAE_SCALE)
    assert (whole - chunked).abs().max() < 1e-4 * whole.abs().mean(), (whole - chunked).abs().max()
    assert sampled.dtype == torch.float32 and (whole.clamp(-1, 1) - sampled).abs().max() < 1e-4 * whole.abs().mean()


def test_mar_diffusion_schedules():
    r = ref("mar_ref.pt")
    for n in (10, 50, 100, 250):
        assert mar.respaced_timesteps(1000, n) == r[f"tmap_{n}"].tolist(), n
    train, gen = mar.GaussianDiffusion(1000), mar.GaussianDiffusion(100)
    assert_close(train.log_betas.double().exp(), r["train_betas"], rtol=1e-6, what="train betas")
    assert_close(gen.log_betas.double().exp(), r["gen100_betas"], rtol=1e-6, what="respaced betas")
    assert_close(gen.post_logvar, r["gen100_post_logvar"], rtol=1e-6, what="posterior log-variance")



def test_mar_snr_shift_for_pixel_tokens():
    """snr_shift k divides every step's signal-to-noise ratio by the same factor, about k (63.4 for
    64: the schedule is normalised by its value at s = 0), in the respaced schedule too; k = 1 is
    the official schedule (checked above). Training on pixels uses k = pixels per token."""
    import train
    snr = lambda d: d.sqrt_acp.double() ** 2 / d.sqrt_one_minus_acp.double() ** 2
    for steps in (1000, 100):
        ratio = snr(mar.GaussianDiffusion(steps)) / snr(mar.GaussianDiffusion(steps, snr_shift=64.0))
        assert 63 < ratio[0] <= 64 and (ratio / ratio[0] - 1).abs().max() < 1e-5, (steps, ratio)
    pixels = mar.Training(train.parse_args(["--model", "mar"]), 10, torch.device("cpu")).model.diffloss
    ratio = snr(mar.GaussianDiffusion(1000)) / snr(pixels.train_diffusion)   # 8x8 pixels per token
    assert 63 < ratio[0] <= 64 and (ratio / ratio[0] - 1).abs().max() < 1e-5

def test_mar_v_prediction_for_pixel_tokens():
    """With v_prediction the MLP's first output is v = sqrt(abar) eps - sqrt(1 - abar) x0: the true
    v converts back to the true eps at every step, its training MSE is the eps MSE / abar, and the
    pixel path (no VAE) uses it while the paper's latent path keeps eps."""
    import train
    g = torch.Generator().manual_seed(0)
    d, e = mar.GaussianDiffusion(1000, v_prediction=True), mar.GaussianDiffusion(1000)
    x0, noise, t = torch.randn(64, 12, generator=g), torch.randn(64, 12, generator=g), torch.arange(0, 1000, 1000 // 64)[:64]
    a, b = d.sqrt_acp[t][:, None], d.sqrt_one_minus_acp[t][:, None]
    x_t = d.q_sample(x0, t, noise)
    assert_close(d.to_eps(a * noise - b * x0, x_t, t), noise, rtol=1e-4, what="eps from the true v")
    pred = torch.randn(64, 12, generator=g)  # an imperfect MLP output: compare the MSE terms
    v_mse = ((a * noise - b * x0 - pred) ** 2).mean(1)
    eps_mse = ((noise - d.to_eps(pred, x_t, t)) ** 2).mean(1)
    assert_close(v_mse, eps_mse / a[:, 0] ** 2, rtol=1e-3, what="v MSE = eps MSE / abar")
    assert torch.equal(e.to_eps(pred, x_t, t), pred)
    # CFG on v is CFG on eps: one guided reverse step along the sampler's own path (guided_embedded,
    # then p_mean_logvar) against that step written out here from the two unguided v outputs
    dl, n, s = perturbed(mar.DiffLoss(12, 16, 2, 32, num_sampling_steps=10, snr_shift=64.0, v_prediction=True), 0.3), 4, 4.0
    gd, x = dl.gen_diffusion, torch.randn(n, 12, generator=g).repeat(2, 1)  # both halves share x_t
    y = dl.net.time_embed(gd.timestep_map[[6]]) + dl.net.cond_embed(torch.randn(2 * n, 16, generator=g))  # (2n, W)
    with torch.no_grad():
        mean = gd.p_mean_logvar(dl.net.guided_embedded(x, y, s), x, torch.full((2 * n,), 6))[0][:n].double()
        v = dl.net.forward_embedded(x, y)[:, :12].double()
    abar, abar_prev, xt = gd.sqrt_acp[6].double() ** 2, gd.sqrt_acp[5].double() ** 2, x[:n].double()

    def step_mean(scale):  # eps from each half's v, guided, then x0 and the posterior mean at x0
        eps = (1 - abar).sqrt() * x.double() + abar.sqrt() * v
        eps = eps[n:] + scale * (eps[:n] - eps[n:])
        x0 = (xt - (1 - abar).sqrt() * eps) / abar.sqrt()
        beta = 1 - abar / abar_prev
        return abar_prev.sqrt() * beta / (1 - abar) * x0 + (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar) * xt
    guidance = step_mean(s) - step_mean(1.0)  # what guidance moves: the error must be small against it
    assert guidance.norm() > 0.05 * step_mean(s).norm(), "the test's guidance is too weak to check"
    assert_close(mean - step_mean(1.0), guidance, rtol=1e-4, what="guided reverse-step mean (v-prediction)")
    pixels = mar.Training(train.parse_args(["--model", "mar"]), 10, torch.device("cpu")).model.diffloss
    assert pixels.train_diffusion.v_prediction and pixels.gen_diffusion.v_prediction
    assert not mar.mar_base().diffloss.train_diffusion.v_prediction


def test_mar_pixel_denoiser_mixes_per_pixel_features():
    """PixelDenoiser (pixel tokens only, not in the paper), written out here pixel by pixel: token
    value c P + p is pixel p's channel c, in the input and in both outputs (eps or v, then the
    variance); y reaches every pixel's features; each block adds a gated linear mix across the
    pixels, then a gated MLP on each pixel's features, each after its own adaLN. The pixel path uses
    it with 8 features and 2 blocks; Diffusion Loss on latents keeps the official MLP."""
    import train
    g, N, P, h = torch.Generator().manual_seed(0), 5, 4, 8
    with torch.no_grad():
        net = perturbed(mar.PixelDenoiser(3 * P, 32, 16, 2, channels=h), 0.3)
    x, y = torch.randn(N, 3 * P, generator=g), torch.randn(N, 32, generator=g)
    lin = lambda m, v: v @ m.weight.T + m.bias
    pixels = torch.stack([x[:, [c * P + p for c in range(3)]] for p in range(P)], 1)  # (N, P, 3)
    silu, norm = torch.nn.functional.silu, lambda m, v: torch.nn.functional.layer_norm(v, (h,), m.weight, m.bias, 1e-6)
    f = lin(net.input_proj, pixels) + net.pos + lin(net.cond_pixels, silu(y)).view(N, P, h)  # (N, P, h)
    for b in net.res_blocks:
        s1, c1, g1, s2, c2, g2 = lin(b.adaLN_modulation[1], silu(y))[:, None].chunk(6, -1)
        u = norm(b.norm1, f) * (1 + c1) + s1
        f = f + g1 * torch.stack([sum(b.mix.weight[p, q] * u[:, q] for q in range(P)) + b.mix.bias[p] for p in range(P)], 1)
        f = f + g2 * lin(b.mlp[2], silu(lin(b.mlp[0], norm(b.norm2, f) * (1 + c2) + s2)))
    s, c = lin(net.final_modulation[1], silu(y))[:, None].chunk(2, -1)
    out = lin(net.linear, norm(net.norm_final, f) * (1 + c) + s)  # (N, P, 6)
    expect = torch.stack([out[:, p, c] for c in range(6) for p in range(P)], 1)  # (N, 2 * 3 P): token layout
    with torch.no_grad():
        assert_close(net.forward_embedded(x, y), expect, rtol=1e-5, what="PixelDenoiser pixel by pixel")
    built = mar.Training(train.parse_args(["--model", "mar"]), 10, torch.device("cpu")).model.diffloss.net
    assert isinstance(built, mar.PixelDenoiser) and len(built.res_blocks) == 2 and built.cond_pixels.out_features == 64 * 8
    assert type(mar.DiffLoss(16, 32, 3, 64).net) is mar.SimpleMLPAdaLN


def test_mar_pixel_tokenizer_is_exact_and_its_cleanup_removes_grain():
    """PixelTokenizer (the built-in tokens): token (2 qa + pa, 2 qb + pb) holds the pixels (16 qa + 2i
    + pa, 16 qb + 2j + pb) of a 32 px image, phase (pa, pb) of the 16 x 16 region (qa, qb); 4 phases
    give polyphase tokens (a + 4i, b + 4j), 1 patches. Untrained, decode is the exact inverse of
    encode. A short fit of its clean-up decoder on real images brings held-out images whose tokens
    got MAR-like errors (`corrupt`) closer to the originals, and their roughness (luma steps) toward
    the real images'. Its lattice error moves a region's phases and keeps the region's level; its
    region error moves a whole region (the panes), and the decoder is told where the regions are."""
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the decoder's initial weights, whatever ran before
        tok = mar.PixelTokenizer(8)
    x = fid.to_tensor(fid.toy_images(32, num_images=1000, seed=3))
    z = tok.encode(x[:20])                                                     # (20, 192, 4, 4)
    assert z.shape == (20, 192, 4, 4) and mar.mar_tiny().token_embed_dim == tok.embed_dim
    assert torch.equal(z[:, :, 3, 1].reshape(20, 3, 8, 8), x[:20, :, 17::2, 1:16:2])   # region (1, 0), phase (1, 1)
    assert torch.equal(z[:, :, 0, 2].reshape(20, 3, 8, 8), x[:20, :, 0:16:2, 16::2])   # region (0, 1), phase (0, 0)
    assert torch.equal(mar.PixelTokenizer(8, 4).encode(x[:20])[:, :, 1, 2].reshape(20, 3, 8, 8), x[:20, :, 1::4, 2::4])
    assert torch.equal(mar.PixelTokenizer(8, 1).encode(x[:20])[:, :, 1, 2].reshape(20, 3, 8, 8), x[:20, :, 8:16, 16:24])
    assert torch.equal(tok.decode(z), x[:20])
    train_set, test_set = x[:800], x[800:]
    g = torch.Generator().manual_seed(0)
    exact, h = dict(offset=0, noise=0, specks=0, lattice=0, region=0), torch.Generator().manual_seed(1)
    assert torch.equal(tok.corrupt(x[:20], h, moved=0, **exact), z)
    lattice = (tok.corrupt(x[:20], h, moved=0, offset=0, noise=0, specks=0, region=0) - z).view(20, 3, 64, 4, 4)
    assert_close(lattice, lattice[:, :, :1].expand_as(lattice), what="one offset per token and channel")
    levels = lattice[:, :, 0].reshape(20, 3, 2, 2, 2, 2)                      # (B, C, qa, pa, qb, pb)
    assert levels.mean((3, 5)).abs().max() < 1e-5 < 0.1 < levels.abs().mean()  # each region's level kept, its phases moved
    panes = tok.unshuffle(tok.corrupt(x[:20], h, moved=0, **{**exact, "region": 0.4})) - x[:20]  # (20, 3, 32, 32)
    pane = panes.view(20, 3, 2, 16, 2, 16)[:, :, :, :1, :, :1]                                  # one value per region
    assert_close(panes.view(20, 3, 2, 16, 2, 16), pane.expand(-1, -1, -1, 16, -1, 16), what="one offset per region")
    assert 0.05 < pane.abs().mean() < 0.4 and (pane - pane.mean((2, 4), keepdim=True)).abs().mean() > 0.05  # regions differ
    where = tok.place(x[:1])                                                                  # (1, 2, 32, 32): row, column
    assert torch.equal(where[0, 0, :, 0], where[0, 1, 0, :]) and torch.equal(where[0, 0, :16, 5], where[0, 0, 16:, 9])
    assert where[0, 0, 0, 0] == -where[0, 0, 15, 0] == -15 / 16 and torch.equal(where[0, 0].T, where[0, 1])
    moved = tok.corrupt(x[:20], h, moved=1, **exact)  # every token taken from the image moved by <= 1 pixel
    pad = torch.nn.functional.pad(x[:20], (1, 1, 1, 1), mode="replicate")
    shifts = torch.stack([tok.encode(pad[:, :, 1 + i: 33 + i, 1 + j: 33 + j]) for i in (-1, 0, 1) for j in (-1, 0, 1)])
    which = (moved[None] == shifts).all(2)                                     # (9, 20, 4, 4): which move each token is
    assert which.any(0).all() and which[4].float().mean() < 0.3              # each a move, most not the identity
    noisy = tok.corrupt(test_set, g)
    with torch.no_grad():
        before = tok.decode(noisy)
    opt = torch.optim.Adam(tok.to(memory_format=torch.channels_last).parameters(), 3e-3)
    for _ in range(300):  # in train.py's precision (bf16 autocast on a CPU with bf16 instructions)
        with mar.autocast(torch.device("cpu")):
            loss = tok.cleanup_loss(train_set[torch.randint(800, (16,), generator=g)], g)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = tok.decode(noisy)
    err = lambda y: (y - test_set).pow(2).mean().item()
    rough = lambda y: fid.token_steps(y)[2]
    assert err(after) < 0.5 * err(before), (err(before), err(after))                # 0.31 x when written
    assert rough(after) - rough(test_set) < 0.7 * (rough(before) - rough(test_set)), (  # 0.24 x
        rough(test_set), rough(before), rough(after))


def test_mar_denoiser_output():
    model, r = ref_mar()
    with torch.no_grad():
        assert_close(model.diffloss.net(r["dn_x"], r["dn_t"], r["dn_c"]), r["dn_out"], what="net")
        assert_close(model.diffloss.net.forward_with_cfg(r["dn_x"], r["dn_t"], r["dn_c"], 2.5), r["dn_cfg_out"], what="cfg")


def test_mar_per_token_training_loss():
    model, r = ref_mar()
    with torch.no_grad():
        loss = model.diffloss.train_diffusion.training_losses(model.diffloss.net, r["tl_target"], r["tl_t"],
                                                              r["tl_z"], r["tl_noise"])
    assert_close(loss, r["tl_loss"], what="loss = mse + vb (t = 0, 1, 500, 999 included)")


def test_mar_condition_vectors():
    model, r = ref_mar()
    visible = torch.argsort(r["cond_mask"], dim=1, stable=True)[:, :16 - 11]  # known positions, increasing
    tokens, labels = r["cond_tokens"], r["cond_labels"]
    with torch.no_grad():
        z = model.forward_mae_decoder(model.forward_mae_encoder(tokens, visible, model.class_embedding(labels)), visible)
        assert_close(z, r["cond_z"], what="z")
        emb = torch.cat([model.class_embedding(labels), model.fake_latent.expand(3, -1)])  # CFG: [cond; uncond]
        z = model.forward_mae_decoder(model.forward_mae_encoder(tokens.repeat(2, 1, 1), visible.repeat(2, 1), emb),
                                      visible.repeat(2, 1))
        assert_close(z, r["cond_z_cfg"], what="z with CFG")
        emb = model.class_embedding(labels, drop=r["cond_drop"])  # training label dropout
        z = model.forward_mae_decoder(model.forward_mae_encoder(tokens, visible, emb), visible)
        assert_close(z, r["cond_z_drop"], what="z with label drop")


def test_mar_training_loss_value():
    model, r = ref_mar()
    target = model.patchify(r["loss_latents"])
    assert_close(target, r["loss_patchified"], rtol=0, what="patchify")
    assert torch.equal(model.unpatchify(target), r["loss_latents"])
    orders, M = r["loss_orders"], r["loss_num_masked"]
    masked, visible = orders[:, :M].sort(1).values, orders[:, M:].sort(1).values
    # the official draws t and noise for every (repeat, sample, token) row and zero-weights the
    # visible ones; we only compute the masked rows, so pick the same draws for them
    mask = torch.zeros(3, 16).scatter(1, masked, 1.0).reshape(-1).repeat(2).bool()
    with torch.no_grad():
        z = model.forward_mae_decoder(model.forward_mae_encoder(target, visible, model.class_embedding(r["loss_labels"])), visible)
        loss = model.forward_loss(z, target, masked, t=r["loss_t"][mask], noise=r["loss_noise"][mask])
    assert_close(loss, r["loss_value"], what="loss")


def test_mar_loss_fraction_scores_a_random_share_of_the_masked_tokens():
    """loss_fraction < 1 (the CPU recipe): Diffusion Loss on the first ceil(M f) tokens of the random order,
    the same value as forward_loss on them with the same draws; the denoiser sees only those rows."""
    model, r = ref_mar()
    target, labels = model.patchify(r["loss_latents"]), r["loss_labels"]
    seen = []
    model.diffloss.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    for frac, scored in ((1.0, 13), (0.5, 7), (0.25, 4)):
        model.loss_fraction = frac
        torch.manual_seed(0)  # eval(): no label dropout draw, no dropout
        loss = model(r["loss_latents"], labels, num_masked=13)
        torch.manual_seed(0)  # the same draws, in the same order, by hand
        orders = model.sample_orders(3, target.device)
        visible = orders[:, 13:].sort(1).values
        z = model.forward_mae_decoder(model.forward_mae_encoder(target, visible, model.class_embedding(labels)), visible)
        expect = model.forward_loss(z, target, orders[:, :scored].sort(1).values)
        assert_close(loss, expect, rtol=1e-6, what=f"loss at fraction {frac}")
        assert seen[-2:] == [3 * scored * model.diffusion_batch_mul] * 2, (frac, seen[-2:])


def test_mar_last_decoder_block_and_first_sampling_step_skip_only_unread_work():
    """The last decoder block computes only the rows Diffusion Loss reads, with the same z and the
    same gradients as computing every row; sampling with CFG runs its first step (nothing known, so
    every unconditional row is the same) on B + 1 rows instead of 2B. Sampling's values are checked
    against the official code by test_mar_sample_tokens_end_to_end."""
    model, r = ref_mar()
    model = perturbed(model)
    target, labels = model.patchify(r["loss_latents"]), r["loss_labels"]
    orders = model.sample_orders(3, generator=torch.Generator().manual_seed(0))
    visible, scored = orders[:, 11:].sort(1).values, orders[:, :7].sort(1).values
    seen = []
    model.decoder_blocks[-1].mlp.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    zs, grads = [], []
    for keep in (None, scored):
        z = model.forward_mae_decoder(model.forward_mae_encoder(target, visible, model.class_embedding(labels)),
                                      visible, keep=keep)
        zs.append(z if keep is not None else mar.gather_rows(z, scored))  # (3, 7, 64)
        model.zero_grad()
        (zs[-1] * torch.linspace(-1, 1, zs[-1].numel()).reshape(zs[-1].shape)).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    assert_close(zs[1], zs[0], rtol=1e-4, what="z of the kept rows")  # other matrix shapes: other rounding
    assert seen == [(3, 4 + 16, 64), (3, 7, 64)], seen  # buffer 4 + 16 tokens, then the 7 scored rows alone
    # the kept path sums the gradients in another order; elements reach 48x their rms, so fp32 rounding
    # reaches 7e-6 of the rms on this Intel CPU (another CPU's kernels round differently); a lost row is O(1)
    assert_close(grads[1], grads[0], rtol=1e-4, what="gradients")
    rows = []
    model.encoder_blocks[0].register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    with torch.no_grad():
        model.sample_tokens(2, 4, cfg=3.0, labels=torch.tensor([3, 7]), generator=torch.Generator().manual_seed(1))
        model.sample_tokens(2, 4, cfg=1.0, labels=torch.tensor([3, 7]), generator=torch.Generator().manual_seed(1))
    assert rows == [3, 4, 4, 4] + [2] * 4, rows


def test_mar_sampling_casts_each_weight_once_and_gathers_no_schedule_term():
    """Under autocast, the reverse diffusion casts each Linear's weight and bias once per token
    batch, not at each step: autocast caches no cast in a CUDA graph capture, nor for weights
    without grad (the EMA's, as here). The samples equal those of casting at every call. The
    schedule terms are views of one step, not gathers, and on the CUDA path (the noises drawn
    first) the time embedding runs once for all steps. Fewer kernels in every captured step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append((func.__name__.split(".")[0], args[0] if args else None))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    d = perturbed(mar.DiffLoss(16, 32, 2, 64, num_sampling_steps=10)).requires_grad_(False)
    layers = [m for m in d.net.modules() if type(m) is torch.nn.Linear and m is not d.net.cond_embed]  # once per batch
    linear = {m.weight.data_ptr() for m in layers} | {m.bias.data_ptr() for m in layers}
    z, noises = torch.randn(8, 32, generator=g), torch.randn(10, 8, 16, generator=g)
    noise, once = noises[0, :4].repeat(2, 1), mar.linears_cast_once
    out = {}
    for cast_once in (True, False):
        mar.linears_cast_once = once if cast_once else lambda module, device_type: contextlib.nullcontext()
        try:
            for path in ("seeded", "cuda"):
                ops = []
                with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), Ops():
                    c = d.net.cond_embed(z)  # (8, 64)
                    ops.clear()
                    out[cast_once, path] = (d.sample(z, 0.9, 2.0, torch.Generator().manual_seed(1)) if path == "seeded"
                                            else d.loop(noise, c, torch.tensor(2.0), True, 0.9, noises=noises))
                casts = collections.Counter(t.data_ptr() for name, t in ops if name == "_to_copy" and t.data_ptr() in linear)
                if cast_once:
                    assert set(casts) == linear and set(casts.values()) == {1}, f"{path}: casts {sorted(casts.values())}"
                    assert not [name for name, _ in ops if name in ("index", "gather")], f"{path}: a gathered schedule term"
                    trig = sum(name == "cos" for name, _ in ops)
                    assert trig == (10 if path == "seeded" else 1), f"{path}: {trig} time embeddings for 10 steps"
                else:
                    assert max(casts.values()) == 10, sorted(casts.values())  # autocast: at every step
        finally:
            mar.linears_cast_once = once
    for path in ("seeded", "cuda"):
        assert torch.equal(out[True, path], out[False, path]), f"{path}: casting once changed the samples"
    assert out[True, "seeded"].abs().mean() > 0.1, "nothing was sampled"
    real_to, casts = torch.Tensor.to, []

    def fails_at_the_fifth(t, *args, **kwargs):  # a cast that fails part way (out of memory)
        casts.append(t)
        if len(casts) == 5:
            raise RuntimeError("out of memory")
        return real_to(t, *args, **kwargs)

    torch.Tensor.to = fails_at_the_fifth
    try:
        with torch.autocast("cpu", torch.bfloat16), mar.linears_cast_once(d.net, "cpu"):
            pass
    except RuntimeError:
        pass
    finally:
        torch.Tensor.to = real_to
    assert len(casts) == 5 and not [m for m in d.net.modules() if "forward" in m.__dict__], "a layer kept its cast weights"


def test_mar_one_reverse_step():
    model, r = ref_mar()
    gen, net, x, z = model.diffloss.gen_diffusion, model.diffloss.net, r["step_x"], r["step_z"]
    assert gen.timestep_map.tolist() == r["tmap_10"].tolist()
    for j in (0, 5, 9):
        for cfg, fn, key in ((3.0, lambda x_, t_: net.forward_with_cfg(x_, t_, z, 3.0), "step_out_cfg"),
                             (1.0, lambda x_, t_: net(x_, t_, z), "step_out")):
            t = torch.full((8,), j)
            with torch.no_grad():
                mean, logvar = gen.p_mean_logvar(fn(x, gen.timestep_map[t]), x, t)
            out = mean + (j != 0) * torch.exp(0.5 * logvar) * r["step_noise"] * 0.9
            assert_close(out, r[f"{key}_j{j}"], what=f"{key} j={j}")
    # and the full reverse loop reproduces the official global-RNG draws from a seeded generator
    with torch.no_grad():
        assert_close(model.diffloss.sample(r["ds_z"], 0.95, 2.0, torch.Generator().manual_seed(7)), r["ds_out_cfg"], what="cfg loop")
        assert_close(model.diffloss.sample(r["ds_z"], 0.95, 1.0, torch.Generator().manual_seed(8)), r["ds_out"], what="loop")


def test_mar_sample_tokens_end_to_end():
    model, r = ref_mar()
    for k in (1, 2, 3):
        a = r[f"st{k}_args"]
        tokens = model.sample_tokens(2, a["num_iter"], a["cfg"], a["cfg_schedule"], torch.tensor(a["labels"]),
                                     a["temperature"], generator=torch.Generator().manual_seed(a["seed"]),
                                     orders=r[f"st{k}_orders"])
        assert_close(tokens, r[f"st{k}_tokens"], what=f"st{k}")


def test_mar_sampling_schedule():
    r = ref("mar_ref.pt")
    for L, n in ((16, 1), (16, 4), (16, 16), (64, 8), (64, 64), (256, 16), (256, 32), (256, 64), (256, 256)):
        steps = mar.sampling_schedule(L, n, cfg=3.0, cfg_schedule="linear")
        assert [b - a for b, a, _ in steps] == r[f"sched_{L}_{n}_count"].tolist(), (L, n)
        assert_close(torch.tensor([s for *_, s in steps]), r[f"sched_{L}_{n}_cfg"], what=f"cfg {L} {n}")
    assert all(s == 2.0 for *_, s in mar.sampling_schedule(256, 16, 2.0, "constant"))


def test_mar_official_layouts_and_param_counts():
    r = ref("mar_ref.pt")
    for name, build in (("kl16", mar.kl16), ("mar_base", mar.mar_base), ("mar_large", mar.mar_large),
                        ("mar_huge", mar.mar_huge)):
        with torch.device("meta"):
            model = build()
        layout = [[k, list(v.shape)] for k, v in model.state_dict().items()]
        assert layout == [list(x) for x in r[f"layout_{name}"]], f"{name}: keys/shapes/order differ from official"
        assert sum(p.numel() for p in model.parameters()) == r[f"nparams_{name}"]
    assert r["nparams_mar_base"] == 207_924_768 and r["nparams_mar_large"] == 478_326_304
    assert r["nparams_mar_huge"] == 942_403_104


def test_mar_strict_load_official_layouts():
    model, r = ref_mar()
    with tempfile.TemporaryDirectory() as d:
        # MAR checkpoint-last.pth layout: model, model_ema, optimizer, epoch, args (a Namespace)
        import argparse
        sd = r["mar_state_dict"]
        ema = {k: v + 1 for k, v in sd.items()}
        path = os.path.join(d, "checkpoint-last.pth")
        torch.save({"model": sd, "model_ema": ema, "optimizer": {}, "epoch": 799, "scaler": {},
                    "args": argparse.Namespace(model="mar_base", cfg=2.9)}, path)
        fresh = ref_mar()[0]
        mar.load_weights(fresh, path, "model_ema")
        assert torch.equal(fresh.z_proj.weight, ema["z_proj.weight"])
        mar.load_weights(fresh, path, "model")
        assert torch.equal(fresh.z_proj.weight, sd["z_proj.weight"])
        # kl16.ckpt layout: {'model': state_dict}
        vpath = os.path.join(d, "kl.ckpt")
        torch.save({"model": r["vae_state_dict"]}, vpath)
        other = perturbed(ref_vae()[0])  # other weights: a load that did nothing would fail below
        mar.load_weights(other, vpath, "model")
        assert all(torch.equal(v, r["vae_state_dict"][k]) for k, v in other.state_dict().items())


def test_mar_wrong_or_truncated_checkpoints_raise_one_line():
    model, r = ref_mar()
    vae, _ = ref_vae()
    with tempfile.TemporaryDirectory() as d:
        path, vpath, sd = os.path.join(d, "checkpoint-last.pth"), os.path.join(d, "kl.ckpt"), r["mar_state_dict"]
        torch.save({"model": r["vae_state_dict"]}, vpath)
        bad = dict(sd)
        bad.pop("mask_token")
        bad["extra.weight"] = torch.zeros(1)
        torch.save({"model": bad}, path)
        for p, key, expect in ((path, "model", "missing (first: mask_token)"), (path, "model_ema", "no 'model_ema' entry"),
                               (vpath, "model", "does not match MAR")):
            e = raises(ValueError, mar.load_weights, model, p, key)
            assert expect in str(e) and "\n" not in str(e), str(e)
        # a truncated file
        with open(vpath, "rb") as f:
            data = f.read()
        with open(vpath, "wb") as f:
            f.write(data[: len(data) // 2])
        assert "not a readable checkpoint" in str(raises(ValueError, mar.load_weights, vae, vpath, "model"))
        with open(vpath, "w") as f:
            f.write("hello")  # a text file: the unpickler's KeyError(101) said only "101"
        assert str(raises(ValueError, mar.load_weights, vae, vpath, "model")).endswith(": not a file that torch.save wrote")


def test_mar_sampling_seed_fixes_output():
    torch.manual_seed(0)
    model = perturbed(mar.mar_tiny(num_sampling_steps=10)).eval()  # the order and the network then matter
    labels = torch.tensor([1, 5])
    run = lambda seed: model.sample_tokens(2, 4, cfg=2.0, labels=labels, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b), "same seed, different images"
    assert (a - c).abs().max() > 1e-3, "different seeds, same images"


def test_mar_mask_ratio_distribution():
    # truncated Gaussian N(1, 0.25^2) on [0.7, 1]: mean 0.8673, std 0.0835 (scipy truncnorm)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = torch.tensor([mar.mask_ratio_from_uniform(x) for x in u[:4000]])
    assert r.min() >= 0.7 and r.max() <= 1.0
    assert abs(r.mean().item() - 0.8673) < 0.005 and abs(r.std().item() - 0.0835) < 0.005, (r.mean(), r.std())


def test_mar_training_step_learns():
    """A few optimizer steps on a fixed batch lower the loss, and gradients reach every parameter."""
    torch.manual_seed(0)
    model = mar.mar_tiny(num_sampling_steps=10)
    x, y = torch.randn(8, 192, 4, 4) * 0.5, torch.randint(0, 10, (8,))  # PixelTokenizer's tokens
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for i in range(30):
        torch.manual_seed(i % 2)  # two fixed draws of mask/t/noise
        loss = model(x, y)
        loss.backward()
        if i == 0:
            no_grad = [n for n, p in model.named_parameters() if p.grad is None]
            assert not no_grad, f"no gradient: {no_grad[:5]}"
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses



def test_mar_compiled_training_step_has_no_graph_break_and_stops_recompiling():
    """--compile: the mask size is drawn outside the model (`draw_num_masked`), so dynamo traces the
    whole training forward as one graph, static as train.py compiles it (dynamic=False). Warm-up
    compiles one graph per mask size (MAR-tiny at 32 px: 12 to 16 of 16 tokens, the 0 and 1
    known-token edge cases among them); after that no size compiles again. The compiled loss
    equals the eager one."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = perturbed(mar.mar_tiny(num_sampling_steps=10))  # the loss then depends on the whole network
    compiled = torch.compile(model, backend="eager", dynamic=False)  # dynamo only: no C++ compiler needed
    x, y = torch.randn(4, 192, 4, 4), torch.randint(0, 10, (4,))
    sizes = {model.draw_num_masked(mar.COMPILE_BUCKETS) for _ in range(200)}
    assert sizes == {12, 13, 14, 15, 16}, sizes
    for n in sorted(sizes):  # warm-up
        compiled(x, y, n).backward()
    graphs = counters["stats"]["unique_graphs"]
    for n in (13, 12, 16, 15, 14):
        with torch.random.fork_rng():
            eager = model(x, y, n)
        assert_close(compiled(x, y, n), eager, rtol=1e-5, what=f"compiled loss, {n} masked")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs <= 5 and counters["stats"]["unique_graphs"] == graphs, (graphs, dict(counters["stats"]))
    torch._dynamo.reset()


def test_mar_compile_buckets_keep_the_mask_size_mean():
    """Under --compile a 256-token model's mask sizes (180 to 256, Sec. 4.2) are rounded at random
    to 6 evenly spaced values, up or down in proportion to the distance: the mean stays the paper's."""
    m = types.SimpleNamespace(seq_len=256, mask_ratio_min=0.7)
    m.mask_sizes = lambda buckets=None: mar.MAR.mask_sizes(m, buckets)
    assert m.mask_sizes(6) == [180, 195, 210, 226, 241, 256] and m.mask_sizes() == list(range(180, 257))
    torch.manual_seed(0)
    plain = torch.tensor([mar.MAR.draw_num_masked(m) for _ in range(20000)], dtype=torch.float64)
    bucketed = torch.tensor([mar.MAR.draw_num_masked(m, 6) for _ in range(20000)], dtype=torch.float64)
    assert set(bucketed.tolist()) == {180, 195, 210, 226, 241, 256}, set(bucketed.tolist())
    assert 220 < plain.mean() < 226 and abs(bucketed.mean() - plain.mean()) < 0.6, (plain.mean(), bucketed.mean())
    assert bucketed.std() > plain.std(), "rounding to a grid spreads the sizes, never narrows them"
    # in proportion, not to the nearest: on a grid of one step over the whole range the mean still holds
    m.mask_sizes = lambda buckets=None: [180, 256] if buckets else list(range(180, 257))
    coarse = torch.tensor([mar.MAR.draw_num_masked(m, 2) for _ in range(20000)], dtype=torch.float64)
    assert abs(coarse.mean() - plain.mean()) < 1.0, (coarse.mean(), plain.mean())  # the nearest: 225.6 against 222.7


def test_mar_tiny_positions_start_at_the_2d_sincos_table():
    """The tiny preset's token positions start at a 2-D sin-cos table (MAE's, the row's half first),
    whose dot products depend only on the offset between two tokens and fall with distance; the
    buffer and every paper configuration keep the official N(0, 0.02)."""
    table = mar.sincos_2d(96, 8)                                  # (64, 96)
    gram = table @ table.T
    at = lambda r, c: r * 8 + c
    assert torch.allclose(gram[at(0, 0), at(1, 2)], gram[at(3, 3), at(4, 5)], atol=1e-4)   # offset (1, 2) twice
    assert gram[at(2, 2), at(2, 3)] > gram[at(2, 2), at(2, 5)] > gram[at(2, 2), at(2, 7)]  # farther: less alike
    assert abs(table[at(0, 0)].norm().item() ** 2 - 48) < 1e-3                 # sin^2 + cos^2 per pair: unit scale
    for tiny in (mar.mar_tiny(), mar.mar_tiny(vae_stride=4, vae_embed_dim=51)):  # 4x4 tokens (the preset), 8x8
        side = tiny.seq_h
        for p in (tiny.encoder_pos_embed_learned, tiny.decoder_pos_embed_learned, tiny.diffusion_pos_embed_learned):
            assert torch.equal(p[0, -side * side:], mar.sincos_2d(96, side))
    omega = 1.0 / 10000 ** (torch.arange(24, dtype=torch.float64) / 24)
    enc = lambda p: torch.cat([torch.sin(p * omega), torch.cos(p * omega)])
    assert_close(table[at(3, 5)], torch.cat([enc(3.0), enc(5.0)]).float(), 1e-6, "row 3, column 5: the row's half first")
    assert 0.017 < tiny.encoder_pos_embed_learned[0, :4].std() < 0.023         # the 4 buffer slots: N(0, 0.02)
    paper_init = mar.mar_tiny(sincos_init=False)
    assert 0.018 < paper_init.decoder_pos_embed_learned.std() < 0.022

def test_mar_bf16_only_on_gpus_with_native_bf16():
    """A V100 emulates bf16 (slowly): MAR and MaskGIT train there in fp32; an A100 or H100 in bf16.
    On a CPU, oneDNN's test decides; a torch without that (private) op trains in fp32."""
    saved, ops = torch.cuda.is_bf16_supported, torch.ops.mkldnn
    try:
        for native, expect in ((False, False), (True, True)):  # V100: bf16 only with emulation counted
            torch.cuda.is_bf16_supported = lambda including_emulation=True, native=native: native or including_emulation
            assert mar.bf16_autocast(torch.device("cuda")) == expect, native
        for answer, expect in ((True, True), (False, False)):
            torch.ops.mkldnn = types.SimpleNamespace(_is_mkldnn_bf16_supported=lambda answer=answer: answer)
            assert mar.bf16_autocast(torch.device("cpu")) == expect, answer
        torch.ops.mkldnn = types.SimpleNamespace()  # the op gone
        assert mar.bf16_autocast(torch.device("cpu")) is False
    finally:
        torch.cuda.is_bf16_supported, torch.ops.mkldnn = saved, ops


def test_mar_grad_checkpointing_and_bf16_autocast():
    """Gradient checkpointing changes memory, not results; under bf16 autocast (train.py's training
    steps and grids on a bf16 CPU) the loss stays close to fp32, and sampling from the same seed keeps
    its float32 diffusion state and float32 tokens close to fp32's."""
    torch.manual_seed(0)
    model = perturbed(mar.mar_tiny(num_sampling_steps=5))
    x, y = torch.randn(4, 192, 4, 4) * 0.5, torch.randint(0, 10, (4,))
    grads, calls, real = [], [], mar.checkpoint
    mar.checkpoint = lambda block, *a, **k: calls.append(block) or real(block, *a, **k)  # counted
    try:
        for ckpt in (False, True):
            model.grad_checkpointing = model.diffloss.net.grad_checkpointing = ckpt
            torch.manual_seed(1)
            model(x, y).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            model.zero_grad()
            blocks = [*model.encoder_blocks, *model.decoder_blocks, *model.diffloss.net.res_blocks]
            assert calls == (blocks if ckpt else []), (ckpt, len(calls))  # every block, once, only when asked
    finally:
        mar.checkpoint = real
    assert_close(grads[1], grads[0], rtol=1e-5, what="gradients with checkpointing")
    torch.manual_seed(1)
    ref_loss = model(x, y)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, y)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss.item()) < 0.05 * ref_loss.item()
    drift = bf16_sampling_drift(model, "cpu")
    assert 0 < drift < 0.1, f"bf16 samples differ from fp32's by {drift:.3f} of their mean size (0: no bf16)"


def test_mar_attention_on_a_bf16_cpu_avoids_the_flash_kernel_and_matches_fp32():
    """Under CPU bf16 autocast `mar.attention` (MAR's and MaskGIT's) avoids SDPA's CPU flash kernel,
    whose bf16 backward is slow at short sequences (it writes the product out, softmax in fp32);
    outputs and gradients stay those of fp32 SDPA."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 31, 32, generator=g, requires_grad=True) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mar.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert "Flash" not in out.grad_fn.name() and out.dtype == torch.bfloat16, out.grad_fn.name()
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert_close(out.float(), ref, rtol=5e-2, what="bf16 attention")  # bf16 inputs: 2-3% at most
    for a, b in zip(grads, ref_grads):  # relative to the whole gradient: bf16 rounds a few elements by 8%
        assert (a - b).norm() < 0.02 * b.norm(), f"bf16 attention gradients off by {(a - b).norm() / b.norm():.1%}"
    assert "Flash" in torch.nn.functional.scaled_dot_product_attention(q, k, v).grad_fn.name()  # fp32: SDPA's own choice, unchanged


def test_mar_keep_freed_memory_stops_page_faults_of_repeated_steps():
    """A step that allocates and frees the same 128 MiB of tensors over and over page-faults them in
    again every time under glibc's static defaults (8 MiB blocks above the 128 KiB mmap threshold:
    a fresh mmap each); after `keep_freed_memory` it reuses them. The defaults are set explicitly:
    glibc's dynamic threshold sometimes absorbed the blocks already (about 1 run in 6 saw no faults
    before the call), and a no-op call must fail. In a fresh process (this one may have called it
    already); counts of minor page faults of 4 KiB."""
    code = """if True:
        import ctypes, resource, sys, torch, mar
        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(10):  # a step: sixteen 8 MiB activations, freed at its end
                x = [torch.ones(2 << 20) for _ in range(16)]
                del x
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD: glibc's default, fixed
        except (OSError, AttributeError):
            pass
        faults(); default = faults()
        applied = mar.keep_freed_memory()
        faults(); kept = faults()
        print(applied, default, kept)"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=HERE, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    applied, default, kept = p.stdout.split()
    if applied == "False":
        raise Skip("not glibc: keep_freed_memory changes nothing here")
    assert int(default) > 10 * 16 * 1024 and int(kept) < 100, f"page faults of 10 steps: {default} by default, {kept} after"


def test_mar_benchmarks_on_a_cpu_use_sizes_that_fit_its_memory():
    """Without size flags, `python mar.py --bench` on a CPU times batch 8 and one 8-step sampling
    run of 8 images (the README's CPU figures), `python maskgit.py --bench` batch 4 and 8 steps of
    4 images: at the GPU sizes MAR-B (batch 64) needs about 24 GiB and was killed for memory on a
    24 GiB machine, and MaskGIT-L peaked at 13 GiB already at batch 4. The tiny presets here; the
    sizes are the same."""
    out = run_script(os.path.join(HERE, "mar.py"), "--bench", "--preset", "tiny").stdout
    assert "training:" in out and "(batch 8," in out, out
    sampling = [line for line in out.splitlines() if line.startswith("sampling:")]
    assert len(sampling) == 1 and "(num_iter 8," in sampling[0] and "batch 8," in sampling[0], out
    out = run_script(os.path.join(HERE, "maskgit.py"), "--bench", "--preset", "tiny").stdout
    assert "training:" in out and "(batch 4)" in out, out
    generation = [line for line in out.splitlines() if line.startswith("generation:")]
    assert len(generation) == 1 and "(8 steps," in generation[0] and "batch 4," in generation[0], out


# ---------------------------------------------------------------------------------------------
# coda.py: parity with the official LeapLabTHU/CODA modules
# ---------------------------------------------------------------------------------------------

def seeded_state(state, seed):
    """Deterministic random values for every tensor of a state dict, drawn in sorted-name order
    from a seeded CPU generator: the reference script gave the official modules exactly these, so
    equal names and shapes mean equal weights. Fan-in scaled matrices, gains near 1, small biases,
    and non-zero LoRA `up` weights (zero at init) so that the LoRA branches matter."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(state):
        v = state[k]
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("lora_layer.up.weight"):
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif v.ndim >= 2:
            out[k] = torch.randn(v.shape, generator=g) * v[0].numel() ** -0.5
        elif k.endswith("weight"):
            out[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
    return out


def ref_quantizer(norm, seed=1, **overrides):
    c = dict(ref("coda_ref.pt")["q_config"], **overrides)
    q = coda.CODAQuantizer(c["hidden_dim"], c["codebook_size"], c["patch_size_list"], "attention", c["beta"],
                           c["attn_dim"], norm)
    q.load_state_dict(seeded_state(q.state_dict(), seed), strict=True)
    return q


def test_coda_quantizer_matches_official():
    r = ref("coda_ref.pt")
    for norm in ("rms_norm", "layer_norm", "none"):
        q, tag = ref_quantizer(norm), f"q_{norm}"
        logits = []
        q.attn.register_forward_hook(lambda m, i, o: logits.append(o[0].detach()))
        f = r["q_f"].clone().requires_grad_(True)
        indices, f_hat, q_loss, e_loss = q(f)
        for k, (p, index, lg) in enumerate(zip(q.levels, indices, logits)):  # official layout: (B, V, p, p)
            assert torch.equal(index, r[tag + "_idx"][k]), (norm, k)
            assert_close(lg.view(2, p, p, -1).permute(0, 3, 1, 2), r[tag + "_logits"][k], 1e-5, f"{norm} logits level {k}")
        assert_close(f_hat, r[tag + "_f_hat"], 1e-5, f"{norm} f_hat")
        assert_close(q_loss, r[tag + "_vq"], 1e-5, f"{norm} quantization loss")
        assert_close(e_loss, r[tag + "_ent"], 1e-5, f"{norm} entropy loss")
        if norm == "rms_norm":
            ((f_hat * r["q_w"]).sum() + q_loss + 0.05 * e_loss).backward()
            for name, param in q.named_parameters():
                assert_close(param.grad, r[tag + "_grads"][name], 1e-5, f"grad {name}")
            assert_close(f.grad, r[tag + "_grad_f"], 1e-5, "grad of the latent")
            # decoding the indices gives the forward's f_hat
            assert_close(q.decode(indices), f_hat, 1e-5, "decode(indices)")


def test_coda_lora_conv_matches_official():
    r = ref("coda_ref.pt")
    base = torch.nn.Conv2d(8, 6, 3, stride=2, padding=0)
    holder = torch.nn.Module()
    holder.encoder = torch.nn.Module()
    holder.encoder.conv1 = base
    coda.add_lora(holder, rank=4, parts=("encoder",))
    conv = holder.encoder.conv1
    assert isinstance(conv, coda.LoRAConv2d) and not conv.weight.requires_grad and conv.lora_layer.down.weight.requires_grad
    assert conv.lora_layer.up.weight.abs().sum() == 0                  # starts as the pretrained conv
    conv.load_state_dict(seeded_state(conv.state_dict(), 6), strict=True)
    y = conv(r["lora_x"])
    assert_close(y, r["lora_y"], 1e-5, "LoRA conv output")
    y.pow(2).sum().backward()
    for name, param in conv.named_parameters():
        if param.requires_grad:
            assert_close(param.grad, r["lora_grads"][name], 1e-5, f"grad {name}")


def ref_tokenizer():
    r = ref("coda_ref.pt")
    c = r["tok_config"]
    vae = mar.AutoencoderKL(embed_dim=16, ch_mult=(1, 1))
    coda.add_lora(vae, rank=c["vae"]["lora_rank"])
    assert sorted(k for k in vae.state_dict() if "lora" in k) == r["tok_lora_keys"]
    vae.load_state_dict(seeded_state(vae.state_dict(), 4), strict=True)
    q = coda.CODAQuantizer(16, c["codebook_size"], c["levels"])
    q.load_state_dict(seeded_state(q.state_dict(), 8), strict=True)
    return coda.CODA(vae, q), r


def test_coda_tokenizer_forward_and_gradients_match_official():
    # in float64, as the VAE test: the official fp32 run's rounding alone is at most 0.4 of every tolerance
    # here; ours added in fp32 took the reconstruction to 0.77 of it on an AVX2 CPU
    model, r = ref_tokenizer()
    model, x = model.double(), r["tok_x"].double()
    assert_close(model.vae.encode(x).moments, r["tok_moments"], 1e-5, "moments (LoRA encoder)")
    f = model.encode(x, torch.Generator().manual_seed(5))               # official: torch.manual_seed(5); .sample()
    assert_close(f, r["tok_f"], 1e-5, "scaled latent sample")
    recon, q_loss, e_loss, indices = model(x, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(indices, r["tok_idx"]))
    assert_close(recon, r["tok_recon"], 1e-5, "reconstruction")
    loss = 0.2 * (x - recon).abs().mean() + ((x - recon) ** 2).mean() + q_loss + 0.05 * e_loss
    assert_close(loss, r["tok_loss"], 1e-5, "loss")
    loss.backward()
    grads = {n: p.grad for n, p in model.vae.named_parameters() if p.grad is not None}
    grads.update({"quantizer." + n: p.grad for n, p in model.quantizer.named_parameters()})
    assert sorted(grads) == sorted(r["tok_grads"]), "the trainable parameters differ from the official ones"
    for name, g in grads.items():
        assert_close(g, r["tok_grads"][name], 1e-4, f"grad {name}")
    # tokens -> image equals the forward's reconstruction: two sums of the same code vectors
    assert_close(model.detokenize(indices), recon, 1e-10, "detokenize(indices)")


def test_coda_release_layout_and_plain_vq_modes():
    """coda_mar() has the parameter names of CODA's released vae.pth / quantizer.pth (LoRA on the
    66 convs the MAR config names, ~6.0M LoRA + 0.26M quantizer parameters), and loads such
    files; plain VQ / residual VQ use nearest-neighbour codes."""
    with torch.device("meta"):
        model = coda.coda_mar()
    lora = [n for n, m in model.vae.named_modules() if isinstance(m, coda.LoRAConv2d)]
    assert len(lora) == 66 and sum(n.startswith("encoder") for n in lora) == 28
    assert sum(p.numel() for p in model.vae.parameters() if p.requires_grad) == 6021120
    assert sum(p.numel() for p in model.quantizer.parameters()) == 263568
    assert sorted(model.quantizer.state_dict()) == ["attn.norm_k.weight", "attn.norm_q.weight", "attn.to_k.bias", "attn.to_k.weight",
                                                    "attn.to_q.bias", "attn.to_q.weight", "attn.to_v.bias", "attn.to_v.weight",
                                                    "codebooks.weight"]
    model, r = ref_tokenizer()
    with tempfile.TemporaryDirectory() as d:
        torch.save(model.vae.state_dict(), f"{d}/vae_ema.pth")
        torch.save(model.quantizer.state_dict(), f"{d}/quantizer_ema.pth")
        fresh = coda.CODA(coda.add_lora(mar.AutoencoderKL(embed_dim=16, ch_mult=(1, 1)), 4), coda.CODAQuantizer(16, 64, (1, 2, 4, 8)))
        coda.load_release(fresh, f"{d}/vae_ema.pth", f"{d}/quantizer_ema.pth")
        assert torch.equal(fresh.detokenize(r["tok_idx"]), model.detokenize(r["tok_idx"]))
        e = raises(ValueError, coda.load_release, fresh, f"{d}/quantizer_ema.pth", f"{d}/vae_ema.pth")
        assert "does not match AutoencoderKL" in str(e) and "missing" in str(e), e
    # nearest-neighbour modes: the index is the closest code, the straight-through passes gradients unchanged
    q = coda.CODAQuantizer(4, 32, (1, 2, 4), assign="nearest")
    f = torch.randn(3, 4, 4, 4, requires_grad=True)
    indices, f_hat, q_loss, e_loss = q(f)
    assert e_loss == 0 and q.beta == 0.25
    u = torch.nn.functional.interpolate(f.detach(), size=(1, 1), mode="area").flatten(1)
    assert torch.equal(indices[0].flatten(), torch.cdist(u, q.codebooks.weight.detach()).argmin(1))
    assert_close(q.decode(indices), f_hat, 1e-6, "nearest decode")
    book, residual, losses = q.codebooks.weight.detach(), f.detach(), []  # every level: the code nearest its residual
    for p, index in zip(q.levels, indices):
        u = torch.nn.functional.interpolate(residual, size=(p, p), mode="area")
        assert torch.equal(index.flatten(1), torch.cdist(u.flatten(2).transpose(1, 2), book[None].expand(3, -1, -1)).argmin(-1)), p
        e = book[index].permute(0, 3, 1, 2)
        losses.append(1.25 * (e - u).pow(2).mean())  # the codebook term and 0.25 x the commitment term
        residual = residual - torch.nn.functional.interpolate(e, size=(4, 4), mode="bicubic")
    assert_close(q_loss, torch.stack(losses).mean(), 1e-6, "VQ loss")
    f_hat.sum().backward()  # identity straight-through per level + a full-size last level: d f_hat / d f = I
    assert torch.allclose(f.grad, torch.ones_like(f.grad), atol=1e-5), f.grad
    usage, counts = coda.codebook_usage(indices, 32)
    assert counts.sum() == 3 * (1 + 4 + 16) and usage == (counts > 0).float().mean().item()
    assert torch.equal(counts, sum(torch.bincount(i.flatten(), minlength=32) for i in indices))  # the scatter counts right


def test_coda_losses_lpips_gan_and_adaptive_weight():
    import lpips
    torch.manual_seed(0)
    net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)    # tests only: random VGG trunk, offline
    crit = coda.TokenizerLoss(lpips=net, disc="patch", patch_ch=16)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    nll, parts = crit.reconstruction(x, x)
    assert nll.item() == 0 and parts["lpips"].item() == 0
    w = torch.nn.Parameter(torch.randn(3, 3, 3, 3) * 0.1)           # a stand-in "last layer"
    recon = torch.tanh(torch.nn.functional.conv2d(x, w, padding=1))
    nll, parts = crit.reconstruction(x, recon)
    expect = 0.2 * (x - recon).abs().mean() + ((x - recon) ** 2).mean() + net(x, recon).mean()
    assert torch.allclose(nll, expect, atol=1e-6)
    loss0, _ = crit.generator_loss(x, recon, w, ramp=0.0)               # start of training: no GAN term
    assert torch.allclose(loss0, nll)
    loss, parts = crit.generator_loss(x, recon, w, ramp=0.5)
    g = -crit.disc(recon).mean()
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    assert torch.allclose(parts["d_weight"], gn / (gg + 1e-6), rtol=1e-5)  # VQGAN Eq. 7
    assert torch.allclose(loss, nll + 0.5 * parts["d_weight"] * g, rtol=1e-5)
    loss.backward()
    assert w.grad is not None and all(p.grad is None for p in crit.disc.parameters()), "G step trained D"
    d_loss, logs = crit.discriminator_loss(x, recon)
    real, fake = crit.disc(x), crit.disc(recon.detach())
    assert torch.allclose(d_loss, 0.5 * ((1 - real).clamp(min=0).mean() + (1 + fake).clamp(min=0).mean()), rtol=1e-5)
    d_loss.backward()
    assert all(p.grad is not None for p in crit.disc.parameters()) and w.grad is not None
    recon = torch.tanh(torch.nn.functional.conv2d(x, w, padding=1))  # a fresh graph
    with torch.autocast("cpu", torch.bfloat16):  # --bf16: the logits are bf16, the GAN losses still fp32
        d16, _ = crit.discriminator_loss(x, recon)
        _, parts16 = crit.generator_loss(x, recon, w, ramp=0.5)
        real, fake = crit.disc(x), crit.disc(recon.detach())
    assert real.dtype == torch.bfloat16 and d16.dtype == parts16["g_loss"].dtype == torch.float32
    hinge = 0.5 * ((1 - real.float()).clamp(min=0).mean() + (1 + fake.float()).clamp(min=0).mean())
    assert torch.allclose(d16, hinge, rtol=1e-6) and torch.allclose(parts16["g_loss"], -fake.float().mean(), rtol=1e-6)


def dino_layout_state(seed):
    """DINO ViT-S/16 tensors under the names of dino_deitsmall16_pretrain.pth."""
    d = coda.DinoDiscriminator()
    state = {k.replace("patch_embed.", "patch_embed.proj."): v for k, v in d.state_dict().items() if not k.startswith("heads.")}
    state.update({"norm.weight": torch.ones(384), "norm.bias": torch.zeros(384)})
    return seeded_state(state, seed)


def seeded_heads(layers, seed):
    """The DINO discriminator heads' layers, in order (per head: 1-wide conv, norm, k-wide conv,
    norm, output conv), filled with seeded values, spectral-norm vectors included, so that ours and
    the official heads hold the same numbers."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda t, scale, shift=0.0: t.copy_(torch.randn(t.shape, generator=g) * scale + shift)
    unit = lambda t: t.copy_(torch.nn.functional.normalize(torch.randn(t.shape, generator=g), dim=0))
    with torch.no_grad():
        for m in layers:
            if hasattr(m, "weight_orig"):  # spectral-norm conv
                draw(m.weight_orig, 0.05), draw(m.bias, 0.05), unit(m.weight_u), unit(m.weight_v)
            else:                          # batch norm
                draw(m.weight, 0.1, 1.0), draw(m.bias, 0.1)


def test_coda_dino_discriminator_matches_official_backbone():
    r = ref("coda_ref.pt")
    with tempfile.TemporaryDirectory() as d:
        state = dino_layout_state(11)
        torch.save(state, f"{d}/dino.pth")
        disc = coda.DinoDiscriminator(f"{d}/dino.pth")
        maps = disc.features(r["dino_x"])                              # 64x64 -> bicubic 224, as the official
        assert len(maps) == 5 and all(m.shape == (2, 384, 196) for m in maps)
        for k, m in enumerate(maps):
            assert_close(m[:, :16, :16], r["dino_maps"][k], 1e-4, f"DINO token map {k}")
        qkv = disc.blocks[0].attn.qkv.bias
        assert (qkv[384:768] == 0).all() and torch.equal(qkv[:384], state["blocks.0.attn.qkv.bias"][:384])
        seeded_heads([m for h in disc.heads for m in (h["a"][0], h["a"][1], h["b"][0], h["b"][1], h["out"])], 12)
        assert_close(disc.train()(r["dino_x"]), r["dino_heads_logits"], 1e-4, "DINO heads' logits")  # (2, 5 * 196)
        assert not disc.blocks[0].attn.qkv.weight.requires_grad
        assert all(p.requires_grad for p in disc.heads.parameters())
        torch.save({"encoder.conv_in.weight": torch.zeros(3)}, f"{d}/other.pth")
        assert "is not DINO ViT-S/16" in str(raises(ValueError, coda.DinoDiscriminator, f"{d}/other.pth"))
    with offline_hub():
        e = raises(FileNotFoundError, coda.dino_weights_path)
        assert "--disc patch" in str(e) and "dino_deitsmall16_pretrain.pth" in str(e), e


# ---------------------------------------------------------------------------------------------
# maskgit.py: decoding exactly as google-research/maskgit's parallel_decode.py
# ---------------------------------------------------------------------------------------------

def test_maskgit_schedule_matches_official_counts():
    """The number of tokens still masked after every step equals the official decode's (run with
    JAX on random logits), for several lengths and step counts, 680 (CODA-MAR) included."""
    r = ref("maskgit_ref.pt")
    for (n, steps), expected in r["masked_counts"].items():
        trace = []
        g = torch.Generator().manual_seed(n + steps)
        out = maskgit.decode(lambda x: torch.randn(*x.shape, 11, generator=g), 2, n, 11, steps, generator=g, trace=trace)
        assert [int((s == 11).sum(1)[0]) for s in trace[1:]] == expected, (n, steps)
        assert all(int((s == 11).sum(1)[1]) == m for s, m in zip(trace[1:], expected))
        assert (out != 11).all(), "the result must have no [MASK] left"
        for before, after in zip(trace, trace[1:] + [out]):   # decoded tokens never change
            known = before != 11
            assert torch.equal(after[known], before[known])


def test_maskgit_remasking_matches_official_step_by_step():
    """Given the official decode's samples at every step (deterministic logits, choice temperature
    0), remask() reproduces the official next state exactly."""
    r = ref("maskgit_ref.pt")
    states, samples = r["det_states"], r["det_final"]                  # (T, N) each, [MASK] = -1
    T, N = states.shape
    for t in range(T - 1):
        unknown = states[t] == -1
        logits = r["det_table"] + 0.5 * (~unknown).sum().float() * r["det_extra"]
        probs = logits.softmax(-1).gather(-1, samples[t][:, None])[:, 0]
        masked = maskgit.remask(probs.log()[None], unknown[None], torch.full((1, 1), float(N)), t, T, 0.0, torch.zeros(1, N))
        assert torch.equal(torch.where(masked[0], -1, samples[t]), states[t + 1]), t
    assert (samples[-1] != -1).all()


def test_maskgit_layout_loss_and_determinism():
    levels = coda.MAR_LEVELS
    lv, rows, cols = maskgit.level_layout(levels)
    offsets = np.cumsum([0] + [p * p for p in levels])
    positions = offsets[lv.numpy()] + rows.numpy() * np.array(levels)[lv.numpy()] + cols.numpy()
    assert len(lv) == 680 and sorted(positions.tolist()) == list(range(680))   # a bijection, in order
    indices = [torch.randint(0, 50, (3, p, p)) for p in levels]
    tokens = maskgit.flatten_levels(indices)
    assert tokens.shape == (3, 680) and all(torch.equal(a, b) for a, b in zip(maskgit.unflatten_levels(tokens, levels), indices))
    k, i, j = 7, 5, 9                                                     # level 7 (10x10), row 5, col 9
    assert tokens[1, offsets[k] + i * levels[k] + j] == indices[k][1, i, j]
    # the loss sees masked positions only
    logits = torch.randn(2, 30, 16, requires_grad=True)
    targets = torch.randint(0, 16, (2, 30))
    mask = torch.rand(2, 30) < 0.5
    loss = maskgit.masked_cross_entropy(logits, targets, mask)
    loss.backward()
    assert logits.grad[~mask].abs().max() == 0 and logits.grad[mask].abs().max() > 0
    expect = torch.nn.functional.cross_entropy(logits[mask], targets[mask], label_smoothing=0.1)
    assert torch.allclose(loss, expect, atol=1e-6)
    # training masks: ceil(gamma(r) L) positions, at least one
    m = maskgit.random_mask(1000, 20, "cpu", torch.Generator().manual_seed(0))
    r = torch.rand(1000, generator=torch.Generator().manual_seed(0))                 # the r of each row, drawn first
    assert torch.equal(m.sum(1), torch.ceil(torch.cos(math.pi / 2 * r) * 20).long())  # the cosine schedule
    assert (m.float().mean(0) - m.float().mean()).abs().max() < 0.07, m.float().mean(0)  # positions drawn uniformly
    # a fixed generator fixes the samples, with and without CFG
    model = maskgit.maskgit_tiny().eval()
    labels = torch.tensor([0, 3, 7])
    for cfg in (1.0, 3.0):
        a = model.generate(labels, 8, cfg=cfg, generator=torch.Generator().manual_seed(1))
        b = model.generate(labels, 8, cfg=cfg, generator=torch.Generator().manual_seed(1))
        c = model.generate(labels, 8, cfg=cfg, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b) and not torch.equal(a, c) and (a < model.codebook_size).all()
    with torch.device("meta"):
        assert sum(p.numel() for p in maskgit.maskgit_large().parameters()) == 196592896  # MaskGIT-L, V = 16384


def test_maskgit_guidance_temperatures_and_training_loss_by_value():
    """Guided logits are l_u + s (l_c - l_u) with s per the schedule; --temperature divides the
    logits; the re-masking noise is annealed by 1 - (t+1)/T; the training loss is the masked
    cross-entropy of the model fed [MASK] at the masked positions, with dropped labels."""
    torch.manual_seed(0)
    model = maskgit.maskgit_tiny().eval()
    L, V = model.length, model.codebook_size
    x = torch.randint(0, V, (3, L))
    x[0, :20], x[1, 5:], x[2] = V, V, V                                   # 10, 5 and 0 of 30 known
    labels, null = torch.tensor([1, 4, 9]), torch.full((3,), model.num_classes)
    lc, lu = model.logits(x, labels), model.logits(x, null)
    known = torch.tensor([10.0, 5.0, 0.0])[:, None, None]
    for schedule, s in (("constant", torch.tensor(3.0)), ("linear", 1 + 2.0 * known / L)):
        guided = model.guided_logits(x, labels, 3.0, schedule)
        expect = lu + s * (lc - lu)
        assert (guided - expect).abs().mean() < 1e-4 * expect.abs().mean(), schedule
    assert torch.equal(model.guided_logits(x, labels, 1.0, "linear"), lc)
    # temperature T samples from logits / T
    table = torch.randn(L, V, generator=torch.Generator().manual_seed(1))
    hot = maskgit.decode(lambda t: table.expand(2, L, V), 2, L, V, 4, 4.5, 2.0, torch.Generator().manual_seed(2))
    cooled = maskgit.decode(lambda t: table.expand(2, L, V) / 2.0, 2, L, V, 4, 4.5, 1.0, torch.Generator().manual_seed(2))
    plain = maskgit.decode(lambda t: table.expand(2, L, V), 2, L, V, 4, 4.5, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(hot, cooled) and not torch.equal(hot, plain)
    # steps 0 and 1 of 4 re-mask 3 and 2 of 4 (floor(4 cos(pi / 8)), floor(4 cos(pi / 4))); the noise is annealed
    # by 1 - (t + 1) / T, 0.75 and 0.5: token 3's confidence -4 + f x crosses the cutoff at x = 4 in both
    log_p, unknown, n0 = torch.tensor([[-1.0, -2.0, -3.0, -4.0]]), torch.ones(1, 4, dtype=torch.bool), torch.full((1, 1), 4.0)
    for step, x, expect in ((0, 3.8, [False, True, True, True]), (0, 4.2, [True, True, True, False]),
                            (1, 3.8, [False, False, True, True]), (1, 4.2, [False, True, True, False])):
        got = maskgit.remask(log_p, unknown, n0, step, 4, 1.0, torch.tensor([[0.0, 0.0, 0.0, x]]))[0].tolist()
        assert got == expect, (step, x, got)
    # the training loss, rebuilt from the same generator draws (class embeddings large enough to matter)
    model.train()
    model.class_emb.weight.data.normal_(0, 3, generator=torch.Generator().manual_seed(4))
    tokens, labels = torch.randint(0, V, (64, L)), torch.randint(0, 10, (64,))
    g = torch.Generator().manual_seed(3)
    mask = maskgit.random_mask(64, L, "cpu", g)
    drop = maskgit.rand((64,), g, "cpu") < model.class_dropout
    assert 0 < drop.sum() < 64
    dropped = torch.where(drop, model.num_classes, labels)
    expect = maskgit.masked_cross_entropy(model.logits(torch.where(mask, V, tokens), dropped), tokens, mask)
    kept = maskgit.masked_cross_entropy(model.logits(torch.where(mask, V, tokens), labels), tokens, mask)
    loss = model(tokens, labels, generator=torch.Generator().manual_seed(3))
    assert abs(loss.item() - expect.item()) < 1e-5 * expect.item() < abs(kept.item() - expect.item()), (loss, expect, kept)


# ---------------------------------------------------------------------------------------------
# fid.py: parity with torch-fidelity and pytorch-fid
# ---------------------------------------------------------------------------------------------

def fake_inception_state(seed=0):
    """Random weights in the FID Inception's layout, identical on every machine (a seeded CPU
    generator). He-scaled convs and BatchNorm statistics away from (0, 1), so that a wrong padding,
    pooling or normalisation shows in the features. The reference script saved exactly these."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in fid.FIDInception().state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(0)
        elif k.endswith("conv.weight"):
            state[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith("bn.weight"):
            state[k] = 1 + 0.2 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k == "fc.weight":
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:  # bn.bias, running_mean, fc.bias
            state[k] = 0.2 * torch.randn(v.shape, generator=g)
    return state


def inception_files(d):
    """The fake weights in torch-fidelity's layout (no num_batches_tracked) and pytorch-fid's."""
    state = fake_inception_state(0)
    tf, pt = os.path.join(d, "weights-inception.pth"), os.path.join(d, "pt_inception.pth")
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tf)
    torch.save(state, pt)
    return tf, pt


def save_pngs(images, folder):
    from PIL import Image
    os.makedirs(folder)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:03d}.png"))


def run_fid(*args, torchrun=False, workers=0):
    return run_script(os.path.join(HERE, "fid.py"), *args, "--num-workers", workers, nproc=2 if torchrun else 1, check=False)


def printed(p, key):
    """The number after `key:` on the last stdout line that starts with it."""
    return float([l for l in p.stdout.splitlines() if l.startswith(key + ":")][-1][len(key) + 1:].split()[0])


def test_fid_features_match_torch_fidelity_and_pytorch_fid():
    r = ref("fid_ref.pt")
    with tempfile.TemporaryDirectory() as d:
        tf, pt = inception_files(d)
        net_tf, net_pt = fid.load_inception(tf), fid.load_inception(pt, pytorch_fid=True)
    with torch.no_grad():
        pool, logits, _ = net_tf(r["A"])                       # 32x32 -> 299 (TF1 bilinear), (x - 128) / 128
        assert_close(pool, r["tf_pool_A"], 1e-4, "torch-fidelity pool3")
        assert_close(logits, r["tf_logits_A"], 1e-4, "torch-fidelity logits_unbiased")
        assert_close(logits + net_tf.fc.bias, r["tf_logits_biased_A"], 1e-4, "torch-fidelity logits")
        assert_close(net_tf(r["odd"])[0], r["tf_pool_odd"], 1e-4, "torch-fidelity pool3, 48x40 input")
        pool_pt = net_pt(r["A"])[0]                            # pytorch-fid: x / 255, half-pixel resize, 2x - 1
        assert_close(pool_pt, r["pt_pool_A"], 1e-4, "pytorch-fid pool3")
        assert_close(net_pt(r["odd"])[0], r["pt_pool_odd"], 1e-4, "pytorch-fid pool3, 48x40 input")
        assert (pool_pt - pool).abs().max() > 1e-2, "the two pipelines should differ"
        # the float [0, 1] input CODA feeds in pytorch-fid mode equals the uint8 path
        assert_close(net_pt(r["A"].float() / 255)[0], pool_pt, 1e-6, "pytorch-fid pool3 from floats")


def test_fid_frechet_distance_and_inception_score():
    r = ref("fid_ref.pt")
    stats = [r[k].numpy() for k in ("frechet_mu1", "frechet_sigma1", "frechet_mu2", "frechet_sigma2")]
    fd = fid.frechet_distance(*stats)
    assert abs(fd - r["frechet_tf"].item()) < 1e-9 * fd and abs(fd - r["frechet_pt"].item()) < 1e-9 * fd, fd
    mu1, s1, mu2, _ = stats
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6       # a set with itself (full-rank covariance)
    assert abs(fid.frechet_distance(mu1, s1, mu2, s1) - ((mu1 - mu2) ** 2).sum()) < 1e-9 * fd  # equal covariances
    a, b = np.diag(np.arange(1.0, 65)), np.diag(np.arange(64.0, 0, -1) ** 2)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(np.diag(a)) - np.sqrt(np.diag(b))) ** 2).sum()
    assert abs(fid.frechet_distance(mu1, a, mu2, b) - closed) < 1e-9 * closed   # diagonal covariances
    is_mean, is_std = fid.inception_score(r["is_logits"])              # torch-fidelity: shuffle seed 2020, 10 splits
    assert_close(torch.tensor([is_mean, is_std], dtype=torch.float64), r["is_logits_ref"], 1e-9, "IS of random logits")
    same = fid.inception_score(r["is_logits"][:1].repeat(40, 1))
    assert abs(same[0] - 1) < 1e-12 and same[1] < 1e-12, same         # identical predictions: IS = 1
    raises(ValueError, fid.frechet_distance, mu1, s1, mu1[:10], s1)     # mismatched dimensions
    raises(ValueError, fid.inception_score, r["is_logits"][:5])          # fewer images than splits


def sparse_features(seed, n, scale_rows=(), d=2048, k=300):
    """The feature sets the ADM reference values were computed on: k of d entries per row set to
    1, 2 or 3 (squared norm at most 2048), from NumPy's frozen legacy generator. Every float16 sum
    of ADM's distance is then exact except the last one, which rounds distances above 2048 to even:
    so the float16 pass changes the result, but not the order of summation. `scale_rows` are
    multiplied by 128: float16 overflows in every block that touches them (float32 stays exact)."""
    rs = np.random.RandomState(seed)
    out = np.zeros((n, d), np.float32)
    for i in range(n):
        while True:
            idx, val = rs.choice(d, k, replace=False), rs.randint(1, 4, size=k)
            if (val ** 2).sum() <= 2048:
                break
        out[i, idx] = val
    out[list(scale_rows)] *= 128
    return torch.from_numpy(out)


def test_fid_precision_recall_match_adm_evaluator_exactly():
    """The reference: ADM's own ManifoldEstimator and DistanceBlock (guided-diffusion's
    evaluations/evaluator.py, TensorFlow 2.12 on CPU) with 1,000 x 1,000 blocks, on 3,000 reference
    and 2,500 sample features; radii and both fractions must be equal, not close."""
    r = ref("adm_ref.pt")
    for case, scaled in (("exact", ()), ("overflow", range(1000, 1400))):
        real, fake = sparse_features(1, 3000, scaled), sparse_features(2, 2500)
        assert torch.equal(fid.manifold_radii(real, block=1000), r[f"{case}_radii_ref"]), case
        assert torch.equal(fid.manifold_radii(fake, block=1000), r[f"{case}_radii_sample"]), case
        precision, recall = fid.precision_recall(real, fake, block=1000)
        assert (precision, recall) == (r[f"{case}_precision"].item(), r[f"{case}_recall"].item()), (case, precision, recall)
    # the details matter on this data: float32 only, or one block for all, gives other numbers
    assert fid.precision_recall(real, fake, block=3000) != (precision, recall)
    d16 = fid.squared_distances(real[:5], fake[:5])
    assert torch.equal(d16, fid._distances(real[:5], fake[:5], torch.float16)) and d16.max() > 2048
    assert not torch.equal(d16, fid._distances(real[:5], fake[:5], torch.float32))       # rounded to even above 2048
    assert torch.equal(fid.squared_distances(real[1000:1005], fake[:5]), fid._distances(real[1000:1005], fake[:5], torch.float32))


def test_fid_adm_inception_score_and_frechet_distance_match_adm_evaluator():
    """ADM's compute_inception_score (its softmax graph on random pool features and weights) and its
    frechet_distance (scipy's sqrtm) on statistics of the FID (2048) and sFID (2023) sizes."""
    r = ref("adm_ref.pt")
    rs = np.random.RandomState(3)  # the reference script drew these in this order
    pool, w = torch.from_numpy(rs.rand(12000, 2048).astype(np.float32)), torch.from_numpy((rs.randn(2048, 1008) * 0.05).astype(np.float32))
    is_adm = fid.inception_score_adm(pool @ w)                 # 3 splits: 5,000, 5,000, 2,000, in order
    assert abs(is_adm - r["is_adm"].item()) < 1e-6 * r["is_adm"].item(), is_adm
    assert abs(fid.inception_score(pool @ w)[0] - is_adm) > 1e-5                # torch-fidelity's splits differ
    for name, dim in (("fid", 2048), ("sfid", 2023)):
        a, b = rs.randn(3000, dim), rs.randn(3000, dim) * 1.1 + 0.05
        fd = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
        assert abs(fd - r[name].item()) < 1e-6 * r[name].item(), (name, fd, r[name].item())


def test_fid_spatial_features_are_mixed_6d_branch1x1():
    """sFID's features: ADM reads the TF graph's mixed_6/conv (the 1x1 tower of the 7th Inception
    block, after its ReLU) and keeps 7 channels in (H, W, C) order. Checked on random weights
    against that module's output, captured by a hook."""
    with tempfile.TemporaryDirectory() as d:
        net = fid.load_inception(inception_files(d)[0])
    seen = []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        pool, _, spatial = net(ref("fid_ref.pt")["A"][:4])
    hook.remove()
    assert spatial.shape == (4, 2023) and seen[0].shape == (4, 192, 17, 17)
    assert torch.equal(spatial, seen[0][:, :7].permute(0, 2, 3, 1).reshape(4, -1))
    assert spatial.min() >= 0 and spatial.std() > 0.05 * spatial.abs().mean()           # after the ReLU, not constant
    assert torch.equal(spatial.view(4, 17, 17, 7)[:, 2, 5, 3], seen[0][:, 3, 2, 5])       # (row, column, channel)


def test_fid_cli_matches_torch_fidelity_on_folders():
    r = ref("fid_ref.pt")
    with tempfile.TemporaryDirectory() as d:
        tf, pt = inception_files(d)
        save_pngs(r["A"], f"{d}/A")
        save_pngs(r["B"], f"{d}/B")
        # the independent runs two at a time: A against B; B's statistics and features saved
        runs = two_at_a_time(lambda flags: run_fid(*flags, "--weights", tf),
                             [(f"{d}/A", f"{d}/B", "--batch-size", "7"), (f"{d}/B", "--save-stats", f"{d}/bf.npz", "--save-features")])
        assert all(q.returncode == 0 for q in runs), [q.stderr[-2000:] for q in runs]
        p = runs[0]
        ref_fid = r["tf_fid_AB"].item()                                  # torch_fidelity.calculate_metrics(A, B)
        assert abs(printed(p, "FID") - ref_fid) < 1e-4 * ref_fid, (printed(p, "FID"), ref_fid)
        is_line = [l for l in p.stdout.splitlines() if l.startswith("IS:")][0].split()
        assert abs(float(is_line[1]) - r["tf_is_A"][0].item()) < 1e-4 and abs(float(is_line[3]) - r["tf_is_A"][1].item()) < 1e-4
        # all five numbers, each equal to the functions' on the same features computed here
        net, sets = fid.load_inception(tf), []
        for images in (r["A"], r["B"]):
            scorer = fid.Scorer(net)
            scorer.update(images)
            sets.append(fid.summarize(*scorer.features()))
        expect = fid.compare(*sets)
        few = fid.compare({**sets[0], "pool": sets[0]["pool"][:3], "logits": sets[0]["logits"][:9]}, sets[1])  # k = 3; 10 splits
        assert "fid" in few and not {"precision", "is_mean"} & few.keys(), few.keys()
        assert set(few["missing"]) == {"precision/recall", "IS"}, few["missing"]
        for key, name in (("sfid", "sFID"), ("is_adm", "IS (ADM evaluator)"), ("precision", "Precision"), ("recall", "Recall")):
            assert abs(printed(p, name) - expect[key]) <= 1e-4 * abs(expect[key]) + 1e-9, (name, p.stdout, expect[key])
        # saved statistics and features give the same five numbers, also under torchrun with 2 processes
        # (shards); statistics alone (no precision and recall, one line says why): the --eval test
        assert sorted(np.load(f"{d}/bf.npz").keys()) == ["mu", "mu_s", "pipeline", "pool3", "sigma", "sigma_s"]
        assert str(np.load(f"{d}/bf.npz")["pipeline"]) == "TF"  # what check_pipeline reads
        p2 = run_fid(f"{d}/A", f"{d}/bf.npz", "--weights", tf, torchrun=True)
        assert p2.returncode == 0, p2.stderr[-2000:]
        assert abs(printed(p2, "FID") - ref_fid) < 1e-4 * ref_fid, p2.stdout
        assert abs(printed(p2, "sFID") - expect["sfid"]) < 1e-4 * expect["sfid"], p2.stdout
        assert (printed(p2, "Precision"), printed(p2, "Recall")) == (printed(p, "Precision"), printed(p, "Recall")), p2.stdout
        # ADM's reference batch layout: its statistics are used as stored, its images (arr_0) give P/R;
        # pytorch-fid mode: pytorch_fid.fid_score.calculate_fid_given_paths on the same folders
        stats = {k: v for k, v in np.load(f"{d}/bf.npz").items() if k != "pool3"}
        np.savez(f"{d}/adm.npz", arr_0=r["B"].permute(0, 2, 3, 1).numpy(), **{**stats, "mu": stats["mu"] + 0.01})
        p3, p5 = two_at_a_time(lambda flags: run_fid(f"{d}/A", *flags),
                               [(f"{d}/adm.npz", "--weights", tf), (f"{d}/B", "--weights", pt, "--pytorch-fid")])
        stored = fid.frechet_distance(sets[0]["mu"], sets[0]["sigma"], stats["mu"] + 0.01, stats["sigma"])
        assert abs(printed(p3, "FID") - stored) < 1e-4 * stored and abs(stored - ref_fid) > 1e-2, (p3.stdout, stored)
        assert abs(printed(p3, "sFID") - expect["sfid"]) < 1e-4 * expect["sfid"], p3.stdout
        assert (printed(p3, "Precision"), printed(p3, "Recall")) == (printed(p, "Precision"), printed(p, "Recall")), p3.stdout
        assert abs(printed(p5, "FID") - r["pt_fid_AB"].item()) < 1e-4 * r["pt_fid_AB"].item(), (p5.stdout, p5.stderr[-500:])


def test_fid_in_memory_scorer_and_self_distance():
    r = ref("fid_ref.pt")
    with tempfile.TemporaryDirectory() as d:
        net = fid.load_inception(inception_files(d)[0])
    a, b = fid.Scorer(net), fid.Scorer(net)
    for chunk in r["A"].split(6):                                      # batches as a generator yields them
        a.update(chunk)
    b.update(r["B"])
    out = a.compute(fid.summarize(*b.features()))
    assert out["num_images"] == 20 and abs(out["fid"] - r["tf_fid_AB"].item()) < 1e-4 * r["tf_fid_AB"].item()
    is_mean, is_std = r["tf_is_A"].tolist()  # IS - 1 is the part the features decide: 0.0045 with these weights
    assert abs(out["is_mean"] - is_mean) < 1e-4 * (is_mean - 1) and abs(out["is_std"] - is_std) < 1e-3 * is_std, out
    # A with itself: 0 up to the rounding of the ~2029 zero eigenvalues of a rank-19 covariance
    assert abs(fid.frechet_distance(out["mu"], out["sigma"], out["mu"], out["sigma"])) < 1e-5 * np.trace(out["sigma"])
    # to_uint8 rounds as MAR's PNG writer: round(clip((x + 1) / 2 * 255))
    x = torch.tensor([-1.5, -1.0, 0.0, 0.99 * 2 / 255 - 1, 1.0, 2.0])
    assert fid.to_uint8(x).tolist() == [0, 0, 128, 1, 255, 255]


def test_fid_reconstruction_metrics_match_coda():
    r = ref("fid_ref.pt")
    assert_close(fid.psnr(r["recon_a"], r["recon_b"]), r["recon_psnr"], 1e-12, "PSNR")
    assert_close(fid.ssim(r["recon_a"], r["recon_b"]), r["recon_ssim"], 1e-10, "SSIM")
    a = r["recon_a"]
    assert fid.ssim(a, a).sub(1).abs().max() < 1e-12 and torch.isinf(fid.psnr(a, a)).all()
    assert abs(fid.psnr(a.clamp(0, 254), a.clamp(0, 254) + 1).mean().item() - 20 * math.log10(255)) < 1e-9  # MSE 1
    with tempfile.TemporaryDirectory() as d:
        metrics = fid.ReconstructionMetrics(fid.load_inception(inception_files(d)[1], pytorch_fid=True))
    x = r["A"].float() / 127.5 - 1
    metrics.update(x[:10], x[:10].flip(2))                             # "reconstructions": upside down
    metrics.update(x[10:], x[10:].flip(2))
    out = metrics.compute()
    a, b = r["A"], r["A"].flip(2)
    assert out["num_images"] == 20 and out["rfid"] > 1, out
    # PSNR / SSIM of the truncated uint8 images (CODA's conversion) are within rounding of the exact ones
    assert abs(out["psnr"] - fid.psnr(a, b).mean().item()) < 0.3 and abs(out["ssim"] - fid.ssim(a, b).mean().item()) < 1e-2, out
    trunc = lambda t: (((t + 1) / 2).clamp(0, 1) * 255).to(torch.uint8)  # CODA's conversion, exactly
    assert abs(out["psnr"] - fid.psnr(trunc(x), trunc(x.flip(2))).mean().item()) < 1e-9, out
    assert abs(out["ssim"] - fid.ssim(trunc(x), trunc(x.flip(2))).mean().item()) < 1e-9, out
    with torch.no_grad():  # rFID: the Frechet distance of pool3 features of the [0, 1] floats, reconstructions first
        pool = lambda t: metrics.real.net(((t + 1) / 2).clamp(0, 1))[0].double().numpy()
        expect = fid.frechet_distance(*fid.statistics(pool(x.flip(2))), *fid.statistics(pool(x)))
    assert abs(out["rfid"] - expect) < 1e-6 * expect, (out["rfid"], expect)
    plain = fid.ReconstructionMetrics(None)                         # no Inception weights: PSNR / SSIM only
    plain.update(x, x.flip(2))
    assert plain.compute() == {k: out[k] for k in ("psnr", "ssim")}, plain.compute()
    metrics = fid.ReconstructionMetrics(metrics.real.net)
    metrics.update(x, x)
    assert abs(metrics.compute()["rfid"]) < 1e-5 * np.trace(metrics.real.compute()["sigma"])


def test_fid_errors_are_one_line():
    r = ref("fid_ref.pt")
    with tempfile.TemporaryDirectory() as d:
        tf, _ = inception_files(d)
        save_pngs(r["A"][:12], f"{d}/A")
        os.makedirs(f"{d}/empty")
        os.makedirs(f"{d}/mixed")
        save_pngs(r["odd"], f"{d}/mixed/odd")
        for f in os.listdir(f"{d}/mixed/odd"):
            os.rename(f"{d}/mixed/odd/{f}", f"{d}/mixed/{f}")
        save_pngs(r["A"][:2], f"{d}/mixed/sq")
        for f in os.listdir(f"{d}/mixed/sq"):
            os.rename(f"{d}/mixed/sq/{f}", f"{d}/mixed/z{f}")
        os.makedirs(f"{d}/corrupt")
        save_pngs(r["A"][:3], f"{d}/corrupt/x")
        with open(f"{d}/corrupt/x/001.png", "wb") as f:
            f.write(b"\x89PNG not really")
        torch.save({"model": {"w": torch.zeros(3)}}, f"{d}/mar.pth")
        np.savez(f"{d}/other.npz", x=np.zeros(3))
        cases = [([f"{d}/A", f"{d}/nope"], "no such folder or file"),
                 ([f"{d}/A", f"{d}/empty"], "no images"),
                 ([f"{d}/A", f"{d}/other.npz"], "neither images"),
                 ([f"{d}/A", f"{d}/mixed"], "differ in size"),
                 ([f"{d}/A", f"{d}/corrupt/x"], "cannot read image"),
                 ([f"{d}/A", f"{d}/A", "--weights", f"{d}/mar.pth"], "is not the FID Inception-v3"),
                 ([f"{d}/A", f"{d}/A", "--weights", f"{d}/missing.pth"], "weights not found")]
        np.save(f"{d}/array.npy", np.zeros(3))
        os.rename(f"{d}/array.npy", f"{d}/array.npz")
        cases.append(([f"{d}/A", f"{d}/array.npz"], "a single .npy array, not an .npz archive"))
        np.savez(f"{d}/stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
        cases.append(([f"{d}/stats.npz", "--save-stats", f"{d}/x.npz", "--save-features"], "holds statistics only"))
        np.savez(f"{d}/pt.npz", mu=np.zeros(2048), sigma=np.eye(2048), pipeline=np.array("pytorch-fid"))
        np.savez(f"{d}/tf.npz", mu=np.zeros(2048), sigma=np.eye(2048), pipeline=np.array("TF"))  # as --save-stats writes
        cases += [([f"{d}/A", f"{d}/tf.npz", "--pytorch-fid"], "computed through the TF input pipeline, and these "
                   "features go through the pytorch-fid one: compute both through one"),  # refused before any feature
                  ([f"{d}/pt.npz", f"{d}/A"], "through the pytorch-fid input pipeline, and these features go through the TF one")]
        with open(f"{d}/stats.npz", "rb") as f, open(f"{d}/cut.npz", "wb") as g:
            g.write(f.read(500))  # an interrupted download
        np.savez(f"{d}/nan.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
        np.savez(f"{d}/pool.npz", mu=np.zeros(2048), sigma=np.eye(2048), pool3=np.zeros((5, 7)))
        np.savez(f"{d}/dims64.npz", mu=np.zeros(64), sigma=np.eye(64))  # pytorch-fid --dims 64
        os.makedirs(f"{d}/dir.npz")
        cases += [([f"{d}/A", f"{d}/dims64.npz"], "mu has 64 values, not the 2048 of the Inception features"),
                  ([f"{d}/A", "--save-stats", f"{d}/dir.npz"], "cannot write it (a folder of that name"),([f"{d}/A", f"{d}/cut.npz"], "is not a readable .npz archive"),
                  ([f"{d}/A", f"{d}/nan.npz"], "mu or sigma holds NaN or infinite values"),
                  ([f"{d}/A", f"{d}/pool.npz"], "pool3 (5, 7) is not features of the size of mu"),
                  ([f"{d}/A", f"{d}/corrupt"], "(the images of one folder are read, not of its subfolders)"),
                  ([f"{d}/A", "--save-stats", f"{d}/nodir/s.npz"], "give a .npz file name in an existing folder"),
                  ([f"{d}/A", "--save-stats", f"{d}/s"], "give a .npz file name in an existing folder")]
        weights = lambda args: [] if "--weights" in args else ["--weights", tf]
        for args, expect in cases:  # in this process: the message of SystemExit, which Python prints, exiting 1
            message = str(raises(SystemExit, fid.main, [*args, *weights(args), "--num-workers", "0"]))
            assert message.startswith("fid.py: error:") and expect in message and "\n" not in message, message
        # as a user runs it; and the same one line when DataLoader workers read the images
        runs = two_at_a_time(lambda case: run_fid(*case[0], *weights(case[0]), "--batch-size", "4", workers=case[1]),
                             [(cases[0][0], 0), (cases[3][0], 2), (cases[4][0], 2)])
        for p, expect in zip(runs, [cases[0][1], cases[3][1], cases[4][1]]):
            expect_error(p, expect, "fid.py")
            assert p.returncode == 1, p.returncode


def test_fid_and_train_read_16_bit_images_scaled_not_clipped():
    """A 16-bit grayscale PNG ("I;16") is scaled to 8 bits (65535 -> 255); convert("RGB") would clip
    it to a white square."""
    import train
    from PIL import Image
    with tempfile.TemporaryDirectory() as d:
        values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
        os.makedirs(f"{d}/c0")
        Image.fromarray(values).save(f"{d}/c0/deep.png")
        assert image(f"{d}/c0/deep.png").mode == "I;16"
        expect = np.round(values / 257).astype(np.uint8)
        assert np.array_equal(fid.ImageFiles(f"{d}/c0")[0].numpy(), np.stack([expect] * 3))
        loaded = train.ImageFolder(d, 32)[0][0]                   # (3, 32, 32) in [-1, 1]
        assert torch.equal(loaded, fid.to_tensor(np.stack([expect] * 3, -1)))
        Image.fromarray(np.zeros((4, 4), np.float32)).save(f"{d}/c0/float.tif")
        assert "32-bit float image" in str(raises(ValueError, fid.to_rgb, image(f"{d}/c0/float.tif")))


def test_fid_offline_without_weights_says_where_to_put_them():
    with offline_hub() as d:
        e = raises(FileNotFoundError, fid.load_inception)
        assert "weights-inception-2015-12-05-6726825d.pth" in str(e) and d in str(e) and "--weights" in str(e), e
        assert "or pass --inception-weights FILE" in str(raises(FileNotFoundError, lambda: fid.load_inception(flag="--inception-weights")))



@contextlib.contextmanager
def served(files):
    """A local HTTP server holding `files` ({name: bytes}) and an empty torch hub cache: a real
    download, offline. Yields (base URL, hub cache dir)."""
    import functools, http.server, threading
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as hub:
        for name, data in files.items():
            with open(os.path.join(root, name), "wb") as f:
                f.write(data)
        quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
        handler = functools.partial(quiet, directory=root)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        old_hub = torch.hub.get_dir()
        torch.hub.set_dir(hub)
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/", hub
        finally:
            torch.hub.set_dir(old_hub)
            server.shutdown()


def test_downloads_are_checked_against_the_published_sha256():
    """Issue 14 case 10: a download whose SHA-256 is not the published one is refused with one line
    and leaves nothing in the cache; a cached file that was altered later is refused when used; the
    right file is downloaded and used."""
    import hashlib
    bad, good = b"not the weights" * 100, b"the weights" * 100
    saved = fid.INCEPTION_URL, fid.INCEPTION_SHA256, coda.VGG16_URL
    with served({"weights-inception-2015-12-05-6726825d.pth": bad, "vgg16-397923af.pth": bad, "good.pth": good}) as (url, hub):
        try:
            fid.INCEPTION_URL, coda.VGG16_URL = url + os.path.basename(fid.INCEPTION_URL), url + "vgg16-397923af.pth"
            for load in (fid.load_inception, coda.make_lpips):
                assert "not the published file" in str(raises(ValueError, load))
            assert os.listdir(os.path.join(hub, "checkpoints")) == []       # nothing half-downloaded is kept
            with open(fid.cached_weights(), "wb") as f:                      # a cached copy altered later
                f.write(bad)
            e = raises(ValueError, fid.load_inception)
            assert "SHA-256" in str(e) and "delete it" in str(e) and "\n" not in str(e), e
            fid.INCEPTION_URL, fid.INCEPTION_SHA256 = url + "good.pth", hashlib.sha256(good).hexdigest()
            with open(fid.weights_path(), "rb") as f:                        # downloaded, checked, used
                assert f.read() == good
        finally:
            fid.INCEPTION_URL, fid.INCEPTION_SHA256, coda.VGG16_URL = saved

# ---------------------------------------------------------------------------------------------
# fid.py: the built-in data and its judge
# ---------------------------------------------------------------------------------------------

def test_fid_builtin_data_is_deterministic_and_varied():
    a, b = fid.toy_image(3, 7, seed=0), fid.toy_image(3, 7, seed=0)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert fid.toy_image(3, 7, seed=0, size=64).shape == (64, 64, 3)
    import train
    data = train.ToyDataset(32, num_images=400)
    x = fid.toy_images(32, num_images=400).float()
    assert torch.equal(data[13][0], fid.to_tensor(fid.toy_image(3, 1, seed=0))) and data[13][1] == 3
    assert torch.equal(fid.to_tensor(x[13].byte()), data[13][0]) and len(data.classes) == 10
    for c in range(10):  # variety inside a class: images differ clearly from each other
        assert x[c::10].std(0).mean() > 20, c


def test_fid_builtin_classes_cannot_be_told_apart_by_colour():
    """Every class draws its colour from the same distribution: a classifier on colour statistics
    (mean and std of each channel's chroma, i.e. the image minus its luma) stays near chance (10%) on
    held-out images. Luma is left out on purpose: how much of the image is light depends on the
    shape (a disc covers more than a ring), and shape is what the classes are about."""
    x = fid.to_tensor(fid.toy_images(32, num_images=3000, seed=7))  # (N, 3, H, W)
    chroma = x - fid.luminance(x)  # what the judge does not see
    features, labels = torch.cat([chroma.mean((2, 3)), chroma.std((2, 3))], 1), torch.arange(3000) % 10
    features = (features - features.mean(0)) / features.std(0)
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 10)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(head(features[:2000]), labels[:2000])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert (head(features[2000:]).argmax(1) == labels[2000:]).float().mean() < 0.18


def test_fid_colour_blind_judge_separates_the_classes():
    """The judge sees luminance only (a grey image of the same luma gets the same verdict), names
    the class of held-out images, and names no class for images of none: held-out ones of its own
    kinds, and the shortcuts a judge without that answer fell for (flat and noisy images it called
    gradients, specks it called dots, lumpy blobs it called squares or triangles)."""
    torch.manual_seed(0)
    judge = fid.toy_judge()  # the runs' judge: judge.pt's three CNNs
    x = fid.to_tensor(fid.toy_images(32, num_images=500, seed=123))
    labels = torch.arange(500) % 10
    accuracy, per_class, none = fid.class_accuracy(judge, x, labels)
    assert accuracy >= 0.9 and min(per_class) >= 0.7 and none <= 0.03, (accuracy, per_class, none)
    junk = fid.to_tensor(torch.from_numpy(np.stack([fid.toy_image(fid.NO_CLASS, i, 123) for i in range(200)])))
    g = torch.Generator().manual_seed(0)
    level = torch.rand(100, 1, 1, 1, generator=g) * 0.4 - 0.9  # dark grounds, as the classes'
    shortcuts = torch.cat([level.expand(100, 3, 32, 32), level + 0.2 * torch.randn(100, 3, 32, 32, generator=g),
                           (level + 1.5 * (torch.rand(100, 1, 32, 32, generator=g) < 0.05)).expand(-1, 3, -1, -1)]).clamp(-1, 1)
    blobs = torch.stack([torch.tensor(fid.blob_coverage(1 + i % 2, np.random.default_rng([9, i]), 32, wander=3.5, sigma=3.5),
                                      dtype=torch.float32) for i in range(100)])  # squares and triangles, lumpy
    blobs = (level + 1.4 * blobs[:, None]).expand(-1, 3, -1, -1).clamp(-1, 1)  # light shapes on dark grounds
    with torch.no_grad():
        for name, images, least in (("images of no class", junk, 0.8), ("flat, noise and specks", shortcuts, 0.95),
                                    ("lumpy blobs", blobs, 0.6)):
            named = judge(images).argmax(1)  # here 91%, 100% and 75% (a 10-way judge: 0%; blobs, the judge before them: 5%)
            assert (named == fid.NO_CLASS).float().mean() >= least, (name, torch.bincount(named, minlength=fid.NO_CLASS + 1))
    grey = fid.luminance(x).expand(-1, 3, -1, -1)
    with torch.no_grad():
        assert_close(judge(grey), judge(x), 1e-5, "judge of the grey image")
        assert not torch.allclose(judge(x.flip(1)), judge(x), atol=1e-3)  # luma differs: so does the verdict


def test_fid_judge_pt_holds_what_toy_judge_trains():
    """judge.pt is the 32 px judge's three CNNs as judge_nets trains them: its first CNN, trained
    again here (1,000 steps), names held-out images as the stored one does; with other settings the
    judge is trained, as the stored weights fit only the runs' own."""
    stored = fid.judge_nets()
    assert len(stored) == 3 and not any(net.training for net in stored)
    assert_close(stored[0][0].weight, torch.load(fid.JUDGE, weights_only=True)[0]["0.weight"], 0, "first conv")
    trained = fid.judge_nets(members=1, weights=None)[0]
    x = fid.judge_view(fid.to_tensor(fid.toy_images(32, num_images=500, seed=321)))
    labels = torch.arange(500) % 10
    with torch.no_grad():
        a, b = stored[0](x).argmax(1), trained(x).argmax(1)
    assert (a == labels).float().mean() >= 0.97 and (b == labels).float().mean() >= 0.97, ((a == labels).float().mean(), (b == labels).float().mean())
    assert (a == b).float().mean() >= 0.97, (a == b).float().mean()  # the same on a CPU with bf16 instructions (here 100%)
    assert not torch.equal(stored[1][0].weight, stored[0][0].weight)  # each CNN from its own seed
    other = fid.judge_nets(steps=2, members=1)[0]  # judge.pt at hand, but other settings: trained, not loaded
    assert not torch.equal(other[0].weight, stored[0][0].weight)


def test_fid_judge_reports_all_final_samples_and_the_grid_alone():
    """The verdict line counts the grid's 100 samples and the 400 more, and the grid on its own."""
    labels = torch.arange(10).repeat_interleave(10).repeat(5)                # five grids, one row per class
    verdict = labels.clone()
    verdict[:100][labels[:100] == 1] = 0                                      # the grid's squares called discs
    images = torch.zeros(500, 3, 32, 32)
    verdict[400:][labels[400:] == 9] = fid.NO_CLASS                        # and the last grid's dots none
    images[:, 0, 0, 0] = verdict / 10                                         # a stand-in judge reads it back
    fake = lambda x: torch.nn.functional.one_hot((x[:, 0, 0, 0] * 10).round().long().clamp(0, fid.NO_CLASS), fid.NO_CLASS + 1).float()
    real_judge, fid.toy_judge = fid.toy_judge, lambda size: fake
    try:
        overall, none, per_class, _ = fid.judge_samples(images, labels, 32, seed=0, grid=100)
    finally:
        fid.toy_judge = real_judge
    assert overall.startswith("class accuracy of 500 final samples") and "96% (the grid's 100: 90%;" in overall, overall
    assert "none of the classes" in none and ": 2% of the samples (real held-out images: " in none, none
    assert "disc 100% / 100%, square 80% / 0%, triangle 100% / 100%" in per_class and "dots 80% / 100%" in per_class, per_class


def test_fid_token_steps_see_mosaics_speckle_and_roughness():
    """Real images have no seams at 8x8 borders (ratio near 1); the same images with every 8x8 block
    shifted to its own brightness do (as MAR's undertrained pixel tokens); a shift inside the blocks
    (4 px off the grid) is not counted as a seam. Pixel noise lowers the seam ratio, and shows as
    speckle instead; the same offsets spread as ramps across the blocks lower it too, and show as
    roughness."""
    x = fid.to_tensor(fid.toy_images(32, num_images=200, seed=7))
    g = torch.Generator().manual_seed(0)
    levels = (torch.rand(200, 1, 4, 4, generator=g) - 0.5) * 0.6                 # one offset per 8x8 block
    mosaic = x + levels.repeat_interleave(8, 2).repeat_interleave(8, 3)
    off_grid = x + levels.repeat_interleave(8, 2).repeat_interleave(8, 3).roll((4, 4), (2, 3))
    noisy = mosaic + 0.3 * torch.randn(mosaic.shape, generator=g)
    smeared = x + torch.nn.functional.interpolate(levels, scale_factor=8, mode="bilinear")  # the same steps as ramps
    (real, speckle, rough), (tiled, _, rough_tiled), (shifted, _, _), (hidden, noise, _), (ramps, _, rough_ramps) = map(
        fid.token_steps, (x, mosaic, off_grid, noisy, smeared))
    assert 0.9 < real < 1.25 and tiled > 2 * real and shifted < real, (real, tiled, shifted)
    assert hidden < 0.5 * tiled and noise > 3 * speckle, (hidden, tiled, noise, speckle)
    # spread over the blocks, the offsets hardly step at the borders, but most of the roughness they add stays
    assert ramps < 0.6 * tiled and rough_ramps - rough > 0.5 * (rough_tiled - rough) > 0.005, (
        ramps, tiled, rough, rough_ramps, rough_tiled)


# ---------------------------------------------------------------------------------------------
# train.py: helpers (runs shared by several tests, fast flags)
# ---------------------------------------------------------------------------------------------

TRAIN = os.path.join(HERE, "train.py")
# fast settings: 32 px images from a small folder, batch 4, few steps, cheap grids; then per model
FAST = ["--preset", "tiny", "--img-size", "32", "--batch-size", "4", "--log-every", "5", "--sample-every", "1000",
        "--warmup-epochs", "1", "--blr", "1e-3", "--device", "cpu"]
MAR = FAST + ["--num-iter", "2", "--num-sampling-steps", "5", "--cleanup-steps", "3"]
TOKENIZER = FAST + ["--lpips-weight", "0", "--disc", "patch"]
SHARED = tempfile.TemporaryDirectory()  # the runs below, made once and removed at exit
SHARED_DIR = os.environ.get("TEST_ALL_SHARED", SHARED.name)  # the runner's, when it runs tests in two processes
_runs = {}


def altered_copy(path, out):
    """A copy of a train.py VAE or CODA checkpoint with one EMA weight changed: another tokenizer of the same layout."""
    ckpt = torch.load(path, weights_only=True)
    next(iter(ckpt["model_ema"].values())).add_(1e-3)
    torch.save(ckpt, out)
    return out


def run_train(*flags, **kw):
    return run_script(TRAIN, *flags, **kw)


def make_folder(root, per_class=4, classes=10, size=40):
    """An ImageNet-style folder of toy images (non-square-cropped sizes exercise the center crop)."""
    from PIL import Image
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c:02d}"), exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(fid.toy_image(c % 10, i + c // 10 * 100, seed=5, size=size)).resize((size + 8, size))
            img.save(os.path.join(root, f"class{c:02d}", f"img{i}.png"))
    return root


def shared_run(name):
    """Runs several tests start from, made on first use: "data" (40 images), "vae" (2 epochs on it),
    "coda" (4 epochs on that VAE, attention quantizer, LoRA on encoder and decoder as the official,
    PatchGAN, its own quantizer lr). Made once for both test processes: a lock file says who makes it."""
    import fcntl
    if name not in _runs:
        d = SHARED_DIR
        with open(f"{d}/{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other test process may be making it now
            if not os.path.exists(f"{d}/{name}.done"):
                if name == "data":
                    make_folder(f"{d}/data")
                elif name == "vae":
                    run_train("--model", "vae", "--data-path", shared_run("data"), *TOKENIZER, "--epochs", "2",
                              "--output-dir", f"{d}/vae")
                else:
                    run_train(*coda_flags(), "--epochs", "4", "--output-dir", f"{d}/coda")
                open(f"{d}/{name}.done", "w").close()
        _runs[name] = f"{d}/{name}"
    return _runs[name]


def coda_flags():
    return ["--model", "coda", "--vae", f"{shared_run('vae')}/checkpoint-last.pth", "--data-path", shared_run("data"),
            *TOKENIZER, "--lora", "both", "--ema-start-epoch", "1", "--lr", "5e-4", "--quantizer-lr", "2e-3"]


def final_weights(out):
    return torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)


def same_state(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["model_ema"][k], b["model_ema"][k])
               for k in a["model"])


def interrupt(*flags, lines=2, logged=None, sig=signal.SIGTERM):
    """Start train.py, send `sig` once metrics.jsonl has `lines` lines (mid-run), or once log.txt
    holds the text `logged` -> (exit code, stderr, seconds from the signal to the exit)."""
    out = flags[list(flags).index("--output-dir") + 1]
    output = lambda name: read(os.path.join(out, name)) if os.path.exists(os.path.join(out, name)) else ""
    ready = (lambda: logged in output("log.txt")) if logged else (lambda: output("metrics.jsonl").count("\n") >= lines)
    proc = subprocess.Popen([sys.executable, TRAIN, *flags], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 180 and not ready():
        time.sleep(0.1)
    t1 = time.time()
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    return code, proc.stderr.read(), time.time() - t1


RANK_WEIGHTS = """import sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
import train
args = train.parse_args(sys.argv[1:])
model = train.main(args)
torch.save(model.state_dict(), f"{{args.output_dir}}/rank{{dist.get_rank()}}.pt")
train.barrier(destroy=True)
"""


def ddp_ranks_weights(d, *flags):
    """train.py under torchrun with 2 gloo processes, each rank saving its own final weights -> both."""
    script = script_in(d, "train_and_save_rank.py", RANK_WEIGHTS)
    run_script(script, *flags, nproc=2)
    out = flags[list(flags).index("--output-dir") + 1]
    return [torch.load(f"{out}/rank{r}.pt", weights_only=True) for r in range(2)]


def assert_ranks_equal(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]


# ---------------------------------------------------------------------------------------------
# train.py: flags per model
# ---------------------------------------------------------------------------------------------

def test_train_help_lists_each_models_own_flags_and_defaults():
    import train
    mg, mar_help, coda_help, wrong = two_at_a_time(lambda flags: run_train(*flags, check=False), [
        ("--model", "maskgit", "--help"), ("--model", "mar", "--help"), ("--model", "coda", "--help"), ("--model", "vae", "--cfg", "2")])
    mg, mar_help, coda_help = mg.stdout, " ".join(mar_help.stdout.split()), " ".join(coda_help.stdout.split())
    assert "--choice-temperature" in mg and "--tokenizer" in mg and "--eval" in mg
    assert not any(f in mg for f in ("--lora-rank", "--disc ", "--vae ", "--diffusion-batch-mul"))
    flat = " ".join(mg.split())  # help text wraps: compare with single spaces
    assert "--cfg CFG classifier-free guidance scale; default: 1.0 (paper), 3.0 (CPU-sized)" in flat
    assert "--num-iter NUM_ITER generation steps for sample grids and --eval; default: 8" in flat
    assert "default: 64 (paper), 8 (CPU-sized)" in mar_help and "--lora" not in mar_help
    assert "--epochs EPOCHS default: 10 (paper), 5 (CPU-sized)" in coda_help
    coda_args = train.parse_args(["--model", "coda", "--vae", "x.ckpt"])
    assert (coda_args.epochs, coda_args.lora, coda_args.lora_rank, coda_args.lr) == (5, "decoder", 8, 2e-3)
    assert not hasattr(coda_args, "cfg") and train.parse_args(["--model", "coda", "--vae", "x", "--defaults", "paper"]).lora == "both"
    assert (coda.preset_levels("tiny", 4), coda.preset_levels("tiny", 8), coda.preset_levels("mar", 16)) == (
        (1, 2, 3, 4), (1, 2, 3, 4, 6, 8), coda.MAR_LEVELS)  # CODA's default levels follow the VAE's latent side
    expect_error(wrong, "unrecognized arguments: --cfg 2", "train.py")


def test_train_defaults_follow_the_data_and_say_so():
    """A small folder on a CPU gets the built-in run's recipe with as many steps, not MAR-B at
    256 px; --defaults paper gives the paper's; a given flag wins over both; the log says which,
    and at what size the folder's images are trained if it is not theirs."""
    import train
    data = shared_run("data")  # 40 images
    small = train.parse_args(["--data-path", data])
    steps = mar.BUILTIN["epochs"] * 10000 // 40  # the built-in run's steps (10,000 images) over 40 images
    assert (small.preset, small.img_size, small.ema, small.epochs, small.warmup_epochs) == ("tiny", 32, 0.995, steps, 250)
    assert small.defaults_in_force.startswith("defaults: CPU-sized (fewer than 100,000 images)"), small.defaults_in_force
    assert "at 32 px (its first image, 48x40, is scaled and center-cropped to it)" in small.defaults_in_force
    assert "(its first image" not in train.parse_args(["--data-path", data, "--img-size", "40"]).defaults_in_force
    paper = train.parse_args(["--data-path", data, "--defaults", "paper"])
    assert (paper.preset, paper.img_size, paper.ema, paper.epochs, paper.warmup_epochs) == ("base", 256, 0.9999, 400, 100)
    assert train.parse_args(["--data-path", data, "--epochs", "3"]).epochs == 3
    warmup = lambda *flags: train.parse_args(["--model", "mar", *flags]).warmup_epochs
    # a shorter --epochs gets the recipe's share of its warm-up, which reaches the recipe's at its length, without a jump
    assert [warmup("--defaults", "paper", "--epochs", str(e)) for e in (100, 101, 399, 400, 800)] == [25, 25.25, 99.75, 100, 100]
    assert warmup("--epochs", "29") == 0.5 and warmup("--epochs", "29", "--warmup-epochs", "2") == 2
    assert "0.5 warm-up epochs, the recipe's share of --epochs 29" in train.parse_args(["--epochs", "29"]).defaults_in_force
    builtin = train.parse_args(["--model", "maskgit", "--tokenizer", "t.pth"])
    assert (builtin.epochs, builtin.cfg) == (96, 3.0) and "built-in data" in builtin.defaults_in_force
    with tempfile.TemporaryDirectory() as d:
        run_train("--data-path", data, *MAR, "--epochs", "1", "--output-dir", f"{d}/run")
        assert "defaults: CPU-sized" in read(f"{d}/run/log.txt")


# ---------------------------------------------------------------------------------------------
# train.py: the loop: DDP, resume, preemption, bad data
# ---------------------------------------------------------------------------------------------

def test_train_ddp_two_processes_keep_ranks_identical():
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/run"
        rank0, rank1 = ddp_ranks_weights(d, "--data-path", shared_run("data"), "--output-dir", out, "--epochs", "2", *MAR)
        assert_ranks_equal(rank0, rank1)
        ckpt = final_weights(out)
        assert ckpt["step"] == 10 and ckpt["world_size"] == 2  # 40 images / 2 ranks / batch 4 = 5 steps per epoch
        assert all(torch.equal(ckpt["model"][k], rank0[k]) for k in rank0)  # no "module." / "_orig_mod." prefixes
        assert "2 process(es)" in read(f"{out}/log.txt") and os.path.exists(f"{out}/samples-final.png")



def free_port():
    """A TCP port free on this machine now, for a process group started by hand (MASTER_PORT)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_ranks_that_see_different_output_folders_refuse_instead_of_hanging():
    """Issue 15: rank 0 decides whether to resume and tells the others. Two gloo processes started
    by hand, each in its own working directory with the same relative --output-dir (node-local
    disks): rank 1 cannot see the checkpoint rank 0 resumes from, says so in one line and exits;
    rank 0 exits too, within seconds, instead of waiting for it."""
    with tempfile.TemporaryDirectory() as d:
        data, flags = shared_run("data"), [*MAR, "--output-dir", "run", "--dist-timeout", "5"]
        run_train("--data-path", shared_run("data"), *MAR, "--epochs", "1", "--output-dir", f"{d}/a/run")
        os.makedirs(f"{d}/b/run")                                            # rank 1's disk: an empty folder
        port = free_port()
        procs = [subprocess.Popen([sys.executable, TRAIN, "--data-path", data, *flags, "--epochs", "2"], cwd=f"{d}/{cwd}",
                                  env=dict(ENV, RANK=str(r), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r, cwd in ((0, "a"), (1, "b"))]
        t0 = time.time()
        try:
            (_, err0), (_, err1) = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                p.kill()
        assert procs[0].returncode != 0 and time.time() - t0 < 90, err0[-1000:]
        expect_error(subprocess.CompletedProcess([], procs[1].returncode, "", err1), "rank 1 cannot see run/checkpoint-last.pth", "train.py")


def test_train_ranks_wait_for_rank_0_longer_than_the_collective_timeout():
    """Rank 0 alone may work longer than --dist-timeout before the others go on (its final report on
    50,000 held-out images); the others must wait for it, not fail. Two gloo processes whose process
    group times out after 2 s: rank 0 works 5 s before `train.barrier`, and rank 1 waits there for
    it (with the default group's barrier it failed after 2 s, and so did every resume of the run)."""
    script = ("import datetime, sys, time; sys.path.insert(0, sys.argv[1]); import torch.distributed as dist, train\n"
              "dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=2))\n"
              "train.HEARTBEAT['stop'] = train.heartbeat(30)\n"
              "time.sleep(5 if dist.get_rank() == 0 else 0)\n"
              "t = time.time(); train.barrier(); print(f'waited {time.time() - t:.1f} s'); train.barrier(destroy=True)")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script, HERE], env=dict(ENV, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR=
                              "127.0.0.1", MASTER_PORT=str(port)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        (out0, err0), (out1, err1) = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 0 and procs[1].returncode == 0, (err0[-1000:], err1[-1000:])
    assert float(out1.split()[1]) >= 4 and float(out0.split()[1]) < 1, (out0, out1)


def test_train_names_a_rank_that_stops_answering():
    """Issue 14 case 4: rank 1 of 2 is stopped (SIGSTOP) mid-run; instead of stalling forever the run
    fails within --dist-timeout with one line naming rank 1."""
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/run"
        flags = ["--data-path", shared_run("data"), "--output-dir", out, "--epochs", "200", "--dist-timeout", "5", *MAR]
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 TRAIN, *flags], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=d)
        t0 = time.time()
        while time.time() - t0 < 120 and not (os.path.exists(f"{out}/metrics.jsonl") and read(f"{out}/metrics.jsonl").count("\n") >= 2):
            time.sleep(0.2)
        stat = lambda p: read(f"/proc/{p}/stat").rsplit(")", 1)[1].split()  # [state, parent pid, ...]
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}/stat")
                    and stat(p)[1] == str(proc.pid)]
        rank = {int(b"\0RANK=1\0" in b"\0" + read(f"/proc/{p}/environ", "rb")): p for p in children}
        assert sorted(rank) == [0, 1], (children, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        os.kill(rank[1], signal.SIGSTOP)
        alive = lambda p: os.path.exists(f"/proc/{p}/stat") and stat(p)[0] != "Z"
        t1 = time.time()
        while alive(rank[0]) and time.time() - t1 < 60:
            time.sleep(0.2)
        seconds = time.time() - t1
        os.kill(rank[1], signal.SIGKILL)  # torchrun would wait 30 s for the stopped rank to take its SIGTERM
        code, err = proc.wait(timeout=90), proc.stderr.read()
        assert code != 0 and 5 <= seconds < 30, (code, seconds)
        assert "train.py: error: rank 1 of 2 stopped answering for 5 s (--dist-timeout)" in err, err[-2000:]
        assert "Traceback" not in err.split("stopped answering")[0], err[-2000:]

def test_train_resume_is_exact():
    with tempfile.TemporaryDirectory() as d:
        common = ["--data-path", shared_run("data"), *MAR]
        def resumed():  # stop after 3 epochs, then go on to 12 -> the step of the first stop
            run_train(*common, "--epochs", "3", "--output-dir", f"{d}/resumed")
            step = final_weights(f"{d}/resumed")["step"]
            run_train(*common, "--epochs", "12", "--output-dir", f"{d}/resumed")
            run_train(*common, "--output-dir", f"{d}/resumed")  # without --epochs: the run's 12, not the default
            return step
        def preempted():  # SIGTERM mid-run saves a checkpoint; the same command then finishes the run
            code, err, _ = interrupt(*common, "--epochs", "12", "--output-dir", f"{d}/pre")
            stopped = final_weights(f"{d}/pre")["step"]
            run_train(*common, "--epochs", "12", "--output-dir", f"{d}/pre")
            return code, err, stopped
        _, first_stop, (code, err, stopped) = two_at_a_time(lambda run: run(), [  # beside the uninterrupted run
            lambda: run_train(*common, "--epochs", "12", "--output-dir", f"{d}/full"), resumed, preempted])
        full = final_weights(f"{d}/full")
        assert full["step"] == 120 and first_stop == 30, (full["step"], first_stop)
        bf16 = mar.bf16_autocast(torch.device("cpu"))  # MAR's training steps on a CPU with bf16 instructions: exact too
        assert f"precision: {'bf16 autocast' if bf16 else 'fp32'}" in read(f"{d}/full/log.txt")
        assert "resumed from" in read(f"{d}/resumed/log.txt")
        assert "resuming: --epochs 12 as the checkpoint's run" in read(f"{d}/resumed/log.txt")
        assert "already complete (120 steps)" in read(f"{d}/resumed/log.txt")
        # the pixel tokenizer's decoder: fitted once, before step 0, then restored from the checkpoint
        assert read(f"{d}/resumed/log.txt").count("clean-up decoder: 3 steps") == 1
        tok = final_weights(f"{d}/resumed")["tokenizer"]
        assert tok["cleanup.10.weight"].abs().sum() > 0 and all(torch.equal(v, full["tokenizer"][k]) for k, v in tok.items())
        assert same_state(final_weights(f"{d}/resumed"), full), "resumed run differs from the uninterrupted one"
        assert code == 143 and 0 < stopped < 120, (code, stopped, err[-1000:])  # 128 + SIGTERM
        assert "stopped by SIGTERM" in read(f"{d}/pre/log.txt")
        assert same_state(final_weights(f"{d}/pre"), full), "preempted + resumed run differs from the uninterrupted one"



def test_train_resume_with_another_global_batch_goes_on_from_the_epochs_done():
    """Resumed with another --batch-size (or number of processes), a run goes on from the epochs it
    has done, counted in its new steps, not from the old step number (which had called a run at half
    its epochs complete, or trained on past its end)."""
    with tempfile.TemporaryDirectory() as d:
        flags = ["--data-path", shared_run("data"), *MAR, "--output-dir", f"{d}/run"]
        run_train(*flags, "--epochs", "1")  # 10 steps of 4 images
        run_train(*flags, "--epochs", "2", "--batch-size", "8")  # 5 steps an epoch: from step 5 to 10
        ckpt = final_weights(f"{d}/run")
        assert (ckpt["step"], ckpt["epoch"]) == (10, 2.0), (ckpt["step"], ckpt["epoch"])
        assert "resuming with 1 x 8 images a step instead of 1 x 4: its step 10 (epoch 1.00) is step 5 here" in read(
            f"{d}/run/log.txt")


def test_train_checkpoints_are_written_in_the_background_from_a_snapshot():
    """The checkpoint holds the state at the moment `write` was called, though training goes on
    while a thread writes it; a failed write stops the run with one line."""
    import train
    with tempfile.TemporaryDirectory() as d:
        writer, weights = train.CheckpointWriter(), torch.arange(100_000.0)
        writer.write({"model": {"w": weights}, "step": 3}, f"{d}/c.pth")
        weights.add_(1)  # the next training step
        writer.wait()
        saved = torch.load(f"{d}/c.pth", weights_only=True)
        assert saved["step"] == 3 and torch.equal(saved["model"]["w"], torch.arange(100_000.0))
        assert os.listdir(d) == ["c.pth"]  # no temporary file left
        writer.write({"model": {"w": weights}}, f"{d}/gone/c.pth")
        assert "could not write the checkpoint" in str(raises(SystemExit, writer.wait))


def test_train_a_signal_during_the_final_report_stops_at_once():
    """Issue 14 case 9: once the final checkpoint is written, SIGTERM during the end-of-run report
    (here the built-in judge's training) stops the run at once, exit 143, the checkpoint complete.
    So does Ctrl-C (SIGINT, exit 130) before the first training step, with nothing to save."""
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/run"
        flags = ["--epochs", "1", "--batch-size", "256", "--num-iter", "2", "--num-sampling-steps", "5", "--device", "cpu",
                 "--output-dir", out]
        code, err, seconds = interrupt(*flags, "--cleanup-steps", "3", logged="samples-final.png")
        assert code == 143 and seconds < 10, (code, seconds, err[-1000:])
        assert "stopped by SIGTERM after the final checkpoint was written" in err and "Traceback" not in err, err[-1000:]
        assert final_weights(out)["step"] == 39 and "class accuracy" not in read(f"{out}/log.txt")
        # before the loop (here while MAR's pixel decoder is fitted; Ctrl-C): nothing to save, one line, at once
        code, err, seconds = interrupt("--data-path", shared_run("data"), *MAR, "--output-dir", f"{d}/early",
                                       "--cleanup-steps", "100000", logged="parameters", sig=signal.SIGINT)
        assert code == 130 and seconds < 10 and "Traceback" not in err, (code, seconds, err[-1000:])
        assert "stopped by SIGINT before the first training step; nothing to save" in err, err[-1000:]
        assert not os.path.exists(f"{d}/early/checkpoint-last.pth")

def test_train_metrics_hold_one_line_per_step_after_a_resume():
    """A run killed after its last checkpoint had logged later steps (the last line cut short): the
    resumed run logs them again, and metrics.jsonl keeps one line per step."""
    with tempfile.TemporaryDirectory() as d:
        flags = ["--data-path", shared_run("data"), *MAR, "--output-dir", f"{d}/run"]
        run_train(*flags, "--epochs", "1")
        for step in (15, 20):  # what the killed run had logged beyond its checkpoint at step 10
            train_append = json.dumps(dict(step=step, loss=0.0))
            with open(f"{d}/run/metrics.jsonl", "a") as f:
                f.write(train_append + "\n")
        with open(f"{d}/run/metrics.jsonl", "a") as f:
            f.write('{"step": 25, "lo')  # a last line cut short by the kill
        run_train(*flags, "--epochs", "2")
        steps = [json.loads(l)["step"] for l in read(f"{d}/run/metrics.jsonl").splitlines()]
        assert steps == [5, 10, 15, 20], steps
        # after a resume with another global batch the steps restart lower: only the last lines past the
        # checkpoint go, not the earlier run's lines counted in its own steps
        import train
        with open(f"{d}/m.jsonl", "w") as f:
            f.write("".join(json.dumps(dict(step=s)) + "\n" for s in (5, 10, 15, 20, 12, 14, 16)) + '{"step": 1')
        train.keep_metrics_until(f"{d}/m.jsonl", 14)
        assert [json.loads(l)["step"] for l in read(f"{d}/m.jsonl").splitlines()] == [5, 10, 15, 20, 12, 14]


def test_train_ema_learning_rate_and_shards_by_value():
    """update_ema is ema <- d ema + (1 - d) p on trained parameters only; the learning rate ramps
    linearly, then holds (constant) or follows the cosine; the ranks' shards of an epoch are disjoint
    and cover the epoch's permutation (less the remainder), and a resumed shard is its tail."""
    import train
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)                                   # frozen: never averaged
    before = [p.detach().clone() for p in ema.parameters()]
    train.update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, 0.9 * before[0] + 0.1 * model.weight, rtol=1e-6, atol=0)
    assert torch.equal(ema.bias, before[1])
    lr = lambda step, schedule: train.learning_rate(step, 1.0, 10, 110, schedule)
    assert [lr(s, "constant") for s in (0, 5, 10, 60, 109)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert lr(60, "cosine") == 0.5 and abs(lr(35, "cosine") - 0.5 * (1 + math.cos(math.pi / 4))) < 1e-12
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 10007 + 2)).tolist()
    shards = [list(train.ShardSampler(10, rank, 3, seed=3, epoch=2)) for rank in range(3)]
    assert sorted(sum(shards, [])) == sorted(perm[:9]) and all(len(s) == 3 for s in shards)
    assert list(train.ShardSampler(10, 1, 3, seed=3, epoch=2, start=1)) == shards[1][1:]


def test_train_recipe_flags_win_over_the_recipe_and_reach_what_uses_them():
    """--weight-decay, --ema, --lr-schedule, --grad-clip and --seed given on the command line replace the
    recipe's values; the weight decay reaches the matrices of the transformer only (the official
    grouping: no decay on biases, norms and the Diffusion Loss MLP), the EMA decay the EMA update,
    CODA's --disc-weight its loss, and MAR's sampling flags (--cfg-schedule among them) its sampler.
    A given --blr replaces a recipe's absolute --lr (the tokenizers'); --eval's flags need --eval."""
    import train
    given = ["--weight-decay", "0.3", "--ema", "0.5", "--lr-schedule", "cosine", "--grad-clip", "0.25", "--seed", "7"]
    recipe, args = train.parse_args(["--model", "mar"]), train.parse_args(["--model", "mar", *given])
    assert (recipe.weight_decay, recipe.ema, recipe.lr_schedule, recipe.grad_clip, recipe.seed) != (0.3, 0.5, "cosine", 0.25, 7)
    assert (args.weight_decay, args.ema, args.lr_schedule, args.grad_clip, args.seed) == (0.3, 0.5, "cosine", 0.25, 7)
    training = train.build(args, 10, torch.device("cpu"))
    assert training.ema_decay(step=100, epoch=1) == 0.5
    decay = {id(p): g["weight_decay"] for g in train.make_optimizer(training, 1e-3, args.weight_decay).param_groups
             for p in g["params"]}
    model = training.model
    qkv = model.encoder_blocks[0].attn.qkv
    assert decay[id(qkv.weight)] == 0.3 and decay[id(qkv.bias)] == 0.0
    assert decay[id(model.encoder_blocks[0].norm1.weight)] == 0.0
    assert {decay[id(p)] for p in model.diffloss.parameters()} == {0.0}
    assert sum(p.numel() for p in model.parameters() if decay[id(p)] == 0.3) > 0.5 * sum(
        p.numel() for n, p in model.named_parameters() if "diffloss" not in n)
    coda_args = train.parse_args(["--model", "coda", "--vae", f"{shared_run('vae')}/checkpoint-last.pth", "--disc", "patch",
                                  "--lpips-weight", "0", "--disc-weight", "0.25"])
    assert train.build(coda_args, 10, torch.device("cpu")).criterion.disc_weight == 0.25  # the adaptive GAN weight's factor
    sampling = ["--num-iter", "3", "--cfg", "2.5", "--cfg-schedule", "constant", "--temperature", "0.7"]
    recipe = train.parse_args(["--model", "mar"])
    assert (recipe.num_iter, recipe.cfg, recipe.cfg_schedule, recipe.temperature) == (8, 9.0, "linear", 1.1)
    training, calls = train.build(train.parse_args(["--model", "mar", *sampling]), 10, torch.device("cpu")), []
    def recorded(*a, **kw):
        calls.append(a)
        raise KeyError("recorded")
    training.model.sample_tokens = recorded  # the grids' and --eval's sampler
    raises(KeyError, training.sample, training.model, torch.arange(2), None)
    assert calls[0][1:4] + calls[0][5:] == (3, 2.5, "constant", 0.7), calls
    vae = train.parse_args(["--model", "vae", "--blr", "1e-2"])  # a given --blr wins over the recipe's absolute --lr
    assert (vae.lr, vae.blr, train.parse_args(["--model", "vae"]).lr) == (None, 1e-2, 1e-3)
    for flag in ("--fid-stats", "--save-images"):  # --eval's: refused in a training run, which would not read them
        assert "is for --eval" in str(raises(SystemExit, train.parse_args, ["--model", "mar", flag, HERE]))


def test_train_check_config_ignores_file_names_and_names_every_difference():
    """A renamed VAE or tokenizer file is the same model (checkpoints of earlier versions recorded
    MaskGIT's tokenizer file name; CODA records its VAE's); any other difference, also a key only the
    checkpoint has, is named in the one line."""
    import train
    old = dict(levels=(1, 2), tokenizer="checkpoint-last.pth", vae=dict(embed_dim=16, file="checkpoint-last.pth"))
    train.check_config("c.pth", old, dict(levels=(1, 2), vae=dict(embed_dim=16, file="vae.pth")))  # no exit
    message = str(raises(SystemExit, train.check_config, "c.pth", dict(old, prediction="v"), dict(levels=(1, 2, 3), vae=old["vae"])))
    assert message.endswith("c.pth was trained with another config: levels (1, 2) (checkpoint) vs (1, 2, 3) (now), "
                            "prediction v (checkpoint) vs None (now)"), message


def test_train_requeued_resume_command_goes_on_from_its_own_checkpoint():
    """A command that starts from --resume A, run again (a requeued job), continues its own run folder
    instead of starting from A again; a complete run draws its final grid again only if it is missing;
    a folder holding another run is refused. Grids of a 12-class folder show 8 classes spread over them."""
    from PIL import Image
    with tempfile.TemporaryDirectory() as d:
        data = make_folder(os.path.join(d, "data"), per_class=1, classes=12)  # 3 steps an epoch at batch 4
        run_train("--data-path", data, *MAR, "--epochs", "1", "--output-dir", f"{d}/a")
        flags = ["--data-path", data, *MAR, "--resume", f"{d}/a/checkpoint-last.pth", "--output-dir", f"{d}/b", "--epochs", "2"]
        run_train(*flags)
        log = read(f"{d}/b/log.txt")
        assert "resumed from" in log and "at step 3 / 6" in log, log[-1500:]
        done = final_weights(f"{d}/b")
        run_train(*flags)
        log = read(f"{d}/b/log.txt")
        assert "which started from --resume" in log and "already complete (6 steps)" in log, log[-1500:]
        assert log.count("wrote") == log.count("samples-final.png") == 1, log[-1500:]  # a complete run draws nothing again
        assert same_state(final_weights(f"{d}/b"), done) and final_weights(f"{d}/b")["step"] == 6
        assert Image.open(f"{d}/b/samples-final.png").size == (8 * 34 + 2, 8 * 34 + 2)  # 8 rows of 8, 32 px + 2 px padding
        os.remove(f"{d}/b/samples-final.png")  # as if a signal had stopped the final grid: the next run draws it
        run_train(*flags)
        assert os.path.exists(f"{d}/b/samples-final.png") and read(f"{d}/b/log.txt").count("wrote") == 2
        # a folder holding a run that did not start from this --resume: refused, not continued nor overwritten
        p = run_train("--data-path", data, *MAR, "--resume", f"{d}/b/checkpoint-last.pth", "--output-dir", f"{d}/a", check=False)
        expect_error(p, f"{d}/a holds a run of its own (step 3) that did not start from --resume", "train.py")
        # --eval of a 12-class run: the built-in data's 10-class reference is no reference for it
        p = run_train("--eval", *MAR, "--output-dir", f"{d}/a", "--num-images", "12", check=False)
        expect_error(p, "--eval of a 12-class checkpoint needs --fid-stats", "train.py")


def test_train_nan_loss_stops_and_keeps_last_good_checkpoint():
    with tempfile.TemporaryDirectory() as d:
        run_train("--data-path", shared_run("data"), *MAR, "--epochs", "1", "--output-dir", f"{d}/run")
        good = final_weights(f"{d}/run")
        p = run_train("--data-path", shared_run("data"), *MAR, "--epochs", "3", "--lr", "1e30", "--output-dir", f"{d}/run",
                      check=False)  # seen at a log step: the loss
        assert p.returncode == 1 and ("loss is nan" in p.stderr.lower() or "loss is inf" in p.stderr.lower()), p.stderr[-2000:]
        assert "the last checkpoint is" in p.stderr and "(step 10)" in p.stderr, p.stderr[-2000:]
        assert same_state(final_weights(f"{d}/run"), good), "the last good checkpoint was overwritten"
        # between log steps, a checkpoint at every step: the first update at lr 1e30 leaves huge but finite
        # weights, saved; the next makes them NaN, and that checkpoint is refused
        p = run_train("--data-path", shared_run("data"), *MAR, "--epochs", "3", "--lr", "1e30", "--output-dir", f"{d}/run",
                      "--log-every", "1000", "--ckpt-every", "1", check=False)
        saved = final_weights(f"{d}/run")
        assert p.returncode == 1 and "the gradient or the weights are not finite" in p.stderr, p.stderr[-2000:]
        assert f"(step {saved['step']})" in p.stderr and saved["step"] > 10, (saved["step"], p.stderr[-1000:])
        assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_train_corrupt_images_are_skipped():
    with tempfile.TemporaryDirectory() as d:
        data = make_folder(os.path.join(d, "data"))
        with open(os.path.join(data, "class00", "broken.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n this is not an image")
        good = read(os.path.join(data, "class01", "img0.png"), "rb")
        with open(os.path.join(data, "class01", "truncated.png"), "wb") as f:
            f.write(good[: len(good) // 2])
        os.makedirs(os.path.join(data, "class10"))
        with open(os.path.join(data, "class10", "gone.png"), "wb") as f:  # a class none of whose images can be read
            f.write(b"not an image")
        import train
        folder = train.ImageFolder(data, 32)
        items = [folder[i] for i in range(len(folder))]  # decoded at every step: a bad file -> the next image, its index
        assert {os.path.basename(folder.samples[i][0]) for _, _, i in items if i >= 0} == {"broken.png", "truncated.png", "gone.png"}
        folder.preload(progress=False)  # a small folder is decoded once: the same items
        assert all(torch.equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(items, folder)) and len(folder) == len(items)
        run_train("--data-path", data, *MAR, "--epochs", "3", "--output-dir", f"{d}/run")
        log = read(f"{d}/run/log.txt")  # 3 bad files over 3 epochs: counted once each, and named
        assert "skipped 3 unreadable images" in log and "broken.png" in log and "truncated.png" in log, log[-1500:]
        assert "warning: no image of class class10 could be read: the model never saw it" in log, log[-1500:]
        assert "images of " in log and "into memory once" in log, log[-1500:]
        assert json.loads(read(f"{d}/run/metrics.jsonl").splitlines()[-1])["skipped_images"] == 3


def test_train_cached_latents_with_a_kl16_layout_vae():
    """--cache-latents writes the official main_cache.py layout (moments of the image and of its
    flip per file), and --use-cached trains from it, skipping an unreadable file, refusing another
    VAE or image size; the VAE file has the official kl16 layout."""
    import train
    with tempfile.TemporaryDirectory() as d:
        data = make_folder(os.path.join(d, "data"), per_class=2, classes=4)
        torch.manual_seed(0)
        vae = mar.kl16()
        torch.save({"model": vae.state_dict()}, f"{d}/kl16.ckpt")
        flags = ["--vae", f"{d}/kl16.ckpt", "--cache-path", f"{d}/cache", *MAR]
        run_train("--cache-latents", "--data-path", data, *flags)
        with np.load(os.path.join(d, "cache", "class02", "img1.png.npz")) as f:
            moments, moments_flip = torch.from_numpy(f["moments"]), torch.from_numpy(f["moments_flip"])
        assert moments.shape == (32, 2, 2)  # 32 px / stride 16, mean and log-variance of 16 channels
        image = train.ImageFolder(data, 32).load(os.path.join(data, "class02", "img1.png"))[None]
        with torch.no_grad():
            assert_close(moments, vae.encode(image).moments[0], rtol=1e-4, what="moments")
            assert_close(moments_flip, vae.encode(image.flip(3)).moments[0], rtol=1e-4, what="flip")
        with open(os.path.join(d, "cache", "class00", "junk.png.npz"), "w") as f:
            f.write("not an archive")  # skipped as an unreadable image is
        run_train("--use-cached", *flags, "--epochs", "2", "--output-dir", f"{d}/run")
        ckpt = final_weights(f"{d}/run")
        assert ckpt["step"] == 4 and ckpt["config"]["vae_embed_dim"] == 16 and ckpt["config"]["patch_size"] == 1
        assert "skipped 1 unreadable images" in read(f"{d}/run/log.txt")
        # the cache records which VAE encoded it, and its latents' size is checked
        assert json.loads(read(f"{d}/cache/vae.json"))["vae_sha256"] == train.weights_digest(vae)
        torch.save({"model": perturbed(mar.kl16()).state_dict()}, f"{d}/other.ckpt")
        cases = [(["--vae", f"{d}/other.ckpt"], "was encoded by another VAE"),
                 (["--img-size", "64"], "holds latents of (2, 2), not the 4 x 4 of --img-size")]
        runs = two_at_a_time(lambda case: run_train("--use-cached", *flags, *case[0], "--epochs", "2", "--output-dir",
                                                    f"{d}/run-{case[0][0]}", check=False), cases)
        for p, (_, expect) in zip(runs, cases):
            expect_error(p, expect, "train.py")


class Pickled:
    """An object whose unpickling would run code: checkpoints holding it must be refused."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_train_error_paths_exit_nonzero_with_one_line():
    """Bad input stops with one line `train.py: error: ...`, exit status 1, no traceback. Flags that
    parse_args refuses are checked in this process (the message is SystemExit's: Python prints it
    and exits 1, as the first subprocess case shows); the rest in a subprocess, as a user runs them."""
    import PIL.Image
    import train
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "empty", "class0"))
        os.makedirs(os.path.join(d, "flat"))
        PIL.Image.new("RGB", (8, 8)).save(os.path.join(d, "flat", "a.png"))  # images but no class subfolder
        data = make_folder(os.path.join(d, "data"), per_class=1)
        run_train("--data-path", data, *MAR, "--epochs", "1", "--output-dir", f"{d}/tiny")
        torch.save(dict(final_weights(f"{d}/tiny"), model_name="coda"), f"{d}/coda.pth")
        torch.save({"model": Pickled()}, f"{d}/evil.pth")
        flag_cases = [
            (["--data-path", f"{d}/empty"], "no images in"),
            (["--data-path", f"{d}/flat"], "holds 1 image but no class subfolders"),
            (["--use-cached"], "--use-cached needs --cache-path"),
            (["--cache-latents", "--data-path", data], "--cache-latents needs"),
            (["--data-path", data, "--resume", f"{d}/nope.pth"], "checkpoint not found"),
            (["--data-path", data, "--patch-size", "-4"], "--patch-size -4: must be at least 1"),
            (["--data-path", data, "--lr", "nan"], "--lr nan: must be a finite number"),
            (["--data-path", data, "--img-size", "0"], "--img-size 0: must be at least 1"),
            (["--data-path", data, "--num-images", "1"], "--num-images 1: must be at least 2"),
            (["--data-path", data, "--output-dir", f"{d}/coda.pth/run"], "is a file, not a folder"),
            (["--data-path", data, "--prediction", "eps"], "--prediction eps is for VAE latents"),
            (["--data-path", data, "--cleanup-steps", "-1"], "--cleanup-steps -1: must be at least 0"),
            (["--data-path", data, "--loss-fraction", "1.5"], "--loss-fraction 1.5: must be in (0, 1]"),
            (["--data-path", data, "--val-path", data], "--val-path: --model mar does not use held-out images"),
            (["--model", "vae", "--data-path", data, "--val-path", f"{d}/nope"], "--val-path: no folder"),
            (["--model", "vae", "--data-path", data, "--val-path", f"{d}/empty"], f"no images in {d}/empty"),
            (["--model", "vae", "--data-path", data, "--val-path", f"{d}/flat"], "rFID needs at least 2 held-out images"),
            (["--model", "vae", "--data-path", data, "--img-size", "8"], "SSIM in 11 x 11 windows; give at least 11"),
            (["--model", "maskgit", "--tokenizer", "t.pth", "--temperature", "0"], "--temperature 0.0: must be positive"),
            (["--model", "maskgit", "--tokenizer", "t.pth", "--cache-path", d], "give a file name (such as tokens.npy)"),
            (["--model", "maskgit", "--tokenizer", "t.pth", "--cache-path", f"{d}/no/t.npy"], "in an existing folder"),
            (["--model", "vae", "--data-path", data, "--inception-weights", f"{d}/no.pth"], "--inception-weights: not found"),
        ]
        for flags, expect in flag_cases:
            message = str(raises(SystemExit, train.parse_args, [*FAST[:6], *flags, "--epochs", "1"]))
            assert message.startswith("train.py: error:") and expect in message and "\n" not in message, message
        cases = [
            (["--data-path", f"{d}/missing"], "data folder not found"),
            (["--data-path", data, "--resume", f"{d}/coda.pth"], "checkpoint of --model coda"),
            (["--data-path", data, "--patch-size", "2", "--output-dir", f"{d}/tiny"], "another config: vae_stride 8"),
            (["--model", "coda", "--vae", f"{d}/nope.ckpt", "--data-path", data], "--vae: checkpoint not found"),
            (["--model", "coda", "--vae", f"{d}/nope.ckpt", "--compare-quantizers"], "--vae: checkpoint not found"),
            (["--model", "coda", "--vae", f"{shared_run('vae')}/checkpoint-last.pth", "--data-path", data, "--levels", "0", "4"],
             "--levels 0 4: each side from 1 to the latent size 4"),
            (["--model", "coda", "--vae", f"{shared_run('vae')}/checkpoint-last.pth", "--data-path", data, "--img-size", "40"],
             "--img-size 40: its latent side 5 is not one of --preset tiny's levels, so give --levels"),
            (["--model", "coda", "--vae", f"{d}/tiny/checkpoint-last.pth", "--data-path", data],
             "is a checkpoint of --model mar, not a VAE"),
            (["--model", "maskgit", "--tokenizer", f"{d}/tiny/checkpoint-last.pth", "--data-path", data],
             "is not a checkpoint of --model coda"),
            (["--model", "vae", "--data-path", data, "--img-size", "30"], "not a multiple of the VAE's stride 8"),
            (["--data-path", data, "--resume", f"{d}/evil.pth"], "holds Python objects other than tensors"),
            (["--data-path", data, "--device", "cuda"], "no CUDA device"),  # ENV hides any GPU
        ]
        runs = two_at_a_time(lambda case: run_train(*FAST[:6], *case[0], "--epochs", "1", check=False), cases)
        for p, (flags, expect) in zip(runs, cases):  # the case's flags win over FAST's
            expect_error(p, expect, "train.py")
            assert p.returncode == 1 and "weights_only=False" not in p.stderr and "unpickled code ran" not in p.stdout, p.stderr[-500:]


def test_train_refuses_empty_class_folders_and_unwritable_outputs_before_any_work():
    with tempfile.TemporaryDirectory() as d:
        data = make_folder(os.path.join(d, "data"), per_class=1, classes=3)
        os.makedirs(os.path.join(data, "class03"))  # would silently become label 3 with no images
        expect_error(run_train("--data-path", data, *MAR, "--epochs", "1", "--output-dir", f"{d}/run", check=False),
                     "class03 holds no images", "train.py")
        open(f"{d}/file", "w").close()
        for flags in (["--eval"], ["--eval", "--save-images", f"{d}/file/png"]):  # checked before generating
            out = f"{d}/file/run" if len(flags) == 1 else f"{d}/run"
            p = run_train(*flags, *MAR, "--output-dir", out, "--num-images", "10", check=False)
            expect_error(p, "is a file, not a folder", "train.py")
        assert not os.path.exists(f"{d}/run"), os.listdir(f"{d}/run")  # refused before the run folder was made


def test_train_refuses_a_second_process_on_the_same_output_dir():
    import fcntl
    with tempfile.TemporaryDirectory() as d:
        flags = ["--data-path", shared_run("data"), *MAR, "--output-dir", f"{d}/run"]
        run_train(*flags, "--epochs", "1")
        with open(f"{d}/run/.lock", "a+") as held:  # as a live process holds it, with its pid
            fcntl.flock(held, fcntl.LOCK_EX)
            held.truncate(0)
            held.write("4242")
            held.flush()
            expect_error(run_train(*flags, "--epochs", "2", check=False), "another process (pid 4242) is training into",
                         "train.py")
        run_train(*flags, "--epochs", "2")  # released: it resumes
        assert final_weights(f"{d}/run")["step"] == 20


COMPILED_RUN = """import sys, functools, torch
sys.path.insert(0, {here!r})
import mar, train
from torch._dynamo.utils import counters
torch.compile = functools.partial(torch.compile, backend="eager")  # dynamo only: no C++ compiler needed
warm_up, skip, seen = mar.Training.warm_up, sys.argv.pop(1) == "skip", {{}}
def recorded(*a):
    if not skip:
        warm_up(*a)
    seen["after warm-up"] = counters["stats"]["unique_graphs"]
mar.Training.warm_up = recorded
train.main(train.parse_args(sys.argv[1:]))
print(seen["after warm-up"], counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
"""


FLIPS_RUN = """import sys
sys.path.insert(0, {here!r})
import coda, train
inputs, flipped = coda.VAETraining.inputs, []
def recorded(self, batch, flip):
    flipped.append(int(flip.sum()))
    return inputs(self, batch, flip)
coda.VAETraining.inputs = recorded
train.main(train.parse_args(sys.argv[1:]))
print(len(flipped), sum(flipped))
"""


def test_train_no_flip_feeds_every_image_unmirrored():
    """The papers' random horizontal flips mirror half the images (a 3 becomes an E); --no-flip
    feeds every image as it is, and says so among the arguments."""
    with tempfile.TemporaryDirectory() as d:
        script = script_in(d, "flips_run.py", FLIPS_RUN)
        vae = ["--model", "vae", "--data-path", shared_run("data"), *TOKENIZER, "--disc", "none", "--epochs", "2"]
        seen = {how: run_script(script, *vae, *flags, "--output-dir", f"{d}/{how}").stdout.split()[-2:]
                for how, flags in (("flips", []), ("none", ["--no-flip"]))}
        assert seen["flips"][0] == seen["none"][0] == "20" and 20 <= int(seen["flips"][1]) <= 60, seen  # 80 images
        assert seen["none"][1] == "0", seen
        assert '"no_flip": true' in read(f"{d}/none/log.txt")


def test_train_compile_compiles_every_mask_size_before_the_first_step_and_leaves_no_trace():
    """--compile: MAR's graphs (one per mask size) all compile before the first step, so that none
    compiles mid-run, where a Ctrl-C would wait for it and torchrun kill the run unsaved. The
    warm-up's passes change nothing: the same run with them skipped ends with the same weights."""
    with tempfile.TemporaryDirectory() as d:
        script = script_in(d, "compiled_run.py", COMPILED_RUN)
        flags = ["--data-path", shared_run("data"), *MAR, "--img-size", "16", "--epochs", "1", "--compile"]
        warm, cold = two_at_a_time(lambda how: run_script(script, how, *flags, "--output-dir", f"{d}/{how}"),
                                   ["warm", "skip"])
        after, end, breaks = map(int, warm.stdout.split()[-3:])
        assert after == end >= 2 and breaks == 0, warm.stdout[-300:]  # 16 px: 4 tokens, 3 or 4 masked
        assert int(cold.stdout.split()[-3]) == 0 and int(cold.stdout.split()[-2]) == end, cold.stdout[-300:]
        assert "--compile: compiled the training step for every mask size" in read(f"{d}/warm/log.txt")
        assert same_state(final_weights(f"{d}/warm"), final_weights(f"{d}/skip"))


# ---------------------------------------------------------------------------------------------
# train.py: the tokenizers (--model vae, --model coda) and MaskGIT on their tokens
# ---------------------------------------------------------------------------------------------

def test_train_vae_records_its_latent_scale_and_reports():
    vae = final_weights(shared_run("vae"))
    assert vae["latent_scale"] > 0 and vae["config"]["arch"]["embed_dim"] == 16 and vae["step"] == 20
    log = read(f"{shared_run('vae')}/log.txt")
    assert "PSNR" in log and os.path.exists(f"{shared_run('vae')}/samples-final.png"), log[-1000:]
    # the CPU-sized recipes of both tokenizers train in bf16 autocast where the CPU has bf16 instructions; the
    # paper's in fp32 (official)
    precision = f"precision: {'bf16 autocast' if mar.bf16_autocast(torch.device('cpu')) else 'fp32'}"
    for run in ("vae", "coda"):
        assert precision in read(f"{shared_run(run)}/log.txt"), (run, read(f"{shared_run(run)}/log.txt")[:1500])
    import train
    for model in (["--model", "vae"], ["--model", "coda", "--vae", "v.pth"]):
        assert train.parse_args(model).bf16 and not train.parse_args([*model, "--no-bf16"]).bf16, model
        assert not train.parse_args([*model, "--defaults", "paper"]).bf16, model
    report = json.loads(read(f"{shared_run('vae')}/report.json"))
    assert report["images"] == 40 and 0 < report["mse"] < 1 and report["psnr"] > 5, report
    assert "note: without --val-path, these 40 images are training images" in read(f"{shared_run('vae')}/log.txt")
    # the recorded scale makes the EMA VAE's latents of the held-out images (here --data-path's 40) unit-variance
    import argparse
    net, scale, _ = mar.load_vae(f"{shared_run('vae')}/checkpoint-last.pth", "cpu")
    with torch.no_grad():
        z = net.encode(train.holdout_images(argparse.Namespace(**vae["args"]), 256)).sample(torch.Generator().manual_seed(0))
    assert scale == vae["latent_scale"] and abs((z * scale).std().item() - 1) < 1e-5, (scale, z.std().item())
    # the report's numbers, recomputed: the EMA VAE's reconstruction (posterior mean, fp32) of those 40 images
    x = train.holdout_images(argparse.Namespace(**vae["args"]), 256)
    with torch.no_grad():
        recon = torch.cat([net.decode(net.encode(b).mean) for b in x.split(vae["args"]["batch_size"])])
    mse = (recon.clamp(-1, 1) - x).pow(2).flatten(1).mean(1).mean().item()
    metrics = fid.ReconstructionMetrics(None, distributed=False)
    metrics.update(x, recon)
    expect = metrics.compute()
    assert report["images"] == len(x) == 40 and abs(report["mse"] - mse) < 1e-5 * mse, (report, mse)
    assert abs(report["psnr"] - expect["psnr"]) < 1e-5 * expect["psnr"], (report, expect)
    assert abs(report["ssim"] - expect["ssim"]) < 1e-4 * abs(expect["ssim"]), (report, expect)
    # --preset tiny-colour's GroupNorm groups of 4 channels are kept in the checkpoint and honoured when it loads
    groups = lambda path: {m.num_groups for m in mar.load_vae(path, "cpu")[0].modules() if isinstance(m, torch.nn.GroupNorm)}
    with tempfile.TemporaryDirectory() as d:
        torch.save(dict(vae, config=dict(vae["config"], arch=coda.VAE_PRESETS["tiny-colour"])), f"{d}/colour.pth")
        assert groups(f"{shared_run('vae')}/checkpoint-last.pth") == {32} and groups(f"{d}/colour.pth") == {8, 16}
        # --val-path may be a flat folder, as ImageNet's val comes: its images in name order
        from PIL import Image
        os.makedirs(f"{d}/val")
        for i in (2, 0, 1):
            Image.fromarray(fid.toy_image(i, 0, seed=9)).save(f"{d}/val/img{i}.png")
        held = train.holdout_images(argparse.Namespace(val_path=f"{d}/val", data_path=None, img_size=32, seed=0), 8)
        assert torch.equal(held, fid.to_tensor(torch.stack([torch.from_numpy(fid.toy_image(i, 0, seed=9)) for i in range(3)])))
    # without --val-path, images spread over --data-path (40 images of 10 classes, 4 each): every class, not the first ones
    data = train.ImageFolder(shared_run("data"), 32)
    spread = train.holdout_images(argparse.Namespace(val_path=None, data_path=shared_run("data"), img_size=32, seed=0), 10)
    assert torch.equal(spread, torch.stack([data[4 * c][0] for c in range(10)])) and [data[4 * c][1] for c in range(10)] == list(range(10))


def test_train_mar_on_a_vae_run_caches_moments_once_and_predicts_v():
    """MAR on the latents of a --model vae run: train.py encodes every image and its flip once
    (the posterior moments, as official main_cache.py), a batch draws its latent from the cached
    moments of the flip it was dealt, and the CPU-sized defaults make the MLP predict v (recorded in
    the checkpoint); the paper's defaults keep eps. A cache that another VAE wrote is refused."""
    import train
    vae_path = f"{shared_run('vae')}/checkpoint-last.pth"
    args = train.parse_args(["--model", "mar", "--vae", vae_path, *MAR])
    training = mar.Training(args, 10, torch.device("cpu"))
    assert args.prediction == "v" and training.model.diffloss.train_diffusion.v_prediction
    latent = train.parse_args(["--model", "mar", "--vae", vae_path])
    assert (latent.preset, latent.epochs, latent.diffusion_batch_mul, latent.loss_fraction, latent.cfg, latent.cfg_schedule,
            latent.temperature) == ("small", 87, 4, 1.0, 4.0, "constant", 1.0)
    assert [mar.mar_small(vae_embed_dim=c).diffloss.net.input_proj.out_features for c in (16, 192)] == [128, 256]
    assert latent.defaults_in_force.startswith("defaults: CPU-sized, for the built-in data on VAE latents")
    assert train.parse_args(["--model", "mar", "--vae", vae_path, "--preset", "tiny", "--cfg", "3"]).cfg == 3  # flags win
    pixels = train.parse_args(["--model", "mar"])
    assert (pixels.preset, pixels.cfg, pixels.cfg_schedule, pixels.temperature, pixels.loss_fraction) == (
        "tiny", 9.0, "linear", 1.1, 0.5)
    assert mar.Training(pixels, 10, torch.device("cpu")).model.loss_fraction == 0.5
    assert train.tokenizer_digest(training) == ("--vae", train.weights_digest(training.vae))
    assert train.tokenizer_digest(mar.Training(pixels, 10, torch.device("cpu"))) == (None, None)  # pixels: the run's own
    assert training.config["prediction"] == "v" and training.cache_limit == 100_000
    paper = train.parse_args(["--model", "mar", "--vae", vae_path, *MAR, "--defaults", "paper"])
    assert paper.prediction == "eps" and "prediction" not in mar.Training(paper, 10, torch.device("cpu")).config
    assert paper.loss_fraction == 1.0  # the paper: every masked token
    images = fid.to_tensor(fid.toy_images(32, 3, seed=4))
    cached = training.encode(images)                                                  # (3, 2, 32, 4, 4)
    moments = training.vae.encode(torch.cat([images, images.flip(3)])).moments
    assert_close(cached, torch.stack(moments.chunk(2), 1), rtol=1e-4, what="moments of the image and its flip")
    flip = torch.tensor([True, False, True])
    torch.manual_seed(0)
    x, labels = training.inputs((cached, torch.arange(3), -torch.ones(3)), flip)
    torch.manual_seed(0)
    expected = mar.images_to_latents(training.vae, torch.where(flip[:, None, None, None], images.flip(3), images),
                                     scale=training.scale)
    assert_close(x, expected, rtol=1e-4, what="a latent drawn from the cached moments")
    with tempfile.TemporaryDirectory() as d:
        run_train("--model", "mar", "--vae", vae_path, "--data-path", shared_run("data"), *MAR, "--epochs", "1",
                  "--output-dir", f"{d}/run")
        codes = np.load(f"{d}/run/tokens.npy")
        first = train.ImageFolder(shared_run("data"), 32)[0][0][None]
        assert codes.shape == (40, 2, 32, 4, 4) and codes.dtype == np.float32
        assert_close(torch.from_numpy(codes[0]), training.encode(first)[0], rtol=1e-4, what="the cache of image 0")
        trained = final_weights(f"{d}/run")
        assert trained["config"]["prediction"] == "v"
        np.save(f"{d}/run/tokens.npy", codes * 1.1)  # as if another VAE had encoded them: refused, not trained on
        p = run_train("--model", "mar", "--vae", vae_path, "--data-path", shared_run("data"), *MAR, "--epochs", "2",
                      "--output-dir", f"{d}/run", check=False)
        expect_error(p, "tokens.npy was encoded from other images or by another VAE", "train.py")
        assert final_weights(f"{d}/run")["step"] == trained["step"] == 10  # the checkpoint untouched
        # the checkpoint records its VAE: sampling it through another VAE (one weight changed) is refused
        assert trained["tokenizer_sha256"] == json.loads(read(f"{d}/run/tokens.npy.json"))["tokenizer_sha256"]
        p = run_train("--model", "mar", "--vae", altered_copy(vae_path, f"{d}/other-vae.pth"), *MAR, "--eval", "--resume", f"{d}/run/checkpoint-last.pth",
                      "--output-dir", f"{d}/run", "--num-images", "10", check=False)
        expect_error(p, "was trained with another --vae (its weights differ", "train.py")
    assert train.same_encoding(cached[0] * 1.01, cached[0]) and not train.same_encoding(cached[0] * 1.1, cached[0])


def test_train_coda_trains_lora_and_quantizer_only():
    full, vae = final_weights(shared_run("coda")), final_weights(shared_run("vae"))
    groups = full["optimizer"]["param_groups"]  # --quantizer-lr: the quantizer's lr is 4x the LoRA's
    assert {g["lr_scale"] for g in groups} == {1.0, 4.0} and len({g["lr"] / g["lr_scale"] for g in groups}) == 1
    assert sum(len(g["params"]) for g in groups if g["lr_scale"] == 4.0) == sum(k.startswith("quantizer.") for k in full["model"])
    trained = [k for k in full["model"] if "lora_layer" in k or k.startswith("quantizer.")]
    frozen = [k for k in full["model"] if k not in trained]
    assert trained and all(torch.equal(full["model"][k], full["model_ema"][k]) for k in frozen)
    ups = [k for k in trained if k.endswith("lora_layer.up.weight")]  # zero at the start: trained if nonzero
    assert ups and all(full["model"][k].abs().sum() > 0 for k in ups), ups
    # with --ema-start-epoch 1 every trained tensor differs from its EMA; any that never moved would equal it
    assert all(not torch.equal(full["model"][k], full["model_ema"][k]) for k in trained), "a trained tensor never moved"
    assert all(torch.equal(full["model"][k], vae["model_ema"][k[4:]]) for k in frozen if k.startswith("vae."))
    log = read(f"{shared_run('coda')}/log.txt")
    assert "codebook usage:" in log and "PSNR" in log, log[-1500:]
    rows = [json.loads(l) for l in read(f"{shared_run('coda')}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 41, 5)), [r["step"] for r in rows]
    assert all(k in rows[-1] for k in ("codebook_usage", "q_loss", "entropy", "d_loss", "l1")), rows[-1]


def test_train_grad_accum_sums_micro_batches_into_one_step():
    """--grad-accum 2 computes each step's batch in two halves and steps once on their summed
    gradients: the VAE (fp32, no discriminator) logs the same losses and trains to the weights of
    whole batches, within float rounding; CODA's discriminator takes both halves' pairs (its
    BatchNorm counts twice the batches) and 2 DDP ranks stay equal; a batch it does not divide is refused with one line."""
    with tempfile.TemporaryDirectory() as d:
        vae = ["--model", "vae", "--data-path", shared_run("data"), *FAST, "--lpips-weight", "0", "--disc", "none",
               "--no-bf16", "--epochs", "1"]
        two_at_a_time(lambda k: run_train(*vae, "--grad-accum", k, "--output-dir", f"{d}/vae{k}"), (1, 2))
        whole, halves = final_weights(f"{d}/vae1"), final_weights(f"{d}/vae2")
        assert whole["step"] == halves["step"] == 10, (whole["step"], halves["step"])
        # AdamW moves a weight whose gradient is near zero by about the lr whatever its sign, so the
        # rounding of sums in another order shows in a few elements; a lost or doubled half in all
        moved = torch.cat([(halves["model"][k].double() - w.double()).abs().flatten() for k, w in whole["model"].items()])
        assert (moved > 1e-7).double().mean() < 1e-3 and moved.max() < 1e-4, (moved > 1e-7).double().mean()
        losses = [[json.loads(l)["loss"] for l in read(f"{d}/vae{k}/metrics.jsonl").splitlines()] for k in (1, 2)]
        assert len(losses[0]) == 2 and all(abs(a - b) < 1e-5 * a for a, b in zip(*losses)), losses
        assert "each in 2 micro-batches of 2 a process (--grad-accum)" in read(f"{d}/vae2/log.txt")
        seen = []
        for k in (1, 2):
            run_train(*coda_flags(), "--epochs", "1", "--grad-accum", k, "--output-dir", f"{d}/coda{k}")
            disc = final_weights(f"{d}/coda{k}")["second_player"]["disc"]
            seen.append([v.item() for name, v in disc.items() if name.endswith("num_batches_tracked")])
        assert seen[0] and seen[1] == [2 * n for n in seen[0]], seen
        # under DDP the first half's gradients wait (no_sync) and are all-reduced with the second's
        assert_ranks_equal(*ddp_ranks_weights(d, *coda_flags(), "--epochs", "1", "--grad-accum", "2", "--output-dir", f"{d}/ddp"))
        for k, text in (("3", "--batch-size 4 is not a multiple of --grad-accum 3"), ("0", "--grad-accum 0: must be at least 1")):
            expect_error(run_train(*vae, "--grad-accum", k, "--output-dir", f"{d}/odd", check=False), text, "train.py")


def test_train_coda_resumes_exactly_with_its_discriminator():
    """The lr (cosine) and the GAN ramp depend on the run's length: interrupt the same command."""
    full = final_weights(shared_run("coda"))  # drew no grid before its end
    with tempfile.TemporaryDirectory() as d:
        grids = ["--sample-every", "5"]  # a grid at every log step, where a signal stops: they must not touch its random state
        code, err, _ = interrupt(*coda_flags(), *grids, "--epochs", "4", "--output-dir", f"{d}/resumed")
        assert code == 143 and 0 < final_weights(f"{d}/resumed")["step"] < 40, (code, err[-2000:])
        run_train(*coda_flags(), *grids, "--epochs", "4", "--output-dir", f"{d}/resumed")
        resumed = final_weights(f"{d}/resumed")
        assert full["step"] == resumed["step"] == 40 and same_state(resumed, full), "resumed CODA run differs"
        disc, disc_resumed = full["second_player"]["disc"], resumed["second_player"]["disc"]
        assert disc.keys() == disc_resumed.keys() and all(torch.equal(disc[k], disc_resumed[k]) for k in disc)
        # a checkpoint whose optimizer or discriminator another run's flags made: one line, no traceback
        groups, extra = copy.deepcopy(full), copy.deepcopy(full)
        groups["optimizer"]["param_groups"].append(dict(groups["optimizer"]["param_groups"][0], params=[10 ** 6]))
        extra["second_player"]["disc"]["extra.weight"] = torch.zeros(1)
        for name, ckpt, text in (("groups", groups, "its optimizer does not fit this run's parameter groups"),
                                 ("disc", extra, "its discriminator does not fit --disc patch")):
            os.makedirs(f"{d}/{name}")
            torch.save(ckpt, f"{d}/{name}/checkpoint-last.pth")
            expect_error(run_train(*coda_flags(), "--epochs", "5", "--output-dir", f"{d}/{name}", check=False), text, "train.py")


def test_train_refuses_pixel_checkpoints_of_other_tokens():
    """A MAR pixel checkpoint of an earlier version (raw 8x8 pixel patches as tokens, v-prediction)
    is refused with one line, for resume and --eval: its tokens are not PixelTokenizer's. So is one
    of the official MLP on these tokens (before PixelDenoiser), and a checkpoint whose config matches
    but whose weights have other sizes (a preset that changed)."""
    with tempfile.TemporaryDirectory() as d:
        common = ["--data-path", shared_run("data"), *MAR, "--output-dir", f"{d}/run"]
        run_train(*common, "--epochs", "1")
        ckpt = final_weights(f"{d}/run")
        resized = {**ckpt, "model": dict(ckpt["model"]), "config": dict(ckpt["config"])}
        mlp = {**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k not in ("pixel_channels", "diffloss_d")}}
        assert ckpt["config"]["tokens"] == "PixelTokenizer, 2x2 phases, clean-up decoder given the regions; v-prediction, SNR / 64"
        del ckpt["config"]["tokens"]
        ckpt["config"].update(vae_stride=1, patch_size=8, vae_embed_dim=3, diffusion="v-prediction, SNR / 64")
        torch.save(ckpt, f"{d}/run/checkpoint-last.pth")
        for more in (["--epochs", "2"], ["--eval", "--num-images", "10", "--fid-stats", shared_run("data")]):
            expect_error(run_train(*common, *more, check=False),
                         "was trained with another config: vae_stride 1 (checkpoint) vs 8 (now), patch_size 8 "
                         "(checkpoint) vs 1 (now), vae_embed_dim 3 (checkpoint) vs 192 (now), diffusion v-prediction, SNR "
                         "/ 64 (checkpoint) vs None (now), tokens None", "train.py")
        torch.save(mlp, f"{d}/run/checkpoint-last.pth")
        expect_error(run_train(*common, "--epochs", "2", check=False), "was trained with another config: "
                     "pixel_channels None (checkpoint) vs 8 (now), diffloss_d None (checkpoint) vs 2 (now)", "train.py")
        resized["model"]["diffloss.net.linear.weight"] = torch.zeros(6, 32)  # 32 features per pixel
        torch.save(resized, f"{d}/run/checkpoint-last.pth")
        expect_error(run_train(*common, "--epochs", "2", check=False), "checkpoint-last.pth['model'] does not match MAR: "
                     "1 with another shape (first: diffloss.net.linear.weight (6, 32) vs (6, 8))", "train.py")


def test_train_resumes_checkpoints_written_before_the_restructuring():
    """Checkpoints before the model files owned their training kept the discriminator under "recipe":
    resuming one continues exactly as resuming the same checkpoint in today's layout."""
    with tempfile.TemporaryDirectory() as d:
        for name in ("old", "new"):
            shutil.copytree(shared_run("coda"), f"{d}/{name}")
        ckpt = final_weights(f"{d}/old")
        ckpt["recipe"] = ckpt.pop("second_player")
        torch.save(ckpt, f"{d}/old/checkpoint-last.pth")
        two_at_a_time(lambda name: run_train(*coda_flags(), "--epochs", "5", "--output-dir", f"{d}/{name}"), ("old", "new"))
        old, new = final_weights(f"{d}/old"), final_weights(f"{d}/new")
        assert old["step"] == new["step"] == 50 and same_state(old, new)
        assert all(torch.equal(old["second_player"]["disc"][k], v) for k, v in new["second_player"]["disc"].items())


def test_train_coda_ddp_keeps_ranks_identical():
    with tempfile.TemporaryDirectory() as d:
        rank0, rank1 = ddp_ranks_weights(d, *coda_flags(), "--epochs", "1", "--output-dir", f"{d}/ddp")
        assert_ranks_equal(rank0, rank1)
        assert final_weights(f"{d}/ddp")["step"] == 5


def test_train_coda_nearest_codes_with_lora_on_the_encoder_alone():
    """No LoRA in the decoder and nearest codes (which pass the codebook no gradient through it): the
    GAN term's adaptive weight is taken at the decoded image (it was a RuntimeError at step 1), it is
    positive, and the encoder's LoRA (its up-projections start at zero) trains."""
    with tempfile.TemporaryDirectory() as d:
        flags = [f if f != "both" else "encoder" for f in coda_flags()]
        run_train(*flags, "--quantizer", "nearest", "--epochs", "1", "--output-dir", f"{d}/run")
        logged = [json.loads(line) for line in read(f"{d}/run/metrics.jsonl").splitlines()]
        assert all(math.isfinite(m["loss"]) and m["d_weight"] > 0 for m in logged[1:]), logged
        ups = {k: v for k, v in final_weights(f"{d}/run")["model"].items() if "lora_layer.up" in k}
        assert ups and all(k.startswith("vae.encoder") for k in ups) and all(v.abs().max() > 0 for v in ups.values()), list(ups)


def test_train_compare_quantizers_under_torchrun():
    """One run per Table 1 row, each with that row's flags, in one process group (2 gloo processes);
    the printed table equals the rows' reports."""
    with tempfile.TemporaryDirectory() as d:
        p = run_train(*coda_flags()[:-4], "--compare-quantizers", "--epochs", "1", "--output-dir", f"{d}/cmp", nproc=2)
        table = p.stdout.strip().splitlines()[-5:]
        assert table == read(f"{d}/cmp/table1.txt").strip().splitlines()[-5:], p.stdout[-2000:]
        expect = [("nearest", (4,), "none"), ("nearest", (1, 2, 3, 4), "none"), ("attention", (1, 2, 3, 4), "none"),
                  ("attention", (1, 2, 3, 4), "decoder"), ("attention", (1, 2, 3, 4), "both")]
        for i, (line, (assign, levels, lora)) in enumerate(zip(table, expect)):
            c, r = final_weights(f"{d}/cmp/table1-{i}")["config"], json.loads(read(f"{d}/cmp/table1-{i}/report.json"))
            assert (c["quantizer"], c["levels"], c["lora"]) == (assign, levels, lora), c
            assert line.split()[-5:] == [f"{r['usage']:.1%}", f"{r['quant_error']:.5f}", f"{r['mse']:.5f}",
                                         f"{r['psnr']:.2f}", f"{r['ssim']:.3f}"], (line, r)
            assert final_weights(f"{d}/cmp/table1-{i}")["world_size"] == 2
    row = dict(usage=0.5, quant_error=0.1, mse=0.01, psnr=20.0, ssim=0.5, images=10)  # rows with and without rFID
    table = coda.format_table1([("a", row), ("b", dict(row, rfid=3.0))], "x", 1)
    assert table[2].endswith("rFID") and table[3].endswith(" -") and table[4].endswith(" 3.00"), table


def test_train_maskgit_on_cached_coda_tokens():
    """Tokens cached once (image and flip), trained, sampled, and scored by --eval (through a renamed
    copy of the tokenizer): its FID, sFID and IS equal fid.py's on the images it saved."""
    with tempfile.TemporaryDirectory() as d:
        mg = ["--model", "maskgit", "--tokenizer", f"{shared_run('coda')}/checkpoint-last.pth", "--data-path",
              shared_run("data"), *FAST, "--num-iter", "2", "--output-dir", f"{d}/mg"]
        tf, _ = inception_files(d)
        save_pngs(ref("fid_ref.pt")["B"], f"{d}/real")
        two_at_a_time(lambda run: run(), [lambda: run_train(*mg, "--epochs", "2"),
                                          lambda: run_fid(f"{d}/real", "--save-stats", f"{d}/real.npz", "--weights", tf)])
        tokens = np.load(f"{d}/mg/tokens.npy")
        assert tokens.shape == (40, 2, 1 + 4 + 9 + 16) and tokens.max() < 256 and tokens.min() >= 0
        ckpt = final_weights(f"{d}/mg")
        assert ckpt["step"] == 20 and ckpt["config"]["levels"] == (1, 2, 3, 4)
        assert os.path.exists(f"{d}/mg/samples-final.png") and os.path.exists(f"{d}/real.npz")
        # a cache that another tokenizer encoded (here: one weight changed) is refused, not trained on
        import train
        recorded = json.loads(read(f"{d}/mg/tokens.npy.json"))["tokenizer_sha256"]
        assert recorded == train.weights_digest(coda.load_trained(mg[3], "cpu")[0]), recorded
        other = altered_copy(mg[3], f"{d}/other.pth")
        p = run_train(*[other if a == mg[3] else a for a in mg], "--epochs", "3", check=False)
        expect_error(p, "tokens.npy was encoded by another tokenizer", "train.py")
        with open(f"{d}/mg/tokens.npy", "rb") as f, open(f"{d}/cut.npy", "wb") as g:
            g.write(f.read(1000))  # a cache cut short
        expect_error(run_train(*mg, "--cache-path", f"{d}/cut.npy", "--epochs", "3", check=False),
                     "cut.npy is not a readable cache", "train.py")
        assert final_weights(f"{d}/mg")["step"] == 20  # the checkpoint untouched
        shutil.copy(mg[3], f"{d}/renamed.pth")  # the same tokenizer under another name is the same tokenizer
        p = run_train(*[f"{d}/renamed.pth" if a == mg[3] else a for a in mg], "--eval", "--num-images", "20", "--eval-batch-size", "10", "--inception-weights", tf,
                      "--fid-stats", f"{d}/real.npz", "--save-images", f"{d}/gen")
        assert sorted(os.listdir(f"{d}/gen")) == [f"{i:05d}.png" for i in range(20)]
        check = run_fid(f"{d}/gen", f"{d}/real.npz", "--weights", tf)  # the numbers of the images it wrote
        for name in ("FID", "sFID", "IS (ADM evaluator)"):
            assert printed(p, name) > 0 and abs(printed(p, name) - printed(check, name)) <= 1e-5 * printed(check, name), (
                name, p.stdout[-500:], check.stdout[-500:])


def test_train_maskgit_cache_holds_each_images_tokens_and_its_flips_in_order():
    """CODA tokenizes a posterior sample, so its tokens change from one encoding to the next; with the
    posterior's mean in place of the sample they do not (a log-variance at its clamp, -30, still left
    a spread of 3e-7 that flipped a near tie now and then), and the cache train.py builds for MaskGIT
    holds, at row i, the tokens of image i and of its flip, with image i's label."""
    import train
    sample = mar.DiagonalGaussian.sample
    mar.DiagonalGaussian.sample = lambda self, generator=None: self.mean
    try:
        cache_holds_each_images_tokens_in_order(train)
    finally:
        mar.DiagonalGaussian.sample = sample


def cache_holds_each_images_tokens_in_order(train):
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(f"{shared_run('coda')}/checkpoint-last.pth", f"{d}/sharp.pth")
        args = train.parse_args(["--model", "maskgit", "--tokenizer", f"{d}/sharp.pth", "--data-path", shared_run("data"), *FAST])
        dataset = train.ImageFolder(args.data_path, args.img_size)
        training = train.build(args, len(dataset.classes), torch.device("cpu"))
        cache = train.CachedTokens(dataset, training.encode, "digest", f"{d}/tokens.npy", 8, 0, 0, 1, torch.device("cpu"))
        tokenizer = coda.load_trained(f"{d}/sharp.pth", "cpu")[0]
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 3, H, W), in the dataset's order
        with torch.no_grad():
            for start in range(0, len(images), 8):                        # the cache's batches
                batch = images[start:start + 8]
                for flip, x in enumerate((batch, batch.flip(3))):
                    expected = maskgit.flatten_levels(tokenizer.tokenize(x))  # (8, 30)
                    cached = torch.stack([cache[i][0][flip] for i in range(start, start + len(batch))]).long()
                    assert torch.equal(cached, expected), (start, flip, (cached != expected).float().mean())
        assert [cache[i][1] for i in range(len(dataset))] == [label for _, label in dataset.samples]
        assert not torch.equal(cache[0][0][0], cache[0][0][1])                # a flip is another image's tokens
        # the same path for another folder of as many images: refused, not trained on with the new labels
        other = train.ImageFolder(make_folder(f"{d}/other", size=48), args.img_size)
        assert "was encoded from other images" in str(raises(SystemExit, train.CachedTokens, other, training.encode,
                                                             "digest", f"{d}/tokens.npy", 8, 0, 0, 1, torch.device("cpu")))
        # an unreadable image (the last of class03) is cached as its substitute, the next readable image
        # (class04's first), with that image's label, and counted as unreadable, as the dataset gives it
        with open(f"{d}/other/class03/img3.png", "wb") as f:
            f.write(b"not a png")
        broken = train.ImageFolder(f"{d}/other", args.img_size)
        cache = train.CachedTokens(broken, training.encode, "digest", f"{d}/broken.npy", 8, 0, 0, 1, torch.device("cpu"))
        i = [path for path, _ in broken.samples].index(f"{d}/other/class03/img3.png")
        assert (cache[i][1], cache[i][2]) == broken[i][1:] == (4, i) and torch.equal(cache[i][0], cache[i + 1][0])
        assert sum(cache[j][2] >= 0 for j in range(len(broken))) == 1


# ---------------------------------------------------------------------------------------------
# train.py: generate and score (--eval)
# ---------------------------------------------------------------------------------------------

def eval_setup(d):
    """A trained MAR run, fake Inception weights and reference statistics -> the --eval flags."""
    r = ref("fid_ref.pt")
    tf, _ = inception_files(d)
    save_pngs(r["B"], f"{d}/real")
    data = shared_run("data")
    _, stats = two_at_a_time(lambda run: run(), [
        lambda: run_train("--data-path", data, "--output-dir", f"{d}/run", "--epochs", "1", *MAR),
        lambda: run_fid(f"{d}/real", "--save-stats", f"{d}/real.npz", "--weights", tf)])
    assert stats.returncode == 0, stats.stderr[-2000:]
    return tf, ["--eval", "--resume", f"{d}/run/checkpoint-last.pth", "--output-dir", f"{d}/run", "--num-images", "20",
                "--eval-batch-size", "8", "--inception-weights", tf, *MAR]


def test_train_eval_generates_and_scores_like_fid_py():
    """Class-balanced samples from the EMA weights, scored in memory: the printed numbers equal fid.py's
    on the saved PNGs, against given reference statistics (one process) and against the built-in
    data's held-out images (two processes: each rank generates and scores half). The samples are
    decoded by the checkpoint's own pixel decoder: one whose output is 0.25 brighter draws brighter
    images than the original checkpoint from the same tokens (and its raw weights, all NaN, are not used)."""
    with tempfile.TemporaryDirectory() as d:
        tf, ev = eval_setup(d)
        out = lambda run: [f"{d}/{run}" if a == f"{d}/run" else a for a in ev]  # --eval with another --output-dir
        ckpt = final_weights(f"{d}/run")
        ckpt["tokenizer"]["cleanup.10.bias"] += 0.25
        ckpt["model"] = {k: v.float().fill_(float("nan")) for k, v in ckpt["model"].items()}  # --eval draws with model_ema
        torch.save(ckpt, f"{d}/brighter.pth")
        brighter = [f"{d}/brighter.pth" if a == f"{d}/run/checkpoint-last.pth" else a for a in out("stats")]
        stats, one = two_at_a_time(lambda run: run(), [  # the reference statistics are cached in the run folder
            lambda: run_train(*brighter, "--fid-stats", f"{d}/real.npz", "--save-images", f"{d}/gen1"),
            lambda: run_train(*ev)])
        two = run_train(*out("run2"), "--save-images", f"{d}/gen2", nproc=2)  # rank r writes images [10 r, 10 r + 10)
        cached = [f for f in os.listdir(f"{d}/run") if f.startswith("fid_stats_builtin_32px_20_")]
        assert len(cached) == 1 and os.listdir(f"{d}/run2").count(cached[0]) == 1, cached
        checks = two_at_a_time(lambda case: run_fid(case[0], case[1], "--weights", tf),
                               [(f"{d}/gen1", f"{d}/real.npz"), (f"{d}/gen2", f"{d}/run2/{cached[0]}")])
        keys = [("fid", "FID"), ("sfid", "sFID"), ("is_adm", "IS (ADM evaluator)")]
        for run, p, check, nproc in (("stats", stats, checks[0], 1), ("run2", two, checks[1], 2)):
            record = [json.loads(l) for l in read(f"{d}/{run}/eval.jsonl").splitlines()][-1]  # one line per evaluation
            assert sorted(os.listdir(f"{d}/gen{nproc}")) == [f"{i:05d}.png" for i in range(20)]
            assert "seconds per image" in p.stdout and record["num_images"] == 20 and record["processes"] == nproc, record
            assert record["step"] == 10, record  # the checkpoint's, as read once
            assert record["cfg"] == 9.0, record  # the run's recipe (CPU-sized), also against given statistics
            for key, name in keys + ([("precision", "Precision"), ("recall", "Recall")] if nproc == 2 else []):
                assert abs(record[key] - printed(p, name)) < 1e-3, (key, p.stdout)
                assert abs(printed(p, name) - printed(check, name)) <= 1e-5 * printed(check, name) + 1e-9, (key, p.stdout, check.stdout)
        # images 0-7 are the first batch of rank 0 in both runs: the same tokens, decoded 0.25 brighter in gen1
        mean = lambda run: np.mean([np.asarray(image(f"{d}/{run}/{i:05d}.png"), np.float32) for i in range(8)])
        assert mean("gen1") - mean("gen2") > 15, (mean("gen1"), mean("gen2"))  # 0.25 = 32 levels, less the clamped
        # statistics alone hold no features: one line says why precision and recall are missing
        assert "precision/recall: not computed: the reference is statistics only" in stats.stdout, stats.stdout
        assert "--eval: as the checkpoint's run (give a flag to change it): --cfg 9, " in stats.stdout, stats.stdout
        assert "Precision:" not in stats.stdout and "not computed" not in one.stdout, one.stdout
        assert f"note: {d}/run/checkpoint-last.pth was trained on {shared_run('data')}, and is scored against" in one.stdout
        # no weights given, none cached, no network (a proxy that refuses): one line naming train.py's own flag
        no_proxy = "http://127.0.0.1:9"
        offline = run_train(*[a for a in ev if a not in ("--inception-weights", tf)], check=False,
                            env=dict(TORCH_HOME=f"{d}/hub", https_proxy=no_proxy, HTTPS_PROXY=no_proxy))
        expect_error(offline, "or pass --inception-weights FILE", "train.py")
        record = [json.loads(l) for l in read(f"{d}/run/eval.jsonl").splitlines()][-1]
        assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1 and record["sfid"] > 0, record
        assert abs(record["precision"] - printed(one, "Precision")) < 1e-4, one.stdout
        # the reference statistics of one process and of two (each rank scores half the held-out images)
        first, second = (np.load(f"{d}/{r}/{cached[0]}")["sigma"] for r in ("run", "run2"))
        assert np.abs(first - second).max() < 1e-4 * np.abs(first).mean(), "reference statistics depend on the process count"
        other, odd, used = two_at_a_time(lambda flags: run_train(*flags, check=False),
                                         [(*ev[:-len(MAR)], "--preset", "tiny", "--img-size", "64", "--num-iter", "2"),
                                          (*ev, "--num-images", "15"), (*ev, "--save-images", f"{d}/gen1")])
        expect_error(other, "another config", "train.py")
        expect_error(odd, "multiple of the 10 classes", "train.py")
        expect_error(used, "holds PNGs already (an earlier --eval?)", "train.py")  # fid.py would score old and new


# ---------------------------------------------------------------------------------------------
# CUDA: `python test_all.py cuda` on a GPU machine; skipped where there is none
# ---------------------------------------------------------------------------------------------

class Skip(Exception):
    """Raised by a test that cannot run on this machine: counted as skipped, not as passed or failed."""


def need_cuda():
    if not torch.cuda.is_available():
        raise Skip("no CUDA device")


def on_cuda(flags):
    return ["cuda" if f == "cpu" else f for f in flags]


def test_cuda_train_steps_of_each_model():
    """A few train.py steps of every model on the GPU, each in its precision (MAR and MaskGIT bf16
    autocast, the tokenizers' CPU-sized recipes bf16, CODA's paper recipe fp32), and MAR once more
    with --compile."""
    need_cuda()
    with tempfile.TemporaryDirectory() as d:
        data, runs = shared_run("data"), []
        runs.append(("mar", ["--model", "mar", *on_cuda(MAR)], "bf16 autocast"))
        # compiled at 16 px: 4 tokens, so 2 mask sizes and 2 compilations (inductor) in its 10 steps
        runs.append(("mar-compiled", ["--model", "mar", *on_cuda(MAR), "--img-size", "16", "--compile"], "bf16 autocast"))
        small = "bf16 autocast" if mar.bf16_autocast(torch.device("cuda")) else "fp32"  # the CPU-sized recipes
        runs.append(("vae", ["--model", "vae", *on_cuda(TOKENIZER)], small))
        runs.append(("coda", ["--model", "coda", "--vae", f"{d}/vae/checkpoint-last.pth", *on_cuda(TOKENIZER)], small))
        runs.append(("coda-paper", ["--model", "coda", "--vae", f"{d}/vae/checkpoint-last.pth", *on_cuda(TOKENIZER),
                                    "--defaults", "paper", "--disc", "none", "--grad-accum", "1"], "fp32, TF32 matmuls"))
        runs.append(("maskgit", ["--model", "maskgit", "--tokenizer", f"{d}/coda/checkpoint-last.pth", *on_cuda(FAST),
                                 "--num-iter", "2"], "bf16 autocast"))
        for name, flags, precision in runs:
            p = run_train(*flags, "--data-path", data, "--epochs", "1", "--output-dir", f"{d}/{name}", gpu=True)
            assert "CUDA graph capture failed" not in p.stdout + p.stderr, (name, p.stdout[-800:])  # MAR's grids: graphs
            log = read(f"{d}/{name}/log.txt")
            assert "device: CPU" not in log and f"precision: {precision}" in log, (name, log[-800:])
            losses = [json.loads(l)["loss"] for l in read(f"{d}/{name}/metrics.jsonl").splitlines()]
            assert losses and all(math.isfinite(v) for v in losses), (name, losses)


def test_cuda_bf16_loss_and_sampling_match_fp32():
    """On the same batch and noise, MAR's bf16-autocast loss is within 2% of fp32's, and sampling
    from the same seed under autocast keeps float32 tokens close to fp32's."""
    need_cuda()
    torch.manual_seed(0)
    model = perturbed(mar.mar_tiny(num_sampling_steps=10)).to("cuda")
    x, y = torch.randn(16, 192, 4, 4, device="cuda") * 0.5, torch.randint(0, 10, (16,), device="cuda")
    losses = []
    for amp in (False, True):
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            losses.append(model(x, y).item())
    assert abs(losses[1] - losses[0]) < 0.02 * losses[0], losses
    drift = bf16_sampling_drift(model, "cuda")
    assert 0 < drift < 0.1, f"bf16 samples differ from fp32's by {drift:.3f} of their mean size (0: no bf16)"


def test_cuda_graph_sampling_equals_eager():
    """Sampling replayed from CUDA graphs equals eager sampling from the same seed, in fp32 and in
    bf16 autocast, with the MLP and with PixelDenoiser; a second call replays the captured graphs
    with new inputs (another seed)."""
    need_cuda()
    for pixels in ({}, dict(pixel_channels=8, diffloss_d=2)):  # the MLP, and PixelDenoiser (the built-in run's)
        graph_sampling_equals_eager(perturbed(mar.mar_tiny(num_sampling_steps=10, **pixels)).to("cuda").eval())


def graph_sampling_equals_eager(model):
    torch.manual_seed(0)
    labels = torch.arange(8, device="cuda")
    captured = lambda: sum(key != "pool" for key in mar.GRAPHS.get(model.diffloss, {}))
    for amp, rtol in ((False, 1e-4), (True, 2e-2)):
        out, before = {}, captured()
        for graphs, seed in ((False, 3), (True, 3), (False, 4), (True, 4)):  # (True, 4) replays without capturing
            model.diffloss.cuda_graphs = graphs
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out[graphs, seed] = model.sample_tokens(8, 4, cfg=2.0, labels=labels, temperature=0.9,
                                                        generator=torch.Generator("cuda").manual_seed(seed))
            assert model.diffloss.cuda_graphs == graphs, "the graph capture failed and fell back to eager"
        assert captured() >= before + 2, f"bf16 {amp}: no graphs of its own were captured"  # autocast is in the key
        for seed in (3, 4):
            assert_close(out[True, seed], out[False, seed], rtol, what=f"graph vs eager, seed {seed}, bf16 {amp}")
        assert (out[True, 3] - out[True, 4]).abs().mean() > 0.1 * out[True, 3].abs().mean(), "replay ignored new inputs"


def test_cuda_precision_recall_on_the_gpu_equal_the_cpu():
    """The nearest-neighbour blocks on the GPU (TF32 off) give ADM's numbers, as on the CPU."""
    need_cuda()
    r = ref("adm_ref.pt")
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    found = {}
    try:
        for case, scaled in (("exact", ()), ("overflow", range(1000, 1400))):
            real, fake = sparse_features(1, 3000, scaled), sparse_features(2, 2500)
            radii = [fid.manifold_radii(f.cuda(), block=1000).cpu() for f in (real, fake)]
            found[case] = ([(a != r[f"{case}_radii_{n}"]).sum().item() for a, n in zip(radii, ("ref", "sample"))],
                           fid.precision_recall(real, fake, block=1000, device="cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32  # the test process goes on to other tests
    assert all(found[c] == ([0, 0], (r[f"{c}_precision"].item(), r[f"{c}_recall"].item())) for c in found), found


def test_cuda_benchmarks_run():
    """`python mar.py --bench` and `python maskgit.py --bench` run and print their figures (tiny
    presets here, on whatever device there is; the real figures come from the default presets)."""
    p = run_script(os.path.join(HERE, "mar.py"), "--bench", "--preset", "tiny", "--batch-size", "8", "--sample-batch", "4",
                   "--steps", "2", "--num-iter", "2", "--breakdown", gpu=True)
    assert "training:" in p.stdout and p.stdout.count("sampling:") == 1, p.stdout
    parts = [float(w.strip(",")) for w in p.stdout.split("of which:")[1].splitlines()[0].split() if w[0].isdigit()]
    assert len(parts) == 3 and all(v > 0 for v in parts), p.stdout  # transformer, Diffusion Loss, decoding
    p = run_script(os.path.join(HERE, "maskgit.py"), "--bench", "--preset", "tiny", "--batch-size", "8",
                   "--sample-batch", "4", "--num-iter", "2", gpu=True)
    assert "training:" in p.stdout and p.stdout.count("generation:") == 1, p.stdout


# ---------------------------------------------------------------------------------------------

def run_test(name):
    """-> (PASS, FAIL or SKIP, the line to print: with the traceback on a failure)."""
    t0 = time.time()
    try:
        globals()[name]()
        return "PASS", f"PASS {name} ({time.time() - t0:.1f}s)"
    except Skip as why:
        return "SKIP", f"SKIP {name} ({why})"
    except Exception:
        return "FAIL", f"FAIL {name} ({time.time() - t0:.1f}s)\n{traceback.format_exc()}"


def worker():
    """`python test_all.py --worker`: runs the test names read from stdin, one result line each
    (what the tests themselves print goes to stderr)."""
    results, sys.stdout = sys.stdout, sys.stderr
    torch.set_num_threads(1)
    for line in sys.stdin:
        print(RESULT + json.dumps(run_test(line.strip())), file=results, flush=True)


RESULT = "@@test_all "
# the longest tests, started first
FIRST = ("test_fid_cli_matches_torch_fidelity_on_folders", "test_train_eval_generates_and_scores_like_fid_py",
         "test_train_a_signal_during_the_final_report_stops_at_once", "test_train_maskgit_on_cached_coda_tokens")


def lane(todo, report):
    """One test process (one thread): takes names from `todo` until it is empty. A process that
    dies fails its test and is replaced."""
    proc = None
    while True:
        try:
            name = todo.get_nowait()
        except queue.Empty:
            break
        if proc is None:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=dict(os.environ, TEST_ALL_SHARED=SHARED_DIR))
        proc.stdin.write(name + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith(RESULT):
                report(*json.loads(line[len(RESULT):]))
                break
            sys.stderr.write(line)  # anything else written to the process's stdout
        else:
            report("FAIL", f"FAIL {name}: its test process exited ({proc.wait()})")
            proc = None
    if proc is not None:
        proc.stdin.close()
        proc.wait()


def main():
    mar.keep_freed_memory()  # as train.py: in the test processes, or here when the tests run in this one
    if sys.argv[1:] == ["--worker"]:
        return worker()
    pattern = sys.argv[1] if len(sys.argv) > 1 else ""
    names = [n for n, f in globals().items() if n.startswith("test_") and callable(f) and pattern in n]
    if not names:
        sys.exit(f"no test name contains {pattern!r}")  # a typo must not look like a pass
    names.sort(key=lambda n: n not in FIRST)  # stable: otherwise in the files' order
    counts, lock = {"PASS": 0, "FAIL": 0, "SKIP": 0}, threading.Lock()

    def report(status, text):
        with lock:
            counts[status] += 1
            print(text, flush=True)

    if len(names) > 1 and (os.cpu_count() or 1) >= 2:  # two test processes of one thread: both cores busy
        todo = queue.Queue()
        for n in names:
            todo.put(n)
        lanes = [threading.Thread(target=lane, args=(todo, report), daemon=True) for _ in range(2)]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
    else:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        for n in names:
            report(*run_test(n))
    passed, failed, skipped = counts["PASS"], counts["FAIL"], counts["SKIP"]
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
