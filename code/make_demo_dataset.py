"""Generate the synthetic traffic dataset used by the CPU demo and the tests.

Writes the challenge's raw layout (``train/``, ``test/``) plus ground truth, true boxes and ``meta.json`` under
``--out``; see ``traffic_retrieval.demo_data`` for what is drawn and the two caption styles.

Example:
    python code/make_demo_dataset.py --out dataset/demo --seed 0
"""

from __future__ import annotations

import argparse
import logging

from traffic_retrieval import runtime
from traffic_retrieval.demo_data import DEFAULT_COUNTS, DEFAULT_DIRTY_FRACTION, STYLES, generate

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="dataset/demo", help="dataset root to create (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same arguments give identical files")
    p.add_argument("--style", choices=STYLES, default="demo",
                   help="demo: learnable by a tiny model; real: mirrors the real captions (default: %(default)s)")
    p.add_argument("--n_train", type=int, default=DEFAULT_COUNTS["train"], help="train images (half vehicles)")
    p.add_argument("--n_val", type=int, default=DEFAULT_COUNTS["val"], help="val images (half vehicles)")
    p.add_argument("--n_test", type=int, default=DEFAULT_COUNTS["test"], help="test images (half vehicles)")
    p.add_argument("--min_size", type=int, default=64, help="smallest long image side in pixels")
    p.add_argument("--max_size", type=int, default=128, help="largest long image side in pixels")
    p.add_argument("--dirty_fraction", type=float, default=DEFAULT_DIRTY_FRACTION,
                   help="share of train/val images that do not match their label, for the cleaning stage")
    p.add_argument("--force", action="store_true",
                   help="replace the dataset an earlier run wrote to --out (a folder without its meta.json is never "
                        "replaced)")
    args = p.parse_args(argv)
    for name in ("n_train", "n_val", "n_test"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    if not 16 <= args.min_size <= args.max_size:
        p.error("need 16 <= --min_size <= --max_size")
    if not 0.0 <= args.dirty_fraction <= 0.5:
        p.error("--dirty_fraction must be in [0, 0.5]")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    args = parse_args(argv)
    runtime.setup(1)
    try:
        counts = generate(
            args.out, seed=args.seed, style=args.style, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
            min_size=args.min_size, max_size=args.max_size, dirty_fraction=args.dirty_fraction, force=args.force,
        )
    except (FileExistsError, ValueError) as e:
        raise SystemExit(f"make_demo_dataset: {e}") from None
    log.info("done: %s", counts)
    return counts


if __name__ == "__main__":
    main()
