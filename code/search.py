"""Search any image folder with text queries and write an HTML contact sheet of the results.

Reads:  ``--images`` (every image directly inside the folder), ``--query TEXT`` or ``--queries FILE`` (one query per
        line), a checkpoint (``--finetune``; or ``--finetune_car`` and/or ``--finetune_people``: each query is then
        answered by the model of its category, by the text rule of stage 5), the sentencepiece model, optionally
        ``--gt`` (``text$img1$img2...`` per line) to mark hits and misses and compute each query's AP.
        ``--detect``: the images are camera frames; the stage-1 detector finds every person and vehicle, each is
        cut out and searched, and each frame is listed once, by its best-matching object (crop and box shown).
Writes: the gallery features in ``--cache_dir`` (reused on the next call while nothing changed; with ``--detect``
        also the detections and crops), and the HTML page (``--html``; thumbnails embedded, so the page can be
        moved). Prints the top k of each query with scores.

Example:
    python code/search.py --images dataset/test/test_images --query "A black Volkswagen Sedan." \\
        --model beit3_large_patch16_384 --finetune code/pt_out_car/checkpoint-best --html runs/search.html
    python code/search.py --images camera_frames/ --queries queries.txt --detect \\
        --finetune_car code/pt_out_car/checkpoint-best --finetune_people code/pt_out_people/checkpoint-best
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from traffic_retrieval import runtime
from traffic_retrieval.categories import CATEGORIES
from traffic_retrieval.checkpoint import CheckpointError
from traffic_retrieval.crops import add_detection_arguments, check_detection_arguments, detect_crops_from_args
from traffic_retrieval.detection import DetectorError
from traffic_retrieval.modeling import canonical_model_name, list_models
from traffic_retrieval.precision import PRECISIONS
from traffic_retrieval.search import (
    QueryResult,
    build_category_searcher,
    build_searcher,
    default_cache_dir,
    format_results,
    mark_hits,
    read_queries,
    read_relevance,
    route_queries,
    write_html,
    write_json_results,
)

log = logging.getLogger("search")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder of images to search")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--query", help="one query text")
    q.add_argument("--queries", help="text file, one query per line")
    p.add_argument("--model", default="beit3_large_patch16_384", type=canonical_model_name, choices=list_models(),
                   help="(default: %(default)s)")
    p.add_argument("--finetune", help="checkpoint: a .pth file or a DeepSpeed checkpoint directory")
    for c in CATEGORIES:
        p.add_argument(f"--finetune_{c}", help=f"instead of --finetune: the {c} model, which answers the queries "
                                               f"about {c} (the text rule of stage 5)")
    p.add_argument("--category", choices=("auto", *CATEGORIES), default="auto",
                   help="with --finetune_car/--finetune_people: which model answers the queries; auto: each query's "
                        "own, by the text rule of stage 5 (default: %(default)s)")
    p.add_argument("--sentencepiece_model", default="model_pth/beit3.spm", help="(default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="results per query (default: %(default)s)")
    p.add_argument("--output_dir", default=None,
                   help="folder for the page (search.html) and the cache (cache/), unless --html/--cache_dir say else")
    p.add_argument("--cache_dir", default=None,
                   help="gallery feature cache (default: <output_dir>/cache, else <images>/../.search_cache)")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--html", default=None, help="contact sheet to write (default: <output_dir>/search.html, "
                                                "else search.html)")
    p.add_argument("--json", default=None, help="also write the results as JSON (query, category, ranked names, "
                                                "paths and scores) to this file")
    p.add_argument("--title", default=None, help="page title (default: the folder and model)")
    p.add_argument("--gt", default=None, help="ground truth, text$img1$img2... per line, to mark hits and misses")
    p.add_argument("--input_size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--pad", type=int, default=None,
                   help="black pixels padded left and right of each image (default: the padding the checkpoint "
                        "was validated with, else 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--batch_size", type=int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers decoding images")
    add_detection_arguments(p)  # --detect: each frame is listed once, by its best-matching object
    runtime.add_sdpa_argument(p)
    runtime.add_fused_ffn_argument(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default suits the machine)")
    args = p.parse_args(argv)
    if args.k < 1 or args.batch_size < 1:
        p.error("--k and --batch_size must be positive")
    check_detection_arguments(p, args)
    if args.pad is not None and args.pad < 0:
        p.error("--pad must be >= 0")
    if args.query is not None:
        args.query = args.query.strip()  # as --queries files and test_text.txt lines are read
        if not args.query:
            p.error("--query is empty")
    per_category = [f"--finetune_{c}" for c in CATEGORIES if getattr(args, f"finetune_{c}")]
    choice = ("--finetune (one model for every query) or " + " and/or ".join(f"--finetune_{c}" for c in CATEGORIES)
              + " (each query to the model of its category)")
    if args.finetune is None and not per_category:
        p.error(f"pass {choice}")
    if args.finetune is not None and per_category:
        p.error(f"pass either {choice}, not both (got --finetune and {', '.join(per_category)})")
    if args.category != "auto" and args.finetune is not None:
        p.error("--category chooses between --finetune_car and --finetune_people; with --finetune one model answers "
                "every query")
    return args


def main(argv: list[str] | None = None) -> list[QueryResult]:
    args = parse_args(argv)
    runtime.setup(args.threads, args.sdpa)
    runtime.use_fused_ffn(args.fused_ffn, args.device)
    html_path = Path(args.html) if args.html else Path(args.output_dir or ".") / "search.html"
    try:
        queries = [args.query] if args.query is not None else read_queries(args.queries)
        relevance = read_relevance(args.gt) if args.gt else None
        checkpoints = {c: getattr(args, f"finetune_{c}") for c in CATEGORIES if getattr(args, f"finetune_{c}")}
        category = None if args.category == "auto" else args.category
        if checkpoints:  # a query without its model fails before any model is loaded
            asked = set(route_queries(queries, checkpoints, category))
            for c in sorted(set(checkpoints) - asked):  # its gallery would be encoded for nothing
                log.info("the %s model is not loaded: no query is about %s", c, c)
            checkpoints = {c: p for c, p in checkpoints.items() if c in asked}
        cache_dir = args.cache_dir or default_cache_dir(args.images, args.output_dir)
        crops = None
        if args.detect:  # the crops live in the cache folder, also with --no_cache (that is for the features)
            crops = detect_crops_from_args(args, cache_dir, str(runtime.resolve_device(args.device)))
        opts = dict(cache_dir=cache_dir, use_cache=not args.no_cache, input_size=args.input_size, device=args.device,
                    precision=args.precision, batch_size=args.batch_size, num_workers=args.num_workers, pad=args.pad,
                    crops=crops)
        if args.finetune is not None:
            searcher = build_searcher(args.images, args.model, args.finetune, args.sentencepiece_model, **opts)
            results = searcher.search(queries, args.k)
        else:
            searcher = build_category_searcher(args.images, args.model, checkpoints, args.sentencepiece_model,
                                               **opts)
            results = searcher.search(queries, args.k, category)
    except (FileNotFoundError, ValueError, CheckpointError, DetectorError) as e:
        raise SystemExit(f"search.py: error: {e}") from None
    if relevance is not None:
        mark_hits(results, relevance)
        unknown = sum(r.official_ap is None for r in results)
        if unknown:
            log.warning("%d of %d queries are not in the ground truth %s: no hit marks for them", unknown,
                        len(results), args.gt)
    title = args.title or f"{Path(args.images).name}: {args.model}"
    write_html(html_path, results, title, searcher.info)
    if args.json:
        write_json_results(args.json, results, searcher.info)
    print(format_results(results))
    print(f"\ncontact sheet: {html_path}")
    return results


if __name__ == "__main__":
    main()
