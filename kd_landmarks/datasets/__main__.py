"""Command line: ``python -m kd_landmarks.datasets prepare --dataset {300w,cofw,wflw,synthetic,custom} ...``.

Examples:
  python -m kd_landmarks.datasets prepare --dataset synthetic --data_dir ~/kd_data
  python -m kd_landmarks.datasets prepare --dataset 300w --manual_dir ~/downloads/300w --data_dir ~/kd_data
  python -m kd_landmarks.datasets prepare --dataset custom --manual_dir ~/my_faces --data_dir ~/my_data

`prepare` is the short form of tfds's build command, which writes the same files:
  python -m kd_landmarks.datasets.tfds_build kd_landmarks --imports kd_landmarks.datasets.builder \\
      --data_dir ~/kd_data --config '{"name": "synthetic", "num_train": 500}'
"""
from __future__ import annotations

import argparse
import sys

from kd_landmarks import errors
from kd_landmarks.datasets import builder
from kd_landmarks.datasets import info as info_lib
from kd_landmarks.datasets import readers
from kd_landmarks.datasets.builder import SYNTHETIC_DEFAULTS


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m kd_landmarks.datasets", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  prepare = commands.add_parser("prepare", help="build one dataset into --data_dir (tfds array_record)")
  prepare.add_argument("--dataset", required=True, choices=sorted(info_lib.DATASET_NAMES))
  prepare.add_argument("--data_dir", required=True, help="where the prepared dataset is written")
  prepare.add_argument("--manual_dir", default=None,
                       help="the extracted official archives (not needed for synthetic); `layout` prints it")
  prepare.add_argument("--allow_partial", action="store_true",
                       help="accept split sizes other than the official ones (a deliberate subset)")
  prepare.add_argument("--overwrite", action="store_true", help="rebuild even if data_dir already has it")
  prepare.add_argument("--num_workers", type=int, default=None, help="image decoding/cropping threads")
  prepare.add_argument("--soft_keep", type=float, default=None,
                       help="the Soft-landmarks' m~ (Section 3.1): share of the shape variance (or of the "
                            "eigenvectors) they keep (default: the dataset's, 0.9 as in the paper, 0.95 for "
                            "synthetic); config.soft_landmarks.keep")
  prepare.add_argument("--soft_keep_mode", default=None, choices=["variance", "eigenvectors"],
                       help="how --soft_keep counts (default variance; "
                            "docs/method.md, 'Soft-landmarks'); config.soft_landmarks.keep_mode")
  prepare.add_argument("--num_train", type=int, default=None, help=f"synthetic only: training faces (default {SYNTHETIC_DEFAULTS['num_train']})")
  prepare.add_argument("--num_test", type=int, default=None, help=f"synthetic only: test faces (default {SYNTHETIC_DEFAULTS['num_test']})")
  prepare.add_argument("--image_size", type=int, default=None, help=f"synthetic only: stored crop side (px) (default {SYNTHETIC_DEFAULTS['image_size']})")
  prepare.add_argument("--seed", type=int, default=None, help=f"synthetic only: rendering seed (default {SYNTHETIC_DEFAULTS['seed']})")
  commands.add_parser("layout", help="print where to download each dataset and the manual_dir layout")
  return parser


def main(argv=None) -> int:
  """The command line; a mistake the user can fix is one ``error:`` line and exit ``errors.EXIT_CODE``."""
  try:
    return _main(argv)
  except errors.UserError as error:
    return errors.report(error)


def _main(argv) -> int:
  args = _parser().parse_args(argv)
  if args.command == "layout":
    print(readers.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return 0
  synthetic_flags = {"num_train": args.num_train, "num_test": args.num_test, "image_size": args.image_size,
                     "seed": args.seed}
  synthetic_options = {key: value for key, value in synthetic_flags.items() if value is not None}
  if synthetic_options and args.dataset != "synthetic":
    raise errors.ArgumentError(f"--{' --'.join(sorted(synthetic_options))} only apply to --dataset synthetic "
                               f"(the official datasets have fixed splits and stored size {builder.STORED_CROP_SIZE})")
  soft_landmarks = {"keep": args.soft_keep, "keep_mode": args.soft_keep_mode}  # None: the dataset's default
  prepared = builder.prepare(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir,
                             allow_partial=args.allow_partial, overwrite=args.overwrite,
                             synthetic_options=synthetic_options or None, soft_landmarks=soft_landmarks,
                             num_workers=args.num_workers)
  print(f"prepared {args.dataset} in {prepared.data_path}")
  if args.dataset == info_lib.CUSTOM:
    scheme = info_lib.get_info(info_lib.CUSTOM)
    print(f"  {scheme.label}: {scheme.num_landmarks} points, flip pairs {[list(p) for p in scheme.flip_pairs]}, "
          f"NME normalised by " + ("the face box" if scheme.normalization == "box" else
                                   f"points {list(scheme.outer_eye_corners)}")
          + f"; train with --config.dataset=custom --config.data_dir={args.data_dir}")
  for name, split in prepared.info.splits.items():
    print(f"  {name}: {split.num_examples} examples")
  return 0


if __name__ == "__main__":
  sys.exit(main())
