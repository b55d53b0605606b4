"""The main job on a fresh machine: train each method's tiny configs on built-in shapes, sample, score.

    python scripts/quickstart.py                  # rqvae, lfq, npp: under 10 minutes on 2 CPU cores
    python scripts/quickstart.py --method rqvae   # one method (vq16 and mar run only this way)

Writes outputs/quickstart/: per method the training runs (checkpoints, metrics.jsonl, TensorBoard
files, grids), their curves (curves.png), reconstruction and sample grids, and one metrics.json for
everything; prints a summary. Samples and reconstructions are always scored by the built-in shapes
classifier (trained once, about 35 s, then cached; see docs/evaluation.md); FID needs the Inception
weights file (see README, "Pretrained weights"); without it the quickstart says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import main_cache  # noqa: E402
import main_mar  # noqa: E402
import main_stage1  # noqa: E402
import main_sampling_txt2img  # noqa: E402
import main_stage2  # noqa: E402
from common import dist  # noqa: E402
from common.captions import sample_file_name  # noqa: E402
from common.data import CaptionedShapesDataset, build_dataset, build_loader, save_image_grid  # noqa: E402
from common.curves import plot_runs  # noqa: E402
from common.errors import WeightsError, cli_entry  # noqa: E402
from common.metrics import (InceptionAccumulator, ShapesEvaluator, find_inception_weights,  # noqa: E402
                            load_inception, reconstruction_metrics)
from methods import load_prior, load_tokenizer  # noqa: E402

METHODS = ("rqvae", "lfq", "npp", "vq16", "mar")
DEFAULT = ("rqvae", "lfq", "npp")  # vq16 and mar run on request: the default takes the whole 10-minute budget
CLASSES = 10
FAST_RUN = ("dataset.num_samples=320", "experiment.epochs=1")  # --fast: a few steps of every stage
# The steps of each stage without --fast, sized so that the default methods (the shapes classifier's first training
# included) take under 10 minutes on 2 idle cores; the times per stage are in docs/evaluation.md.
# RQ-VAE: twice the steps at half the batch and twice the learning rate of its config, the same images: 73% of
# the reconstructions keep their class instead of 57%.
RQVAE_RUN = ("dataset.num_samples=3200", "experiment.epochs=3", "experiment.batch_size=16", "optimizer.init_lr=2.0e-3")
RQ_PRIOR_RUN = ("dataset.num_samples=1600", "experiment.epochs=3")
# 50 steps: text-to-image end to end; at 150 its samples were no more on-caption (10%).
T2I_RUN = ("dataset.num_samples=800", "experiment.epochs=2")
LFQ_RUN = ("dataset.num_samples=3200", "experiment.epochs=2")
NPP_RUN = ("dataset.num_samples=3200", "experiment.epochs=3")
VQ16_RUN = ("dataset.num_samples=3200", "experiment.epochs=3")
MAR_VAE_RUN = ()  # its config as it is


@dataclasses.dataclass
class Scorers:
    inception: torch.nn.Module | None  # FID / IS, where the Inception weights file is present
    shapes: ShapesEvaluator  # the built-in shapes classifier: class accuracy, Fréchet distance in its features


def find_inception(path: str | None):
    """The Inception network when its weights file is present, else None and the reason."""
    try:
        return load_inception(find_inception_weights(path)), None
    except WeightsError as error:
        return None, str(error)


def score_samples(images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, scorers: Scorers) -> dict:
    """The shapes classifier's scores of class-conditional samples; with Inception, also FID against as many
    reference shapes and the Inception Score."""
    scores = scorers.shapes.score(images, labels)
    inception = scorers.inception
    if inception is None:
        return scores
    fake, real = InceptionAccumulator(inception, "samples"), InceptionAccumulator(inception, "shapes val")
    for chunk in images.split(64):
        fake.add(chunk)
    for chunk in reference.split(64):
        real.add(chunk)
    is_mean, is_std = fake.inception_score()
    return {**scores, "fid": fake.fid(real), "is_mean": is_mean, "is_std": is_std, "num_images": len(images),
            "fid_note": f"FID-{len(images)} against as many shapes validation images (not FID-50K)"}


def shapes_val(fast: bool):
    """The validation shapes every method is scored on."""
    return build_dataset("shapes", "val", resolution=32, num_samples=40 if fast else 1000)


def train_and_score_tokenizer(config: str, name: str, out: str, env: dist.DistEnv, scorers: Scorers, fast: bool,
                              full_run: tuple[str, ...]):
    """Train a tiny tokenizer on shapes (`full_run` overrides, or a few steps with `fast`); score and draw its
    reconstructions of the validation shapes."""
    runs = os.path.join(out, "runs")
    main_stage1.main(["-m", config, "-r", runs, "--fresh", "--device", str(env.device),
                      *(FAST_RUN if fast else full_run)])
    checkpoint = os.path.join(runs, name, "last.pt")
    tokenizer, _ = load_tokenizer(checkpoint)
    tokenizer = tokenizer.to(env.device)
    val = shapes_val(fast)
    loader = build_loader(val, 100, shuffle=False, drop_last=False)
    scores = reconstruction_metrics(tokenizer, loader, env, scorers.inception, desc="reconstruction scores")
    originals = torch.cat([batch["image"] for batch in loader])
    labels = torch.cat([batch["label"] for batch in loader])
    with torch.no_grad():
        recon = torch.cat([tokenizer.reconstruct(chunk.to(env.device))[0].clamp(-1, 1).cpu()
                           for chunk in originals.split(100)])
    scores.update(scorers.shapes.score_reconstructions(recon, originals, labels))
    save_image_grid(torch.cat([originals[:16], recon[:16]]), os.path.join(out, "reconstructions.png"), nrow=16)
    return checkpoint, tokenizer, val, scores


def run_lfq(out: str, env: dist.DistEnv, scorers, fast: bool) -> dict:
    """The Open-MAGVIT2 tokenizer (lookup-free quantization, 2^10 codes) on shapes."""
    _, _, _, scores = train_and_score_tokenizer("configs/shapes/stage1/lfq.yaml", "lfq", out, env, scorers, fast,
                                                LFQ_RUN)
    return {"stage1_reconstruction": scores, "samples": {},
            "files": {"reconstructions": "reconstructions.png", "runs": "runs/"}}


def run_vq16(out: str, env: dist.DistEnv, scorers, fast: bool) -> dict:
    """LlamaGen's VQ-16 tokenizer (l2-normalised 256-code book, 8x8 codes) trained with LlamaGen's losses."""
    _, _, _, scores = train_and_score_tokenizer("configs/shapes/stage1/vq16.yaml", "vq16", out, env, scorers, fast,
                                                VQ16_RUN)
    return {"stage1_reconstruction": scores, "samples": {},
            "files": {"reconstructions": "reconstructions.png", "runs": "runs/"}}


def train_prior_and_sample(config: str, name: str, stage1: str, tokenizer, val, out: str, env: dist.DistEnv,
                           scorers, fast: bool, full_run: tuple[str, ...], knobs: dict) -> dict:
    """Train a tiny class-conditional prior on a tokenizer's tokens, then sample it (`sample_and_score`)."""
    runs = os.path.join(out, "runs")
    main_stage2.main(["-m", config, "-r", runs, "-v", stage1, "--fresh", "--device", str(env.device),
                      *(FAST_RUN if fast else full_run)])
    return sample_and_score(os.path.join(runs, name, "last.pt"), tokenizer, val, out, env, scorers, fast, knobs)


def sample_and_score(checkpoint: str, tokenizer, val, out: str, env: dist.DistEnv, scorers, fast: bool,
                     knobs: dict) -> dict:
    """Draw and score samples of every class without and with classifier-free guidance: `knobs` are the
    prior's sampling knobs, its guidance knob set to 1 and to 3."""
    prior, _, _ = load_prior(checkpoint, tokenizer)
    prior = prior.to(env.device)
    guidance = "cfg" if "cfg" in prior.SAMPLING_KNOBS else "cfg_scale"
    per_class = 2 if fast else 20
    labels = torch.arange(CLASSES, device=env.device).repeat_interleave(per_class)
    generator = torch.Generator(env.device).manual_seed(0)
    samples = {}
    for scale in (1.0, 3.0):
        tokens = torch.cat([prior.generate(chunk, generator=generator, **knobs, **{guidance: scale})
                            for chunk in labels.split(100)])
        with torch.no_grad():
            samples[scale] = tokenizer.decode_tokens(tokens).clamp(-1, 1).cpu()
        grid = samples[scale].reshape(CLASSES, per_class, 3, 32, 32)[:, :min(per_class, 10)]
        save_image_grid(grid.transpose(0, 1).reshape(-1, 3, 32, 32),
                        os.path.join(out, f"samples_cfg{scale:g}.png"), nrow=CLASSES)
    reference = torch.stack([val[i]["image"] for i in range(len(labels))])
    return {f"cfg{scale:g}": score_samples(images, labels.cpu(), reference, scorers)
            for scale, images in samples.items()}


def run_rqvae(out: str, env: dist.DistEnv, scorers, fast: bool) -> dict:
    """RQ-VAE on shapes, then the class-conditional RQ-Transformer on its codes, then samples."""
    stage1, tokenizer, val, stage1_scores = train_and_score_tokenizer("configs/shapes/stage1/rqvae.yaml", "rqvae",
                                                                      out, env, scorers, fast, RQVAE_RUN)
    sample_scores = train_prior_and_sample("configs/shapes/stage2/rqtransformer.yaml", "rqtransformer", stage1,
                                           tokenizer, val, out, env, scorers, fast, RQ_PRIOR_RUN, {"top_k": 16})
    sample_scores["txt2img"] = train_and_sample_txt2img(stage1, out, env, scorers, fast)
    return {"stage1_reconstruction": stage1_scores, "samples": sample_scores,
            "files": {"reconstructions": "reconstructions.png", "samples": ["samples_cfg1.png", "samples_cfg3.png"],
                      "txt2img": "samples_txt2img.png", "runs": "runs/"}}


def train_and_sample_txt2img(stage1: str, out: str, env: dist.DistEnv, scorers, fast: bool) -> dict:
    """The text-conditioned RQ-Transformer on captioned shapes ("a red star on a blue background, top left"),
    sampled with main_sampling_txt2img.py from the captions of the validation shapes; the shapes classifier
    checks that the image shows the shape its caption names."""
    runs = os.path.join(out, "runs")
    main_stage2.main(["-m", "configs/shapes/stage2/rqtransformer-t2i.yaml", "-r", runs, "-v", stage1, "--fresh",
                      "--device", str(env.device), *(FAST_RUN if fast else T2I_RUN)])
    val = CaptionedShapesDataset("val", resolution=32, num_samples=20 if fast else 200)
    prompts = os.path.join(out, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(val.captions) + "\n")
    result = main_sampling_txt2img.main(["-v", stage1, "-a", os.path.join(runs, "rqtransformer-t2i", "last.pt"),
                                         "--prompts", prompts, "--save-dir", os.path.join(out, "txt2img"),
                                         "--top-k", "16", "--seed", "0", "-bs", "100", "--device", str(env.device)])
    shutil.copyfile(os.path.join(result, "grid.png"), os.path.join(out, "samples_txt2img.png"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(result, "samples", sample_file_name(i)))))
                          .permute(2, 0, 1) for i in range(len(val))])
    labels = torch.arange(len(val)) % CLASSES
    # Only the accuracy: the evaluator's reference set is the uncaptioned shapes (random colours, gradients).
    return {"shapes_accuracy": scorers.shapes.score(images, labels)["shapes_accuracy"], "num_images": len(val)}


def run_npp(out: str, env: dist.DistEnv, scorers, fast: bool, lfq_out: str | None = None) -> dict:
    """Next-patch prediction: LlamaGen's GPT on the codes of the tiny Open-MAGVIT2 tokenizer (LlamaGen's VQ
    tokenizer is not trained here), 4x4 then 2x2 patches then tokens, then samples. The tokenizer is the
    one the lfq method trained in `lfq_out`, or trained here."""
    if lfq_out is None:
        stage1, tokenizer, val, _ = train_and_score_tokenizer("configs/shapes/stage1/lfq.yaml", "lfq", out, env,
                                                              scorers, fast, LFQ_RUN)
    else:
        stage1 = os.path.join(lfq_out, "runs", "lfq", "last.pt")
        tokenizer = load_tokenizer(stage1)[0].to(env.device)
        val = shapes_val(fast)
    sample_scores = train_prior_and_sample("configs/shapes/stage2/npp-gpt.yaml", "npp-gpt", stage1, tokenizer, val,
                                           out, env, scorers, fast, NPP_RUN, {"top_k": 100})
    return {"tokenizer": stage1, "samples": sample_scores,
            "files": {"samples": ["samples_cfg1.png", "samples_cfg3.png"], "runs": "runs/"}}


def run_mar(out: str, env: dist.DistEnv, scorers, fast: bool) -> dict:
    """MAR: the tiny KL VAE on shapes, its latents cached in the official layout (main_cache.py), the tiny
    MAR trained on the cache with main_mar.py, then samples (8 autoregressive steps)."""
    stage1, tokenizer, val, stage1_scores = train_and_score_tokenizer("configs/shapes/stage1/kl-vae.yaml", "kl-vae",
                                                                      out, env, scorers, fast, MAR_VAE_RUN)
    cache, run = os.path.join(out, "cache"), os.path.join(out, "runs", "mar")
    shutil.rmtree(cache, ignore_errors=True)  # the cache skips existing files: latents of an earlier VAE would stay
    main_cache.main(["--dataset", "shapes", "--num_images", "320" if fast else "2000", "--img_size", "32",
                     "--vae_path", stage1, "--vae_embed_dim", str(tokenizer.channels), "--cached_path", cache,
                     "--batch_size", "100", "--num_workers", "0", "--device", str(env.device)])
    main_mar.main(["--config", "configs/shapes/mar/mar.yaml", "--fresh", "--use_cached", "--cached_path", cache,
                   "--vae_path", stage1, "--output_dir", run, "--device", str(env.device),
                   *(["experiment.epochs=1"] if fast else [])])
    sample_scores = sample_and_score(os.path.join(run, "last.pt"), tokenizer, val, out, env, scorers, fast,
                                     {"num_iter": 8})
    return {"stage1_reconstruction": stage1_scores, "samples": sample_scores,
            "files": {"reconstructions": "reconstructions.png", "samples": ["samples_cfg1.png", "samples_cfg3.png"],
                      "cache": "cache/", "runs": "runs/"}}


def summary_lines(method: str, result: dict, seconds: float) -> list[str]:
    lines = [f"{method}: {seconds / 60:.1f} min"]
    recon = result.get("stage1_reconstruction")
    if recon:
        usage = ", ".join(f"d{d} {recon[f'usage_d{d}']:.0%}" for d in range(8) if f"usage_d{d}" in recon)
        lines.append(f"  reconstruction: PSNR {recon['psnr']:.2f} dB, SSIM {recon['ssim']:.3f}"
                     + (f", codebook usage {usage}" if usage else "")
                     + f", shapes rFD {recon['shapes_rfd']:.1f}, shapes accuracy {recon['shapes_recon_accuracy']:.0%}"
                     + (f", rFID {recon['rfid']:.2f}" if "rfid" in recon else ""))
    for name, scores in result["samples"].items():
        lines.append(f"  samples {name}: shapes accuracy {scores['shapes_accuracy']:.0%}"
                     + (f", shapes FD {scores['shapes_fd']:.1f}, precision {scores['shapes_precision']:.2f}, "
                        f"recall {scores['shapes_recall']:.2f}" if "shapes_fd" in scores else "")
                     + (f"; FID {scores['fid']:.2f} ({scores['fid_note']}), IS {scores['is_mean']:.2f} ± "
                        f"{scores['is_std']:.2f}" if "fid" in scores else ""))
    return lines


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=(*METHODS, "all"), default="all")
    parser.add_argument("--output", default="outputs/quickstart")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--inception-weights", default=None, help="weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--fast", action="store_true", help="a few steps only (smoke test)")
    args = parser.parse_args(argv)

    env = dist.setup(args.device)
    inception, missing = find_inception(args.inception_weights)
    scorers = Scorers(None if inception is None else inception.to(env.device),
                      ShapesEvaluator.load_or_train(device=env.device))
    methods = DEFAULT if args.method == "all" else (args.method,)
    results, summary = {}, []
    for method in methods:
        out = os.path.join(args.output, method)
        start = time.time()
        if method == "npp":  # on the Open-MAGVIT2 tokenizer, the one just trained when there is one
            lfq_out = os.path.join(args.output, "lfq") if "lfq" in results else None
            results[method] = run_npp(out, env, scorers, args.fast, lfq_out)
        else:
            run = {"rqvae": run_rqvae, "lfq": run_lfq, "vq16": run_vq16, "mar": run_mar}[method]
            results[method] = run(out, env, scorers, args.fast)
        runs = sorted(os.path.dirname(path) for path in glob.glob(os.path.join(out, "runs", "*", "metrics.jsonl")))
        plot_runs(runs, os.path.join(out, "curves.png"))
        results[method]["files"]["curves"] = "curves.png"
        summary += summary_lines(method, results[method], time.time() - start)
    if missing:
        results["fid_skipped"] = missing
        summary.append(f"FID and IS skipped: {missing}")
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n".join(["", "Quickstart summary", *summary, f"Everything is in {args.output}/ (metrics.json, grids, runs)"]))


if __name__ == "__main__":
    main()
