"""Extract BEiT-3 retrieval features for your own images and texts.

Reads: an image folder (``--images``) and/or a text file with one text per line (``--texts``).
Writes: one ``.npz`` (``--out``) with ``image_names``, ``image_features``, ``texts``, ``text_features`` (float32,
L2-normalised; cosine similarity = dot product). Unreadable images, and empty or undecodable text lines, are
reported by name / line and left out; the rest is still written. Images get the official eval transform (no side
padding unless ``--pad``; ``search.py`` and ``infer.py`` default to the padding a people checkpoint was validated
with). Image features go through a cache (``--cache_dir``, shared with
``search.py``; progress saved every minute): a repeated or interrupted run encodes only new, changed or not yet
encoded images. With ``--detect`` (camera frames) there is one row per detected person or vehicle: ``image_names``
holds its frame, and ``boxes`` (x1, y1, x2, y2 in frame pixels), ``categories`` and ``det_scores`` say which object.

Example:
    python code/extract_features.py --model beit3_large_patch16_384 \
        --finetune model_pth/beit3_large_patch16_384_f30k_retrieval.pth \
        --sentencepiece_model model_pth/beit3.spm --images my_photos/ --texts queries.txt --out features.npz
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from traffic_retrieval import runtime
from traffic_retrieval.categories import CATEGORIES
from traffic_retrieval.checkpoint import CheckpointError, resolve_checkpoint_path
from traffic_retrieval.crops import add_detection_arguments, check_detection_arguments, detect_crops_from_args
from traffic_retrieval.detection import DetectorError
from traffic_retrieval.encoding import encode_texts
from traffic_retrieval.fileio import atomic_open
from traffic_retrieval.inference import FeatureSpec, load_model
from traffic_retrieval.labels import LineProblem, text_lines
from traffic_retrieval.modeling import canonical_model_name, list_models
from traffic_retrieval.precision import PRECISIONS, default_precision
from traffic_retrieval.search import default_cache_dir, encode_crops, encode_folder, folder_images
from traffic_retrieval.tokenizer import Tokenizer

log = logging.getLogger("extract_features")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=canonical_model_name, choices=list_models(),
                   help="registered model name")
    p.add_argument("--finetune", required=True, help="checkpoint (.pth, DeepSpeed file or checkpoint directory)")
    p.add_argument("--sentencepiece_model", default="model_pth/beit3.spm", help="needed with --texts")
    p.add_argument("--images", help="folder of images to encode")
    p.add_argument("--texts", help="text file, one text per line")
    p.add_argument("--input_size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--batch_size", type=int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--pad", type=int, default=0,
                   help="black pixels padded left and right of each image before resizing (default: %(default)s, the "
                        "official eval transform)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--cache_dir", default=None,
                   help="image feature cache, shared with search.py (default: <images>/../.search_cache)")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the feature cache")
    add_detection_arguments(p)  # --detect: one feature per detected object, with its frame and box
    runtime.add_sdpa_argument(p)
    runtime.add_fused_ffn_argument(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default suits the machine)")
    p.add_argument("--out", required=True, help="output .npz file")
    args = p.parse_args(argv)
    if not args.images and not args.texts:
        p.error("give --images, --texts or both")
    if args.detect and not args.images:
        p.error("--detect needs --images")
    if args.batch_size < 1 or (args.input_size is not None and args.input_size < 1):
        p.error("--batch_size and --input_size must be positive")
    if args.pad < 0:
        p.error("--pad must be >= 0")
    check_detection_arguments(p, args)
    return args


def read_text_lines(path: Path) -> tuple[list[str], list[LineProblem]]:
    """The texts of a file, one per line (split on LF only, so a U+2028 or a form feed inside a text does not split
    it), and the lines left out: blank, not UTF-8, or with a carriage return inside."""
    skipped: list[LineProblem] = []
    return [text for _, text in text_lines(path, "text file", skipped)], skipped


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runtime.setup(args.threads, args.sdpa)
    runtime.use_fused_ffn(args.fused_ffn, args.device)
    device = runtime.resolve_device(args.device)
    precision = args.precision or default_precision(device)

    # Everything that can be wrong with the input fails here, before the weights are read and the images encoded.
    texts: list[str] = []
    tokenizer = None
    try:
        if args.texts:
            texts, skipped = read_text_lines(Path(args.texts))
            for problem in skipped:
                log.warning("%s, skipped", problem)
            if not texts:
                raise ValueError(f"no usable text in {args.texts}" + (f" (first problem: {skipped[0]})" if skipped
                                                                      else " (the file is empty)"))
            tokenizer = Tokenizer(args.sentencepiece_model)
        if args.images:
            folder_images(args.images)
        ckpt = resolve_checkpoint_path(args.finetune)
        model, _ = load_model(args.model, ckpt, device, args.input_size, tokenizer.vocab_size if tokenizer else None,
                              what=f"--finetune {ckpt}")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

    out: dict[str, np.ndarray] = {}
    dim = model.cfg.embed_dim
    if args.images:
        spec = FeatureSpec.create(ckpt, args.model, model.cfg.img_size, precision, args.pad)
        opts = dict(use_cache=not args.no_cache, batch_size=args.batch_size, device=device,
                    num_workers=args.num_workers)
        if args.detect:
            cache_dir = args.cache_dir or default_cache_dir(args.images)
            try:
                crops = detect_crops_from_args(args, cache_dir, str(device))
            except DetectorError as e:
                raise SystemExit(f"error: {e}") from None
            res = encode_crops(model, crops, CATEGORIES, spec, cache_dir=cache_dir, **opts)
            objs = [crops.crops[p.name] for p in res.paths]
            out["boxes"] = np.array([o.box for o in objs], dtype=np.int64).reshape(-1, 4)
            out["categories"] = np.array([o.category for o in objs], dtype=str)
            out["det_scores"] = np.array([o.score for o in objs], dtype=np.float32)
            names = [o.frame for o in objs]
        else:
            res = encode_folder(model, args.images, spec, cache_dir=args.cache_dir, **opts)
            names = [p.name for p in res.paths]
        for p, reason in res.failed:
            log.warning("%s: not encoded (%s)", p, reason)
        out["image_names"] = np.array(names, dtype=str)
        out["image_features"] = res.features.numpy().astype(np.float32)
        log.info("encoded %d %s (%d skipped)", len(res.paths), "objects" if args.detect else "images",
                 len(res.failed))
    else:
        out["image_names"], out["image_features"] = np.array([], dtype=str), np.zeros((0, dim), np.float32)
    if tokenizer is not None:
        feats = encode_texts(model, tokenizer, texts, batch_size=args.batch_size * 4, device=device,
                             precision=precision)
        out["texts"], out["text_features"] = np.array(texts, dtype=str), feats.numpy().astype(np.float32)
        log.info("encoded %d texts (%d lines skipped)", len(texts), len(skipped))
    else:
        out["texts"], out["text_features"] = np.array([], dtype=str), np.zeros((0, dim), np.float32)

    with atomic_open(args.out, "wb") as f:
        np.savez(f, **out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
