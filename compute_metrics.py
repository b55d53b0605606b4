"""Score generated images against a reference: FID, Inception Score, precision/recall (stock torch-fidelity).

    python compute_metrics.py --fake SAMPLES --ref REFERENCE [--metrics fid,isc,prc] [--inception-weights FILE]
    python compute_metrics.py fake_path=SAMPLES ref_dataset=imagenet     # the official RQ-VAE form
    python compute_metrics.py --fake FOLDER --save-stats OUT.npz         # reference statistics, computed once
    python compute_metrics.py --fake SAMPLES --metrics shapes            # built-in shapes: no --ref, no Inception
    python compute_metrics.py --fake SAMPLES --metrics clip --captions SAMPLES/captions.jsonl   # text-to-image
    torchrun --nproc_per_node 8 compute_metrics.py --fake ... --ref ...  # features extracted in 8 shards

SAMPLES is a folder of images or an ADM .npz batch (arr_0 uint8 N x H x W x 3). REFERENCE is the same,
a statistics .npz (mu, sigma), or a name of REFERENCE_STATS looked up under --stats-dir. Prints one
table and writes metrics.json beside the samples (SAMPLES/metrics.json, or NAME.metrics.json beside
NAME.npz).

--metrics shapes scores 32x32 samples of the built-in shapes with the built-in shapes classifier
(trained once, cached in --cache-dir) against the shapes val split: class accuracy, Fréchet
distance, precision and recall in its feature space (not Inception FID). The intended classes come
from an .npz's `labels` (or `arr_1`) array, or from a folder's file names (`star_00012.png`,
`star/00012.png` or `7/00012.png`); without them there is no accuracy.

--metrics clip scores text-to-image samples against their captions (--captions FILE) with CLIP ViT-B/32
(--clip-weights, or torch's hub cache): the mean cosine similarity of image and caption embeddings, as the
official RQ-Transformer evaluation. Rows of FILE that name files pair by file name (the captions file
written beside the samples); captions alone pair caption i with image `i.png` / `00012.png`, or .npz row i.
It combines with the Inception metrics (--metrics fid,clip --ref ...) and needs no --ref alone.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch_fidelity
from torch.utils.data import Dataset

from common import dist
from common.errors import ConfigError, DataError, cli_entry
from common.flags import at_least
from common.metrics import (FIDStatistics, InceptionAccumulator, extract_features, find_inception_weights,
                            frechet_distance, load_inception, open_images, precision_recall)
from common.metrics.clip_score import (CLIP_FILE, CLIP_MODEL, ClipAccumulator, ClipScorer, find_clip_weights,
                                      pair_captions)
from common.metrics.fidelity import check_feature_dims, check_image_count, write_atomic
from common.metrics.inception import INCEPTION_NAME, POOL, POOL_DIM, shard
from common.metrics.reference import DEFAULT_STATS_DIR, REFERENCE_STATS, Reference, resolve_reference
from common.metrics.shapes import ShapesEvaluator, sample_labels
from common.metrics.shapes_classifier import RESOLUTION
from common.paths import CACHE_ENV, check_output_file

SHAPES, CLIP = "shapes", "clip"
METRICS = ("fid", "isc", "prc", SHAPES, CLIP)
FID_50K = 50_000
BACKEND = f"torch-fidelity {torch_fidelity.__version__} {INCEPTION_NAME}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("official", nargs="*", metavar="KEY=VALUE",
                        help="official form: fake_path=SAMPLES ref_dataset=NAME")
    parser.add_argument("--fake", help="generated images: a folder or an .npz batch (arr_0)")
    parser.add_argument("--ref", help="reference: a folder, an .npz batch, a statistics .npz, or a name: "
                                      + ", ".join(REFERENCE_STATS))
    parser.add_argument("--metrics", help="comma-separated, from " + ",".join(METRICS) + " (default fid,isc; "
                                          "none without a reference); shapes alone, without --ref: the "
                                          "built-in shapes evaluator, labels from an .npz 'labels' array or "
                                          "from file names (star_00012.png, star/ or 7/ folders)")
    parser.add_argument("--inception-weights", help="local weights-inception-2015-12-05-6726825d.pth "
                                                    "(default: torch's hub cache)")
    parser.add_argument("--captions", metavar="FILE", help="--metrics clip: the captions of the images (.jsonl "
                                                           "or .tsv rows naming files, or one caption per line)")
    parser.add_argument("--clip-weights", help=f"local CLIP ViT-B/32 weights, {CLIP_FILE} (default: torch's hub cache)")
    parser.add_argument("--clip-model", default=CLIP_MODEL, help="open_clip architecture of --clip-weights "
                                                                 f"(default {CLIP_MODEL}: OpenAI's ViT-B/32)")
    parser.add_argument("--batch-size", type=at_least(1), default=64, help="images per batch per process")
    parser.add_argument("--num-workers", type=at_least(0), default=4, help="image-decoding workers per process")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--stats-dir", default=DEFAULT_STATS_DIR, help="where named reference statistics live")
    parser.add_argument("--save-stats", metavar="OUT.npz", help="also write mu/sigma of --fake to this file")
    parser.add_argument("--cache-dir", help=f"where the shapes classifier is cached (default ${CACHE_ENV}, "
                                            "else ~/.cache/argen); trained there once when missing")
    args = parser.parse_args(argv)
    for token in args.official:
        key, _, value = token.partition("=")
        if key not in ("fake_path", "ref_dataset") or not value:
            raise ConfigError(f"{token!r}: the official form takes fake_path=SAMPLES and ref_dataset=NAME")
        setattr(args, "fake" if key == "fake_path" else "ref", value)
    if not args.fake:
        raise ConfigError("no generated images given: pass --fake SAMPLES (or fake_path=SAMPLES)")
    requested = args.metrics if args.metrics is not None else ("fid,isc" if args.ref else "")
    args.metrics = [name.strip() for name in requested.split(",") if name.strip()]
    if SHAPES in args.metrics and (len(args.metrics) > 1 or args.ref or args.save_stats):
        raise ConfigError("--metrics shapes runs alone and scores against the built-in shapes val split: drop --ref, "
                          "--save-stats and other metrics (score those in a second run)")
    if CLIP in args.metrics and not args.captions:
        raise ConfigError("--metrics clip scores each image against its caption: pass --captions FILE "
                          "(the captions file written beside the samples)")
    if args.captions and CLIP not in args.metrics:
        raise ConfigError("--captions is read by --metrics clip only; add clip to --metrics")
    if not args.ref and not args.save_stats and args.metrics not in ([SHAPES], [CLIP]):
        raise ConfigError("no reference given: pass --ref REFERENCE (or ref_dataset=NAME), "
                          "or only --save-stats OUT.npz to write the statistics of --fake")
    if set(args.metrics) - set(METRICS) or (args.ref and not args.metrics):
        raise ConfigError(f"--metrics {requested}: choose from {','.join(METRICS)}")
    if args.save_stats:
        check_output_file(args.save_stats, "--save-stats")
    return args


def needs_reference_images(metrics: list[str], reference: Reference | None) -> bool:
    """Precision/recall always, FID when the reference has no statistics."""
    return "prc" in metrics or ("fid" in metrics and reference.stats is None)


def check_metrics(metrics: list[str], fake: str, fake_images: Dataset, reference: Reference | None) -> None:
    """Refuse what cannot be scored before any feature is extracted."""
    if reference is None and {"fid", "prc"} & set(metrics):
        raise ConfigError("fid and prc compare with a reference: pass --ref REFERENCE (or ref_dataset=NAME)")
    if "prc" in metrics and reference.images is None:
        raise ConfigError("precision/recall (prc) needs reference images, and --ref holds statistics only; "
                          "pass a folder or an .npz batch as --ref, or drop prc from --metrics")
    for metric in metrics:
        check_image_count(metric, len(fake_images), fake)
        if needs_reference_images([metric], reference):
            check_image_count(metric, len(reference.images), reference.path)
    if "fid" in metrics and reference.stats is not None:
        check_feature_dims(POOL_DIM, f"{fake} (Inception pool)", reference.stats.dim, reference.path)


def metrics_json_path(fake: str) -> str:
    if os.path.isdir(fake):
        return os.path.join(fake, "metrics.json")
    return os.path.splitext(fake)[0] + ".metrics.json"


def image_size(images: Dataset, resized: int) -> str:
    width, height = images.size
    return f"{width}x{height}" + (f" ({resized} resized)" if resized else "")


def print_table(results: dict) -> None:
    rows = [("metric", "value", "images", "reference", "backend", "image size")]
    reference, images, size, backend = results["reference"], str(results["num_images"]), results["image_size"], BACKEND
    if "fid" in results:
        rows.append(("FID", f"{results['fid']:.4f}", images, reference, backend, size))
    if "is_mean" in results:
        rows.append(("IS", f"{results['is_mean']:.4f} ± {results['is_std']:.4f}", images, "-", backend, size))
    if "precision" in results:
        reference_images = results["reference_images"]
        rows.append(("precision", f"{results['precision']:.4f}", images, reference_images, backend, size))
        rows.append(("recall", f"{results['recall']:.4f}", images, reference_images, backend, size))
    if "clip_score" in results:
        rows.append(("CLIP score", f"{results['clip_score']:.4f}", str(results["clip_images"]), results["captions"],
                     f"open_clip {results['clip_model']}", size))
    for key, name in (("shapes_accuracy", "shapes accuracy"), ("shapes_fd", "shapes FD"),
                      ("shapes_precision", "shapes precision"), ("shapes_recall", "shapes recall")):
        if key in results:
            rows.append((name, f"{results[key]:.4f}", images, reference, "shapes classifier", size))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            print("-+-".join("-" * width for width in widths))


def features_of(images: Dataset, name: str, extractor, env: dist.DistEnv, args: argparse.Namespace,
                notes: list[str]) -> tuple[InceptionAccumulator, int]:
    """Inception features of one image set (sharded over ranks) and how many of its images were resized."""
    accumulator = InceptionAccumulator(extractor, name)
    resized = extract_features(images, accumulator, env, args.batch_size, args.num_workers, desc=name)
    if resized:
        width, height = images.size
        notes.append(f"{resized} of {len(images)} images in {name} were not {width}x{height} "
                     f"and were resized to it (PIL bicubic)")
    return accumulator, resized


@cli_entry
def main(argv: list[str] | None = None) -> dict | None:
    """Compute the metrics; on rank 0 print the table, write metrics.json and return the results."""
    args = parse_args(argv)
    fake = open_images(args.fake)
    if args.metrics == [SHAPES]:
        return score_shapes(args, fake)
    reference = resolve_reference(args.ref, args.stats_dir) if args.ref else None
    inception_metrics = [metric for metric in args.metrics if metric != CLIP]
    check_metrics(inception_metrics, args.fake, fake, reference)
    if args.save_stats:
        check_image_count("fid", len(fake), args.fake)
    pairs = pair_captions(args.fake, fake, args.captions) if CLIP in args.metrics else None
    clip_weights = find_clip_weights(args.clip_weights) if pairs else None
    weights = find_inception_weights(args.inception_weights) if inception_metrics or args.save_stats else None
    with dist.session(args.device) as env:
        clip = ClipScorer(clip_weights, args.clip_model, env.device) if pairs else None  # refused before any work
        notes: list[str] = []
        results, fake_stats = score_inception(args, env, fake, reference, weights, notes) if weights else ({}, None)
        if clip:
            results = {**score_clip(args, env, fake, pairs, clip, notes), **results}
        if not env.is_main:
            return None
        report(args, results, fake_stats, notes)
        return results


def score_inception(args: argparse.Namespace, env: dist.DistEnv, fake: Dataset, reference: Reference | None,
                    weights: str, notes: list[str]) -> tuple[dict, FIDStatistics | None]:
    """FID, IS and precision/recall from Inception features extracted in shards; results and statistics on rank 0."""
    extractor = load_inception(weights, env.device)
    fake_features, resized = features_of(fake, args.fake, extractor, env, args, notes)
    ref_features = None
    if needs_reference_images(args.metrics, reference):
        ref_features, _ = features_of(reference.images, reference.path, extractor, env, args, notes)
    fake_features.gather()  # collective: every rank takes part, rank 0 scores
    if ref_features is not None:
        ref_features.gather()
    fake_stats = fake_features.statistics() if "fid" in args.metrics or args.save_stats else None
    if not env.is_main:
        return {}, None
    results = score(args, env, reference, fake_features, ref_features, fake_stats, notes)
    results["image_size"] = image_size(fake, resized)
    results["backend"] = (f"{BACKEND} ({os.path.basename(weights)}); uint8 RGB in, TF1-compatible bilinear "
                          "resize to 299 inside the network")
    return results, fake_stats


def score_clip(args: argparse.Namespace, env: dist.DistEnv, fake: Dataset, pairs: tuple[Dataset, list[str], int],
               scorer: ClipScorer, notes: list[str]) -> dict:
    """The CLIP score of the image-caption pairs, each rank scoring a shard; the results on rank 0."""
    images, captions, unpaired = pairs
    accumulator = ClipAccumulator(scorer, [captions[i] for i in shard(images, env.rank, env.world_size).indices])
    resized = extract_features(images, accumulator, env, args.batch_size, args.num_workers, desc=f"CLIP {args.fake}")
    scores = accumulator.gather()  # collective
    if unpaired:
        notes.append(f"{unpaired} images in {args.fake} have no caption in {args.captions}: not in the CLIP score")
    return {"num_images": len(scores), "reference": "-", "image_size": image_size(fake, resized),
            "clip_score": float(scores.mean()), "clip_images": len(scores), "captions": args.captions,
            "clip_model": args.clip_model,
            "clip_backend": f"{scorer.description}; mean cosine similarity of image and caption embeddings"}


def score(args: argparse.Namespace, env: dist.DistEnv, reference: Reference | None,
          fake_features: InceptionAccumulator, ref_features: InceptionAccumulator | None,
          fake_stats: FIDStatistics | None, notes: list[str]) -> dict:
    """The requested metrics from gathered features (rank 0)."""
    num_images = len(fake_features.gather()[POOL])
    results = {"num_images": num_images, "reference": reference.description if reference else "-"}
    if "fid" in args.metrics:
        ref_stats = reference.stats or ref_features.statistics()
        results["fid"] = frechet_distance(fake_stats, ref_stats)
        if num_images != FID_50K:
            notes.append(f"FID over {num_images} images: report it as FID-{num_images}; only N = 50,000 is FID-50K")
    if "isc" in args.metrics:
        results["is_mean"], results["is_std"] = fake_features.inception_score()
    if "prc" in args.metrics:
        ref_pool = ref_features.gather()[POOL]
        results["precision"], results["recall"] = precision_recall(fake_features.gather()[POOL].to(env.device),
                                                                   ref_pool.to(env.device))
        results["reference_images"] = f"{reference.path} ({len(ref_pool)} images)"
    return results


class ImageCollector:
    """`extract_features`' accumulator for the shapes evaluator, which takes the images themselves:
    keeps this rank's uint8 batches until `gather`."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []

    def add(self, images: torch.Tensor) -> None:
        self.chunks.append(images)

    def gather(self, device: torch.device) -> torch.Tensor:
        """(N, 3, H, W) uint8 of all ranks, in dataset order; collective under torchrun."""
        local = torch.cat(self.chunks) if self.chunks else torch.zeros(0, 3, RESOLUTION, RESOLUTION, dtype=torch.uint8)
        return dist.all_gather_cat(local.to(device)).cpu()


def score_shapes(args: argparse.Namespace, fake: Dataset) -> dict | None:
    """--metrics shapes: every rank reads its shard of the images, rank 0 scores them with the shapes evaluator."""
    if tuple(fake.size) != (RESOLUTION, RESOLUTION):
        raise DataError(f"{args.fake}: the shapes evaluator scores {RESOLUTION}x{RESOLUTION} images, "
                        f"got {fake.size[0]}x{fake.size[1]}")
    check_image_count("prc", len(fake), args.fake)
    labels, labels_source = sample_labels(args.fake, fake)
    with dist.session(args.device) as env:
        collector = ImageCollector()
        resized = extract_features(fake, collector, env, args.batch_size, args.num_workers, desc=args.fake)
        images = collector.gather(env.device)
        if not env.is_main:
            return None
        evaluator = ShapesEvaluator.load_or_train(args.cache_dir, env.device)
        results = {"num_images": len(images), "reference": evaluator.reference, **evaluator.score(images, labels),
                   "labels": labels_source, "image_size": image_size(fake, resized), "backend": evaluator.describe()}
        notes = ["shapes FD, precision and recall are measured in the shapes classifier's features, "
                 "not Inception's: they are not FID and compare only with other shapes scores"]
        if labels is None:
            notes.append("no intended classes (an .npz 'labels' array or class names in the file names): "
                         "no shapes accuracy")
        report(args, results, None, notes)
        return results


def report(args: argparse.Namespace, results: dict, fake_stats: FIDStatistics | None, notes: list[str]) -> None:
    """Print the table and the notes; write metrics.json and the --save-stats file."""
    if args.save_stats:
        fake_stats.save(args.save_stats)
        notes.append(f"wrote the statistics of {args.fake} ({fake_stats.num_images} images) to {args.save_stats}")
    if args.metrics:
        print_table(results)
        path = metrics_json_path(args.fake)
        write_atomic(path, lambda handle: handle.write((json.dumps(results, indent=2) + "\n").encode()))
        notes.append(f"wrote {path}")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
